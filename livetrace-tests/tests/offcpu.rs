//! `livetrace offcpu` against the `offcpu` fixture, whose threads have known blocked times: a
//! napper (~100% blocked, interruptible), a pipe reader blocked since before the capture began,
//! a spinner (~0% blocked in sleep states), and a mutex holder/waiter pair.

mod common;

use std::time::Duration;

use common::*;

/// Slack for start-up, symbolisation and a busy machine, on top of the capture time.
const SLACK: Duration = Duration::from_secs(20);

/// Runs `livetrace offcpu -p FIXTURE -d 3 --per-thread -o out.folded EXTRA...` on a fresh
/// fixture and returns the parsed folded stacks (weights in microseconds) and stderr.
fn capture(extra: &[&str]) -> (Profile, String) {
    capture_of(&fixture("offcpu"), extra)
}

/// [`capture`] of a build of the fixture given by its path.
fn capture_of(program: &std::path::Path, extra: &[&str]) -> (Profile, String) {
    require_root();
    let _cpus = cpu_shared();
    let mut command = std::process::Command::new(program);
    command.arg("25").stdin(std::process::Stdio::null());
    let fixture = Process::spawn(command);
    // Every thread running, and the reader blocked before the capture starts.
    wait_for_offcpu_fixture(fixture.pid());
    let pid = fixture.pid().to_string();
    let mut args = vec!["offcpu", "-p", &pid, "-d", "3", "--per-thread"];
    args.extend_from_slice(extra);
    let (profile, run) = run_folded(&args, Duration::from_secs(3) + SLACK);
    (profile, run.stderr)
}

/// Share of the window the thread named `name` (thread frame `name-TID`) spent blocked: of the
/// window the footer (`stderr`) gives, which starts when the programs do, a moment before `-d`
/// starts counting.
fn blocked_share(profile: &Profile, stderr: &str, name: &str) -> f64 {
    let prefix = format!("{name}-");
    let micros = profile.count_where(|s| {
        s.below_root()
            .first()
            .is_some_and(|t| t.starts_with(&prefix))
    });
    micros as f64 / window_us(stderr)
}

/// The window in the footer ("data quality: 2.35 s, ..."), in microseconds, to 10 ms.
fn window_us(stderr: &str) -> f64 {
    stderr
        .split("data quality: ")
        .nth(1)
        .and_then(|rest| rest.split(" s,").next())
        .and_then(|secs| secs.parse::<f64>().ok())
        .map(|secs| secs * 1e6)
        .unwrap_or_else(|| panic!("no window in the footer:\n{stderr}"))
}

fn thread_stacks<'a>(profile: &'a Profile, name: &str) -> Vec<&'a Stack> {
    let prefix = format!("{name}-");
    profile
        .stacks
        .iter()
        .filter(|s| {
            s.below_root()
                .first()
                .is_some_and(|t| t.starts_with(&prefix))
        })
        .collect()
}

/// The napper and the reader are blocked for about the whole window, the reader's stack is the
/// recovered one (it never switched during the capture) and names read_forever; the spinner is
/// not asleep at all.
#[test]
fn blocked_times_match_the_truth() {
    // --state S: preemption of the spinner depends on what else runs on this 2-CPU machine.
    let (profile, stderr) = capture(&["--state", "S"]);
    // Both within 10%: the window is measured from the moment the clocks start, and a thread
    // may be between naps (on CPU for microseconds) at either end.
    for name in ["napper", "reader"] {
        let share = blocked_share(&profile, &stderr, name);
        assert!(
            (0.9..=1.1).contains(&share),
            "{name} blocked {share:.3} of the window, expected ~1.0\n{}",
            profile.summary()
        );
    }
    let spinner = blocked_share(&profile, &stderr, "spinner");
    assert!(
        spinner < 0.02,
        "the spinner slept {spinner:.3} of the window"
    );

    let napper = thread_stacks(&profile, "napper");
    assert!(
        napper.iter().all(|s| s.contains("nap_loop")),
        "every napper stack passes through nap_loop: {napper:?}"
    );
    let reader = thread_stacks(&profile, "reader");
    assert!(
        reader
            .iter()
            .any(|s| s.contains("[blocked since before the capture]") && s.contains("read_forever")),
        "the reader's stack is recovered and names read_forever: {reader:?}"
    );
    assert!(
        reader
            .iter()
            .any(|s| s.below_root().iter().any(|f| f.contains("pipe_read"))),
        "the reader's kernel stack shows the pipe read: {reader:?}"
    );
    assert!(
        stderr.contains("already blocked when the capture began"),
        "{stderr}"
    );
}

/// Built without frame pointers, the fixture's blocked threads still get complete user stacks
/// with --unwind dwarf (the default with -p), from the thread's start through its function to
/// the blocking call, and the same blocked times, and so does the thread blocked since before
/// the capture; frame-pointer mode, on the same build, loses the chain (so the fixture does test
/// unwinding without frame pointers).
#[test]
fn dwarf_completes_blocked_stacks_without_frame_pointers() {
    let program = build_fixture(
        "offcpu_nofp",
        &[
            "cc",
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-fno-inline",
            "@offcpu.c",
        ],
    );
    let chains: [(&str, &[&str]); 2] = [
        (
            "napper",
            &["start_thread", "napper", "nap_loop", "take_nap"],
        ),
        ("holder", &["start_thread", "holder", "hold_lock"]),
    ];
    let complete_share = |profile: &Profile, thread: &str, chain: &[&str]| {
        let stacks = thread_stacks(profile, thread);
        let total: u64 = stacks.iter().map(|s| s.count).sum();
        let complete: u64 = stacks
            .iter()
            .filter(|s| s.contains_run(chain))
            .map(|s| s.count)
            .sum();
        complete as f64 / total.max(1) as f64
    };

    let (dwarf, stderr) = capture_of(&program, &["--state", "S"]);
    assert!(
        stderr.contains("unwound with DWARF CFI"),
        "-p defaults to dwarf unwinding, and the footer says so:\n{stderr}"
    );
    let napper = blocked_share(&dwarf, &stderr, "napper");
    assert!(
        (0.9..=1.1).contains(&napper),
        "napper blocked {napper:.3} of the window, expected ~1.0\n{}",
        dwarf.summary()
    );
    for (thread, chain) in chains {
        let share = complete_share(&dwarf, thread, chain);
        assert!(
            share >= 0.95,
            "dwarf: only {share:.3} of {thread}'s blocked time has {chain:?}\n{}\n{stderr}",
            dwarf.summary()
        );
    }
    assert!(stderr.contains("lost: nothing"), "{stderr}");
    // The reader has been blocked since before the capture: its stack is recovered from /proc
    // and the stack memory, and unwound with CFI too, complete from the thread's start.
    let reader = thread_stacks(&dwarf, "reader");
    assert!(
        reader.iter().any(|s| {
            s.contains("[blocked since before the capture]")
                && s.contains_run(&["start_thread", "reader", "read_forever"])
        }),
        "the reader's recovered stack is incomplete: {reader:?}"
    );

    let (fp, _) = capture_of(&program, &["--state", "S", "--unwind", "fp"]);
    let (thread, chain) = chains[0];
    let share = complete_share(&fp, thread, chain);
    assert!(
        share <= 0.10,
        "frame pointers were expected to lose {chain:?} in this build, but {share:.3} of the \
         time has it: the fixture no longer tests unwinding without frame pointers\n{}",
        fp.summary()
    );
}

/// A block that began during the capture and outlasts it (a command that sleeps longer than the
/// capture runs) is only in the start map at the end: it is counted up to the end with both of
/// its stacks, not as stacks missing from the map.
#[test]
fn a_block_that_outlasts_the_capture_keeps_its_stacks() {
    require_root();
    let _cpus = cpu_shared();
    // Both ways the stacks are kept: ids in the kernel's map (fp), or a stack copy (dwarf).
    for mode in ["fp", "dwarf"] {
        outlasting_block(mode);
    }
}

fn outlasting_block(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    // sleep ends itself two seconds after the capture.
    let run = run_livetrace(
        [
            "offcpu",
            "-d",
            "1.5",
            "--unwind",
            mode,
            "-o",
            path_arg(&out),
            "--",
            "sleep",
            "3.5",
        ],
        Duration::from_secs(2) + SLACK,
    );
    run.assert_success();
    let profile = Profile::read(&out);
    let asleep = profile.count_where(|s| s.contains("do_nanosleep_[k]"));
    assert!(
        asleep >= 1_200_000,
        "{mode}: sleep's block was counted for {asleep} us, expected ~1.5 s\n{}\n{}",
        profile.summary(),
        run.stderr
    );
    // The outlasting block keeps both its stacks. (Another, brief block can lose its user stack
    // for a reason of its own, counted in the footer: a 15 us one once failed its walk with
    // EFAULT, around the command's exec.)
    let sleep_lost = profile.count_where(|s| {
        s.contains("do_nanosleep_[k]") && s.frames.iter().any(|f| f.starts_with("[lost "))
    });
    assert_eq!(
        sleep_lost,
        0,
        "{mode}: {}\n{}",
        profile.summary(),
        run.stderr
    );
}

/// Stack copies are sized from each thread's earlier stacks (most need a fraction of a whole
/// copy). A thread that then blocks 60 frames deeper has that first deeper stack cut short, and
/// counted as such, and its copies are whole from then on: its later deep blocks are complete.
#[test]
fn copies_sized_from_earlier_stacks_grow_when_a_stack_deepens() {
    require_root();
    let _cpus = cpu_shared();
    let program = fixture("deepening");
    let (profile, run) = run_folded(
        &[
            "offcpu",
            "-d",
            "20",
            "--unwind",
            "dwarf",
            "--",
            path_arg(&program),
        ],
        Duration::from_secs(5) + SLACK,
    );
    let weight = |f: &dyn Fn(&Stack) -> bool| profile.count_where(f);
    let deep = weight(&|s| s.contains("deep_nap"));
    let deep_complete = weight(&|s| {
        s.contains("deep_nap")
            && s.contains("main")
            && s.frames.iter().filter(|f| *f == "deep").count() == 61
    });
    let cut = weight(&|s| s.contains("[stack cut short]"));
    // Nothing of livetrace's own shim, which waited to be released before it exec'd the
    // command: the command is traced from its exec on.
    run.assert_stderr_has("unresolved frames: none");
    assert!(
        deep >= 50_000,
        "the deep naps (50 of 2 ms) are missing: {deep} us\n{}\n{}",
        profile.summary(),
        run.stderr
    );
    assert!(
        deep_complete as f64 >= 0.9 * deep as f64,
        "only {deep_complete} of {deep} us of deep naps have all 61 deep frames under main\n{}",
        run.stderr
    );
    assert!(
        cut <= deep / 10,
        "{cut} us cut short: more than the first deeper block\n{}",
        run.stderr
    );
    // The copies were sized (the first deep blocks needed more) and the footer says why.
    assert!(
        cut > 0
            && run
                .stderr
                .contains("deeper than this thread's earlier ones"),
        "{}",
        run.stderr
    );
}

/// `--unwind dwarf` and `--wakers` do not go together (waker stacks are frame-pointer only):
/// a usage error that names both, before anything is loaded.
#[test]
fn dwarf_with_wakers_is_a_usage_error() {
    let run = run_livetrace(
        ["offcpu", "-p", "1", "--wakers", "--unwind", "dwarf"],
        Duration::from_secs(10),
    );
    run.assert_failure();
    assert!(
        run.stderr.contains("--wakers") && run.stderr.contains("--unwind dwarf"),
        "{}",
        run.stderr
    );
}

/// `--state D` leaves out every interruptible sleep: none of the fixture's threads sleeps
/// uninterruptibly, so nothing of theirs is recorded.
#[test]
fn state_filter_excludes_interruptible_sleep() {
    let (profile, stderr) = capture(&["--state", "D"]);
    for name in ["napper", "reader", "holder"] {
        let share = blocked_share(&profile, &stderr, name);
        assert!(
            share < 0.01,
            "{name} shows {share:.3} blocked under --state D"
        );
    }
    assert!(stderr.contains("left out by --state"), "{stderr}");
    // The napper's thousands of naps, left out by --state, are not switch-ins "without a
    // switch-out": at most each of the fixture's 6 threads switches in once unmatched (the
    // first time, if it was already off-CPU when the capture began).
    let unmatched: u64 = stderr
        .split(" switch-ins had no recorded switch-out")
        .next()
        .filter(|before| before.len() < stderr.len())
        .and_then(|before| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        unmatched <= 6,
        "{unmatched} unmatched switch-ins:\n{stderr}"
    );
}

/// A filter that leaves out every block says so, and says which, instead of claiming the
/// threads never left the CPU.
#[test]
fn an_empty_result_names_the_filter_that_emptied_it() {
    let (profile, stderr) = capture(&["--min-block", "3ms", "--max-block", "3ms"]);
    assert_eq!(profile.total(), 0, "{}", profile.summary());
    assert!(
        stderr.contains("left out by --min-block") && !stderr.contains("did not leave the CPU"),
        "{stderr}"
    );
}

/// `--min-block 500ms` drops the napper's 1 ms naps but keeps the reader's one long block. (A nap
/// is timed to the thread's next switch-in, so the wait for a CPU after waking is part of it: on
/// a loaded 2-CPU machine that can reach tens of milliseconds, hence 500 ms, not 100.)
#[test]
fn min_block_drops_short_blocks() {
    let (profile, stderr) = capture(&["--min-block", "500ms", "--state", "S"]);
    let napper = blocked_share(&profile, &stderr, "napper");
    assert!(
        napper < 0.01,
        "napper shows {napper:.3} with --min-block 500ms\n{}",
        profile.summary()
    );
    let reader = blocked_share(&profile, &stderr, "reader");
    assert!((0.9..=1.1).contains(&reader), "reader shows {reader:.3}");
}

/// `--max-block 100ms` keeps the naps (about the whole window) and drops the reader's block.
#[test]
fn max_block_drops_long_blocks() {
    let (profile, stderr) = capture(&["--max-block", "100ms", "--state", "S"]);
    let napper = blocked_share(&profile, &stderr, "napper");
    assert!((0.85..=1.1).contains(&napper), "napper shows {napper:.3}");
    let reader = blocked_share(&profile, &stderr, "reader");
    assert!(
        reader < 0.01,
        "reader shows {reader:.3} with --max-block 100ms"
    );
}

/// `--wakers` joins the waiter's blocked futex stack with the holder's, who unlocked it:
/// `blocked...;--;waker...` with the waker's stack read leaf to root.
#[test]
fn wakers_join_blocked_and_waking_stacks() {
    let (profile, _) = capture(&["--wakers"]);
    let joined = profile.stacks.iter().any(|s| {
        let frames = s.below_root();
        let Some(split) = frames.iter().position(|f| f == "--") else {
            return false;
        };
        let (blocked, waker) = (&frames[..split], &frames[split + 1..]);
        blocked.first().is_some_and(|t| t.starts_with("waiter-"))
            && blocked.iter().any(|f| f.contains("futex"))
            && waker.iter().any(|f| f == "holder")
            && waker.iter().any(|f| f.contains("futex_wake"))
    });
    assert!(
        joined,
        "no waiter;...futex...;--;...futex_wake...;holder stack\n{}",
        profile.summary()
    );
}

/// The classic tracepoint (tracefs, mounted on demand) measures the same truth as tp_btf.
#[test]
fn tracepoint_fallback_measures_the_same() {
    let (profile, stderr) = capture(&["--attach", "tracepoint", "--state", "S"]);
    assert!(stderr.contains("sched:sched_switch tracepoint"), "{stderr}");
    let napper = blocked_share(&profile, &stderr, "napper");
    assert!(
        (0.85..=1.1).contains(&napper),
        "napper shows {napper:.3}\n{stderr}\n{}",
        profile.summary()
    );
}

/// With `-- COMMAND`, the capture ends when the command exits, and its threads are there.
#[test]
fn command_mode_ends_with_the_command() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let fixture = fixture("offcpu");
    let run = run_livetrace(
        [
            "offcpu",
            "-d",
            "30",
            "-o",
            path_arg(&out),
            "--",
            path_arg(&fixture),
            "2",
        ],
        Duration::from_secs(2) + SLACK,
    );
    run.assert_success();
    assert!(
        run.elapsed < Duration::from_secs(15),
        "took {:?}",
        run.elapsed
    );
    let profile = Profile::read(&out);
    assert!(
        profile.has_frame("nap_loop"),
        "{}\n{}",
        profile.summary(),
        run.stderr
    );
}

/// Contradictory filters are a usage error (exit 2) naming both options, before any capture.
#[test]
fn min_above_max_is_a_usage_error() {
    let run = run_livetrace(
        [
            "offcpu",
            "--min-block",
            "1s",
            "--max-block",
            "1ms",
            "-d",
            "5",
        ],
        Duration::from_secs(5),
    );
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--min-block") && run.stderr.contains("--max-block"));
    assert!(run.elapsed < Duration::from_secs(2));
}

/// Kernel threads (kworker, ksoftirqd, rcu_*) switch all the time; the whole-system view leaves
/// them out unless `--include-kernel-threads` asks for them.
#[test]
fn kernel_threads_only_when_asked() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let is_kernel_thread = |stack: &Stack| {
        let root = stack.root();
        ["kworker/", "ksoftirqd/", "rcu_", "migration/", "kcompactd"]
            .iter()
            .any(|prefix| root.starts_with(prefix))
    };
    let mut shares = Vec::new();
    for extra in [None, Some("--include-kernel-threads")] {
        let out = dir.path().join("out.folded");
        let mut args = vec!["offcpu", "-d", "2", "-o", path_arg(&out)];
        args.extend(extra);
        let run = run_livetrace(&args, Duration::from_secs(2) + SLACK);
        run.assert_success();
        let profile = Profile::read(&out);
        shares.push(profile.share_where(is_kernel_thread));
    }
    assert_eq!(
        shares[0], 0.0,
        "kernel threads in the default whole-system view"
    );
    assert!(
        shares[1] > 0.0,
        "no kernel thread with --include-kernel-threads"
    );
}

/// No thread is blocked for longer than the window, however long the scan for threads blocked
/// since before the capture takes (500 of them here) and however often a thread blocks during
/// it: the window starts when the programs start timing blocks. It used to start after the
/// scan, and threads that blocked during it were counted from before the window (113% here).
#[test]
fn no_thread_is_blocked_longer_than_the_window() {
    require_root();
    let _cpus = cpu_shared();
    let mut command = std::process::Command::new(fixture("crowd"));
    command
        .args(["500", "30"])
        .stdin(std::process::Stdio::null());
    let crowd = Process::spawn(command);
    wait_until("crowd has started its 501 threads", SLACK, || {
        thread_named(crowd.pid(), "napper").is_some()
    });
    let pid = crowd.pid().to_string();
    let (profile, run) = run_folded(
        &["offcpu", "-p", &pid, "-d", "2", "--per-thread"],
        Duration::from_secs(2) + SLACK,
    );
    let window_us = window_us(&run.stderr);
    let mut by_thread: std::collections::BTreeMap<&str, u64> = Default::default();
    for stack in &profile.stacks {
        *by_thread.entry(stack.frames[1].as_str()).or_default() += stack.count;
    }
    let napper = by_thread
        .iter()
        .find(|(thread, _)| thread.starts_with("napper-"))
        .map(|(_, &us)| us)
        .unwrap_or_else(|| panic!("no napper in:\n{}", profile.summary()));
    assert!(
        napper as f64 >= 0.9 * window_us,
        "the napper was blocked {napper} us of {window_us} us"
    );
    for (thread, &us) in &by_thread {
        assert!(
            us as f64 <= window_us + 5_000.0,
            "{thread} was blocked {us} us, longer than the {window_us} us window\n{}",
            run.stderr
        );
    }
}

/// Builds tests/fixtures/go/sleeper.go with the machine's Go (scripts/setup.sh installs it),
/// offline, into the fixtures folder.
fn go_sleeper() -> std::path::PathBuf {
    let dir = fixture("offcpu").parent().unwrap().to_path_buf();
    let out = dir.join("go_sleeper");
    let home = dir.join("go-home");
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/go/sleeper.go"
    );
    let partial = dir.join(format!("go_sleeper.{}.partial", std::process::id()));
    let built = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&partial)
        .arg(source)
        .env("HOME", &home)
        .env("GOCACHE", home.join("cache"))
        .env("GOPATH", home.join("go"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .output()
        .expect("go runs (scripts/setup.sh installs golang-go)");
    assert!(built.status.success(), "go build failed: {built:?}");
    std::fs::rename(&partial, &out).unwrap();
    out
}

/// A Go program: `--unwind auto` walks its frame pointers (Go keeps them on x86-64; it has no
/// .eh_frame for CFI), and the nap's stack is complete down to the goroutine's start. It used to
/// be judged "without frame pointers" and copied, and 60% of its blocked time was cut short.
#[test]
fn go_programs_are_walked_by_their_frame_pointers() {
    require_root();
    let _cpus = cpu_shared();
    let mut command = std::process::Command::new(go_sleeper());
    command.arg("20").stdin(std::process::Stdio::null());
    let go = Process::spawn(command);
    wait_for_cpu(go.pid(), 0.01);
    let pid = go.pid().to_string();
    let (profile, run) = run_folded(
        &["offcpu", "-p", &pid, "-d", "2"],
        Duration::from_secs(2) + SLACK,
    );
    run.assert_stderr_has("frame pointers, walked in the kernel (--unwind auto");
    let nap = profile.share_where(|s| s.contains("main.nap"));
    let complete = profile.share_where(|s| {
        s.contains_run(&["runtime.main", "main.main", "main.napLoop", "main.nap"])
    });
    assert!(
        nap > 0.0 && complete >= 0.95 * nap,
        "{complete:.3} of {nap:.3} reach the goroutine's start\n{}",
        profile.summary()
    );
    assert!(!run.stderr.contains("cut short"), "{}", run.stderr);
}
