//! What hostile use found (issue 14), end to end: names that carry terminal escapes, standard
//! streams that cannot be written, outputs that fail or collide, signals that come at once, and
//! commands that cannot start or outlive the capture. Each case failed before it was fixed.

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

const SLACK: Duration = Duration::from_secs(15);

/// Characters a terminal obeys: ESC, BEL, CSI.
fn raw_escapes(text: &str) -> usize {
    text.chars()
        .filter(|c| matches!(c, '\x1b' | '\x07' | '\u{9b}'))
        .count()
}

/// `go tool pprof -raw FILE`, the pprof's strings as text.
fn pprof_raw(file: &Path, home: &Path) -> String {
    let output = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(file)
        .env("HOME", home)
        .env("GOPATH", home.join("go"))
        .env("GOCACHE", home.join("go-cache"))
        .env("PPROF_TMPDIR", home)
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .output()
        .expect("go tool pprof runs (scripts/setup.sh installs golang-go)");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A process name, a thread name and an ELF symbol holding terminal escapes, and a JIT frame
/// named by a perf map entry holding one, reach no output raw: not the terminal summary, not
/// stderr, not the folded, SVG, JSON, speedscope or pprof files. The SVG stays well-formed, and
/// the escapes show as visible `\x1b` text.
#[test]
fn names_from_the_target_cannot_drive_a_terminal_or_break_a_file() {
    require_root();
    let _cpus = cpu_shared();
    let evil = start_fixture("evil_names", &["20"]);
    wait_until("evil_names has named its thread", SLACK, || {
        thread_named(evil.pid(), "\x1b]0;t\x07thr").is_some()
    });
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name);
    let files = [
        "e.folded",
        "e.svg",
        "e.json",
        "e.speedscope.json",
        "e.pb.gz",
    ];
    let pid = evil.pid().to_string();
    let mut args = vec!["profile", "-p", &pid, "-d", "1.5", "--per-thread"];
    let paths: Vec<String> = files.iter().map(|f| path_arg(&out(f)).to_owned()).collect();
    for path in &paths {
        args.extend(["-o", path]);
    }
    let run = run_livetrace(&args, Duration::from_secs(2) + SLACK);
    run.assert_success();
    assert_eq!(raw_escapes(&run.stdout), 0, "{}", run.stdout);
    assert_eq!(raw_escapes(&run.stderr), 0, "{}", run.stderr);
    for file in &files[..4] {
        let text = String::from_utf8_lossy(&fs::read(out(file)).unwrap()).into_owned();
        assert_eq!(raw_escapes(&text), 0, "{file} holds raw escapes");
    }
    assert_eq!(raw_escapes(&pprof_raw(&out("e.pb.gz"), dir.path())), 0);
    assert_well_formed_svg(&fs::read_to_string(out("e.svg")).unwrap());
    let folded = fs::read_to_string(out("e.folded")).unwrap();
    for visible in [
        "\\x1b[2Jevil",
        "\\x1b]0:t\\x07thr",
        "\\x1b]0:pwned\\x07burn",
    ] {
        assert!(folded.contains(visible), "no {visible:?} in:\n{folded}");
    }

    // A perf map is the target's own file too.
    let (jit, address) = start_jit();
    let map = format!("/tmp/perf-{}.map", jit.pid());
    fs::write(&map, format!("{address:x} 10 jit\x1b[31mred\n")).unwrap();
    let (profile, run) = run_folded(
        &["profile", "-p", &jit.pid().to_string(), "-d", "1", "-U"],
        Duration::from_secs(1) + SLACK,
    );
    let _ = fs::remove_file(&map);
    assert!(
        profile.has_frame("jit\\x1b[31mred"),
        "{}",
        profile.summary()
    );
    assert_eq!(raw_escapes(&run.stderr), 0, "{}", run.stderr);
}

/// Starts the `jit` fixture and returns it with the address of its JIT page.
fn start_jit() -> (Process, u64) {
    use std::io::BufRead as _;
    let mut command = Command::new(fixture("jit"));
    command
        .arg("12")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = command.spawn().expect("cannot start jit");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = u64::from_str_radix(line.trim(), 16).expect("jit prints its page's address");
    (Process::from_child(child), address)
}

/// `livetrace ARGS` through `bash -o pipefail -c 'SCRIPT'` ("$0" is livetrace), where SCRIPT
/// redirects its streams; returns the exit status (livetrace's, pipes included) and what it
/// printed.
fn through_shell(script: &str, args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new("bash")
        .args(["-o", "pipefail", "-c"])
        .arg(script)
        .arg(livetrace())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// Standard error full or closed, standard output cut off by `head` (the summary, or --json),
/// or full: never a panic; the file output is written whatever happens to the terminal; a
/// reader that went away ends the run quietly (exit 0), a full disk is an error (exit 1).
#[test]
fn unwritable_standard_streams_never_panic_and_files_are_still_written() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["60"]);
    let pid = chain.pid().to_string();
    let latency = start_fixture("latency", &["loop", "60"]);
    let latency_pid = latency.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("out.folded");
    let profile = ["profile", "-p", &pid, "-d", "0.5", "-o", path_arg(&folded)];
    let histogram = ["uprobe-hist", "timed_work", "-p", &latency_pid, "-d", "0.5"];
    let cases: [(&str, &[&str], i32); 6] = [
        (r#""$0" "$@" 2>/dev/full"#, &profile, 0),
        (r#""$0" "$@" 2>&-"#, &profile, 0),
        (r#""$0" "$@" 2>&1 | head -c 10 >/dev/null"#, &profile, 0),
        (r#""$0" "$@" | head -1 >/dev/null"#, &profile, 0),
        (r#""$0" "$@" --json | head -c 1 >/dev/null"#, &histogram, 0),
        (r#""$0" "$@" >/dev/full"#, &profile, 1),
    ];
    for (script, args, expected) in cases {
        let _ = fs::remove_file(&folded);
        let (status, text) = through_shell(script, args);
        assert!(!text.contains("panicked"), "{script}: {text}");
        assert_eq!(status, Some(expected), "{script}: {text}");
        if args[0] == "profile" {
            assert!(
                fs::metadata(&folded).is_ok_and(|m| m.len() > 0),
                "{script}: the file output was not written\n{text}"
            );
        }
    }
}

/// Every -o is attempted even when one fails: the others are written, the failure names its
/// path, and the exit status is 1.
#[test]
fn one_failing_output_does_not_lose_the_others() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["30"]);
    let dir = tempfile::tempdir().unwrap();
    // A directory that passes the preflight and is gone before the end.
    let gone = dir.path().join("gone");
    fs::create_dir(&gone).unwrap();
    let (first, second, last) = (
        gone.join("a.svg"),
        dir.path().join("b.folded"),
        dir.path().join("c.json"),
    );
    let mut run = Livetrace::start([
        "profile",
        "-p",
        &chain.pid().to_string(),
        "-o",
        path_arg(&first),
        "-o",
        path_arg(&second),
        "-o",
        path_arg(&last),
    ]);
    run.wait_for_stderr("livetrace: profiling", SLACK);
    fs::remove_dir(&gone).unwrap();
    wait_for_cpu(chain.pid(), 0.2);
    run.signal(libc::SIGINT);
    let run = run.finish(SLACK);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    run.assert_stderr_has(path_arg(&first));
    assert!(second.exists() && last.exists(), "{}", run.stderr);
}

/// Temporary files planted next to an output, at the names a temporary file could have (the
/// old `.NAME.livetrace-PID.tmp` for each of the next pids, as symlinks and hard links to a
/// victim), neither stop the write nor are written through. A collision used to lose the
/// capture ("File exists").
#[test]
fn planted_temporary_files_do_not_lose_the_capture() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["30"]);
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, "keep").unwrap();
    let out = dir.path().join("late.svg");
    let last_pid: u32 = fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for pid in last_pid + 1..last_pid + 400 {
        let planted = dir.path().join(format!(".late.svg.livetrace-{pid}.tmp"));
        if pid % 2 == 0 {
            std::os::unix::fs::symlink(&victim, planted).unwrap();
        } else {
            fs::hard_link(&victim, planted).unwrap();
        }
    }
    let pid = chain.pid().to_string();
    let run = run_livetrace(
        ["profile", "-p", &pid, "-d", "0.5", "-o", path_arg(&out)],
        SLACK,
    );
    run.assert_success();
    assert!(fs::read_to_string(&out).unwrap().contains("<svg"));
    assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
}

/// `-o -` twice, and one file given as a relative and as an absolute path, are usage errors.
#[test]
fn one_output_given_twice_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let absolute = dir.path().join("x.folded");
    for args in [
        vec!["profile", "-p", "1", "-o", "-", "-o", "-"],
        vec![
            "profile",
            "-p",
            "1",
            "-o",
            path_arg(&absolute),
            "-o",
            "x.folded",
        ],
    ] {
        let mut command = Command::new(livetrace());
        command.args(&args).current_dir(dir.path());
        let run = Livetrace::start_command(command).finish(SLACK);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("twice"), "{}", run.stderr);
    }
}

/// Whether the process has a BPF map or program open: livetrace is loading its BPF object,
/// before its capture loop runs.
fn has_bpf_fd(pid: u32) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.filter_map(Result::ok)
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .any(|target| target.to_string_lossy().contains("bpf"))
    })
}

/// SIGUSR1 (a snapshot), SIGTERM and SIGHUP sent while livetrace is still loading its BPF
/// object, before its capture loop runs, are handled, not fatal: the handlers are installed
/// first thing (they used to come with the loop, and these signals killed it).
#[test]
fn signals_before_the_capture_loop_are_not_fatal() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["30"]);
    let pid = chain.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    for signal in [libc::SIGUSR1, libc::SIGTERM, libc::SIGHUP] {
        let run = Livetrace::start(["profile", "-p", &pid, "-d", "1", "-o", path_arg(&out)]);
        let livetrace = run.pid();
        let deadline = std::time::Instant::now() + SLACK;
        while !has_bpf_fd(livetrace) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        run.signal(signal);
        let run = run.finish(SLACK);
        run.assert_success();
        assert!(out.exists(), "signal {signal}: {}", run.stderr);
    }
}

/// Snapshot signals sent without pause while livetrace loads and verifies its programs do not
/// fail the load: a signal pending on the loading thread makes the kernel's verifier give up
/// (EAGAIN), and made aya's feature probes decide the kernel had no global data; the signals are
/// now held back until the capture loop, where each is a snapshot.
#[test]
fn a_storm_of_signals_while_loading_does_not_fail_it() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["30"]);
    let pid = chain.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    for unwind in ["dwarf", "fp"] {
        let mut run = Livetrace::start([
            "profile",
            "-p",
            &pid,
            "-d",
            "1",
            "--unwind",
            unwind,
            "-o",
            path_arg(&out),
        ]);
        let livetrace = run.pid() as libc::pid_t;
        // From when its handlers are in place (before that, SIGUSR1 would kill any program).
        wait_until("livetrace catches SIGUSR1", SLACK, || {
            catches_sigusr1(run.pid())
        });
        let done = Arc::new(AtomicBool::new(false));
        let storm = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    // SAFETY: a signal to the livetrace this test started, by its pid.
                    unsafe { libc::kill(livetrace, libc::SIGUSR1) };
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        run.wait_for("it starts profiling or fails", SLACK, |_, stderr| {
            stderr.contains("livetrace: profiling") || stderr.contains("error")
        });
        done.store(true, Ordering::SeqCst);
        storm.join().unwrap();
        let run = run.finish(SLACK);
        run.assert_success();
        assert!(
            !run.stderr.contains("could not be loaded"),
            "{unwind}: {}",
            run.stderr
        );
        assert!(out.exists(), "{unwind}: {}", run.stderr);
    }
}

/// Whether the process has a handler for SIGUSR1 (`SigCgt` in /proc/PID/status).
fn catches_sigusr1(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (libc::SIGUSR1 - 1)) != 0)
}

/// A command that cannot be started (a file that is not a program) fails with exit 1 and the
/// reason, rather than an empty profile and exit 0.
#[test]
fn a_command_that_cannot_start_is_an_error() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let not_a_program = dir.path().join("data.txt");
    fs::write(&not_a_program, "just text").unwrap();
    fs::set_permissions(&not_a_program, fs::Permissions::from_mode(0o644)).unwrap();
    for tool in ["profile", "offcpu"] {
        let run = run_livetrace([tool, "-o", "-", "--", path_arg(&not_a_program)], SLACK);
        assert_eq!(run.status.code(), Some(1), "{tool}: {}", run.stderr);
        assert!(
            run.stderr.contains("cannot run") && run.stderr.contains("Permission denied"),
            "{tool}: {}",
            run.stderr
        );
    }
}

/// A command still running when the capture ends (-d, or a stop signal) is stopped, and
/// livetrace says so; none is left behind.
#[test]
fn a_command_that_outlives_the_capture_is_stopped() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let chain = fixture("chain");
    for (tool, end) in [("profile", "-d"), ("offcpu", "SIGINT")] {
        let out = dir.path().join(format!("{tool}.folded"));
        let mut args = vec![tool, "-o", path_arg(&out)];
        if end == "-d" {
            args.extend(["-d", "1"]);
        }
        args.extend(["--", path_arg(&chain), "60"]);
        let mut run = Livetrace::start(&args);
        let command = run.wait_for_command_pid(SLACK);
        if end == "SIGINT" {
            wait_for_cpu(command, 0.1);
            run.signal(libc::SIGINT);
        }
        let run = run.finish(SLACK);
        run.assert_success();
        run.assert_stderr_has(&format!("the command (pid {command}) was still running"));
        assert!(
            !Path::new(&format!("/proc/{command}")).exists(),
            "{tool}: the command {command} is still running"
        );
    }
}
