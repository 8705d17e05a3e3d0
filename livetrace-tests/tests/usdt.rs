//! USDT probes: `livetrace probes` lists what a binary, a library or a process declares, checked
//! against readelf (the notes, byte for byte) and bpftrace (the probe names), on the fixture that
//! uses every argument form and on real programs: PostgreSQL 15 and Debian's Python 3.11.

mod common;

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use common::{Process, build_fixture, path_arg, require_root, require_tool, run_livetrace};
use serde_json::Value;

const SLACK: Duration = Duration::from_secs(20);
const POSTGRES: &str = "/usr/lib/postgresql/15/bin/postgres";
const PYTHON: &str = "/usr/bin/python3.11";

/// The fixture: its probes in two files, at -O2 so that GCC writes every operand form.
fn usdt_fixture() -> PathBuf {
    build_fixture(
        "usdt",
        &["cc", "-O2", "-g", "@usdt/usdt.c", "@usdt/forms.c"],
    )
}

/// `livetrace probes --json ARGS`, parsed.
fn probes_json(args: &[&str]) -> Value {
    let mut all = vec!["probes", "--json"];
    all.extend_from_slice(args);
    let run = run_livetrace(&all, SLACK);
    run.assert_success();
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

/// Each site as readelf prints it: (provider:name, location, semaphore, arguments).
fn readelf_sites(path: &str) -> BTreeSet<(String, u64, u64, String)> {
    let out = Command::new("readelf")
        .args(["-n", "--wide", path])
        .output()
        .expect("readelf runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sites = BTreeSet::new();
    let (mut provider, mut name, mut location, mut semaphore) =
        (String::new(), String::new(), 0, 0);
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap();
    for line in text.lines().map(str::trim) {
        // With --wide, the provider ends the note's header line.
        if let Some((_, p)) = line.split_once("Provider: ") {
            provider = p.trim().to_owned();
        } else if let Some(n) = line.strip_prefix("Name: ") {
            name = n.to_owned();
        } else if let Some(rest) = line.strip_prefix("Location: ") {
            let fields: Vec<&str> = rest.split(", ").collect();
            location = hex(fields[0]);
            semaphore = hex(fields[2].trim_start_matches("Semaphore: "));
        } else if let Some(args) = line.strip_prefix("Arguments: ") {
            sites.insert((
                format!("{provider}:{name}"),
                location,
                semaphore,
                args.to_owned(),
            ));
        } else if line == "Arguments:" {
            sites.insert((
                format!("{provider}:{name}"),
                location,
                semaphore,
                String::new(),
            ));
        }
    }
    sites
}

/// The same, from livetrace's JSON.
fn listed_sites(json: &Value) -> BTreeSet<(String, u64, u64, String)> {
    let mut sites = BTreeSet::new();
    for file in json.as_array().unwrap() {
        for probe in file["probes"].as_array().unwrap() {
            let name = format!(
                "{}:{}",
                probe["provider"].as_str().unwrap(),
                probe["name"].as_str().unwrap()
            );
            for site in probe["sites"].as_array().unwrap() {
                sites.insert((
                    name.clone(),
                    site["address"].as_u64().unwrap(),
                    site["semaphore"].as_u64().unwrap_or(0),
                    site["args"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    sites
}

/// Every site of every probe, with its semaphore and argument specs, as readelf reads the notes;
/// and every argument form described as it reads.
#[test]
fn lists_the_fixtures_probes_in_every_argument_form() {
    let fixture = usdt_fixture();
    let json = probes_json(&[path_arg(&fixture)]);
    assert_eq!(listed_sites(&json), readelf_sites(path_arg(&fixture)));

    let run = run_livetrace(["probes", path_arg(&fixture)], SLACK);
    run.assert_success();
    let line = |probe: &str| {
        run.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(probe))
            .unwrap_or_else(|| panic!("no {probe} in:\n{}", run.stdout))
            .to_owned()
    };
    assert!(
        line("lt:query__start").contains("semaphore, arg0: u64 in %r"),
        "{}",
        run.stdout
    );
    assert!(
        !line("lt:args_basic").contains("semaphore"),
        "{}",
        run.stdout
    );
    for (probe, parts) in [
        (
            "lt:args_basic",
            &["arg3: s32 = 7", "arg2: s32 at 8(%rdi)"][..],
        ),
        (
            "lt:args_memory",
            &[
                "arg1: s64 at global_counter",
                "arg2: s32 = -3",
                ",4)",
                "arg4: s16 in %r",
            ][..],
        ),
        ("lt:args_pointer", &["arg2: s64 at local_counter"][..]),
        ("lt:args_float", &["arg0: f64 in %r", "arg1: f32 in %r"][..]),
    ] {
        let line = line(probe);
        for part in parts {
            assert!(line.contains(part), "{probe}: no '{part}' in: {line}");
        }
    }
}

/// PostgreSQL's 57 probes (71 sites), the same as readelf's notes and bpftrace's list.
#[test]
fn lists_postgres_probes_as_bpftrace_and_readelf_do() {
    let bpftrace = require_tool("bpftrace", "apt-get install bpftrace");
    require_root();
    let json = probes_json(&[POSTGRES]);
    let listed = listed_sites(&json);
    assert_eq!(listed, readelf_sites(POSTGRES));
    let names: BTreeSet<String> = listed.iter().map(|s| s.0.clone()).collect();
    let out = Command::new(bpftrace)
        .args(["-l", &format!("usdt:{POSTGRES}:*")])
        .output()
        .expect("bpftrace runs");
    let theirs: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("usdt:{POSTGRES}:")))
        .map(str::to_owned)
        .collect();
    assert!(theirs.len() > 50, "bpftrace listed {theirs:?}");
    assert_eq!(names, theirs);

    let run = run_livetrace(["probes", POSTGRES, "postgresql:query__start"], SLACK);
    run.assert_success();
    assert!(
        run.stdout
            .contains("postgresql:query__start  semaphore, arg0: u64"),
        "{}",
        run.stdout
    );
}

/// Debian's Python 3.11 (a non-PIE executable: file offsets differ from addresses) by command
/// name, and a running fixture through -p, which lists its executable's probes.
#[test]
fn lists_python_by_name_and_a_process_by_pid() {
    let json = probes_json(&[PYTHON, "python:gc*"]);
    let sites = listed_sites(&json);
    let names: Vec<&str> = sites.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["python:gc__done", "python:gc__start"]);
    for site in json[0]["probes"][0]["sites"].as_array().unwrap() {
        assert!(site["semaphore"].is_u64(), "{site}");
        assert_ne!(site["file_offset"], site["address"], "{site}");
    }

    let fixture = usdt_fixture();
    let process = Process::spawn({
        let mut command = Command::new(&fixture);
        command.args(["100000", "0", "30"]);
        command
    });
    let pid = process.pid().to_string();
    common::wait_until("the fixture runs", SLACK, || {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == fixture)
    });
    let json = probes_json(&["-p", &pid, "lt:*"]);
    assert_eq!(json.as_array().unwrap().len(), 1, "{json:#}");
    assert_eq!(json[0]["probes"].as_array().unwrap().len(), 6, "{json:#}");
}

/// A binary without probes, a pattern that matches nothing, a script: each error says so.
#[test]
fn says_what_is_missing() {
    let run = run_livetrace(["probes", "/bin/true"], SLACK);
    run.assert_failure();
    run.assert_stderr_has("/bin/true has no USDT probes (no .note.stapsdt section)");
    let run = run_livetrace(["probes", POSTGRES, "mysql:*"], SLACK);
    run.assert_failure();
    run.assert_stderr_has("no probe matches 'mysql:*'");
    let run = run_livetrace(["probes", "/no/such/binary"], SLACK);
    run.assert_failure();
    run.assert_stderr_has("cannot find /no/such/binary");
    let run = run_livetrace(["probes"], SLACK);
    run.assert_failure();
    run.assert_stderr_has("give a binary or library");
}
