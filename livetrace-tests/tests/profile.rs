//! Integration tests of `livetrace profile`: they run the real binary, as root, against the C
//! fixtures in `tests/fixtures/` and check the folded stacks and flame graphs it writes.
//!
//! The machine has 2 CPUs and these tests run in parallel. Tests that assert on sample counts take
//! the CPUs exclusively (`cpu_exclusive`); the others that burn CPU share them (`cpu_shared`), at
//! most one busy fixture per test, so a fixture gets close to a whole CPU either way. Shares of
//! samples do not depend on how much CPU a fixture gets, only their number does.

mod common;

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Livetrace, MeasuredFixture, Profile, Stack, assert_share, assert_well_formed_svg,
    cpu_exclusive, cpu_seconds, cpu_shared, fixture, is_kernel_frame, path_arg, require_root,
    run_folded, run_livetrace, start_fixture, unused_pid, wait_for_cpu,
};

/// The chain fixture's hot leaves (about 6:3:1 of its CPU time; it measures the split itself).
const HOT_LEAVES: [&str; 3] = ["hot_60", "hot_30", "hot_10"];

/// The chain fixture's call chain above the hot leaves.
const CHAIN: [&str; 4] = ["main", "a", "b", "c"];

/// livetrace's default sampling frequency.
const DEFAULT_HZ: u32 = 99;

/// Generous bound on a run's wall time beyond its capture (start-up, symbolization and writing
/// by a debug build on a busy machine); only reached when livetrace hangs.
const SLACK: Duration = Duration::from_secs(8);

/// Profiles the single-threaded fixture `pid` at `hz` for `seconds` and checks the sample count
/// against the truth: the CPU time the fixture actually got meanwhile, times `hz` (a sample is
/// taken every 1/hz s of CPU time it runs). That holds on a busy machine too, where the fixture
/// gets less than a whole CPU. The CPU share is measured from attach to exit (about the capture
/// window); ±15% covers the clock-tick granularity of /proc and the edges of the window.
fn profile_and_check_count(pid: u32, hz: u32, seconds: u32, out: &std::path::Path) -> Profile {
    let mut run = Livetrace::start([
        "profile".to_owned(),
        "-p".to_owned(),
        pid.to_string(),
        "-F".to_owned(),
        hz.to_string(),
        "-d".to_owned(),
        seconds.to_string(),
        "-o".to_owned(),
        path_arg(out).to_owned(),
    ]);
    run.wait_for_stderr("livetrace: profiling", SLACK);
    let (t0, c0) = (Instant::now(), cpu_seconds(pid));
    // The capture ends after `seconds`; read the CPU time right then, before symbolisation.
    thread::sleep(Duration::from_secs(seconds.into()));
    let (t1, c1) = (Instant::now(), cpu_seconds(pid));
    let finished = run.finish(Duration::from_secs(seconds.into()) + SLACK);
    finished.assert_success();
    let profile = Profile::read(out);
    let share = (c1 - c0) / (t1 - t0).as_secs_f64();
    let expected = share * f64::from(seconds) * f64::from(hz);
    let total = profile.total() as f64;
    assert!(
        expected > 0.2 * f64::from(seconds * hz),
        "the fixture got only {share:.2} of a CPU: too little to judge the sample count"
    );
    assert!(
        (0.85 * expected..=1.15 * expected).contains(&total),
        "{total} samples, expected {expected:.0} ± 15% ({share:.2} CPU × {seconds} s × {hz} Hz)\n{}",
        profile.summary()
    );
    profile
}

/// `-p PID` gets the right sample count, complete main;a;b;c stacks and the leaf shares that the
/// fixture measured of itself (about 6:3:1).
#[test]
fn pid_profile_has_complete_stacks_and_right_shares() {
    require_root();
    let _cpus = cpu_exclusive();
    let mut chain = MeasuredFixture::start("chain", &["15"]);
    let pid = chain.pid();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");

    let (profile, truth) = chain.during(|| profile_and_check_count(pid, DEFAULT_HZ, 4, &out));
    for stack in &profile.stacks {
        assert_eq!(
            stack.root(),
            "chain",
            "the root frame is the process name: {stack:?}"
        );
    }

    // Frame-pointer unwinding of a -O0 binary must not lose frames. A few samples may land
    // outside the chain (the clock read between rounds, kernel entry), hence 95%, not 100%.
    let complete = profile.share_where(|stack| stack.contains_run(&CHAIN));
    assert!(
        complete >= 0.95,
        "only {complete:.3} of samples contain main;a;b;c\n{}",
        profile.summary()
    );
    // A sample in a hot leaf always has main;a;b;c right above it. The only legitimate exception
    // is a sample in the two-instruction prologue before the leaf sets up its frame, which is
    // vanishingly rare; 99% tolerates it.
    let in_hot_leaf = |stack: &Stack| {
        HOT_LEAVES
            .iter()
            .any(|leaf| stack.user_leaf() == Some(leaf))
    };
    let under_chain = |stack: &Stack| {
        let user = stack.user_frames();
        user.len() > CHAIN.len() && user[user.len() - 1 - CHAIN.len()..user.len() - 1] == CHAIN
    };
    let hot = profile.share_where(in_hot_leaf);
    let hot_under_chain = profile.share_where(|stack| in_hot_leaf(stack) && under_chain(stack));
    assert!(
        hot_under_chain >= 0.99 * hot,
        "of the {hot:.3} of samples in hot leaves, only {hot_under_chain:.3} sit right under \
         main;a;b;c\n{}",
        profile.summary()
    );

    for leaf in HOT_LEAVES {
        assert_share(
            &format!("the share of {leaf}"),
            profile.share_with_leaf(leaf),
            profile.total(),
            truth.share(leaf),
            &profile.summary(),
        );
    }
}

/// `-F` sets the sampling frequency: 49 Hz gives about half the samples of the default 99 Hz.
#[test]
fn frequency_flag_sets_the_sample_rate() {
    require_root();
    let _cpus = cpu_exclusive();
    let chain = start_fixture("chain", &["15"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");

    profile_and_check_count(chain.pid(), 49, 3, &out);
}

/// `-d` takes fractional seconds and `ms`/`s` suffixes, and the capture lasts that long.
#[test]
fn duration_accepts_fractions_and_units() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["15"]);
    let dir = tempfile::tempdir().unwrap();
    let pid = chain.pid().to_string();

    for (index, duration) in ["0.75", "750ms", "0.75s"].into_iter().enumerate() {
        let out = dir.path().join(format!("out{index}.folded"));
        let run = run_livetrace(
            ["profile", "-p", &pid, "-d", duration, "-o", path_arg(&out)],
            Duration::from_millis(750) + SLACK,
        );
        run.assert_success();
        // 0.75 s of capture plus start-up and writing stays well under 4 s; reading 750ms as
        // 750 s would not, and rounding 0.75 down to 0 s would leave no samples below.
        assert!(
            run.elapsed < Duration::from_secs(4),
            "-d {duration} ran for {:?}; stderr:\n{}",
            run.elapsed,
            run.stderr
        );
        let profile = Profile::read(&out);
        assert!(
            profile.has_frame("hot_60"),
            "-d {duration}: no hot_60\n{}",
            profile.summary()
        );
    }
}

/// `-- COMMAND` runs the command, profiles it, and ends when it exits, well before `-d`.
#[test]
fn command_mode_ends_when_the_command_exits() {
    require_root();
    let _cpus = cpu_shared();
    let chain = fixture("chain");
    let (profile, run) = run_folded(
        &["profile", "-d", "10", "--", path_arg(&chain), "2"],
        Duration::from_secs(10) + SLACK,
    );
    // The command runs for 2 s; 8 s is far below the 10 s of -d even on a loaded machine.
    assert!(
        run.elapsed < Duration::from_secs(8),
        "livetrace ran for {:?}: it did not stop when the command exited; stderr:\n{}",
        run.elapsed,
        run.stderr
    );
    assert!(profile.total() > 0, "no samples; stderr:\n{}", run.stderr);
    assert!(
        profile.has_frame("hot_60"),
        "no hot_60 in the profile\n{}",
        profile.summary()
    );
}

/// `-- COMMAND` also profiles the children the command forks after the capture started.
#[test]
fn command_mode_follows_forked_children() {
    require_root();
    let _cpus = cpu_shared();
    let forker = fixture("forker");
    // forker burns in parent_burn for 1 s, then its child burns in child_burn for 2 s.
    let (profile, run) = run_folded(
        &["profile", "-d", "10", "--", path_arg(&forker), "3"],
        Duration::from_secs(10) + SLACK,
    );
    assert!(
        run.elapsed < Duration::from_secs(9),
        "livetrace ran for {:?}: it did not stop when the command exited; stderr:\n{}",
        run.elapsed,
        run.stderr
    );
    assert!(
        profile.has_frame("parent_burn"),
        "no parent_burn\n{}",
        profile.summary()
    );
    assert!(
        profile.has_frame("child_burn"),
        "no child_burn: the forked child was not followed\n{}",
        profile.summary()
    );
}

/// A `-p` target exiting mid-capture ends it: livetrace says so, writes its outputs, exits 0.
#[test]
fn target_exit_ends_the_capture_and_writes_outputs() {
    require_root();
    let _cpus = cpu_shared();
    // 3 s rather than 2: enough for livetrace to attach and sample before the target is gone.
    let mut spin = start_fixture("spin", &["3"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");

    let pid = spin.pid().to_string();
    let livetrace = Livetrace::start(["profile", "-p", &pid, "-d", "30", "-o", path_arg(&out)]);
    // Reap the target as soon as it exits, as its parent would, so that it is really gone.
    let status = spin
        .wait_timeout(Duration::from_secs(6))
        .expect("spin did not exit by itself");
    assert!(status.success(), "spin failed: {status}");
    // The target is gone 3 s in; 10 s is far below the 30 s of -d.
    let run = livetrace.finish(Duration::from_secs(10));
    run.assert_success();

    assert!(
        run.stderr.to_lowercase().contains("exited"),
        "stderr does not say that the target exited:\n{}",
        run.stderr
    );
    let profile = Profile::read(&out);
    assert!(
        profile.has_frame("spin_leaf"),
        "no spin_leaf\n{}",
        profile.summary()
    );
}

/// SIGTERM ends a capture without -d early, and every output is still written.
#[test]
fn sigterm_ends_the_capture_and_writes_every_output() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["15"]);
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("out.folded");
    let svg = dir.path().join("out.svg");

    let pid = chain.pid().to_string();
    let mut livetrace = Livetrace::start([
        "profile",
        "-p",
        &pid,
        "-o",
        path_arg(&folded),
        "-o",
        path_arg(&svg),
    ]);
    livetrace.wait_for_stderr("livetrace: profiling", SLACK);
    // Samples to write: the fixture has run a while under the capture.
    wait_for_cpu(chain.pid(), 0.3);
    livetrace.signal(libc::SIGTERM);
    let run = livetrace.finish(Duration::from_secs(2) + SLACK);
    run.assert_success();

    for path in [&folded, &svg] {
        let size = fs::metadata(path)
            .unwrap_or_else(|e| {
                panic!(
                    "{} was not written: {e}; stderr:\n{}",
                    path.display(),
                    run.stderr
                )
            })
            .len();
        assert!(
            size > 0,
            "{} is empty; stderr:\n{}",
            path.display(),
            run.stderr
        );
    }
    let profile = Profile::read(&folded);
    assert!(profile.total() > 0, "no samples; stderr:\n{}", run.stderr);
}

/// The `.svg` output is a complete SVG document that names the fixture's hot function.
#[test]
fn svg_output_is_well_formed() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["15"]);
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("out.svg");

    let pid = chain.pid().to_string();
    let run = run_livetrace(
        ["profile", "-p", &pid, "-d", "2", "-o", path_arg(&svg)],
        Duration::from_secs(2) + SLACK,
    );
    run.assert_success();

    let text = fs::read_to_string(&svg).expect("cannot read the SVG");
    assert_well_formed_svg(&text);
    assert!(text.contains("hot_60"), "the SVG does not mention hot_60");
}

/// `-p` with a PID that does not exist fails at once, names the PID and writes nothing.
#[test]
fn nonexistent_pid_fails_fast_and_names_it() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");

    let pid = unused_pid().to_string();
    let run = run_livetrace(
        ["profile", "-p", &pid, "-d", "5", "-o", path_arg(&out)],
        SLACK,
    );
    run.assert_failure();
    // Checking a PID takes microseconds; 2 s means nothing was loaded or captured first.
    assert!(
        run.elapsed < Duration::from_secs(2),
        "took {:?} to fail",
        run.elapsed
    );
    assert!(
        run.stderr.contains(&pid),
        "stderr does not name PID {pid}:\n{}",
        run.stderr
    );
    assert!(
        !out.exists(),
        "{} was written although the run failed",
        out.display()
    );
}

/// `-U` records user stacks only: no kernel frame in any stack.
#[test]
fn user_only_has_no_kernel_frames() {
    require_root();
    let _cpus = cpu_shared();
    let mixed = start_fixture("mixed", &["15"]);
    let pid = mixed.pid().to_string();
    let (profile, _) = run_folded(
        &["profile", "-p", &pid, "-U", "-d", "2"],
        Duration::from_secs(2) + SLACK,
    );
    assert!(
        profile.has_frame("user_burn"),
        "no user_burn\n{}",
        profile.summary()
    );
    for stack in &profile.stacks {
        assert!(
            !stack.frames.iter().any(|frame| is_kernel_frame(frame)),
            "a kernel frame under -U: {}",
            stack.frames.join(";")
        );
    }
}

/// `-K` records kernel stacks only: every frame below the process name is a kernel frame.
#[test]
fn kernel_only_has_only_kernel_frames() {
    require_root();
    let _cpus = cpu_shared();
    // mixed spends about half its time in read(2) from /dev/zero, so -K has plenty to record.
    let mixed = start_fixture("mixed", &["15"]);
    let pid = mixed.pid().to_string();
    let (profile, _) = run_folded(
        &["profile", "-p", &pid, "-K", "-d", "2"],
        Duration::from_secs(2) + SLACK,
    );
    for stack in &profile.stacks {
        assert!(
            stack
                .below_root()
                .iter()
                .all(|frame| is_kernel_frame(frame)),
            "a frame without the kernel suffix under -K: {}",
            stack.frames.join(";")
        );
    }
    // Every read(2) of /dev/zero goes through vfs_read.
    assert!(
        profile.has_frame("vfs_read_[k]"),
        "no vfs_read_[k]\n{}",
        profile.summary()
    );
}

/// By default a stack has both parts, user frames first and kernel frames after them.
#[test]
fn kernel_frames_follow_user_frames() {
    require_root();
    let _cpus = cpu_shared();
    let mixed = start_fixture("mixed", &["15"]);
    let pid = mixed.pid().to_string();
    let (profile, _) = run_folded(
        &["profile", "-p", &pid, "-d", "2"],
        Duration::from_secs(2) + SLACK,
    );
    for stack in &profile.stacks {
        let first_kernel = stack.frames.iter().position(|frame| is_kernel_frame(frame));
        if let Some(first_kernel) = first_kernel {
            assert!(
                stack.frames[first_kernel..]
                    .iter()
                    .all(|frame| is_kernel_frame(frame)),
                "a user frame after a kernel frame: {}",
                stack.frames.join(";")
            );
        }
    }
    // mixed's kernel_work makes its system calls itself, so a sample in the kernel on its behalf
    // has kernel_work as its innermost user frame with kernel frames after it. The fixture spends
    // about half its time there; 0.25 leaves room for the sampling error of ~200 samples.
    let stitched = profile.share_where(|stack| {
        stack.user_leaf() == Some("kernel_work")
            && stack
                .frames
                .last()
                .is_some_and(|frame| is_kernel_frame(frame))
    });
    assert!(
        stitched >= 0.25,
        "only {stitched:.3} of samples go from kernel_work into the kernel\n{}",
        profile.summary()
    );
}

/// `-o -` writes the folded stacks to standard output, and nothing else goes there.
#[test]
fn dash_output_writes_folded_to_stdout() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["15"]);

    let pid = chain.pid().to_string();
    let run = run_livetrace(
        ["profile", "-p", &pid, "-d", "2", "-o", "-"],
        Duration::from_secs(2) + SLACK,
    );
    run.assert_success();

    // Profile::parse panics on any line that is not folded, such as a progress message.
    let profile = Profile::parse(&run.stdout);
    assert!(
        profile.total() > 0,
        "no samples on stdout; stderr:\n{}",
        run.stderr
    );
    assert!(
        profile.has_frame("hot_60"),
        "no hot_60 on stdout\n{}",
        profile.summary()
    );
}

/// An output path that cannot be written fails before capturing and names the path.
#[test]
fn unwritable_output_path_fails_before_capturing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("missing-dir").join("x.folded");

    // Whole-system mode, so that the output path is the only thing wrong.
    let run = run_livetrace(
        ["profile", "-d", "10", "-o", path_arg(&out)],
        Duration::from_secs(10) + SLACK,
    );
    run.assert_failure();
    // A capture would take 10 s; failing within 2 s means the path was checked first.
    assert!(
        run.elapsed < Duration::from_secs(2),
        "took {:?} to fail",
        run.elapsed
    );
    assert!(
        run.stderr.contains(path_arg(&out)),
        "stderr does not name {}:\n{}",
        out.display(),
        run.stderr
    );
}

/// A duration that is not one is a usage error (exit code 2) that names the bad value.
#[test]
fn bad_duration_is_a_usage_error() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");

    let run = run_livetrace(["profile", "-d", "banana", "-o", path_arg(&out)], SLACK);
    assert_eq!(
        run.status.code(),
        Some(2),
        "expected the usage-error exit code 2, got {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    assert!(
        run.stderr.contains("banana"),
        "stderr does not name the value:\n{}",
        run.stderr
    );
    assert!(
        !out.exists(),
        "{} was written although the run failed",
        out.display()
    );
}

/// A stack deeper than either unwinding mode walks (2000 frames) is marked `[stack cut short]`
/// at its root end and counted in the footer with the reason, in frame-pointer and in DWARF
/// mode: its outermost frames (main, _start) are missing, and it must not pass for complete.
#[test]
fn a_stack_deeper_than_any_walk_is_marked_and_counted() {
    require_root();
    let _cpus = cpu_shared();
    let deep = start_fixture("deep", &["2000", "20"]);
    let pid = deep.pid().to_string();
    for (mode, reason) in [
        ("fp", "filled the kernel's 127 frames"),
        ("dwarf", "16 KiB"),
    ] {
        let (profile, run) = run_folded(
            &["profile", "-p", &pid, "-U", "--unwind", mode, "-d", "1"],
            Duration::from_secs(1) + SLACK,
        );
        let bottom = profile.share_containing("spin_at_bottom");
        let marked = profile.share_where(|s| {
            s.contains("spin_at_bottom")
                && s.below_root().first().map(String::as_str) == Some("[stack cut short]")
        });
        assert!(
            bottom > 0.5 && (marked - bottom).abs() < 1e-9,
            "{mode}: {marked:.3} of {bottom:.3} marked\n{}",
            profile.summary()
        );
        assert!(!profile.has_frame("main"), "{mode}: {}", profile.summary());
        assert!(
            run.stderr.contains("stack cut short") && run.stderr.contains(reason),
            "{mode}: {}",
            run.stderr
        );
        // The copy is already the largest there is: no advice to raise it.
        assert!(
            !run.stderr.contains("raise --stack-copy-size"),
            "{}",
            run.stderr
        );
    }
}

/// At a sampling rate the unwinding thread cannot keep up with (20 kHz, the smallest ring
/// buffer), stack copies are dropped, but no sample is: each stays in the profile under
/// `[lost user stack]`, the footer counts them by cause, and the hint names the ring buffer.
/// They used to vanish (a quarter of the samples at high -F) with a hint at the wrong knob.
#[test]
fn samples_whose_stack_copy_is_dropped_stay_in_the_profile() {
    require_root();
    let _cpus = cpu_shared();
    let chain = start_fixture("chain", &["20"]);
    let pid = chain.pid().to_string();
    let (profile, run) = run_folded(
        &[
            "profile",
            "-p",
            &pid,
            "-F",
            "20000",
            "--unwind-buffer-size",
            "64k",
            "-d",
            "1",
        ],
        Duration::from_secs(1) + SLACK,
    );
    // "data quality: 1.00 s, 39990 events seen, 19921 recorded"
    let recorded: u64 = run
        .stderr
        .split(" recorded")
        .next()
        .and_then(|before| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no recorded count:\n{}", run.stderr));
    assert_eq!(profile.total(), recorded, "{}", run.stderr);
    assert!(
        profile.has_frame("[lost user stack]")
            && run
                .stderr
                .contains("stack copy lost to the full unwind ring buffer")
            && run.stderr.contains("raise --unwind-buffer-size"),
        "{}\n{}",
        profile.summary(),
        run.stderr
    );
}

/// A command whose work is done by children that each live 5 ms, less than a sample period
/// (forked, or forked and exec'd): they are sampled as often as their time on a CPU says, and
/// their frames are named, with complete stacks, although each is gone long before the
/// capture ends. Per-task sampling gave such children no sample at all, and the exec'd ones'
/// frames were 99% `[unknown]` ("exited before it could be looked at").
#[test]
fn short_lived_children_of_a_command_are_sampled_and_named() {
    require_root();
    let _cpus = cpu_exclusive();
    let brood = fixture("brood");
    for mode in ["fork", "exec"] {
        let (profile, run) = run_folded(
            &["profile", "-d", "30", "--", path_arg(&brood), mode, "100"],
            Duration::from_secs(30) + SLACK,
        );
        // 100 children × 5 ms of CPU, sampled at 99 Hz: about 50 samples.
        let in_children = profile.share_containing("child_burn") * profile.total() as f64;
        assert!(
            in_children >= 25.0,
            "{mode}: {in_children} samples in child_burn, expected about 50\n{}\n{}",
            profile.summary(),
            run.stderr
        );
        let complete = profile.share_where(|s| {
            s.contains("child_burn") && s.user_frames().first() == Some(&"_start")
        }) * profile.total() as f64;
        assert!(
            complete >= 0.9 * in_children,
            "{mode}: only {complete} of {in_children} child samples are complete and named\n{}\n{}",
            profile.summary(),
            run.stderr
        );
    }
}
