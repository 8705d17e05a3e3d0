//! Faults and bad input, for every subcommand: targets that do not exist or exit mid-capture,
//! processes that live a fraction of a second, outputs that cannot be written or are planted
//! symlinks, a kernel without BTF or tracefs, maps too small for the stacks, targets in another
//! PID and mount namespace, and JIT symbol files of the wrong owner. Each failure must name the
//! culprit and the next step, and never be a panic.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Livetrace, Process, Profile, cpu_shared, fixture, path_arg, require_root, run_folded,
    run_livetrace, start_fixture, unused_pid,
};

/// Bound on a run's wall time beyond its capture: start-up, symbolisation, detaching, writing.
const SLACK: Duration = Duration::from_secs(10);

/// Panics unless a failed run exited with status 1 and did not panic.
fn assert_clean_failure(run: &common::Finished) {
    assert_eq!(run.status.code(), Some(1), "stderr:\n{}", run.stderr);
    assert!(
        !run.stderr.contains("panicked"),
        "livetrace panicked:\n{}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Targets

/// `offcpu -p` and `uprobe-hist -p` with a PID that does not exist fail at once, naming it,
/// before anything is loaded or written (profile has its own test in tests/profile.rs).
#[test]
fn nonexistent_pid_fails_fast_for_offcpu_and_uprobe_hist() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pid = unused_pid().to_string();
    let folded = dir.path().join("out.folded");
    let text = dir.path().join("out.txt");
    for args in [
        vec!["offcpu", "-p", &pid, "-d", "5", "-o", path_arg(&folded)],
        vec!["offcpu", "-t", &pid, "-d", "5", "-o", path_arg(&folded)],
        vec![
            "uprobe-hist",
            "timed_work",
            "-p",
            &pid,
            "-d",
            "5",
            "-o",
            path_arg(&text),
        ],
    ] {
        let run = run_livetrace(&args, SLACK);
        assert_clean_failure(&run);
        assert!(
            run.elapsed < Duration::from_secs(2),
            "{args:?} took {:?} to fail",
            run.elapsed
        );
        assert!(
            run.stderr.contains(&pid) && run.stderr.contains("still running"),
            "{args:?}: stderr does not name {pid}:\n{}",
            run.stderr
        );
    }
    assert!(!folded.exists() && !text.exists(), "an output was written");
}

/// An offcpu `-p` target exiting mid-capture ends it: livetrace says so, writes its outputs
/// and exits 0, long before `-d`.
#[test]
fn offcpu_target_exit_ends_the_capture_and_writes_outputs() {
    require_root();
    let _cpus = cpu_shared();
    let mut target = start_fixture("spin", &["3"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let pid = target.pid().to_string();
    let livetrace = Livetrace::start(["offcpu", "-p", &pid, "-d", "30", "-o", path_arg(&out)]);
    target
        .wait_timeout(Duration::from_secs(6))
        .expect("spin did not exit by itself");
    let run = livetrace.finish(SLACK);
    run.assert_success();
    assert!(
        run.stderr.contains("every target exited"),
        "stderr does not say that the target exited:\n{}",
        run.stderr
    );
    assert!(out.is_file(), "{} was not written", out.display());
}

/// A uprobe-hist `-p` target exiting mid-capture ends it: the histogram of the calls made until
/// then is written (text and JSON), the footer says why it stopped, and the status is 0.
#[test]
fn uprobe_hist_target_exit_ends_the_capture_and_writes_outputs() {
    require_root();
    let _cpus = cpu_shared();
    let mut target = start_fixture("latency", &["loop", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("hist.txt");
    let json = dir.path().join("hist.json");
    let pid = target.pid().to_string();
    let livetrace = Livetrace::start([
        "uprobe-hist",
        "timed_work",
        "-p",
        &pid,
        "-d",
        "30",
        "-o",
        path_arg(&text),
        "-o",
        path_arg(&json),
    ]);
    target
        .wait_timeout(Duration::from_secs(8))
        .expect("latency did not exit by itself");
    let run = livetrace.finish(SLACK);
    run.assert_success();
    assert!(
        run.stderr.contains("every target exited"),
        "stderr does not say that the target exited:\n{}",
        run.stderr
    );
    let written = fs::read_to_string(&text).expect("the text report");
    assert!(
        written.contains("every target exited") && written.contains("p99"),
        "{written}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&json).expect("the JSON report")).unwrap();
    assert!(
        report["count"].as_u64().is_some_and(|n| n > 0),
        "no calls measured: {report}"
    );
}

/// Processes that live 300 ms each, started ten times a second during a whole-system profile,
/// have their frames named: the BPF program announces each process on its first sample, and
/// livetrace reads its memory map while it lives (a once-a-second scan would miss most).
#[test]
fn short_lived_processes_are_named_in_a_whole_system_profile() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let livetrace = {
        let mut livetrace = Livetrace::start(["profile", "-d", "3", "-o", path_arg(&out)]);
        livetrace.wait_for_stderr("livetrace: profiling", Duration::from_secs(10));
        livetrace
    };
    let mut fixture = start_fixture("short_lived", &["2.5"]);
    let run = livetrace.finish(Duration::from_secs(3) + SLACK);
    run.assert_success();
    fixture.wait_timeout(Duration::from_secs(5));

    let profile = Profile::read(&out);
    let children: Vec<_> = profile
        .stacks
        .iter()
        .filter(|s| s.root() == "short_lived" && !s.user_frames().is_empty())
        .collect();
    let total: u64 = children.iter().map(|s| s.count).sum();
    let named: u64 = children
        .iter()
        .filter(|s| s.contains("short_lived_burn"))
        .map(|s| s.count)
        .sum();
    assert!(
        total >= 20,
        "too few samples of the short-lived processes ({total}) to judge:\n{}",
        profile.summary()
    );
    assert!(
        named as f64 >= 0.8 * total as f64,
        "only {named} of {total} samples of short-lived processes are named:\n{}\nstderr:\n{}",
        profile.summary(),
        run.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Outputs

/// An output that cannot be written fails offcpu and uprobe-hist before anything is captured,
/// naming the path (profile has its own test in tests/profile.rs).
#[test]
fn unwritable_output_fails_before_capturing_offcpu_and_uprobe_hist() {
    require_root();
    let target = start_fixture("latency", &["loop", "20"]);
    let pid = target.pid().to_string();
    for (args, path) in [
        (
            vec![
                "offcpu",
                "-p",
                &pid,
                "-d",
                "5",
                "-o",
                "/nonexistent-livetrace/x.svg",
            ],
            "/nonexistent-livetrace/x.svg",
        ),
        (
            vec![
                "uprobe-hist",
                "timed_work",
                "-p",
                &pid,
                "-d",
                "5",
                "-o",
                "/nonexistent-livetrace/x.txt",
            ],
            "/nonexistent-livetrace/x.txt",
        ),
        (
            vec![
                "uprobe-hist",
                "timed_work",
                "-p",
                &pid,
                "-d",
                "5",
                "-o",
                "/nonexistent-livetrace/x.json",
            ],
            "/nonexistent-livetrace/x.json",
        ),
        (
            vec![
                "uprobe-hist",
                "timed_work",
                "-p",
                &pid,
                "-d",
                "5",
                "--slow",
                "1ms",
                "-o",
                "/nonexistent-livetrace/x.svg",
            ],
            "/nonexistent-livetrace/x.svg",
        ),
    ] {
        let run = run_livetrace(&args, SLACK);
        assert_clean_failure(&run);
        assert!(
            run.elapsed < Duration::from_secs(3),
            "{args:?} took {:?}: it captured first",
            run.elapsed
        );
        assert!(
            run.stderr.contains(path) && run.stderr.contains("writable"),
            "{args:?}: stderr does not name {path}:\n{}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("livetrace: timing") && !run.stderr.contains("tracing off-CPU"),
            "{args:?} started capturing:\n{}",
            run.stderr
        );
    }
}

/// uprobe-hist's .txt and .json outputs go through the same atomic write as the stack formats:
/// a symlink planted at the output path is replaced, never written through, and no temporary
/// file is left behind.
#[test]
fn uprobe_hist_outputs_replace_planted_symlinks() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, "keep").unwrap();
    let text = dir.path().join("hist.txt");
    let json = dir.path().join("hist.json");
    symlink(&victim, &text).unwrap();
    symlink(&victim, &json).unwrap();
    let run = run_livetrace(
        [
            "uprobe-hist",
            "timed_work",
            "-o",
            path_arg(&text),
            "-o",
            path_arg(&json),
            "--",
            path_arg(&fixture("latency")),
            "mix",
        ],
        Duration::from_secs(10) + SLACK,
    );
    run.assert_success();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
    for path in [&text, &json] {
        let meta = fs::symlink_metadata(path).unwrap();
        assert!(meta.is_file(), "{} is still a symlink", path.display());
    }
    assert!(fs::read_to_string(&text).unwrap().contains("p99"));
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

// ---------------------------------------------------------------------------------------------
// The kernel lacking something

/// Without kernel BTF (simulated with LIVETRACE_BTF_PATH), `offcpu --attach tp-btf` and
/// `uprobe-hist` fail naming the BTF file and what to check; `offcpu` in auto mode falls back to
/// the classic tracepoint, and when tracefs is missing too (LIVETRACE_TRACEFS at a directory that
/// does not exist) says both and the mount command to run.
#[test]
fn missing_btf_and_tracefs_name_what_is_missing_and_what_to_run() {
    require_root();
    let target = start_fixture("latency", &["loop", "20"]);
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let no_btf = ("LIVETRACE_BTF_PATH", "/nonexistent-livetrace/vmlinux");
    let run_env = |args: &[&str], env: &[(&str, &str)]| {
        Livetrace::start_with_env(args, env).finish(Duration::from_secs(2) + SLACK)
    };

    let run = run_env(
        &[
            "offcpu",
            "-p",
            &pid,
            "-d",
            "1",
            "--attach",
            "tp-btf",
            "-o",
            path_arg(&out),
        ],
        &[no_btf],
    );
    assert_clean_failure(&run);
    assert!(
        run.stderr.contains("/nonexistent-livetrace/vmlinux")
            && run.stderr.contains("CONFIG_DEBUG_INFO_BTF"),
        "{}",
        run.stderr
    );

    let run = run_env(
        &[
            "uprobe-hist",
            "timed_work",
            "-p",
            &pid,
            "-d",
            "1",
            "-o",
            path_arg(&dir.path().join("h.txt")),
        ],
        &[no_btf],
    );
    assert_clean_failure(&run);
    assert!(
        run.stderr.contains("/nonexistent-livetrace/vmlinux")
            && run.stderr.contains("CONFIG_DEBUG_INFO_BTF"),
        "{}",
        run.stderr
    );

    let run = run_env(
        &["offcpu", "-p", &pid, "-d", "1", "-o", path_arg(&out)],
        &[
            no_btf,
            ("LIVETRACE_TRACEFS", "/nonexistent-livetrace/tracing"),
        ],
    );
    assert_clean_failure(&run);
    for needle in [
        "falling back to the classic tracepoint",
        "/nonexistent-livetrace/vmlinux",
        "mount -t tracefs nodev /nonexistent-livetrace/tracing",
    ] {
        assert!(
            run.stderr.contains(needle),
            "no {needle:?} in:\n{}",
            run.stderr
        );
    }
    assert!(!out.exists());
}

/// A tracefs without the sched_switch tracepoint (an empty `events/`): the error names the
/// tracepoint and where to list the ones the kernel has.
#[test]
fn missing_tracepoint_is_named() {
    require_root();
    let tracefs = tempfile::tempdir().unwrap();
    fs::create_dir(tracefs.path().join("events")).unwrap();
    let target = start_fixture("latency", &["loop", "20"]);
    let pid = target.pid().to_string();
    let run = Livetrace::start_with_env(
        [
            "offcpu",
            "-p",
            &pid,
            "-d",
            "1",
            "--attach",
            "tracepoint",
            "-o",
            "-",
        ],
        &[("LIVETRACE_TRACEFS", path_arg(tracefs.path()))],
    )
    .finish(Duration::from_secs(2) + SLACK);
    assert_clean_failure(&run);
    assert!(
        run.stderr
            .contains("tracepoint sched:sched_switch is missing")
            && run.stderr.contains("events/sched"),
        "{}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Maps too small

/// A fixture whose every sample has a new stack, profiled with `--stack-storage-size 64`: the
/// samples that did not fit are counted (none vanish: recorded plus losses add up), and the
/// footer names the flag that fixes it.
#[test]
fn full_stack_maps_are_counted_and_the_flag_named() {
    require_root();
    let _cpus = cpu_shared();
    let target = start_fixture("many_stacks", &["5"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let json = dir.path().join("out.json");
    let pid = target.pid().to_string();
    let run = run_livetrace(
        [
            "profile",
            "-p",
            &pid,
            "-d",
            "2",
            // Five times the default rate: hundreds of samples even on a busy machine, so 64
            // slots cannot hold their distinct stacks.
            "-F",
            "499",
            "--stack-storage-size",
            "64",
            // The kernel's stack map is what fills: frame-pointer stacks go through it (DWARF
            // stacks are aggregated in user space).
            "--unwind",
            "fp",
            "-o",
            path_arg(&out),
            "-o",
            path_arg(&json),
        ],
        Duration::from_secs(2) + SLACK,
    );
    run.assert_success();
    assert!(
        run.stderr.contains("raise --stack-storage-size (now 64)"),
        "the footer does not name the flag:\n{}",
        run.stderr
    );
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&json).unwrap()).unwrap();
    let quality = &summary["data_quality"];
    let map_full = quality["counts_map_full"].as_u64().unwrap_or(0);
    let stack_losses: u64 = quality["stack_losses"]
        .as_object()
        .map(|o| o.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0);
    assert!(
        map_full + stack_losses > 0,
        "no loss counted with 64 slots for hundreds of distinct stacks: {quality}"
    );
    let profile = Profile::read(&out);
    assert!(
        profile.stacks.len() <= 64,
        "{} stacks in a map of 64",
        profile.stacks.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Containers

/// The host PID of the first child of `parent` (unshare's forked child: the namespace's init),
/// waiting until it has exec'd `name`.
fn namespace_child(parent: u32, name: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            let comm = fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            if comm.trim() == name {
                return child.parse().unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not start in the namespace (children of {parent}: {children:?})"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `chain` as PID 1 of a new PID namespace with its own /proc, and, with `hidden`, from a
/// tmpfs mounted over a directory in a private mount namespace, so that the binary exists only
/// there. Returns the unshare process and the chain's host PID.
fn chain_in_namespace(hidden: Option<&Path>) -> (Process, u32) {
    let chain = fixture("chain");
    let mut command = Command::new("unshare");
    match hidden {
        None => {
            command
                .args(["--pid", "--fork", "--mount-proc"])
                .arg(&chain)
                .arg("15");
        }
        Some(dir) => {
            let script = format!(
                "mount -t tmpfs none '{dir}' && cp '{chain}' '{dir}/chain' && exec '{dir}/chain' 15",
                dir = dir.display(),
                chain = chain.display()
            );
            command
                .args([
                    "--mount",
                    "--propagation",
                    "private",
                    "--pid",
                    "--fork",
                    "--mount-proc",
                ])
                .args(["sh", "-c", &script]);
        }
    }
    command.stdin(Stdio::null()).stdout(Stdio::null());
    let unshare = Process::spawn(command);
    let pid = namespace_child(unshare.pid(), "chain");
    (unshare, pid)
}

/// A process in its own PID namespace is profiled by its host PID and its functions named; and
/// when its binary exists only in its private mount namespace, the symbols are still found
/// (through /proc/PID/root).
#[test]
fn profile_names_functions_of_a_process_in_other_namespaces() {
    require_root();
    let _cpus = cpu_shared();
    let hidden = tempfile::tempdir().unwrap();
    for dir in [None, Some(hidden.path())] {
        let (_unshare, pid) = chain_in_namespace(dir);
        if dir.is_some() {
            assert!(
                !hidden.path().join("chain").exists(),
                "the binary is visible outside its mount namespace"
            );
        }
        let pid = pid.to_string();
        let (profile, run) = run_folded(
            &["profile", "-p", &pid, "-d", "1.5", "-U"],
            Duration::from_secs(2) + SLACK,
        );
        for name in ["hot_60", "c"] {
            assert!(
                profile.has_frame(name),
                "{name} not named (namespace dir {dir:?}):\n{}\nstderr:\n{}",
                profile.summary(),
                run.stderr
            );
        }
    }
}

/// uprobe-hist -p of a process whose binary exists only in its private mount namespace finds
/// the binary and the function through /proc/PID/root and measures calls.
#[test]
fn uprobe_hist_finds_a_binary_only_inside_the_target_mount_namespace() {
    require_root();
    let _cpus = cpu_shared();
    let hidden = tempfile::tempdir().unwrap();
    let (_unshare, pid) = chain_in_namespace(Some(hidden.path()));
    let run = run_livetrace(
        [
            "uprobe-hist",
            "c",
            "-p",
            &pid.to_string(),
            "-d",
            "1.5",
            "--json",
        ],
        Duration::from_secs(2) + SLACK,
    );
    run.assert_success();
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\nstderr:\n{}", run.stdout, run.stderr));
    assert!(
        report["count"].as_u64().is_some_and(|n| n > 0),
        "no call of c measured: {report}\nstderr:\n{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("{}/chain", hidden.path().display())),
        "the site is not the binary inside the namespace:\n{}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// JIT symbol files

/// Starts the `jit` fixture as `uid` and returns it with the address of its JIT page.
fn start_jit(uid: u32) -> (Process, u64) {
    use std::io::BufRead as _;
    use std::os::unix::process::CommandExt as _;
    let mut command = Command::new(fixture("jit"));
    command
        .arg("12")
        .uid(uid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = command.spawn().expect("cannot start jit");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let address = u64::from_str_radix(line.trim(), 16)
        .unwrap_or_else(|_| panic!("jit printed {line:?}, not an address"));
    (Process::from_child(child), address)
}

/// A perf map, owned by `owner`, naming the page at `address` `name`.
struct PerfMap(PathBuf);

impl PerfMap {
    fn write(pid: u32, address: u64, name: &str, owner: u32) -> Self {
        let path = PathBuf::from(format!("/tmp/perf-{pid}.map"));
        fs::write(&path, format!("{address:x} 10 {name}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&path, Some(owner), Some(owner)).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().uid(), owner);
        Self(path)
    }
}

impl Drop for PerfMap {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Profiles `pid` for a second and returns the folded stacks.
fn profile_user_stacks(pid: u32) -> Profile {
    let pid = pid.to_string();
    let (profile, _) = run_folded(
        &["profile", "-p", &pid, "-d", "1", "-U"],
        Duration::from_secs(1) + SLACK,
    );
    profile
}

/// /tmp/perf-PID.map names JIT code only when the target's user or root owns it: a map owned by
/// another user is ignored (its frames stay unresolved), one owned by the target's user is used.
#[test]
fn perf_map_is_used_only_when_owned_by_the_target_user_or_root() {
    require_root();
    let _cpus = cpu_shared();
    const TARGET_UID: u32 = 64_123;
    const OTHER_UID: u32 = 64_124;
    let (jit, address) = start_jit(TARGET_UID);
    let pid = jit.pid();

    let planted = PerfMap::write(pid, address, "planted_by_someone_else", OTHER_UID);
    let profile = profile_user_stacks(pid);
    assert!(
        profile.total() > 0 && !profile.has_frame("planted_by_someone_else"),
        "a perf map of another user was trusted:\n{}",
        profile.summary()
    );
    drop(planted);

    let _own = PerfMap::write(pid, address, "jitted_spin", TARGET_UID);
    let profile = profile_user_stacks(pid);
    assert!(
        profile.share_with_leaf("jitted_spin") > 0.9,
        "the target user's own perf map was not used:\n{}",
        profile.summary()
    );
}
