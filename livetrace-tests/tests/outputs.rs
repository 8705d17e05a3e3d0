//! Integration tests of the ecosystem outputs (`.pb.gz`, `.speedscope.json`, `.json`): each file
//! is read back by a real third-party reader (`go tool pprof`; speedscope's own importer; the
//! ajv JSON Schema validator against speedscope's and our published schemas) and the chain
//! fixture's split, as it measured it itself, must come out of it. `scripts/setup.sh` installs the readers.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{
    MeasuredFixture, Profile, Truth, assert_share, cpu_shared, path_arg, require_root,
    run_livetrace, start_fixture, wait_for_offcpu_fixture,
};

/// The chain fixture's hot leaves (about 6:3:1 of its CPU time; it measures the split itself).
const HOT_LEAVES: [&str; 3] = ["hot_60", "hot_30", "hot_10"];

const SLACK: Duration = Duration::from_secs(8);
const CAPTURE_SECS: u64 = 3;

/// Where scripts/setup.sh installs the npm packages (speedscope, ajv).
fn node_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME is set");
    let dir = cache.join("livetrace/node");
    assert!(
        dir.join("node_modules/speedscope/package.json").is_file()
            && dir.join("node_modules/ajv/package.json").is_file(),
        "speedscope and ajv are not installed in {}: run scripts/setup.sh (cargo xtask test does)",
        dir.display()
    );
    dir
}

fn support(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script)
}

/// Runs a command to completion, panicking with its output if it fails.
fn run_tool(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e} (run scripts/setup.sh)"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `go tool pprof ARGS FILE` with a private HOME and caches: no network, no state left behind.
fn go_pprof(args: &[&str], file: &Path, home: &Path) -> String {
    run_tool(
        Command::new("go")
            .args(["tool", "pprof"])
            .args(args)
            .arg(file)
            .env("HOME", home)
            .env("GOPATH", home.join("go"))
            .env("GOCACHE", home.join("go-cache"))
            .env("PPROF_TMPDIR", home)
            .env("GOFLAGS", "-mod=mod")
            .env("GOPROXY", "off"),
    )
}

/// The flat% column of `go tool pprof -top`, by function name.
fn pprof_flat_shares(top: &str) -> BTreeMap<String, f64> {
    // Rows: "flat flat% sum% cum cum% name", e.g. " 1727.27ms 57.97% 57.97%  1727.27ms 57.97%  hot_60".
    top.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 6 || !fields[1].ends_with('%') {
                return None;
            }
            let share = fields[1].trim_end_matches('%').parse::<f64>().ok()? / 100.0;
            Some((fields[5..].join(" "), share))
        })
        .collect()
}

/// Profiles a fresh chain fixture for CAPTURE_SECS with `extra` arguments and these outputs;
/// returns what the fixture measured of its own CPU time while it was profiled.
fn capture_chain(outputs: &[&Path], extra: &[&str]) -> Truth {
    let mut chain = MeasuredFixture::start("chain", &["15"]);
    let pid = chain.pid().to_string();
    let secs = CAPTURE_SECS.to_string();
    let mut args = vec!["profile", "-p", &pid, "-d", &secs];
    args.extend_from_slice(extra);
    for output in outputs {
        args.extend(["-o", path_arg(output)]);
    }
    let (run, truth) =
        chain.during(|| run_livetrace(&args, Duration::from_secs(CAPTURE_SECS) + SLACK));
    run.assert_success();
    truth
}

/// `go tool pprof -top` reads the .pb.gz and shows the fixture's split; the fixture's mapping
/// carries its build ID and the footer is in the comments.
#[test]
fn pprof_is_read_by_go_tool_pprof() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let pb = dir.path().join("cpu.pb.gz");
    let folded = dir.path().join("cpu.folded");
    let truth = capture_chain(&[&pb, &folded], &[]);
    let n = Profile::read(&folded).total();

    let top = go_pprof(&["-top", "-nodecount=20"], &pb, dir.path());
    let shares = pprof_flat_shares(&top);
    for leaf in HOT_LEAVES {
        let share = shares
            .get(leaf)
            .copied()
            .unwrap_or_else(|| panic!("go tool pprof -top does not list {leaf}:\n{top}"));
        assert_share(
            &format!("pprof's flat% of {leaf}"),
            share,
            n,
            truth.share(leaf),
            &top,
        );
    }
    assert!(top.contains("Type: cpu"), "not a cpu profile:\n{top}");
    assert!(top.contains("data quality:"), "no footer comment:\n{top}");

    let raw = go_pprof(&["-raw"], &pb, dir.path());
    let chain_mapping = raw
        .lines()
        .skip_while(|l| !l.starts_with("Mappings"))
        .find(|l| l.contains("/fixtures/chain "))
        .unwrap_or_else(|| panic!("no mapping for the chain fixture:\n{raw}"));
    // "ID: START/LIMIT/OFFSET PATH BUILD-ID FLAGS"
    let build_id = chain_mapping.split_whitespace().nth(3).unwrap_or("");
    assert!(
        build_id.len() == 40 && build_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "the chain mapping has no build ID: {chain_mapping}"
    );
}

/// speedscope's own importer reads the .speedscope.json, which also validates against
/// speedscope's published schema, and finds the fixture's split in sample counts.
#[test]
fn speedscope_importer_reads_the_profile() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cpu.speedscope.json");
    let truth = capture_chain(&[&file], &[]);
    let node = node_dir();

    let schema = node.join("node_modules/speedscope/dist/release/file-format-schema.json");
    run_tool(
        Command::new("node")
            .arg(support("validate-json-schema.mjs"))
            .args([&node, &schema, &file]),
    );
    let imported = run_tool(
        Command::new("node")
            .arg(support("speedscope-import.mjs"))
            .args([&node, &file]),
    );
    let profiles: Vec<serde_json::Value> = imported
        .lines()
        .map(|l| serde_json::from_str(l).expect("the importer prints JSON lines"))
        .collect();
    assert_eq!(profiles.len(), 1, "one process, one profile:\n{imported}");
    let profile = &profiles[0];
    assert_eq!(profile["name"], "chain", "{imported}");
    assert_eq!(profile["unit"], "none", "sample counts have no unit");
    let total = profile["total"].as_f64().unwrap();
    assert!(total > 0.0, "{imported}");
    for leaf in HOT_LEAVES {
        let frame = profile["frames"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == leaf)
            .unwrap_or_else(|| panic!("speedscope has no frame {leaf}:\n{imported}"));
        let share = frame["self"].as_f64().unwrap() / total;
        assert_share(
            &format!("speedscope's self share of {leaf}"),
            share,
            total as u64,
            truth.share(leaf),
            &imported,
        );
    }
}

/// The .json summary validates against docs/profile-summary.schema.json and reports the
/// fixture's truth: hot_60 first by self weight at the share the fixture measured, totals that
/// agree with the folded stacks of the same run, and why the capture stopped.
#[test]
fn json_summary_matches_its_schema_and_the_truth() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("summary.json");
    let folded = dir.path().join("cpu.folded");
    let truth = capture_chain(&[&json, &folded], &[]);

    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/profile-summary.schema.json");
    run_tool(
        Command::new("node")
            .arg(support("validate-json-schema.mjs"))
            .args([&node_dir(), &schema, &json]),
    );
    let text = fs::read_to_string(&json).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(summary["unit"], "samples");
    assert_eq!(summary["kind"], "on-cpu");
    assert_eq!(summary["stop_reason"], "the requested duration elapsed");
    let total = summary["total"].as_u64().unwrap();
    assert_eq!(
        total,
        Profile::read(&folded).total(),
        "folded and JSON disagree"
    );
    let period = summary["sample_period_nanoseconds"].as_u64().unwrap();
    assert_eq!(period, 1_000_000_000 / 99);
    assert_eq!(summary["total_nanoseconds"].as_u64(), Some(total * period));
    let top = &summary["top_self"][0];
    assert_eq!(top["name"], "hot_60", "{text}");
    assert_share(
        "hot_60's self_share",
        top["self_share"].as_f64().unwrap(),
        total,
        truth.share("hot_60"),
        &text,
    );
    let c = summary["top_total"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "c")
        .unwrap_or_else(|| panic!("c is not in top_total:\n{text}"));
    assert!(c["total_share"].as_f64().unwrap() >= 0.95, "{text}");
}

/// With --per-thread every format carries the thread, and all five formats written by one run
/// hold the same samples.
#[test]
fn per_thread_reaches_every_format_from_the_same_samples() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let [folded, pb, speedscope, json, svg] = [
        "t.folded",
        "t.pb.gz",
        "t.speedscope.json",
        "t.json",
        "t.svg",
    ]
    .map(|name| dir.path().join(name));
    capture_chain(&[&folded, &pb, &speedscope, &json, &svg], &["--per-thread"]);

    let profile = Profile::read(&folded);
    let total = profile.total();
    let thread = profile.stacks[0].frames[1].clone();
    assert!(
        thread.starts_with("chain-") && profile.stacks.iter().all(|s| s.frames[1] == thread),
        "no chain-TID thread frame under the root\n{}",
        profile.summary()
    );

    let tags = go_pprof(&["-tags"], &pb, dir.path());
    assert!(
        tags.contains("thread:") && tags.contains(&thread),
        "pprof has no thread label {thread}:\n{tags}"
    );
    let raw = go_pprof(&["-raw"], &pb, dir.path());
    let pprof_total: u64 = raw
        .lines()
        .skip_while(|l| !l.starts_with("samples/count"))
        .skip(1)
        .take_while(|l| !l.starts_with("Locations"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(pprof_total, total, "pprof and folded disagree:\n{raw}");

    let file: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&speedscope).unwrap()).unwrap();
    let profiles = file["profiles"].as_array().unwrap();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0]["name"], format!("chain / {thread}"));
    let weights: u64 = profiles[0]["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_u64().unwrap())
        .sum();
    assert_eq!(weights, total, "speedscope and folded disagree");

    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["per_thread"], true);
    assert_eq!(summary["total"].as_u64(), Some(total));
    let svg = fs::read_to_string(&svg).unwrap();
    assert!(svg.contains(&thread), "the flamegraph has no {thread}");
}

/// An -o whose extension is none of ours is a usage error (exit 2) that lists every format.
#[test]
fn unknown_extension_lists_every_format() {
    require_root();
    let run = run_livetrace(["profile", "-d", "1", "-o", "out.txt"], SLACK);
    assert_eq!(run.status.code(), Some(2), "stderr:\n{}", run.stderr);
    for ext in [".svg", ".folded", ".json", ".pb.gz", ".speedscope.json"] {
        assert!(
            run.stderr.contains(ext),
            "{ext} is not listed:\n{}",
            run.stderr
        );
    }
}

/// An off-CPU capture's pprof says what it measured (off_cpu nanoseconds), and `go tool pprof`
/// totals the same blocked time as the folded output (us there, ns here).
#[test]
fn offcpu_pprof_is_read_by_go_tool_pprof() {
    require_root();
    let _cpus = cpu_shared();
    let fixture = start_fixture("offcpu", &["20"]);
    wait_for_offcpu_fixture(fixture.pid());
    let dir = tempfile::tempdir().unwrap();
    let (pprof, folded) = (dir.path().join("x.pb.gz"), dir.path().join("x.folded"));
    let pid = fixture.pid().to_string();
    let run = run_livetrace(
        [
            "offcpu",
            "-p",
            &pid,
            "-d",
            "2",
            "--state",
            "S",
            "-o",
            path_arg(&pprof),
            "-o",
            path_arg(&folded),
        ],
        Duration::from_secs(25),
    );
    run.assert_success();
    let top = go_pprof(&["-top", "-nodecount=40"], &pprof, dir.path());
    assert!(top.contains("Type: off_cpu"), "{top}");
    // "Showing nodes accounting for 9753.17ms, 100% of 9753.17ms total" (pprof picks the unit:
    // ns, us, ms, s, mins, hrs).
    let total_s: f64 = top
        .lines()
        .find_map(|l| {
            let total = l.split(" of ").nth(1)?.strip_suffix(" total")?;
            let split = total.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
            let (number, unit) = total.split_at(split);
            let scale = match unit {
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "mins" => 60.0,
                "hrs" => 3600.0,
                _ => return None,
            };
            Some(number.parse::<f64>().ok()? * scale)
        })
        .unwrap_or_else(|| panic!("no total in:\n{top}"));
    let folded_s = Profile::read(&folded).total() as f64 / 1e6;
    assert!(
        (total_s - folded_s).abs() <= 0.01 * folded_s + 0.01,
        "pprof total {total_s} s, folded total {folded_s} s"
    );
    let cum = go_pprof(&["-top", "-cum", "-nodecount=60"], &pprof, dir.path());
    assert!(
        cum.contains("nap_loop") && cum.contains("read_forever"),
        "{cum}"
    );
}
