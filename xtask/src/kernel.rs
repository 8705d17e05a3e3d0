//! `cargo xtask test-kernel`: livetrace's smoke checks on the kernels that production fleets run,
//! booted in QEMU, and on the host's own kernel.
//!
//! Each kernel is a Debian package fetched from the Debian registry (`apt-get download`) and
//! cached in `~/.cache/livetrace/kernels/`, or a vmlinuz given by path. livetrace is built as a
//! static (musl) binary and the fixtures statically; both go with busybox into an initramfs
//! whose `/init` runs the checks and powers the guest off. QEMU emulates the CPU (TCG: nested
//! KVM does not work on these machines), 2 vCPUs, under a time limit. Every output of every
//! check is printed on the serial console between markers, and the checks' truths are asserted
//! here, on the host, by the same code for a guest and for the host kernel.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    apt_install, dist::build_static_livetrace, on_path, require_root, run_command, workspace_root,
};

#[derive(clap::Args)]
pub struct Args {
    /// A kernel to check: a Debian kernel package (linux-image-6.1.0-57-cloud-amd64), its
    /// version (6.1.0-57), a vmlinuz path, or `host` (the running kernel, without QEMU).
    /// Repeatable. Default: Debian 12's 6.1 and 6.12 LTS kernels, then the host.
    #[arg(long = "kernel", value_name = "KERNEL")]
    kernels: Vec<String>,
    /// Time limit for each guest, in seconds: it is stopped then, whatever it was doing.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// The kernels checked by default: what Debian 12 runs (6.1 LTS) and its 6.12 LTS backport.
/// Pinned, so that a run is the same tomorrow; the registry keeps superseded versions for a while.
const MATRIX: [&str; 2] = [
    "linux-image-6.1.0-57-cloud-amd64",
    "linux-image-6.12.118+deb12-cloud-amd64",
];

pub fn run(args: &Args) -> anyhow::Result<()> {
    require_root("the checks load BPF programs on the host")?;
    ensure_tools()?;
    let work = std::env::temp_dir().join(format!("livetrace-kernels-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = check_all(args, &work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn check_all(args: &Args, work: &Path) -> anyhow::Result<()> {
    let livetrace = build_static_livetrace()?;
    let fixtures = build_static_fixtures(&work.join("fixtures"))?;
    let mut kernels = args.kernels.clone();
    if kernels.is_empty() {
        kernels = MATRIX.iter().map(|k| (*k).to_owned()).collect();
        kernels.push("host".into());
    }
    let mut table = Vec::new();
    for kernel in &kernels {
        eprintln!("xtask: checking {kernel}");
        let started = Instant::now();
        let outcome = if kernel == "host" {
            run_on_host(&livetrace, &fixtures, work)
        } else {
            let image = kernel_image(kernel)?;
            run_in_guest(&image, &livetrace, &fixtures, work, args.timeout)
        };
        let rows = match outcome {
            Ok(log) => judge(&log),
            Err(err) => vec![("boot".into(), Err(format!("{err:#}")))],
        };
        table.push((kernel.clone(), started.elapsed(), rows));
    }
    print_table(&table);
    let failed: Vec<String> = table
        .iter()
        .flat_map(|(kernel, _, rows)| {
            rows.iter()
                .filter(|(_, r)| r.is_err())
                .map(move |(check, _)| format!("{kernel}: {check}"))
        })
        .collect();
    if !failed.is_empty() {
        bail!("{} checks failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// QEMU, busybox and cpio, where missing.
fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
    ]
    .into_iter()
    .filter(|(tool, _)| !on_path(tool))
    .map(|(_, package)| package)
    .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(())
}

/// The fixtures the checks run, linked statically (the guest has no libc).
fn build_static_fixtures(dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let sources = workspace_root().join("tests/fixtures");
    for (name, extra) in [
        ("chain", &[][..]),
        ("offcpu", &["-pthread"][..]),
        ("latency", &["-pthread"][..]),
        ("switch", &[][..]),
    ] {
        run_command(
            Command::new("cc")
                .args([
                    "-static",
                    "-O0",
                    "-g",
                    "-fno-omit-frame-pointer",
                    "-fno-optimize-sibling-calls",
                ])
                .args(extra)
                .arg("-o")
                .arg(dir.join(name))
                .arg(sources.join(format!("{name}.c"))),
        )?;
    }
    // The USDT fixture: -O2 (every argument form), its probes in two files.
    run_command(
        Command::new("cc")
            .args(["-static", "-O2", "-g", "-o"])
            .arg(dir.join("usdt"))
            .arg(sources.join("usdt/usdt.c"))
            .arg(sources.join("usdt/forms.c")),
    )?;
    Ok(dir.to_path_buf())
}

/// The vmlinuz for a kernel argument: a path, or a Debian package fetched and cached.
fn kernel_image(kernel: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(kernel);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let package = if kernel.starts_with("linux-image-") {
        kernel.to_owned()
    } else {
        format!("linux-image-{kernel}-cloud-amd64")
    };
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?
        .join("livetrace/kernels")
        .join(&package);
    let find = |dir: &Path| -> Option<PathBuf> {
        fs::read_dir(dir.join("boot"))
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
            })
    };
    if let Some(image) = find(&cache) {
        return Ok(image);
    }
    fs::create_dir_all(&cache)?;
    eprintln!("xtask: fetching {package} from the Debian registry");
    run_command(
        Command::new("apt-get")
            .current_dir(&cache)
            .args(["download", "-q", &package]),
    )
    .with_context(|| {
        format!("cannot download {package}: `apt-cache search linux-image` lists what there is")
    })?;
    let deb = fs::read_dir(&cache)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run_command(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&cache))?;
    let _ = fs::remove_file(&deb);
    find(&cache).with_context(|| format!("{package} holds no boot/vmlinuz"))
}

/// The checks, as one shell script: each runs its commands with `$LT` (livetrace), `$FIX` (the
/// fixtures) and `$OUT` (its own output folder), and prints everything between markers.
fn script() -> String {
    let mut script = String::from(
        "set +e\nmkdir -p /tmp/out\n\
         section() { echo \"@@ $1\"; }\n",
    );
    for check in CHECKS {
        let _ = write!(
            script,
            "OUT=/tmp/out/{id}; mkdir -p $OUT\nsection 'BEGIN {id}'\n\
             ( {body} ) > $OUT/stdout 2> $OUT/stderr\nrc=$?\n\
             mv ${{TMPDIR:-/tmp}}/livetrace-verifier-*.log $OUT/ 2>/dev/null\n\
             for f in $OUT/*; do section \"FILE $(basename $f)\"; cat $f; echo; done\n\
             section \"END {id} $rc\"\n",
            id = check.id,
            body = check.body.trim(),
        );
    }
    script
}

/// One smoke check: the commands to run, and the truth its outputs are held to.
struct Check {
    /// A short name for markers and folders.
    id: &'static str,
    name: &'static str,
    body: &'static str,
    verify: fn(&Outputs) -> Result<(), String>,
}

const CHECKS: &[Check] = &[
    Check {
        id: "profile-dwarf",
        name: "profile (default: DWARF)",
        body: r#"
$FIX/chain 60 > $OUT/truth & P=$!; sleep 1
$LT profile -p $P -d 5 -o $OUT/profile.folded
kill -TERM $P; wait $P"#,
        verify: |o| verify_chain(o, "unwound with DWARF CFI"),
    },
    Check {
        id: "profile-fp",
        name: "profile --unwind fp",
        body: r#"
$FIX/chain 60 > $OUT/truth & P=$!; sleep 1
$LT profile -p $P -d 5 --unwind fp -o $OUT/profile.folded
kill -TERM $P; wait $P"#,
        verify: |o| verify_chain(o, "frame pointers, walked in the kernel"),
    },
    Check {
        id: "profile-system",
        name: "profile, whole system",
        body: r#"
$FIX/chain 60 > $OUT/truth & P=$!; sleep 1
$LT profile -d 3 -o $OUT/profile.folded
kill -TERM $P; wait $P"#,
        verify: |o| {
            let profile = o.folded("profile.folded")?;
            let share = profile.share(|s| s.contains(&["main", "a", "b", "c"]));
            check(share >= 0.2, || {
                format!("main;a;b;c in {share:.2} of samples")
            })
        },
    },
    Check {
        id: "offcpu",
        name: "offcpu (default)",
        body: r#"
$FIX/offcpu 60 & P=$!; sleep 2
$LT offcpu -p $P -d 3 --per-thread -o $OUT/offcpu.folded
kill $P"#,
        verify: |o| verify_blocked(o, false),
    },
    Check {
        id: "offcpu-dwarf",
        name: "offcpu --unwind dwarf",
        body: r#"
$FIX/offcpu 60 & P=$!; sleep 2
$LT offcpu -p $P -d 3 --per-thread --unwind dwarf -o $OUT/offcpu.folded
kill $P"#,
        verify: |o| verify_blocked(o, true),
    },
    Check {
        id: "profile-refused",
        name: "profile, copies refused",
        body: r#"
$FIX/chain 60 > $OUT/truth & P=$!; sleep 1
LIVETRACE_TEST_REFUSE_STACK_COPIES=1 $LT profile -p $P -d 5 -o $OUT/profile.folded
kill -TERM $P; wait $P"#,
        verify: |o| {
            verify_chain(o, "frame pointers, walked in the kernel")?;
            check(
                o.stderr().contains("could not be loaded on this kernel"),
                || format!("no notice of the fallback: {}", o.stderr()),
            )
        },
    },
    Check {
        id: "offcpu-refused",
        name: "offcpu, copies refused",
        body: r#"
$FIX/offcpu 60 & P=$!; sleep 2
LIVETRACE_TEST_REFUSE_STACK_COPIES=1 $LT offcpu -p $P -d 3 --per-thread --unwind dwarf -o $OUT/offcpu.folded
kill $P"#,
        verify: |o| {
            verify_blocked(o, false)?;
            check(
                o.stderr().contains("could not be loaded on this kernel")
                    && o.stderr().contains("tp_btf/sched_switch"),
                || format!("not tp_btf with frame pointers: {}", o.stderr()),
            )
        },
    },
    Check {
        id: "offcpu-no-btf",
        name: "offcpu without BTF",
        body: r#"
$FIX/offcpu 60 & P=$!; sleep 2
LIVETRACE_BTF_PATH=/nonexistent $LT offcpu -p $P -d 3 --per-thread -o $OUT/offcpu.folded
kill $P"#,
        verify: |o| {
            verify_blocked(o, false)?;
            check(o.stderr().contains("sched:sched_switch tracepoint"), || {
                format!("not the classic tracepoint: {}", o.stderr())
            })
        },
    },
    Check {
        id: "record",
        name: "record and dump",
        body: r#"
$LT record --bucket 500ms --socket /tmp/record.sock -o $OUT/final.folded -- $FIX/switch 3 5 > $OUT/switched 2> $OUT/record.err & R=$!
until grep -q switched $OUT/switched; do sleep 0.2; done
sleep 3
$LT dump --socket /tmp/record.sock --last 2s -o $OUT/last.folded
wait $R"#,
        verify: verify_record,
    },
    Check {
        id: "check",
        name: "livetrace check",
        body: r#"$LT check --json"#,
        verify: verify_host_check,
    },
    Check {
        id: "uprobe-hist",
        name: "uprobe-hist",
        body: r#"$LT uprobe-hist timed_work --json -- $FIX/latency mix"#,
        verify: verify_latency,
    },
    Check {
        id: "usdt",
        name: "uprobe-hist USDT spans --by",
        body: r#"$LT uprobe-hist --from usdt:lt:query__start --to usdt:lt:query__done --by 'str(arg0)' --json -- $FIX/usdt 50 10"#,
        verify: verify_usdt,
    },
];

/// Each check's name and outcome.
type Verdicts = Vec<(String, Result<(), String>)>;

/// One kernel's verdicts, and how long its run took.
type KernelResult = (String, Duration, Verdicts);

/// What one check printed: its standard output and error and the files it wrote, and its exit
/// status.
#[derive(Default)]
struct Outputs {
    files: BTreeMap<String, String>,
    status: Option<i32>,
}

impl Outputs {
    fn file(&self, name: &str) -> Result<&str, String> {
        self.files
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("no {name}"))
    }

    fn folded(&self, name: &str) -> Result<Folded, String> {
        Ok(Folded::parse(self.file(name)?))
    }

    fn stderr(&self) -> &str {
        self.files.get("stderr").map_or("", String::as_str)
    }
}

fn check(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(why()) }
}

/// Folded stacks, each with its weight.
struct Folded(Vec<(Vec<String>, u64)>);

impl Folded {
    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|line| {
                    let (stack, count) = line.trim_end().rsplit_once(' ')?;
                    Some((
                        stack.split(';').map(str::to_owned).collect(),
                        count.parse().ok()?,
                    ))
                })
                .collect(),
        )
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    fn share(&self, predicate: impl Fn(&Stack) -> bool) -> f64 {
        let total = self.total().max(1) as f64;
        self.0
            .iter()
            .filter(|(frames, _)| predicate(&Stack(frames)))
            .map(|(_, n)| *n as f64)
            .sum::<f64>()
            / total
    }
}

struct Stack<'a>(&'a [String]);

impl Stack<'_> {
    fn contains(&self, run: &[&str]) -> bool {
        self.0
            .windows(run.len())
            .any(|w| w.iter().zip(run).all(|(a, b)| a == b))
    }

    fn user_leaf(&self) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|f| !f.ends_with("_[k]"))
            .map(String::as_str)
    }
}

/// The chain fixture's truth (`truth cpu=... hot_60=...`) against the profile: complete
/// main;a;b;c stacks, and each hot leaf's share within four standard errors + 0.02 (the suite's
/// rule, tests/common).
fn verify_chain(o: &Outputs, mode: &str) -> Result<(), String> {
    check(o.status == Some(0), || {
        format!("exit {:?}: {}", o.status, o.stderr())
    })?;
    check(o.stderr().contains(mode), || {
        format!("the footer lacks {mode:?}: {}", o.stderr())
    })?;
    let profile = o.folded("profile.folded")?;
    let n = profile.total();
    check(n >= 60, || format!("only {n} samples"))?;
    let complete = profile.share(|s| s.contains(&["main", "a", "b", "c"]));
    check(complete >= 0.95, || {
        format!("only {complete:.3} of samples have main;a;b;c")
    })?;
    let truth: BTreeMap<String, f64> = o
        .file("truth")?
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect();
    for leaf in ["hot_60", "hot_30", "hot_10"] {
        let p = *truth
            .get(leaf)
            .ok_or_else(|| format!("no truth for {leaf}"))?;
        let share = profile.share(|s| s.user_leaf() == Some(leaf));
        let tolerance = 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 0.02;
        check((share - p).abs() <= tolerance, || {
            format!(
                "{leaf} {share:.3} of {n} samples, the fixture measured {p:.3} (± {tolerance:.3})"
            )
        })?;
    }
    Ok(())
}

/// The offcpu fixture: the napper and the reader are blocked for (nearly) the whole window,
/// under their own functions; with `dwarf`, the stacks were copied and are complete.
fn verify_blocked(o: &Outputs, dwarf: bool) -> Result<(), String> {
    check(o.status == Some(0), || {
        format!("exit {:?}: {}", o.status, o.stderr())
    })?;
    if dwarf {
        check(o.stderr().contains("unwound with DWARF CFI"), || {
            format!("not unwound with CFI: {}", o.stderr())
        })?;
    }
    let profile = o.folded("offcpu.folded")?;
    let window: f64 = o
        .stderr()
        .split("data quality: ")
        .nth(1)
        .and_then(|r| r.split(" s,").next()?.parse().ok())
        .ok_or("no window in the footer")?;
    for (thread, function) in [("napper", "nap_loop"), ("reader", "read_forever")] {
        let blocked: u64 = profile
            .0
            .iter()
            .filter(|(f, _)| {
                f.get(1)
                    .is_some_and(|t| t.starts_with(&format!("{thread}-")))
            })
            .filter(|(f, _)| Stack(f).contains(&[function]))
            .map(|(_, n)| n)
            .sum();
        let share = blocked as f64 / 1e6 / window;
        check((0.8..=1.01).contains(&share), || {
            format!("{thread} blocked {share:.3} of the window in {function}")
        })?;
    }
    Ok(())
}

/// switch 3 5 recorded: the last 2 s dumped 3 s after the switch hold only the new function
/// (swapping the count map under the programs works on this kernel), and the end wrote both.
fn verify_record(o: &Outputs) -> Result<(), String> {
    let last = o.folded("last.folded")?;
    let after = last.share(|s| s.contains(&["main", "after_switch"]));
    let before = last.share(|s| s.contains(&["main", "before_switch"]));
    check(last.total() >= 20 && after > 0.9 && before == 0.0, || {
        format!(
            "the last 2 s: {} samples, after_switch {after:.2}, before_switch {before:.2}",
            last.total()
        )
    })?;
    let all = o.folded("final.folded")?;
    let both = ["before_switch", "after_switch"]
        .iter()
        .all(|f| all.share(|s| s.contains(&["main", f])) > 0.1);
    check(both, || {
        format!(
            "the whole recording lacks a function: {} samples",
            all.total()
        )
    })
}

/// latency mix: 1000 calls, 1% of 5 ms, 9% of 500 us, the rest 50 us.
fn verify_latency(o: &Outputs) -> Result<(), String> {
    check(o.status == Some(0), || {
        format!("exit {:?}: {}", o.status, o.stderr())
    })?;
    let report: serde_json::Value =
        serde_json::from_str(o.file("stdout")?).map_err(|e| format!("not JSON: {e}"))?;
    check(report["count"] == 1000, || {
        format!("count {}", report["count"])
    })?;
    let p = |key: &str| report["percentiles_ns"][key].as_f64().unwrap_or(0.0);
    check(p("p50") >= 50_000.0 && p("p50") < 500_000.0, || {
        format!("p50 {}", p("p50"))
    })?;
    check(p("p99.9") >= 5_000_000.0, || {
        format!("p99.9 {}", p("p99.9"))
    })?;
    Ok(())
}

/// usdt 50 10: 50 spans between two semaphore-guarded probes, 5 keyed "slow" and 45 "fast".
fn verify_usdt(o: &Outputs) -> Result<(), String> {
    check(o.status == Some(0), || {
        format!("exit {:?}: {}", o.status, o.stderr())
    })?;
    let stdout = o.file("stdout")?;
    // The fixture's own line comes first.
    let json = stdout.find('{').map_or("", |at| &stdout[at..]);
    let report: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    check(report["count"] == 50, || {
        format!("count {}", report["count"])
    })?;
    let keys = &report["spans"]["by"]["keys"];
    let count = |key: &str| {
        keys.as_array()
            .into_iter()
            .flatten()
            .find(|k| k["key"] == key)
            .map(|k| k["count"].clone())
    };
    check(
        count("fast") == Some(45.into()) && count("slow") == Some(5.into()),
        || format!("keys {keys}"),
    )
}

/// `livetrace check` on a kernel where every tool passed: it must say so, with the verifier's
/// own word for both ways of walking stacks.
fn verify_host_check(o: &Outputs) -> Result<(), String> {
    check(o.status == Some(0), || {
        format!("exit {:?}: {}", o.status, o.stderr())
    })?;
    let report: serde_json::Value =
        serde_json::from_str(o.file("stdout")?).map_err(|e| format!("not JSON: {e}"))?;
    for verdict in report["subcommands"].as_array().into_iter().flatten() {
        check(verdict["status"] == "ok", || format!("says {verdict}"))?;
    }
    let item = |name: &str| {
        report["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    for name in ["verifier", "BTF", "uprobes", "version"] {
        check(item(name)["status"] == "ok", || {
            format!("{name}: {}", item(name))
        })?;
    }
    Ok(())
}

/// Splits a console log into each check's outputs and judges them./// Splits a console log into each check's outputs and judges them.
fn judge(log: &str) -> Verdicts {
    let mut results = Vec::new();
    for check in CHECKS {
        let begin = format!("@@ BEGIN {}", check.id);
        let Some(start) = log.find(&begin) else {
            results.push((check.name.to_owned(), Err("never ran".into())));
            continue;
        };
        let body = &log[start + begin.len()..];
        let end_marker = format!("@@ END {} ", check.id);
        let Some(end) = body.find(&end_marker) else {
            results.push((check.name.to_owned(), Err("did not finish".into())));
            continue;
        };
        let status = body[end + end_marker.len()..]
            .lines()
            .next()
            .and_then(|s| s.trim().parse().ok());
        let mut outputs = Outputs {
            status,
            ..Outputs::default()
        };
        for file in body[..end].split("@@ FILE ").skip(1) {
            let (name, contents) = file.split_once('\n').unwrap_or((file, ""));
            outputs
                .files
                .insert(name.trim().to_owned(), contents.replace('\r', ""));
        }
        results.push((check.name.to_owned(), (check.verify)(&outputs)));
    }
    results
}

/// Boots `image` with an initramfs of busybox, livetrace, the fixtures and the checks, and
/// returns its console log.
fn run_in_guest(
    image: &Path,
    livetrace: &Path,
    fixtures: &Path,
    work: &Path,
    timeout: u64,
) -> anyhow::Result<String> {
    let root = work.join("initramfs");
    let _ = fs::remove_dir_all(&root);
    for dir in ["bin", "proc", "sys", "dev", "tmp", "fix"] {
        fs::create_dir_all(root.join(dir))?;
    }
    let busybox = which("busybox").context("busybox is not installed")?;
    fs::copy(busybox, root.join("bin/busybox"))?;
    fs::copy(livetrace, root.join("livetrace"))?;
    for entry in fs::read_dir(fixtures)? {
        let entry = entry?;
        fs::copy(entry.path(), root.join("fix").join(entry.file_name()))?;
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         export LT=/livetrace FIX=/fix\n\
         echo \"@@ KERNEL $(uname -r)\"\n{}\necho '@@ DONE'\npoweroff -f\n",
        script()
    );
    let init_path = root.join("init");
    fs::write(&init_path, init)?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))?;
    let cpio = work.join("initramfs.cpio");
    run_command(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet > {}",
        root.display(),
        cpio.display()
    )))?;
    let log = work.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2048",
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(&cpio)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("failed to start qemu-system-x86_64")?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let status = loop {
        if let Some(status) = qemu.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned())?;
    fs::write(
        workspace_root().join("target/test-kernel-console.log"),
        &console,
    )?;
    if status.is_none() {
        bail!(
            "the guest was still running after {timeout} s (console: target/test-kernel-console.log)"
        );
    }
    if !console.contains("@@ DONE") {
        bail!(
            "the guest stopped before the checks ended (console: target/test-kernel-console.log)"
        );
    }
    Ok(console)
}

/// Runs the same checks on the host's kernel, in a scratch directory.
fn run_on_host(livetrace: &Path, fixtures: &Path, work: &Path) -> anyhow::Result<String> {
    let tmp = work.join("host");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let script = script().replace("/tmp/out", &tmp.join("out").to_string_lossy());
    let output = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("LT", livetrace)
        .env("FIX", fixtures)
        .stdin(Stdio::null())
        .output()
        .context("running the checks on the host")?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn print_table(table: &[KernelResult]) {
    println!("\n{:<42} {:<28} result", "kernel", "check");
    for (kernel, elapsed, rows) in table {
        for (i, (check, result)) in rows.iter().enumerate() {
            let kernel = if i == 0 {
                format!("{kernel} ({:.0} s)", elapsed.as_secs_f64())
            } else {
                String::new()
            };
            match result {
                Ok(()) => println!("{kernel:<42} {check:<28} pass"),
                Err(why) => println!("{kernel:<42} {check:<28} FAIL: {why}"),
            }
        }
    }
}
