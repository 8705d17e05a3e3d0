//! Integration tests of `livetrace profile --unwind dwarf`: complete user stacks of code built
//! without frame pointers (a C call chain compiled with -fomit-frame-pointer, and CPython 3.12,
//! whose pyenv build has no frame pointers), and JIT code named through the perf maps that
//! CPython (`-X perf`), Node (`--perf-basic-prof`) and the JVM (`jcmd PID Compiler.perfmap`)
//! write. They run the real binary as root.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    MeasuredFixture, Process, Profile, Stack, assert_share, build_fixture, cpu_exclusive, path_arg,
    require_root, require_tool, run_folded, wait_until,
};

/// The chain fixture's hot leaves (about 6:3:1 of its CPU time; it measures the split itself).
const HOT_LEAVES: [&str; 3] = ["hot_60", "hot_30", "hot_10"];

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

/// Without frame pointers, dwarf mode gives complete main;a;b;c stacks at the shares the fixture
/// measured of itself, and frame-pointer mode, on the same process, does not: the new mode is
/// what completes them.
#[test]
fn dwarf_completes_stacks_that_frame_pointers_cannot() {
    require_root();
    let _cpus = cpu_exclusive();
    let mut chain = MeasuredFixture::start_path(&chain_without_frame_pointers(), &["12"]);
    let pid = chain.pid().to_string();

    let ((dwarf, stderr), truth) =
        chain.during(|| profile(&["-p", &pid, "-U", "--unwind", "dwarf", "-d", "4"], 4));
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
    for leaf in HOT_LEAVES {
        assert_share(
            &format!("dwarf mode: the share of {leaf}"),
            dwarf.share_with_leaf(leaf),
            dwarf.total(),
            truth.share(leaf),
            &dwarf.summary(),
        );
    }
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

/// A library loaded with dlopen() after livetrace first read the process's memory map (and
/// built without frame pointers, so only its CFI completes stacks through it): the unwinder
/// reads the map again as soon as a walk reaches it. It used to wait 500 ms between re-reads,
/// which cut short every block in the library of this 0.3 s program, and, on a cold start,
/// every stack of a program whose first stack came while ld.so was still mapping libc.
#[test]
fn dwarf_finds_a_library_loaded_after_the_first_stack() {
    require_root();
    let _cpus = cpu_exclusive();
    let library = build_fixture(
        "libplugin.so",
        &[
            "cc",
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-shared",
            "-fPIC",
            "@plugin/plugin.c",
        ],
    );
    let program = build_fixture(
        "late_plugin",
        &[
            "cc",
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "@plugin/late_plugin.c",
        ],
    );
    let (profile, run) = run_folded(
        &[
            "offcpu",
            "--unwind",
            "dwarf",
            "-d",
            "20",
            "--",
            path_arg(&program),
            path_arg(&library),
        ],
        Duration::from_secs(20) + SLACK,
    );
    let in_plugin = |stack: &Stack| stack.contains("plugin_nap");
    let complete = |stack: &Stack| {
        in_plugin(stack)
            && stack.contains_run(&["main", "call_plugin", "plugin_work", "plugin_nap"])
            && stack.user_frames().first() == Some(&"_start")
    };
    let plugin = profile.share_where(in_plugin) * profile.total() as f64;
    assert!(
        plugin >= 50_000.0,
        "the 50 naps of 2 ms in the library are missing: {plugin} us\n{}\n{}",
        profile.summary(),
        run.stderr
    );
    let complete = profile.share_where(complete) * profile.total() as f64;
    assert!(
        complete >= 0.95 * plugin,
        "only {complete} of {plugin} us blocked in the library have complete stacks\n{}\n{}",
        profile.summary(),
        run.stderr
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
    // Past start-up and into the request loop: CPython makes a function's trampoline (and its
    // perf map line) at its first call.
    wait_for_perf_map(
        python.pid(),
        &["py::serve_request", "py::parse_subtitle_track"],
    );
    let pid = python.pid().to_string();

    let (profile, stderr) = profile(&["-p", &pid, "-U", "-d", "4"], 4);
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    assert!(
        !stderr.contains("shown as the interpreter"),
        "named Python functions are counted as unnamed:\n{stderr}"
    );
    // The perf map names them: livetrace must not read the frames as well and show each twice.
    let doubled = profile.share_where(|stack| {
        stack
            .frames
            .iter()
            .filter(|f| *f == "py::parse_subtitle_track")
            .count()
            > 1
    });
    assert!(
        doubled == 0.0,
        "{doubled:.3} of samples show parse_subtitle_track twice\n{}",
        profile.summary()
    );
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
    // Past start-up and into the request loop, with the hot functions optimised.
    wait_for_perf_map(node.pid(), &["JS:*serveRequest", "JS:*parseSubtitleTrack"]);
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
    // The map lists what is compiled when jcmd asks: ask until it lists the request loop and
    // has stopped changing for a second (the JIT has settled on its final versions).
    let jcmd = require_tool("jcmd", "apt-get install default-jdk-headless");
    let catalogue_lines = || -> Vec<String> {
        let run = Command::new(&jcmd)
            .args([&pid, "Compiler.perfmap"])
            .output()
            .expect("jcmd runs");
        assert!(
            run.status.success(),
            "jcmd {pid} Compiler.perfmap failed: {}",
            String::from_utf8_lossy(&run.stdout)
        );
        let map = std::fs::read_to_string(format!("/tmp/perf-{pid}.map")).unwrap_or_default();
        map.lines()
            .filter(|l| l.contains(" Catalogue."))
            .map(str::to_owned)
            .collect()
    };
    let (mut last, mut same_since) = (Vec::new(), std::time::Instant::now());
    wait_until(
        "the JVM's perf map lists the settled request loop",
        SLACK * 4,
        || {
            let lines = catalogue_lines();
            if lines != last {
                (last, same_since) = (lines, std::time::Instant::now());
            }
            let compiled = ["Catalogue.serveRequest(", "Catalogue.parseSubtitleTrack("]
                .iter()
                .all(|m| last.iter().any(|l| l.contains(m)));
            compiled && same_since.elapsed() >= Duration::from_secs(1)
        },
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

/// Waits until `pid`'s perf map (`/tmp/perf-PID.map`) has a line for each of `names`.
fn wait_for_perf_map(pid: u32, names: &[&str]) {
    let path = format!("/tmp/perf-{pid}.map");
    wait_until(&format!("{path} names {names:?}"), SLACK * 4, || {
        let map = std::fs::read_to_string(&path).unwrap_or_default();
        names.iter().all(|name| map.contains(name))
    });
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
