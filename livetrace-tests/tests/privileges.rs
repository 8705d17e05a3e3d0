//! Least privilege, signals and exit codes, end to end. The privilege tests run livetrace as
//! `nobody` holding exactly the capabilities the README documents (ambient capabilities through
//! util-linux `setpriv`), against fixtures owned by root, i.e. by another user; and holding none,
//! to check the refusal. The binary and fixtures are copied into a world-readable temporary
//! directory, so `nobody` can run them wherever the build tree lives.

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;

const SLACK: Duration = Duration::from_secs(30);

/// A 0777 directory holding copies of livetrace and the named fixtures, for `nobody`.
struct NobodyDir {
    dir: tempfile::TempDir,
}

impl NobodyDir {
    fn new(fixtures: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("livetrace-nobody-")
            .tempdir_in("/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        fs::copy(livetrace(), dir.path().join("livetrace")).unwrap();
        for name in fixtures {
            fs::copy(fixture(name), dir.path().join(name)).unwrap();
        }
        NobodyDir { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `livetrace ARGS` as nobody with exactly `caps` (setpriv names: "bpf,perfmon"; "" for
    /// none) as its effective, permitted, inheritable, ambient and bounding sets.
    fn start(&self, caps: &str, args: &[&str]) -> Livetrace {
        let set = if caps.is_empty() {
            "-all".to_owned()
        } else {
            let plus: Vec<String> = caps.split(',').map(|c| format!("+{c}")).collect();
            format!("-all,{}", plus.join(","))
        };
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .arg(format!("--bounding-set={set}"))
            .arg("--")
            .arg(self.path("livetrace"))
            .args(args)
            .current_dir(self.dir.path());
        Livetrace::start_command(command)
    }

    fn run(&self, caps: &str, args: &[&str]) -> Finished {
        self.start(caps, args).finish(SLACK)
    }
}

fn start_root_fixture(dir: &NobodyDir, name: &str, args: &[&str]) -> Process {
    let mut command = Command::new(dir.path(name));
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    Process::spawn(command)
}

/// Without any capability, every tracing subcommand refuses at once, before loading anything,
/// naming each missing capability and the setcap line, with exit status 1 and no file written.
#[test]
fn no_capabilities_is_refused_with_the_missing_ones_named() {
    require_root();
    let dir = NobodyDir::new(&["chain"]);
    let out = dir.path("out.folded");
    let txt = dir.path("out.txt");
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["profile", "-d", "5", "-o", path_arg(&out)],
            &["CAP_BPF", "CAP_PERFMON"],
        ),
        (
            &["offcpu", "-d", "5", "-o", path_arg(&out)],
            &["CAP_BPF", "CAP_PERFMON"],
        ),
        (
            &["uprobe-hist", "a", "-d", "5", "-o", path_arg(&txt), "--"],
            &["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"],
        ),
    ];
    for (args, caps) in cases {
        let mut args = args.to_vec();
        let chain = dir.path("chain");
        if args[0] == "uprobe-hist" {
            args.push(path_arg(&chain));
        }
        let run = dir.run("", &args);
        assert_eq!(run.status.code(), Some(1), "{args:?}: {}", run.stderr);
        for cap in caps {
            assert!(
                run.stderr.contains(cap),
                "{args:?} names {cap}: {}",
                run.stderr
            );
        }
        assert!(
            run.stderr.contains("setcap cap_bpf,cap_perfmon") && run.stderr.contains("sudo "),
            "{}",
            run.stderr
        );
        assert!(
            run.elapsed < Duration::from_secs(2),
            "took {:?}",
            run.elapsed
        );
        assert!(!out.exists() && !txt.exists(), "{args:?} wrote an output");
    }
}

/// uprobe-hist with CAP_BPF and CAP_PERFMON but not CAP_SYS_ADMIN names only CAP_SYS_ADMIN and
/// what it is for (uprobes through perf_event_open).
#[test]
fn uprobe_hist_names_sys_admin_alone() {
    require_root();
    let dir = NobodyDir::new(&["latency"]);
    let latency = dir.path("latency");
    let run = dir.run(
        "bpf,perfmon",
        &["uprobe-hist", "timed_work", "--", path_arg(&latency), "mix"],
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("CAP_SYS_ADMIN"), "{}", run.stderr);
    assert!(run.stderr.contains("uprobes"), "{}", run.stderr);
    assert!(!run.stderr.contains("  CAP_BPF"), "{}", run.stderr);
}

/// profile as nobody with CAP_BPF, CAP_PERFMON and CAP_SYSLOG samples root's chain fixture
/// and names its frames, user and kernel.
#[test]
fn profile_with_documented_capabilities() {
    require_root();
    let _cpus = cpu_shared();
    let dir = NobodyDir::new(&["chain"]);
    let chain = start_root_fixture(&dir, "chain", &["20"]);
    let out = dir.path("out.folded");
    let pid = chain.pid().to_string();
    let run = dir.run(
        "bpf,perfmon,syslog",
        &["profile", "-p", &pid, "-d", "2", "-o", path_arg(&out)],
    );
    run.assert_success();
    let profile = Profile::read(&out);
    assert!(
        profile
            .stacks
            .iter()
            .any(|s| s.contains_run(&["main", "a", "b", "c", "hot_60"])),
        "{}",
        profile.summary()
    );
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

/// offcpu (tp_btf) as nobody with the documented capabilities measures root's fixture; the
/// recovery of threads blocked before the start, which needs more, only warns.
#[test]
fn offcpu_with_documented_capabilities() {
    require_root();
    let _cpus = cpu_shared();
    let dir = NobodyDir::new(&["offcpu"]);
    let fixture = start_root_fixture(&dir, "offcpu", &["20"]);
    wait_for_offcpu_fixture(fixture.pid());
    let out = dir.path("out.folded");
    let pid = fixture.pid().to_string();
    let run = dir.run(
        "bpf,perfmon,syslog",
        &[
            "offcpu",
            "-p",
            &pid,
            "-d",
            "2",
            "--per-thread",
            "-o",
            path_arg(&out),
        ],
    );
    run.assert_success();
    let profile = Profile::read(&out);
    assert!(profile.has_frame("nap_loop"), "{}", profile.summary());
    run.assert_stderr_has("warning: without CAP_SYS_ADMIN");
    run.assert_stderr_has("warning: without CAP_SYS_PTRACE");
}

/// Mounts tracefs if nobody has (as root, which the tests are).
fn ensure_tracefs() {
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        let status = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .unwrap();
        assert!(status.success(), "cannot mount tracefs");
    }
}

/// offcpu --attach tracepoint needs CAP_DAC_READ_SEARCH besides (tracefs is root's, 0700):
/// refused without it and naming it, working with it.
#[test]
fn offcpu_tracepoint_needs_dac_read_search() {
    require_root();
    let _cpus = cpu_shared();
    ensure_tracefs();
    let dir = NobodyDir::new(&["offcpu"]);
    let fixture = start_root_fixture(&dir, "offcpu", &["20"]);
    let out = dir.path("out.folded");
    let pid = fixture.pid().to_string();
    let args = [
        "offcpu",
        "-p",
        &pid,
        "-d",
        "2",
        "--attach",
        "tracepoint",
        "-o",
        path_arg(&out),
    ];
    let refused = dir.run("bpf,perfmon,syslog", &args);
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("CAP_DAC_READ_SEARCH"),
        "{}",
        refused.stderr
    );
    let run = dir.run("bpf,perfmon,syslog,dac_read_search", &args);
    run.assert_success();
    let profile = Profile::read(&out);
    assert!(profile.has_frame("nap_loop"), "{}", profile.summary());
}

/// uprobe-hist as nobody with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN times its own command
/// exactly; another user's -p needs CAP_SYS_PTRACE too, and says so.
#[test]
fn uprobe_hist_with_documented_capabilities() {
    require_root();
    let _cpus = cpu_shared();
    let dir = NobodyDir::new(&["latency"]);
    let latency = dir.path("latency");
    let run = dir.run(
        "bpf,perfmon,sys_admin",
        &[
            "uprobe-hist",
            "timed_work",
            "--json",
            "--",
            path_arg(&latency),
            "mix",
        ],
    );
    run.assert_success();
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["count"], 1000, "{report}");

    let fixture = start_root_fixture(&dir, "latency", &["loop", "20"]);
    let pid = fixture.pid().to_string();
    let args = ["uprobe-hist", "timed_work", "-p", &pid, "-d", "1", "--json"];
    let refused = dir.run("bpf,perfmon,sys_admin", &args);
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("CAP_SYS_PTRACE"),
        "{}",
        refused.stderr
    );
    let run = dir.run("bpf,perfmon,sys_admin,sys_ptrace", &args);
    run.assert_success();
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(report["count"].as_u64().unwrap() > 100, "{report}");
}

/// diff needs no capability at all.
#[test]
fn diff_needs_no_capabilities() {
    require_root();
    let dir = NobodyDir::new(&[]);
    let before = dir.path("a.folded");
    fs::write(&before, "app;main;work 10\napp;main;idle 5\n").unwrap();
    fs::set_permissions(&before, fs::Permissions::from_mode(0o644)).unwrap();
    let out = dir.path("d.svg");
    let run = dir.run(
        "",
        &[
            "diff",
            path_arg(&before),
            path_arg(&before),
            "-o",
            path_arg(&out),
        ],
    );
    run.assert_success();
    assert!(out.exists());
}

/// Under sudo (SUDO_UID/SUDO_GID), the command after -- runs as the invoking user; --as-root
/// keeps root.
#[test]
fn command_runs_as_the_sudo_user_unless_as_root() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let sudo = [("SUDO_UID", "65534"), ("SUDO_GID", "65534")];
    for (extra, expected) in [(None, "65534"), (Some("--as-root"), "0")] {
        let mut args = vec!["profile", "-U", "-o", path_arg(&out)];
        args.extend(extra);
        args.extend(["--", "id", "-u"]);
        let run = Livetrace::start_with_env(&args, &sudo).finish(SLACK);
        run.assert_success();
        assert!(
            run.stdout.lines().any(|l| l.trim() == expected),
            "{extra:?}: expected `id -u` to print {expected}; stdout:\n{}",
            run.stdout
        );
    }
}

/// SIGTERM and SIGHUP end an offcpu and an uprobe-hist capture without -d, and every output is
/// written with exit status 0 (profile's SIGTERM test is in profile.rs). The signal comes right
/// after the start line: livetrace catches it from its first instant.
#[test]
fn stop_signals_write_every_output() {
    require_root();
    let _cpus = cpu_shared();
    // The offcpu fixture's reader is blocked throughout: there is always blocked time to write.
    let blocked = start_fixture("offcpu", &["30"]);
    wait_for_offcpu_fixture(blocked.pid());
    let latency = start_fixture("latency", &["loop", "30"]);
    let (blocked_pid, latency_pid) = (blocked.pid().to_string(), latency.pid().to_string());
    let dir = tempfile::tempdir().unwrap();
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let folded = dir.path().join(format!("{name}.folded"));
        let text = dir.path().join(format!("{name}.txt"));
        let runs = [
            (
                vec!["offcpu", "-p", &blocked_pid, "-o", path_arg(&folded)],
                folded.clone(),
                "livetrace: tracing",
            ),
            (
                vec![
                    "uprobe-hist",
                    "timed_work",
                    "-p",
                    &latency_pid,
                    "-o",
                    path_arg(&text),
                ],
                text.clone(),
                "livetrace: timing",
            ),
        ];
        for (args, path, started) in runs {
            let mut run = Livetrace::start(&args);
            run.wait_for_stderr(started, Duration::from_secs(10));
            run.signal(signal);
            let run = run.finish(SLACK);
            run.assert_success();
            assert!(run.stderr.contains(name), "{args:?}: {}", run.stderr);
            let written = fs::read_to_string(&path).unwrap();
            assert!(!written.is_empty(), "{args:?}: {} is empty", path.display());
        }
    }
}

/// A second SIGINT while symbolising (slowed down by the test hook) writes the outputs at once
/// with raw addresses, and the footer says symbolisation was interrupted.
#[test]
fn second_sigint_writes_raw_addresses_promptly() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let chain = fixture("chain");
    let mut run = Livetrace::start_with_env(
        [
            "profile",
            "-o",
            path_arg(&out),
            "--",
            path_arg(&chain),
            "20",
        ],
        &[("LIVETRACE_TEST_SLOW_SYMBOLIZE", "20000")],
    );
    let chain_pid = run.wait_for_command_pid(Duration::from_secs(10));
    // Samples to name: the command has run a while under the capture.
    wait_for_cpu(chain_pid, 0.3);
    run.signal(libc::SIGINT);
    // Printed once the capture loop has ended: the next stop signal asks to hurry.
    run.wait_for_stderr("send it again", Duration::from_secs(10));
    run.signal(libc::SIGINT);
    let run = run.finish(Duration::from_secs(15));
    run.assert_success();
    run.assert_stderr_has("symbolisation was interrupted");
    let profile = Profile::read(&out);
    let raw = profile
        .stacks
        .iter()
        .flat_map(|s| s.below_root())
        .any(|f| f.starts_with("[chain+0x"));
    assert!(raw && !profile.has_frame("hot_60"), "{}", profile.summary());
}

/// SIGUSR1 writes a snapshot of the profile so far to the output path and the capture goes on;
/// the final profile, written at the end (SIGINT), has more samples.
#[test]
fn sigusr1_writes_a_snapshot_and_the_capture_goes_on() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let chain = start_fixture("chain", &["20"]);
    let pid = chain.pid().to_string();
    let mut run = Livetrace::start(["profile", "-p", &pid, "-o", path_arg(&out)]);
    run.wait_for_stderr("livetrace: profiling", Duration::from_secs(10));
    wait_for_cpu(chain.pid(), 0.3);
    run.signal(libc::SIGUSR1);
    run.wait_for_stderr("snapshot (SIGUSR1)", Duration::from_secs(10));
    let snapshot = Profile::read(&out);
    assert!(snapshot.has_frame("hot_60"), "{}", snapshot.summary());
    // More samples after the snapshot, then the end.
    wait_for_cpu(chain.pid(), 0.3);
    run.signal(libc::SIGINT);
    let run = run.finish(SLACK);
    run.assert_success();
    let last = Profile::read(&out);
    assert!(
        last.total() > snapshot.total(),
        "final {} <= snapshot {}",
        last.total(),
        snapshot.total()
    );
    assert!(!run.stderr.contains("snapshot failed"), "{}", run.stderr);
}

/// SIGUSR1 makes uprobe-hist print the histogram so far and write its file, and go on.
#[test]
fn sigusr1_prints_the_histogram_so_far() {
    require_root();
    let _cpus = cpu_shared();
    let latency = start_fixture("latency", &["loop", "20"]);
    let pid = latency.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("h.txt");
    let mut run = Livetrace::start([
        "uprobe-hist",
        "timed_work",
        "-p",
        &pid,
        "-o",
        path_arg(&text),
    ]);
    run.wait_for_stderr("livetrace: timing", Duration::from_secs(10));
    // Calls to count: the fixture has run a while under the probes.
    wait_for_cpu(latency.pid(), 0.2);
    run.signal(libc::SIGUSR1);
    run.wait_for_stderr("snapshot (SIGUSR1)", Duration::from_secs(10));
    assert!(fs::read_to_string(&text).unwrap().contains("p99"));
    run.signal(libc::SIGINT);
    let run = run.finish(SLACK);
    run.assert_success();
    assert_eq!(run.stdout.matches("p99.9").count(), 2, "{}", run.stdout);
}

/// Command-line mistakes exit 2; a target or environment that is wrong exits 1.
#[test]
fn usage_errors_exit_2_and_runtime_errors_exit_1() {
    require_root();
    let usage: [&[&str]; 5] = [
        &["profile", "-F", "0"],
        &["profile", "-p", "1", "--", "true"],
        &["offcpu", "--min-block", "2ms", "--max-block", "1ms"],
        &["profile", "-o", "x.folded", "-o", "x.folded", "-d", "1"],
        &["uprobe-hist", "x", "-p", "1", "--", "true"],
    ];
    for args in usage {
        let run = run_livetrace(args, SLACK);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {}", run.stderr);
    }
    let missing_dir = "/nonexistent-livetrace/x.folded";
    let pid = unused_pid().to_string();
    let runtime: [&[&str]; 3] = [
        &["profile", "-p", &pid, "-d", "1"],
        &["profile", "-d", "1", "-o", missing_dir],
        &["profile", "-d", "1", "--", "/nonexistent-livetrace/cmd"],
    ];
    for args in runtime {
        let run = run_livetrace(args, SLACK);
        assert_eq!(run.status.code(), Some(1), "{args:?}: {}", run.stderr);
    }
}

/// `livetrace check` as nobody with no capabilities: every capability livetrace uses is named
/// as missing, the tracing subcommands cannot run, diff can, and the fix is the grant line in
/// the words of the tools' own refusal. With CAP_BPF and CAP_PERFMON, only uprobe-hist is left
/// wanting, for CAP_SYS_ADMIN.
#[test]
fn check_without_capabilities_names_every_missing_one() {
    require_root();
    let dir = NobodyDir::new(&[]);
    let run = dir.run("", &["check"]);
    assert_eq!(run.status.code(), Some(1), "{}\n{}", run.stdout, run.stderr);
    let mut expected = vec![
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
    ];
    // Kernel symbols are hidden from nobody unless both sysctls allow them.
    let sysctl = |name: &str| -> i64 {
        fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    if sysctl("perf_event_paranoid") >= 2 || sysctl("kptr_restrict") >= 1 {
        expected.push("CAP_SYSLOG");
    }
    let section = run
        .stdout
        .split("\ncapabilities\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no capabilities section:\n{}", run.stdout));
    let section = section.split("\n\n").next().unwrap();
    for cap in &expected {
        assert!(
            section
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(cap)),
            "{cap} is not named as missing:\n{}",
            run.stdout
        );
    }
    for subcommand in ["profile", "offcpu", "uprobe-hist"] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(subcommand) && l.contains("cannot run")),
            "{subcommand}:\n{}",
            run.stdout
        );
    }
    assert!(
        run.stdout.lines().any(|l| l.trim() == "diff         ready"),
        "{}",
        run.stdout
    );
    // The same words as the refusal of the tools themselves.
    let refusal = dir.run("", &["profile", "-d", "1"]);
    let phrase =
        "grant the binary these capabilities once (then any user who may run it can trace)";
    assert!(refusal.stderr.contains(phrase), "{}", refusal.stderr);
    assert!(
        run.stdout.replace("\n    ", " ").contains(phrase),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "sudo setcap cap_bpf,cap_perfmon,{}",
            if expected.contains(&"CAP_SYSLOG") {
                "cap_syslog,cap_sys_admin"
            } else {
                "cap_sys_admin"
            }
        )),
        "{}",
        run.stdout
    );

    let partial = dir.run("bpf,perfmon", &["check", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&partial.stdout).unwrap();
    let verdict = report["subcommands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["subcommand"] == "uprobe-hist")
        .unwrap();
    assert_eq!(verdict["status"], "missing", "{verdict}");
    assert_eq!(verdict["because"], serde_json::json!(["CAP_SYS_ADMIN"]));
}
