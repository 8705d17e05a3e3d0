//! Integration tests of `livetrace profile --unwind dwarf`: complete user stacks of code built
//! without frame pointers (a C call chain compiled with -fomit-frame-pointer, and CPython 3.12,
//! whose pyenv build has no frame pointers), and JIT code named through the perf maps that
//! CPython (`-X perf`), Node (`--perf-basic-prof`) and the JVM (`jcmd PID Compiler.perfmap`)
//! write. They run the real binary as root.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{Process, Profile, Stack, build_fixture, cpu_exclusive, require_root, run_folded};

/// The chain fixture's hot leaves and the share of its CPU time each one burns.
const HOT_LEAVES: [(&str, f64); 3] = [("hot_60", 0.60), ("hot_30", 0.30), ("hot_10", 0.10)];

/// The chain fixture's call chain above the hot leaves.
const CHAIN: [&str; 4] = ["main", "a", "b", "c"];

/// Bound on a run's wall time beyond its capture; only reached when livetrace hangs.
const SLACK: Duration = Duration::from_secs(8);

/// The CPython these tests profile: pyenv's 3.12 (no frame pointers, has `-X perf`).
fn python() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".pyenv/versions/3.12.1/bin/python3.12")
}

/// chain.c optimised and without frame pointers (but without tail calls, so that every
/// function of the chain is a real frame, and without identical-code folding).
fn chain_without_frame_pointers() -> PathBuf {
    build_fixture(
        "chain_nofp",
        &[
            "cc",
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-fno-ipa-icf",
            "@chain.c",
        ],
    )
}

fn profile(args: &[&str], seconds: u64) -> (Profile, String) {
    let mut full = vec!["profile"];
    full.extend_from_slice(args);
    let (profile, run) = run_folded(&full, Duration::from_secs(seconds) + SLACK);
    (profile, run.stderr)
}

/// Without frame pointers, dwarf mode gives complete main;a;b;c stacks at the 6:3:1 shares, and
/// frame-pointer mode, on the same process, does not: the new mode is what completes them.
#[test]
fn dwarf_completes_stacks_that_frame_pointers_cannot() {
    require_root();
    let _cpus = cpu_exclusive();
    let mut command = Command::new(chain_without_frame_pointers());
    command.arg("12").stdin(Stdio::null()).stdout(Stdio::null());
    let chain = Process::spawn(command);
    let pid = chain.pid().to_string();

    let (dwarf, stderr) = profile(&["-p", &pid, "-U", "--unwind", "dwarf", "-d", "4"], 4);
    assert!(
        stderr.contains("unwound with DWARF CFI"),
        "the footer names the unwinding mode:\n{stderr}"
    );
    let complete = dwarf.share_where(|stack| stack.contains_run(&CHAIN));
    assert!(
        complete >= 0.95,
        "dwarf mode: only {complete:.3} of samples contain main;a;b;c\n{}\n{stderr}",
        dwarf.summary()
    );
    let hot_total: f64 = HOT_LEAVES
        .iter()
        .map(|(leaf, _)| dwarf.share_with_leaf(leaf))
        .sum();
    for (leaf, expected) in HOT_LEAVES {
        let share = dwarf.share_with_leaf(leaf) / hot_total;
        assert!(
            (share - expected).abs() <= 0.08,
            "{leaf} has {share:.3} of the hot samples, expected {expected:.2} ± 0.08\n{}",
            dwarf.summary()
        );
    }
    let rooted = dwarf.share_where(|stack: &Stack| stack.user_frames().first() == Some(&"_start"));
    assert!(
        rooted >= 0.95,
        "dwarf mode: only {rooted:.3} of stacks reach _start\n{}",
        dwarf.summary()
    );

    let (fp, _) = profile(&["-p", &pid, "-U", "--unwind", "fp", "-d", "2"], 2);
    let fp_complete = fp.share_where(|stack| stack.contains_run(&CHAIN));
    assert!(
        fp.total() > 0 && fp_complete <= 0.10,
        "frame-pointer mode was expected to lose main;a;b;c in this build, but {fp_complete:.3} \
         of its samples have it: the fixture no longer tests unwinding without frame pointers\n{}",
        fp.summary()
    );
}

/// The same chain in Rust without frame pointers: rustc links with lld, which puts the code
/// segment at a file offset one page off its address. Stacks are complete only if each mapping
/// is matched with the segment it maps (with the neighbouring segment, every CFI lookup was a
/// page off and the walk stopped or went astray after the leaf).
#[test]
fn dwarf_completes_rust_stacks_linked_by_lld() {
    require_root();
    let _cpus = cpu_exclusive();
    let program = build_fixture(
        "chain_rust",
        &[
            "rustc",
            "-O",
            "-C",
            "force-frame-pointers=no",
            "@rust/chain.rs",
        ],
    );
    let mut command = Command::new(program);
    command.arg("12").stdin(Stdio::null()).stdout(Stdio::null());
    let chain = Process::spawn(command);
    let pid = chain.pid().to_string();

    let (dwarf, stderr) = profile(&["-p", &pid, "-U", "--unwind", "dwarf", "-d", "3"], 3);
    let run = ["chain::a", "chain::b", "chain::c"];
    let complete = dwarf.share_where(|stack| {
        stack.contains_run(&run) && stack.user_frames().first() == Some(&"_start")
    });
    assert!(
        complete >= 0.95,
        "only {complete:.3} of samples have _start … chain::a;chain::b;chain::c\n{}\n{stderr}",
        dwarf.summary()
    );
    assert!(
        !stderr.contains("[unknown]") && stderr.contains("unresolved frames: none"),
        "{stderr}"
    );
}

/// CPython 3.12 with `-X perf`: the hot Python function is named (py::parse_subtitle_track,
/// under py::serve_request) and the native frames beneath run complete down to _start through
/// libpython, which has no frame pointers.
#[test]
fn python_functions_by_name_over_complete_native_stacks() {
    require_root();
    let _cpus = cpu_exclusive();
    let python_path = python();
    assert!(
        python_path.is_file(),
        "{} is missing: this test needs pyenv's CPython 3.12.1 (`pyenv install 3.12.1`); \
         CPython 3.12+ is the first with -X perf",
        python_path.display()
    );
    let mut command = Command::new(&python_path);
    command
        .args(["-X", "perf"])
        .arg(fixture_source("catalogue.py"))
        .arg("12")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let python = Process::spawn(command);
    // Past start-up (imports, building the catalogue) and into the request loop.
    thread::sleep(Duration::from_millis(1500));
    let pid = python.pid().to_string();

    let (profile, stderr) = profile(&["-p", &pid, "-U", "-d", "4"], 4);
    assert_incident_stacks(
        &profile,
        &stderr,
        |frame| frame == "py::parse_subtitle_track",
        |frame| frame == "py::serve_request",
        &["_start", "Py_RunMain"],
    );
}

/// Node with `--perf-basic-prof`: V8's JIT code is named from its perf map (`JS:*parseSubtitleTrack
/// /path/catalogue.js:26:28`), nested under serveRequest, over native frames down to _start.
#[test]
fn node_functions_by_name() {
    require_root();
    let _cpus = cpu_exclusive();
    // --perf-basic-prof also turns on V8's log, written to the working directory.
    let workdir = tempfile::tempdir().unwrap();
    let mut command = Command::new(require_tool("node", "apt-get install nodejs"));
    command
        .current_dir(workdir.path())
        .args(["--perf-basic-prof", "--no-turbo-inlining"])
        .arg(fixture_source("catalogue.js"))
        .arg("12")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let node = Process::spawn(command);
    // Past start-up and into the request loop, with the hot functions compiled.
    thread::sleep(Duration::from_millis(1500));
    let pid = node.pid().to_string();

    let (profile, stderr) = profile(&["-p", &pid, "-U", "-d", "4"], 4);
    assert_incident_stacks(
        &profile,
        &stderr,
        |frame| js_function(frame) == Some("parseSubtitleTrack"),
        |frame| js_function(frame) == Some("serveRequest"),
        &["_start", "node::Start(int, char**)"],
    );
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
}

/// A JVM with -XX:+PreserveFramePointer whose perf map `jcmd PID Compiler.perfmap` wrote: the
/// JIT-compiled Java methods are named (the JVM writes its map in a 0x-prefixed dialect), nested
/// under serveRequest, over the JVM's native frames down to the Java main thread's start.
#[test]
fn java_methods_by_name() {
    require_root();
    let _cpus = cpu_exclusive();
    let mut command = Command::new(require_tool("java", "apt-get install default-jdk-headless"));
    command
        .args([
            "-XX:+PreserveFramePointer",
            "-XX:CompileCommand=quiet",
            "-XX:CompileCommand=dontinline,Catalogue::*",
        ])
        .arg(fixture_source("Catalogue.java"))
        .arg("14")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let java = Process::spawn(command);
    let pid = java.pid().to_string();
    // The map lists what is compiled when jcmd asks: wait until the request loop is compiled
    // (a source-file launch compiles the program first).
    thread::sleep(Duration::from_secs(4));
    let jcmd = Command::new(require_tool("jcmd", "apt-get install default-jdk-headless"))
        .args([&pid, "Compiler.perfmap"])
        .output()
        .expect("jcmd runs");
    assert!(
        jcmd.status.success(),
        "jcmd {pid} Compiler.perfmap failed: {}",
        String::from_utf8_lossy(&jcmd.stdout)
    );

    let (profile, stderr) = profile(&["-p", &pid, "-U", "-d", "4"], 4);
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    assert_incident_stacks(
        &profile,
        &stderr,
        |frame| java_method(frame) == Some("Catalogue.parseSubtitleTrack"),
        |frame| java_method(frame) == Some("Catalogue.serveRequest"),
        &["clone3", "start_thread", "JavaMain"],
    );
}

/// The incident's truth, whatever the runtime: the hot function is on the large majority of
/// stacks, nested under the request handler, and the native frames beneath include `native`
/// (in that order) from the outermost frame down.
fn assert_incident_stacks(
    profile: &Profile,
    stderr: &str,
    is_hot: impl Fn(&str) -> bool,
    is_handler: impl Fn(&str) -> bool,
    native: &[&str],
) {
    let hot_share = profile.share_where(|stack| stack.user_frames().into_iter().any(&is_hot));
    assert!(
        hot_share >= 0.70,
        "the hot function is on only {hot_share:.3} of the stacks\n{}\n{stderr}",
        profile.summary()
    );
    let nested = profile.share_where(|stack| {
        let frames = stack.user_frames();
        let handler = frames.iter().position(|f| is_handler(f));
        let hot = frames.iter().position(|f| is_hot(f));
        matches!((handler, hot), (Some(h), Some(p)) if h < p)
    });
    assert!(
        nested >= 0.98 * hot_share,
        "the hot function sits under the request handler in only {nested:.3} of {hot_share:.3}\n{}",
        profile.summary()
    );
    let complete = profile.share_where(|stack| {
        let frames = stack.user_frames();
        frames.iter().any(|f| is_hot(f))
            && frames.first() == native.first()
            && native.iter().all(|n| frames.contains(n))
    });
    assert!(
        complete >= 0.95 * hot_share,
        "only {complete:.3} of {hot_share:.3} have the native frames {native:?} beneath\n{}\n{stderr}",
        profile.summary()
    );
}

/// `parseSubtitleTrack` from V8's `JS:*parseSubtitleTrack /path/file.js:26:28` (the marker after
/// `JS:` is the tier: ~ interpreted, ^ baseline, + or * optimised).
fn js_function(frame: &str) -> Option<&str> {
    let name = frame.strip_prefix("JS:")?.split(' ').next()?;
    Some(name.trim_start_matches(['~', '^', '+', '*']))
}

/// `Catalogue.parseSubtitleTrack` from the JVM's `int Catalogue.parseSubtitleTrack(byte[])`.
fn java_method(frame: &str) -> Option<&str> {
    let (before_args, _) = frame.split_once('(')?;
    before_args.rsplit(' ').next()
}

fn fixture_source(name: &str) -> String {
    format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The path of a runtime these tests need, or a failure that says how to install it.
fn require_tool(name: &str, install: &str) -> PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: this test needs it (`{install}`, or `cargo xtask setup`)")
    })
}
