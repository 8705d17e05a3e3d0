//! Integration tests of the flight recorder, `livetrace record`, and `livetrace dump`: a fixture
//! that switches its hot function at a known moment must show, in each window dumped, the
//! functions of that window only, in the right proportions; memory stays bounded, counted, while
//! stacks explode; only the recorder's owner may dump; dumps at once and while the recorder stops
//! are answered; the end writes the outputs; an hour of recording, scaled down, stays flat.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use common::{
    Finished, Livetrace, Process, Profile, cpu_exclusive, cpu_shared, fixture, path_arg,
    require_root, run_livetrace, start_fixture,
};

const SLACK: Duration = Duration::from_secs(20);
/// Descriptors a recorder may hold open for a moment beyond its steady state.
const TRANSIENT_FDS: usize = 4;

/// Starts `livetrace record ARGS --socket SOCKET` and waits for its start line.
fn start_recorder(args: &[&str], socket: &Path) -> Livetrace {
    let mut all = vec!["record"];
    all.extend_from_slice(args);
    all.extend(["--socket", path_arg(socket)]);
    let mut recorder = Livetrace::start(&all);
    recorder.wait_for_stderr("livetrace: recording", SLACK);
    recorder
}

/// `livetrace dump --socket SOCKET ARGS`, to completion.
fn dump(socket: &Path, args: &[&str]) -> Finished {
    let mut all = vec!["dump", "--socket", path_arg(socket)];
    all.extend_from_slice(args);
    run_livetrace(&all, SLACK)
}

fn unix(at: SystemTime) -> String {
    format!(
        "@{:.3}",
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    )
}

fn seconds(text: &str) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs_f64(text.trim().parse().unwrap())
}

fn json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("no {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The resident memory (kB) and open file descriptors of a process.
fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// The switch fixture burns in before_switch, then in after_switch from the moment T it prints.
/// Dumps of a window wholly before T, of the last seconds after T, and of one spanning T show
/// the old function only, the new one only, and both at their share of the window's time; the
/// end (SIGTERM) writes the outputs; each dump says which window it covers.
#[test]
fn each_window_dumped_shows_its_own_functions() {
    require_root();
    // Samples follow time only while the fixture has a CPU to itself.
    let _cpus = cpu_exclusive();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("record.sock");
    let mut command = Command::new(fixture("switch"));
    command
        .args(["6", "8"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let switcher = Process::from_child(child);
    let final_out = dir.path().join("final.folded");
    let pid = switcher.pid().to_string();
    let recorder = start_recorder(
        &[
            "-p",
            &pid,
            "--bucket",
            "500ms",
            "--keep",
            "1m",
            "-o",
            path_arg(&final_out),
        ],
        &socket,
    );
    let recording_since = SystemTime::now();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let switched = seconds(line.strip_prefix("switched ").expect("the switch line"));
    // Three and a half seconds after the switch: whole buckets after it, and before it.
    let ready = switched + Duration::from_millis(3500);
    if let Ok(wait) = ready.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }

    let before = dir.path().join("before.folded");
    let run = dump(
        &socket,
        &[
            "--from",
            &unix(recording_since),
            "--to",
            &unix(switched - Duration::from_millis(300)),
            "-o",
            path_arg(&before),
        ],
    );
    run.assert_success();
    let profile = Profile::read(&before);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    assert!(run.stderr.contains("note: window "), "{context}");
    assert!(profile.total() >= 50, "{context}");
    assert!(
        profile.share_containing("before_switch") > 0.95,
        "{context}"
    );
    assert!(!profile.has_frame("after_switch"), "{context}");
    assert!(
        dir.path().join("before.offcpu.folded").is_file(),
        "{context}"
    );

    let after = dir.path().join("after.folded");
    let run = dump(&socket, &["--last", "2s", "-o", path_arg(&after)]);
    run.assert_success();
    let profile = Profile::read(&after);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    assert!(profile.total() >= 30, "{context}");
    assert!(profile.share_containing("after_switch") > 0.95, "{context}");
    assert!(!profile.has_frame("before_switch"), "{context}");

    let (spanning, spanning_json) = (dir.path().join("both.folded"), dir.path().join("both.json"));
    let run = dump(
        &socket,
        &[
            "--from",
            &unix(switched - Duration::from_secs(2)),
            "--to",
            &unix(switched + Duration::from_secs(2)),
            "-o",
            path_arg(&spanning),
            "-o",
            path_arg(&spanning_json),
        ],
    );
    run.assert_success();
    let profile = Profile::read(&spanning);
    let summary = json(&spanning_json);
    let started = summary["started_unix_nanoseconds"].as_u64().unwrap() as f64 / 1e9;
    let duration = summary["duration_seconds"].as_f64().unwrap();
    let switch_at = switched
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // The fixture is always on a CPU: samples follow time.
    let expected = ((switch_at - started) / duration).clamp(0.0, 1.0);
    let share = profile.share_containing("before_switch");
    let context = format!(
        "{}\n{}\nwindow {started:.3} + {duration:.3} s, switch at {switch_at:.3}",
        profile.summary(),
        run.stderr
    );
    assert!(profile.total() >= 100, "{context}");
    assert!(
        (share - expected).abs() <= 0.12,
        "before_switch on {share:.3}, expected {expected:.3}\n{context}"
    );
    assert!(
        (profile.share_containing("after_switch") - (1.0 - expected)).abs() <= 0.12,
        "{context}"
    );

    recorder.signal(libc::SIGTERM);
    let run = recorder.finish(SLACK);
    run.assert_success();
    let profile = Profile::read(&final_out);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    assert!(
        profile.has_frame("before_switch") && profile.has_frame("after_switch"),
        "{context}"
    );
    assert!(!socket.exists(), "the socket outlived the recorder");
    drop(switcher);
}

/// Only the recorder's owner may dump: the socket's directory and the socket itself are its
/// owner's, and where those permissions are opened up, the recorder refuses another uid itself.
/// Two dumps at once are both answered, and so is one that asks while the recorder stops; one
/// after it has stopped says that no recorder is listening.
#[test]
fn dumps_are_the_owners_and_are_answered_at_once_and_while_stopping() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("record.sock");
    let spin = start_fixture("spin", &["30"]);
    let pid = spin.pid().to_string();
    let final_out = dir.path().join("final.folded");
    let recorder = start_recorder(
        &["-p", &pid, "--bucket", "250ms", "-o", path_arg(&final_out)],
        &socket,
    );
    std::thread::sleep(Duration::from_secs(1));

    let nobody = |out: &Path| {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(common::livetrace())
            .args(["dump", "--socket", path_arg(&socket), "-o", path_arg(out)]);
        Livetrace::start_command(command).finish(SLACK)
    };
    let run = nobody(Path::new("/tmp/livetrace-test-nobody.folded"));
    run.assert_failure();
    assert!(run.stderr.contains("permission denied"), "{}", run.stderr);
    // Opened up, the socket still refuses another user.
    use std::os::unix::fs::PermissionsExt as _;
    let open = std::fs::Permissions::from_mode(0o777);
    std::fs::set_permissions(dir.path(), open.clone()).unwrap();
    std::fs::set_permissions(&socket, open).unwrap();
    let run = nobody(Path::new("/tmp/livetrace-test-nobody.folded"));
    run.assert_failure();
    assert!(
        run.stderr.contains("refused: uid Some(65534)"),
        "{}",
        run.stderr
    );

    // Every output format, over the window asked for, the off-CPU profile beside each.
    let formats = [
        "w.folded",
        "w.svg",
        "w.pb.gz",
        "w.speedscope.json",
        "w.json",
    ];
    let mut args = vec!["--last", "1s"];
    let paths: Vec<PathBuf> = formats.iter().map(|f| dir.path().join(f)).collect();
    for path in &paths {
        args.extend(["-o", path_arg(path)]);
    }
    dump(&socket, &args).assert_success();
    for name in formats {
        let size = std::fs::metadata(dir.path().join(name)).map_or(0, |m| m.len());
        assert!(size > 0, "{name} is missing or empty");
        // The spinning fixture may not block at all: its off-CPU profile may hold nothing.
        let offcpu = name.replacen("w.", "w.offcpu.", 1);
        assert!(dir.path().join(&offcpu).is_file(), "{offcpu} is missing");
    }
    let window = json(&dir.path().join("w.json"));
    let seconds = window["duration_seconds"].as_f64().unwrap();
    assert!(
        (0.25..=1.0).contains(&seconds),
        "a window of the last 1 s covers {seconds} s"
    );

    // Two at once.
    let outs: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("at-once-{i}.folded")))
        .collect();
    let dumps: Vec<Livetrace> = outs
        .iter()
        .map(|out| Livetrace::start(["dump", "--socket", path_arg(&socket), "-o", path_arg(out)]))
        .collect();
    for (dump, out) in dumps.into_iter().zip(&outs) {
        let run = dump.finish(SLACK);
        run.assert_success();
        assert!(
            Profile::read(out).share_containing("spin") > 0.9,
            "{}",
            run.stderr
        );
    }

    // One that connects, then asks once the recorder has been told to stop.
    let mut stream = UnixStream::connect(&socket).unwrap();
    let stopping_out = dir.path().join("stopping.folded");
    recorder.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let request = serde_json::json!({
        "from": null, "to": null, "last": null,
        "outputs": [stopping_out.to_str().unwrap()],
    });
    writeln!(stream, "{request}").unwrap();
    let mut answer = String::new();
    stream.set_read_timeout(Some(SLACK)).unwrap();
    stream.read_to_string(&mut answer).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(Profile::read(&stopping_out).total() > 0);

    let run = recorder.finish(SLACK);
    run.assert_success();
    assert!(
        Profile::read(&final_out).share_containing("spin") > 0.9,
        "{}",
        run.stderr
    );
    let late = dump(&socket, &["-o", path_arg(&dir.path().join("late.folded"))]);
    late.assert_failure();
    assert!(
        late.stderr.contains("no recorder is listening"),
        "{}",
        late.stderr
    );
    drop(spin);
}

/// A fixture that makes new stacks without end, at 499 Hz: the recorder drops its oldest
/// buckets to stay within --max-memory, says so, and its resident memory stays within what it
/// needed once started (its rings of stack copies, its binary, its unwinding caches: about
/// 85 MiB here, measured after a second) plus --max-memory plus 16 MiB of slack for the
/// allocator and the building of a bucket.
#[test]
fn memory_stays_bounded_while_stacks_explode() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("record.sock");
    let many = start_fixture("many_stacks", &["30"]);
    let pid = many.pid().to_string();
    let final_out = dir.path().join("final.folded");
    let recorder = start_recorder(
        &[
            "-p",
            &pid,
            "-F",
            "499",
            "--bucket",
            "250ms",
            "--keep",
            "1m",
            "--max-memory",
            "4m",
            "-o",
            path_arg(&final_out),
        ],
        &socket,
    );
    std::thread::sleep(Duration::from_secs(1));
    let (warm, _) = footprint(recorder.pid());
    let mut peak = warm;
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        peak = peak.max(footprint(recorder.pid()).0);
        std::thread::sleep(Duration::from_millis(100));
    }
    recorder.signal(libc::SIGTERM);
    let run = recorder.finish(SLACK);
    run.assert_success();
    let context = format!("RSS after 1 s {warm} kB, peak {peak} kB\n{}", run.stderr);
    assert!(peak <= warm + 4 * 1024 + 16 * 1024, "{context}");
    assert!(
        run.stderr.contains("were dropped, oldest first"),
        "{context}"
    );
    let held: f64 = run
        .stderr
        .split("(held now: ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .expect("the footer says what is held");
    assert!(held <= 4.0, "{context}");
    assert!(Profile::read(&final_out).total() > 0, "{context}");
    drop(many);
}

/// An hour of recording scaled down 40 times: 250 ms buckets instead of the default 10 s, for
/// 90 s (360 cuts, as many as an hour of the default), a --keep of 5 s, and a command that
/// starts a short-lived process every 100 ms, with rotated pprof files every second. Resident
/// memory and open file descriptors do not grow after the first 20 s (but for a few open for a
/// moment); the processes that exited
/// are still named; --max-files holds.
#[test]
fn an_hour_scaled_down_stays_flat() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("record.sock");
    let rotated = dir.path().join("rotated");
    let final_out = dir.path().join("final.folded");
    let program = fixture("short_lived");
    let recorder = start_recorder(
        &[
            "--bucket",
            "250ms",
            "--keep",
            "5s",
            "--write-every",
            "1s",
            "--dir",
            path_arg(&rotated),
            "--max-files",
            "3",
            "-o",
            path_arg(&final_out),
            "-d",
            "90",
            "--",
            path_arg(&program),
            "100",
        ],
        &socket,
    );
    let started = Instant::now();
    let at = |secs| {
        let due = Duration::from_secs(secs);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    };
    at(20);
    let warm = footprint(recorder.pid());
    let mut peak = warm.0;
    for secs in (25..=85).step_by(5) {
        at(secs);
        let (rss, fds) = footprint(recorder.pid());
        peak = peak.max(rss);
        // A file being read at that instant (a process's maps, an ELF) is not a leak; one
        // descriptor per process or per cut would be hundreds.
        assert!(
            fds <= warm.1 + TRANSIENT_FDS,
            "{fds} descriptors open at {secs} s, {} at 20 s",
            warm.1
        );
    }
    let run = recorder.finish(Duration::from_secs(90) + SLACK);
    run.assert_success();
    let context = format!(
        "RSS at 20 s {} kB, peak after {peak} kB\n{}",
        warm.0, run.stderr
    );
    assert!(peak <= warm.0 + 4 * 1024, "{context}");
    let profile = Profile::read(&final_out);
    let named = profile.share_containing("short_lived_burn");
    assert!(
        named > 0.8,
        "short_lived_burn on {named:.3}\n{}\n{context}",
        profile.summary()
    );
    let files: Vec<String> = std::fs::read_dir(&rotated)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let on_cpu = files.iter().filter(|n| !n.contains(".offcpu.")).count();
    assert!((1..=3).contains(&on_cpu), "{files:?}");
    assert!(files.iter().all(|n| n.ends_with(".pb.gz")), "{files:?}");
}

/// With frame pointers walked in the kernel, every stack goes through the kernel's stack map,
/// which a recording that runs for hours would fill (and then lose most new stacks to hash
/// collisions: about the share of it that is full). A fixture that makes new stacks without
/// end at 499 Hz, against a map of 2048 stacks, for 8 s: the recorder empties the map at its
/// cuts once it holds 128, says so, and loses under 10% of stacks, where a map let fill would
/// lose most of them after its first four seconds.
#[test]
fn a_full_stack_map_is_emptied_and_stacks_stay_whole() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("record.sock");
    let many = start_fixture("many_stacks", &["30"]);
    let pid = many.pid().to_string();
    let final_out = dir.path().join("final.folded");
    let recorder = start_recorder(
        &[
            "-p",
            &pid,
            "--unwind",
            "fp",
            "--no-offcpu",
            "-F",
            "499",
            "--bucket",
            "250ms",
            "--stack-storage-size",
            "2048",
            "-d",
            "8",
            "-o",
            path_arg(&final_out),
        ],
        &socket,
    );
    let run = recorder.finish(Duration::from_secs(8) + SLACK);
    run.assert_success();
    let profile = Profile::read(&final_out);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    let lost = profile.share_where(|s| s.frames.iter().any(|f| f.starts_with("[lost ")));
    assert!(profile.total() >= 500, "{context}");
    assert!(
        lost < 0.1,
        "{lost:.3} of samples lost their stack\n{context}"
    );
    assert!(
        run.stderr
            .contains("the stack map filled a sixteenth and was emptied"),
        "{context}"
    );
    drop(many);
}

/// Every sample the programs count lands in exactly one bucket: each cut swaps the count map
/// the programs add through, and the kernel returns from the swap only once no program still
/// adds to the old one. Over many cuts at a high rate, the samples of all buckets together are
/// exactly those counted as recorded, and every event seen has exactly one outcome.
#[test]
fn every_sample_lands_in_exactly_one_bucket() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("record.sock");
    let final_out = dir.path().join("final.json");
    let spin = fixture("spin");
    // 24 cuts of 250 ms (the shortest bucket) at 999 Hz: about 1000 samples between cuts.
    let recorder = start_recorder(
        &[
            "--unwind",
            "fp",
            "--no-offcpu",
            "-F",
            "999",
            "--bucket",
            "250ms",
            "-d",
            "6",
            "-o",
            path_arg(&final_out),
            "--",
            path_arg(&spin),
            "30",
        ],
        &socket,
    );
    let run = recorder.finish(Duration::from_secs(6) + SLACK);
    run.assert_success();
    let summary = json(&final_out);
    let quality = &summary["data_quality"];
    let field = |name: &str| {
        quality[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {quality}"))
    };
    let context = format!("{quality}\n{}", run.stderr);
    let total = summary["total"].as_u64().unwrap();
    assert!(total >= 3000, "{total} samples in 6 s at 999 Hz\n{context}");
    assert_eq!(total, field("recorded"), "{context}");
    assert_eq!(
        field("events"),
        field("recorded") + field("idle") + field("not_target") + field("counts_map_full"),
        "{context}"
    );
}
