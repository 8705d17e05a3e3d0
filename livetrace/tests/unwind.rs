//! Integration tests of `livetrace profile --unwind dwarf`: complete user stacks of code built
//! without frame pointers (a C call chain compiled with -fomit-frame-pointer, and CPython 3.12,
//! whose pyenv build has no frame pointers), and Python functions named through the perf map
//! that `python -X perf` writes. They run the real binary as root.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{
    Process, Profile, Stack, build_fixture, cpu_exclusive, path_arg, require_root, run_livetrace,
};

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
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let mut full = vec!["profile"];
    full.extend_from_slice(args);
    full.extend(["-o", path_arg(&out)]);
    let run = run_livetrace(&full, Duration::from_secs(seconds) + SLACK);
    run.assert_success();
    (Profile::read(&out), run.stderr)
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
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/catalogue.py"
    );
    let mut command = Command::new(&python_path);
    command
        .args(["-X", "perf", script, "12"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let python = Process::spawn(command);
    // Past start-up (imports, building the catalogue) and into the request loop.
    thread::sleep(Duration::from_millis(1500));
    let pid = python.pid().to_string();

    let (profile, stderr) = profile(&["-p", &pid, "-U", "-d", "4"], 4);
    let hot = "py::parse_subtitle_track";
    let in_hot = |stack: &Stack| stack.contains(hot);
    let hot_share = profile.share_where(in_hot);
    assert!(
        hot_share >= 0.70,
        "{hot} is on only {hot_share:.3} of the stacks\n{}\n{stderr}",
        profile.summary()
    );
    let nested = profile.share_where(|stack| {
        let frames = stack.user_frames();
        let serve = frames.iter().position(|f| *f == "py::serve_request");
        let parse = frames.iter().position(|f| *f == hot);
        matches!((serve, parse), (Some(s), Some(p)) if s < p)
    });
    assert!(
        nested >= 0.98 * hot_share,
        "{hot} sits under py::serve_request in only {nested:.3} of {hot_share:.3}\n{}",
        profile.summary()
    );
    let complete = profile.share_where(|stack| {
        in_hot(stack)
            && stack.user_frames().first() == Some(&"_start")
            && stack.contains("Py_RunMain")
    });
    assert!(
        complete >= 0.95 * hot_share,
        "only {complete:.3} of {hot_share:.3} reach _start through Py_RunMain\n{}\n{stderr}",
        profile.summary()
    );
}
