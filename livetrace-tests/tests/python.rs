//! Integration tests of Python frames in CPython processes that were not started with `-X perf`.
//! CPython 3.8 to 3.13 (pyenv's builds, without frame pointers, and Debian's stripped
//! python3.11) get their Python functions by name, with lines, in call order among the native
//! frames, as py-spy (pinned, installed by `cargo xtask setup`) sees the same process at the same
//! time. The older CPythons on these machines (2.7, 3.6) get complete native stacks, and a footer
//! that counts what it could not name and says why. They run the real binary as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    Process, Profile, Stack, assert_share, cpu_exclusive, cpu_seconds, cpu_shared, path_arg,
    require_root, run_folded, run_livetrace, thread_cpu_seconds, wait_for_cpu,
};

/// Bound on a run's wall time beyond its capture; only reached when livetrace hangs.
const SLACK: Duration = Duration::from_secs(8);
/// How long each Python process is profiled.
const CAPTURE_SECS: u64 = 3;

/// A CPU-bound loop that runs on Python 2.7 and 3, and ends itself after 20 s.
const HOT_LOOP: &str = "
import time
def hot():
    total = 0
    for i in range(10000):
        total += i * i
    return total
end = time.time() + 20
while time.time() < end:
    hot()
";

fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
}

fn pyenv(version: &str, minor: &str) -> PathBuf {
    home().join(format!(".pyenv/versions/{version}/bin/python{minor}"))
}

/// The CPythons whose frames livetrace reads: (version as the footer names it, interpreter).
fn readable() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("3.8", pyenv("3.8.18", "3.8")),
        ("3.9", pyenv("3.9.18", "3.9")),
        ("3.10", pyenv("3.10.13", "3.10")),
        ("3.11", pyenv("3.11.7", "3.11")),
        ("3.12", pyenv("3.12.1", "3.12")),
        ("3.13", pyenv("3.13.0", "3.13")),
        ("3.11", PathBuf::from("/usr/bin/python3.11")),
    ]
}

/// One CPython of each way of keeping frames: `PyFrameObject`s found through the pthread (3.10),
/// `_PyInterpreterFrame`s with `is_entry` (3.11), with shim frames (3.12), in the thread state
/// (3.13).
fn each_frame_model() -> Vec<(&'static str, PathBuf)> {
    readable()
        .into_iter()
        .filter(|(version, path)| {
            ["3.10", "3.11", "3.12", "3.13"].contains(version) && path.starts_with(home())
        })
        .collect()
}

/// The other CPythons on these machines.
fn unreadable() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("2.7", pyenv("2.7.18", "2.7")),
        ("3.6", pyenv("3.6.15", "3.6")),
    ]
}

fn require(interpreter: &Path) {
    assert!(
        interpreter.is_file(),
        "{} is missing: these tests need pyenv's CPython 2.7, 3.6 and 3.8 to 3.13 and Debian's \
         python3.11",
        interpreter.display()
    );
}

fn fixture_source(name: &str) -> String {
    format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// py-spy, pinned, as `cargo xtask setup` installs it.
fn py_spy() -> PathBuf {
    let cache =
        std::env::var_os("XDG_CACHE_HOME").map_or_else(|| home().join(".cache"), PathBuf::from);
    let path = cache.join("livetrace/py-spy-0.4.3/bin/py-spy");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup` (py-spy is the oracle for Python frames)",
        path.display()
    );
    path
}

/// Starts `interpreter` on a script (or `-c` code), its output discarded.
fn spawn_python(interpreter: &Path, args: &[&str]) -> Process {
    let mut command = Command::new(interpreter);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Process::spawn(command)
}

/// [`spawn_python`] on CPU-bound work, once it has run a little (past start-up, into the work).
fn start_python(interpreter: &Path, args: &[&str]) -> Process {
    let python = spawn_python(interpreter, args);
    wait_for_cpu(python.pid(), 0.2);
    python
}

/// Starts a fixture that prints `thread FUNCTION TID` as each of its `threads` threads starts
/// (workers.py, blocked.py), and waits for every line: the process, and each function's tid as
/// the fixture's own PID namespace numbers it.
fn start_announcing(
    mut command: Command,
    threads: usize,
) -> (Process, std::collections::BTreeMap<String, u32>) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = child.stdout.take().expect("piped");
    let process = Process::from_child(child);
    let mut tids = std::collections::BTreeMap::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).take(threads) {
        let line = line.expect("the fixture's stdout");
        let mut words = line.split_whitespace().skip(1);
        let (function, tid) = (words.next().unwrap(), words.next().unwrap());
        tids.insert(function.to_owned(), tid.parse::<u32>().unwrap());
    }
    assert_eq!(
        tids.len(),
        threads,
        "the fixture's threads did not all start"
    );
    (process, tids)
}

/// The number after `label` in `text` ("... shown as the interpreter's frames 97, ...").
fn count_after(text: &str, label: &str) -> Option<u64> {
    let rest = &text[text.find(label)? + label.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn position(stack: &Stack, frame: &str) -> Option<usize> {
    stack.frames.iter().position(|f| f == frame)
}

/// py-spy's raw output (folded stacks of `function (file:line)` frames): the share of samples
/// with `function` anywhere, and the line most samples with it as the leaf were on.
fn py_spy_view(path: &Path, function: &str) -> (f64, Option<String>) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("py-spy wrote no {}: {e}", path.display()));
    let (mut total, mut with) = (0u64, 0u64);
    let mut leaf_lines: std::collections::BTreeMap<String, u64> = Default::default();
    let prefix = format!("{function} (");
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (stack, count) = line.rsplit_once(' ').expect("py-spy's raw format");
        let count: u64 = count.parse().expect("py-spy's raw format");
        total += count;
        if stack.split(';').any(|f| f.starts_with(&prefix)) {
            with += count;
        }
        let leaf = stack.rsplit(';').next().unwrap_or_default();
        if let Some(at) = leaf.strip_prefix(&prefix) {
            let line = at
                .trim_end_matches(')')
                .rsplit(':')
                .next()
                .unwrap_or_default();
            *leaf_lines.entry(line.to_owned()).or_default() += count;
        }
    }
    let hottest = leaf_lines
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(l, _)| l);
    (with as f64 / total.max(1) as f64, hottest)
}

/// `go tool pprof -top -lines`: the line of `function` that most samples were on, counting the
/// samples in what it called too (its cumulative share): py-spy's innermost Python frame is on
/// that line whatever native code runs beneath it.
fn pprof_hottest_line(pprof: &Path, function: &str) -> Option<String> {
    let out = Command::new("go")
        .args(["tool", "pprof", "-top", "-lines"])
        .arg(pprof)
        .output()
        .expect("go tool pprof (cargo xtask setup installs golang-go)");
    let text = String::from_utf8_lossy(&out.stdout);
    // Rows: flat flat% sum% cum cum% function file:line.
    text.lines()
        .filter(|l| l.contains(&format!(" {function} ")))
        .filter_map(|l| {
            let cum: f64 = l
                .split_whitespace()
                .nth(4)?
                .trim_end_matches('%')
                .parse()
                .ok()?;
            Some((cum, l.rsplit(':').next()?.trim().to_owned()))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, line)| line)
}

/// The incident demo on every CPython livetrace reads, not started with `-X perf`:
/// parse_subtitle_track is on at least 80% of the samples, under serve_request; its share agrees
/// with py-spy's on the same process at the same time within 0.05, and its hottest line is
/// py-spy's. No sample is left showing only the interpreter.
#[test]
fn python_functions_are_named_as_py_spy_names_them() {
    require_root();
    let _cpus = cpu_shared();
    let py_spy = py_spy();
    for (version, interpreter) in readable() {
        require(&interpreter);
        let python = start_python(&interpreter, &[&fixture_source("catalogue.py"), "30"]);
        let pid = python.pid().to_string();
        let dir = tempfile::tempdir().unwrap();
        let (folded, pprof, spied) = (
            dir.path().join("profile.folded"),
            dir.path().join("profile.pb.gz"),
            dir.path().join("py-spy.txt"),
        );
        let mut oracle = Command::new(&py_spy);
        oracle
            .args(["record", "--nonblocking", "--rate", "99", "--format", "raw"])
            .args(["--pid", &pid, "--duration", &CAPTURE_SECS.to_string(), "-o"])
            .arg(&spied)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut oracle = Process::spawn(oracle);
        let secs = CAPTURE_SECS.to_string();
        let run = run_livetrace(
            [
                "profile",
                "-p",
                &pid,
                "-U",
                "-d",
                &secs,
                "-o",
                path_arg(&folded),
                "-o",
                path_arg(&pprof),
            ],
            Duration::from_secs(CAPTURE_SECS) + SLACK,
        );
        run.assert_success();
        let status = oracle.wait_timeout(Duration::from_secs(CAPTURE_SECS) + SLACK);
        assert!(
            status.is_some_and(|s| s.success()),
            "py-spy failed: {status:?}"
        );
        drop(python);

        let profile = Profile::read(&folded);
        let context = format!(
            "CPython {version} ({})\n{}\n{}",
            interpreter.display(),
            profile.summary(),
            run.stderr
        );
        let hot = profile.share_where(|s| position(s, "py::parse_subtitle_track").is_some());
        let nested = profile.share_where(|s| {
            let (outer, inner) = (
                position(s, "py::serve_request"),
                position(s, "py::parse_subtitle_track"),
            );
            outer.zip(inner).is_some_and(|(o, i)| o < i)
        });
        assert!(
            hot >= 0.80,
            "parse_subtitle_track on only {hot:.3} of samples\n{context}"
        );
        assert!(
            nested >= hot - 0.01,
            "parse_subtitle_track under serve_request on {nested:.3}, on {hot:.3} in all\n{context}"
        );
        let (spied_share, spied_line) = py_spy_view(&spied, "parse_subtitle_track");
        assert!(
            (hot - spied_share).abs() <= 0.05,
            "parse_subtitle_track: livetrace {hot:.3}, py-spy {spied_share:.3}\n{context}"
        );
        let line = pprof_hottest_line(&pprof, "py::parse_subtitle_track");
        assert!(
            line.is_some() && line == spied_line,
            "the hottest line of parse_subtitle_track: livetrace {line:?}, py-spy {spied_line:?}\n\
             {context}"
        );
        assert!(
            !run.stderr.contains("shown as the interpreter"),
            "samples left with the interpreter only\n{context}"
        );
    }
}

/// Profiling the whole system with --unwind dwarf reads the frames of every CPython it meets,
/// from when it meets it: a process that the samples find names its Python functions, and the
/// samples taken before it was found are counted, not passed off as complete.
#[test]
fn the_whole_system_reads_every_python_it_meets() {
    require_root();
    let _cpus = cpu_shared();
    let interpreter = pyenv("3.9.18", "3.9");
    require(&interpreter);
    let python = start_python(&interpreter, &[&fixture_source("catalogue.py"), "30"]);
    let (profile, run) = run_folded(
        &["profile", "--unwind", "dwarf", "--per-thread", "-d", "3"],
        Duration::from_secs(3) + SLACK,
    );
    let main_thread = format!("-{}", python.pid());
    drop(python);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    let ours = |s: &Stack| s.frames.get(1).is_some_and(|t| t.ends_with(&main_thread));
    let samples = profile.count_where(ours);
    let named =
        profile.count_where(|s| ours(s) && position(s, "py::parse_subtitle_track").is_some());
    assert!(
        samples >= 100,
        "only {samples} samples of the fixture\n{context}"
    );
    assert!(
        named as f64 >= 0.7 * samples as f64,
        "parse_subtitle_track on {named} of {samples} samples\n{context}"
    );
    let unnamed = samples - named;
    if unnamed > 0 {
        assert!(
            run.stderr.contains("Python frames: not sent")
                || run.stderr.contains("shown as the interpreter's frames"),
            "{unnamed} samples without Python frames, not counted\n{context}"
        );
    }
}

/// A Python function's name and file are the traced program's to choose (a code object can be
/// renamed to anything): one that holds terminal escapes is shown escaped, on the terminal and
/// in the files, never raw.
#[test]
fn python_names_with_escapes_are_shown_escaped() {
    require_root();
    let _cpus = cpu_shared();
    let interpreter = pyenv("3.12.1", "3.12");
    require(&interpreter);
    let code = "import time\n\
                def spin():\n    total = 0\n    for i in range(20000):\n        total += i\n\
                spin.__code__ = spin.__code__.replace(co_qualname='evil\\x1b[31mred\\x07', \
                co_filename='/tmp/\\x1b[2Jfile.py')\n\
                end = time.time() + 20\nwhile time.time() < end:\n    spin()\n";
    let python = start_python(&interpreter, &["-c", code]);
    let pid = python.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (svg, pprof) = (
        dir.path().join("profile.svg"),
        dir.path().join("profile.pb.gz"),
    );
    let (profile, run) = run_folded(
        &[
            "profile",
            "-p",
            &pid,
            "-d",
            "1",
            "-o",
            path_arg(&svg),
            "-o",
            path_arg(&pprof),
        ],
        SLACK,
    );
    drop(python);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    assert!(
        profile.has_frame("py::evil\\x1b[31mred\\x07"),
        "no escaped frame\n{context}"
    );
    let svg = std::fs::read(&svg).unwrap();
    // pprof is binary (a 0x1b byte can be a number): look for the escapes' text instead.
    let pprof = Command::new("gzip")
        .arg("-dc")
        .arg(&pprof)
        .output()
        .expect("gzip")
        .stdout;
    for (what, bytes) in [
        ("stderr", run.stderr.as_bytes()),
        ("stdout", run.stdout.as_bytes()),
        ("the SVG", &svg[..]),
        ("the pprof profile", &pprof[..]),
    ] {
        let raw = |escape: &[u8]| bytes.windows(escape.len()).any(|w| w == escape);
        assert!(
            !raw(b"\x1b[31m") && !raw(b"\x1b[2J") && !raw(b"red\x07"),
            "a raw escape in {what}\n{context}"
        );
    }
}

/// Python called back from C keeps its place: in `rank -> sorted -> weigh`, the native frames of
/// the sort stand between the two Python functions.
#[test]
fn python_called_from_c_sits_above_the_c_frames() {
    require_root();
    let _cpus = cpu_shared();
    for (version, interpreter) in each_frame_model() {
        require(&interpreter);
        let python = start_python(&interpreter, &[&fixture_source("ranking.py"), "30"]);
        let pid = python.pid().to_string();
        let (profile, run) = run_folded(&["profile", "-p", &pid, "-U", "-d", "2"], SLACK);
        drop(python);
        let context = format!("CPython {version}\n{}\n{}", profile.summary(), run.stderr);
        let weighing = profile.share_where(|s| position(s, "py::weigh").is_some());
        let in_order = profile.share_where(|s| {
            let (Some(rank), Some(weigh)) = (position(s, "py::rank"), position(s, "py::weigh"))
            else {
                return false;
            };
            rank < weigh && s.frames[rank..weigh].iter().any(|f| f.contains("sort"))
        });
        assert!(
            weighing >= 0.8,
            "weigh on only {weighing:.3} of samples\n{context}"
        );
        assert!(
            in_order >= weighing - 0.01,
            "rank > sort > weigh on {in_order:.3}, weigh on {weighing:.3}\n{context}"
        );
    }
}

/// Three threads, each hot in a function of its own: with --per-thread, each thread's samples
/// carry its own function (never another's), at the share of the process's CPU time the kernel
/// measured for that thread over the capture.
#[test]
fn each_thread_has_its_own_python_stack() {
    require_root();
    // Shares against measured CPU time: the CPUs to itself, so that samples are plenty.
    let _cpus = cpu_exclusive();
    for (version, interpreter) in each_frame_model() {
        require(&interpreter);
        let mut command = Command::new(&interpreter);
        command.args([&fixture_source("workers.py"), "30"]);
        let (python, threads) = start_announcing(command, 3);
        wait_for_cpu(python.pid(), 0.2);
        let pid = python.pid().to_string();
        let thread_cpu = |tid: u32| thread_cpu_seconds(python.pid(), tid);
        let before: Vec<f64> = threads.values().map(|&tid| thread_cpu(tid)).collect();
        let process_before = cpu_seconds(python.pid());
        let (profile, run) = run_folded(
            &["profile", "-p", &pid, "-U", "--per-thread", "-d", "3"],
            Duration::from_secs(3) + SLACK,
        );
        let after: Vec<f64> = threads.values().map(|&tid| thread_cpu(tid)).collect();
        let process_cpu = cpu_seconds(python.pid()) - process_before;
        drop(python);
        let context = format!("CPython {version}\n{}\n{}", profile.summary(), run.stderr);
        for ((function, &tid), (start, end)) in threads.iter().zip(before.iter().zip(&after)) {
            let frame = format!("py::{function}");
            // The thread by the name Python gave it.
            let thread = format!("{}-{tid}", worker_name(function));
            let of_thread = |s: &Stack| s.frames.get(1) == Some(&thread);
            let others = profile.share_where(|s| !of_thread(s) && position(s, &frame).is_some());
            assert!(
                others == 0.0,
                "{frame} in other threads' stacks ({others:.3})\n{context}"
            );
            assert_share(
                &format!("{frame} (thread {tid})"),
                profile.share_where(|s| of_thread(s) && position(s, &frame).is_some()),
                profile.total(),
                (end - start) / process_cpu,
                &context,
            );
        }
    }
}

/// A Python in a container numbers its threads in its own PID namespace, and so does the thread
/// state livetrace reads (`native_thread_id`, or the tid in the pthread before 3.11): its threads
/// are still each found, and each is hot in its own function. The container is `unshare --pid`
/// (podman cannot run here).
#[test]
fn python_in_its_own_pid_namespace_is_named() {
    require_root();
    let _cpus = cpu_shared();
    for (version, interpreter) in each_frame_model() {
        require(&interpreter);
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
            .arg(&interpreter)
            .args([&fixture_source("workers.py"), "30"]);
        // Each thread prints its tid as the namespace numbers it: small numbers, not ours.
        let (unshare, started) = start_announcing(command, 3);
        let children = format!("/proc/{0}/task/{0}/children", unshare.pid());
        let pid: u32 = std::fs::read_to_string(&children)
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no child in {children}"));
        wait_for_cpu(pid, 0.2);
        let pid_arg = pid.to_string();
        let (profile, run) = run_folded(
            &["profile", "-p", &pid_arg, "-U", "--per-thread", "-d", "2"],
            Duration::from_secs(2) + SLACK,
        );
        drop(unshare);
        let context = format!(
            "CPython {version} in a PID namespace (threads {started:?})\n{}\n{}",
            profile.summary(),
            run.stderr
        );
        let mut threads = std::collections::BTreeSet::new();
        for function in ["hot_a", "hot_b", "hot_c"] {
            let frame = format!("py::{function}");
            let of: std::collections::BTreeSet<String> = profile
                .stacks
                .iter()
                .filter(|s| position(s, &frame).is_some())
                .filter_map(|s| s.frames.get(1).cloned())
                .collect();
            assert_eq!(of.len(), 1, "{frame} in threads {of:?}\n{context}");
            // Python's name for it, with its tid as the kernel numbers it (not the namespace).
            let thread = of.first().unwrap();
            let tid = thread
                .rsplit_once('-')
                .and_then(|(_, t)| t.parse::<u32>().ok());
            assert!(
                thread.starts_with(&format!("{}-", worker_name(function)))
                    && tid.is_some_and(|t| t > pid),
                "{frame} in thread {thread}\n{context}"
            );
            threads.extend(of);
        }
        assert_eq!(
            threads.len(),
            3,
            "one thread for all: {threads:?}\n{context}"
        );
        let named = profile.share_where(|s| s.frames.iter().any(|f| f.starts_with("py::hot_")));
        assert!(
            named >= 0.8,
            "a hot function on only {named:.3} of samples\n{context}"
        );
    }
}

/// The name workers.py gives the thread that runs `function` (`threading.Thread(name=...)`): ASCII,
/// and strings of one and of two bytes per character.
fn worker_name(function: &str) -> &'static str {
    match function {
        "hot_a" => "crunch-a",
        "hot_b" => "crunch-\u{e9}",
        "hot_c" => "crunch-\u{7ebf}",
        other => panic!("workers.py has no {other}"),
    }
}

/// With --per-thread, a Python thread is shown by the name Python gave it, read from the
/// `threading` module (a walk of CPython's dicts and instance attributes, whose layouts differ
/// across versions): on every CPython read, the main thread as `MainThread` and each worker by
/// its own name, in offcpu (where the main thread, waiting in `join()`, shows too).
#[test]
fn python_threads_are_shown_by_their_python_names() {
    require_root();
    let _cpus = cpu_shared();
    for (version, interpreter) in readable() {
        require(&interpreter);
        let mut command = Command::new(&interpreter);
        command.args([&fixture_source("workers.py"), "30"]);
        let (python, threads) = start_announcing(command, 3);
        let pid = python.pid();
        let (profile, run) = run_folded(
            &["offcpu", "-p", &pid.to_string(), "--per-thread", "-d", "1"],
            Duration::from_secs(1) + SLACK,
        );
        drop(python);
        let shown: std::collections::BTreeSet<&str> = profile
            .stacks
            .iter()
            .filter_map(|s| s.frames.get(1).map(String::as_str))
            .collect();
        let mut expected: std::collections::BTreeSet<String> = threads
            .iter()
            .map(|(function, tid)| format!("{}-{tid}", worker_name(function)))
            .collect();
        expected.insert(format!("MainThread-{pid}"));
        let expected: std::collections::BTreeSet<&str> =
            expected.iter().map(String::as_str).collect();
        assert_eq!(
            shown,
            expected,
            "CPython {version} ({})\n{}\n{}",
            interpreter.display(),
            profile.summary(),
            run.stderr
        );
    }
}

/// A thread's time on a CPU so far, in seconds, as the scheduler counts it (`schedstat`, in ns).
fn thread_run_seconds(pid: u32, tid: u32) -> f64 {
    let path = format!("/proc/{pid}/task/{tid}/schedstat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .unwrap();
    ns as f64 / 1e9
}

/// offcpu's window, from its footer ("data quality: 3.00 s, ...").
fn window_seconds(stderr: &str) -> f64 {
    let rest = &stderr[stderr.find("data quality: ").expect("no footer") + 14..];
    rest.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("no window")
}

/// offcpu shows each Python thread under the Python function it waits in, with the time it was
/// off the CPU: one blocked in `sock.recv()` since before the capture (recovered from the
/// process's memory), one sleeping in a loop, and one waiting for the GIL behind a CPU-bound
/// thread (marked as such). Each thread's time is within 10% of the truth: the window less the
/// thread's own time on a CPU (offcpu counts preemption too), from the scheduler's accounting.
#[test]
fn offcpu_shows_each_python_thread_where_it_waits() {
    require_root();
    let _cpus = cpu_shared();
    let mut models = each_frame_model();
    models.push(("3.11", PathBuf::from("/usr/bin/python3.11")));
    for (version, interpreter) in models {
        require(&interpreter);
        let mut command = Command::new(&interpreter);
        command.args([&fixture_source("blocked.py"), "30"]);
        let (python, threads) = start_announcing(command, 4);
        let pid = python.pid();
        wait_for_cpu(pid, 0.3);
        // The scheduler's clocks are read from when offcpu starts recording to when it is done.
        let dir = tempfile::tempdir().unwrap();
        let folded = dir.path().join("offcpu.folded");
        let pid_arg = pid.to_string();
        let mut offcpu = common::Livetrace::start([
            "offcpu",
            "-p",
            &pid_arg,
            "--per-thread",
            "-d",
            "3",
            "-o",
            path_arg(&folded),
        ]);
        offcpu.wait_for_stderr("livetrace: tracing", SLACK);
        let started = std::time::Instant::now();
        let before: Vec<f64> = threads
            .values()
            .map(|&t| thread_run_seconds(pid, t))
            .collect();
        let run = offcpu.finish(Duration::from_secs(3) + SLACK);
        let after: Vec<f64> = threads
            .values()
            .map(|&t| thread_run_seconds(pid, t))
            .collect();
        let bracket = started.elapsed().as_secs_f64();
        drop(python);
        run.assert_success();
        let profile = Profile::read(&folded);
        let window = window_seconds(&run.stderr);
        let context = format!("CPython {version}\n{}\n{}", profile.summary(), run.stderr);
        for ((function, &tid), (start, end)) in threads.iter().zip(before.iter().zip(&after)) {
            if function == "spin" {
                continue; // the thread that holds the GIL: on a CPU, mostly
            }
            let frame = format!("py::{function}");
            let thread_suffix = format!("-{tid}");
            let of_thread =
                |s: &Stack| s.frames.get(1).is_some_and(|t| t.ends_with(&thread_suffix));
            let weight = |keep: &dyn Fn(&Stack) -> bool| profile.count_where(keep) as f64 / 1e6;
            let in_function = weight(&|s| of_thread(s) && position(s, &frame).is_some());
            let in_thread = weight(&of_thread);
            let truth = window * (1.0 - (end - start) / bracket);
            assert!(
                (in_function - truth).abs() <= 0.1 * truth,
                "{frame} (thread {tid}): {in_function:.3} s off the CPU, truth {truth:.3} s of \
                 {window:.2} s\n{context}"
            );
            assert!(
                in_function >= 0.95 * in_thread,
                "thread {tid}: {in_function:.3} s under {frame}, of {in_thread:.3} s\n{context}"
            );
            if function == "crunch" {
                let gil = weight(&|s| {
                    of_thread(s)
                        && position(s, &frame).is_some()
                        && s.frames.iter().any(|f| f == "[waiting for the GIL]")
                });
                assert!(
                    gil >= 0.3 * in_function,
                    "{frame}: {gil:.3} s of {in_function:.3} s marked as waiting for the GIL\n\
                     {context}"
                );
            }
        }
    }
}

/// offcpu --wakers walks frame pointers only, so it reads no Python frames at switch-outs; the
/// threads blocked since before the capture still get theirs (read from the process's memory),
/// and no hint advises --unwind dwarf, which --wakers refuses.
#[test]
fn wakers_names_threads_blocked_before_and_advises_nothing_it_refuses() {
    require_root();
    let _cpus = cpu_shared();
    let interpreter = pyenv("3.12.1", "3.12");
    require(&interpreter);
    let mut command = Command::new(&interpreter);
    command.args([&fixture_source("blocked.py"), "30"]);
    // Once every thread has said it started, the client waits for a reply that never comes.
    let (python, _) = start_announcing(command, 4);
    let pid = python.pid().to_string();
    let (profile, run) = run_folded(&["offcpu", "-p", &pid, "--wakers", "-d", "1"], SLACK);
    drop(python);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    let recovered_reply = profile.share_where(|s| {
        s.frames
            .iter()
            .any(|f| f == "[blocked since before the capture]")
            && position(s, "py::await_reply").is_some()
    });
    assert!(
        recovered_reply > 0.0,
        "no recovered stack of the client under await_reply\n{context}"
    );
    assert!(
        !run.stderr.contains("--unwind dwarf"),
        "advice to use --unwind dwarf with --wakers\n{context}"
    );
}

/// The CPythons livetrace does not read: complete native stacks (down to _start, through
/// libpython without frame pointers), and a footer that counts the samples whose Python
/// functions show as the interpreter's frames, with a hint that names the version and the way
/// to get the names.
#[test]
fn unreadable_pythons_are_counted_and_named_by_version() {
    require_root();
    // A second of each interpreter, with the CPUs to itself: enough samples for the shares.
    let _cpus = cpu_exclusive();
    for (version, interpreter) in unreadable() {
        require(&interpreter);
        let python = start_python(&interpreter, &["-c", HOT_LOOP]);
        let pid = python.pid().to_string();
        let (profile, run) = run_folded(&["profile", "-p", &pid, "-U", "-d", "2"], SLACK);
        drop(python);
        let context = format!(
            "{}\n{}\n{}",
            interpreter.display(),
            profile.summary(),
            run.stderr
        );
        let total = profile.total();
        assert!(total >= 50, "only {total} samples\n{context}");
        let rooted = profile.share_where(|s| s.user_frames().first() == Some(&"_start"));
        assert!(
            rooted >= 0.95,
            "only {rooted:.3} of the stacks reach _start\n{context}"
        );
        let unnamed = count_after(&run.stderr, "shown as the interpreter's frames")
            .unwrap_or_else(|| panic!("the footer does not count the unnamed Python\n{context}"));
        assert!(
            unnamed as f64 >= 0.9 * total as f64 && unnamed <= total,
            "{unnamed} of {total} samples counted as Python shown as the interpreter\n{context}"
        );
        let eval = if version == "2.7" {
            "PyEval_EvalFrameEx"
        } else {
            "_PyEval_EvalFrameDefault"
        };
        assert!(
            profile.has_frame(eval),
            "no {eval} frame in the stacks\n{context}"
        );
        for hint in [
            format!("pid {pid} (CPython {version})"),
            format!("({eval})"),
            "reads the frames of CPython 3.8 to 3.13 only".to_owned(),
            format!("`py-spy dump --pid {pid}`"),
        ] {
            assert!(
                run.stderr.contains(&hint),
                "the hint lacks {hint:?}\n{context}"
            );
        }
    }
}

/// offcpu counts the blocked time of a CPython it does not read (3.6) as Python shown as the
/// interpreter, with the hint that names the version.
#[test]
fn offcpu_counts_unreadable_python_too() {
    require_root();
    let _cpus = cpu_shared();
    let interpreter = pyenv("3.6.15", "3.6");
    require(&interpreter);
    let code = "import time\ndef nap():\n    time.sleep(0.01)\nend = time.time() + 20\n\
                while time.time() < end:\n    nap()\n";
    let python = spawn_python(&interpreter, &["-c", code]);
    wait_for_cpu(python.pid(), 0.02);
    let pid = python.pid().to_string();

    let (profile, run) = run_folded(&["offcpu", "-p", &pid, "-d", "1"], SLACK);
    drop(python);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    let total = profile.total();
    let unnamed = count_after(&run.stderr, "shown as the interpreter's frames")
        .unwrap_or_else(|| panic!("the footer does not count the unnamed Python\n{context}"));
    assert!(
        unnamed as f64 >= 0.9 * total as f64 && unnamed <= total,
        "{unnamed} of {total} us counted as Python shown as the interpreter\n{context}"
    );
    assert!(
        run.stderr.contains(&format!("pid {pid} (CPython 3.6)"))
            && run.stderr.contains(&format!("`py-spy dump --pid {pid}`")),
        "no hint for pid {pid}\n{context}"
    );
}
