//! Shared helpers for livetrace's integration tests: building the C fixtures, running processes
//! that are killed by PID if a test fails, running livetrace with a deadline, and reading the
//! folded stacks it writes.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

/// The livetrace binary under test: built by `cargo xtask test`, which names it in
/// `LIVETRACE_BIN` (this crate is not livetrace's own, so cargo's `CARGO_BIN_EXE_` is not set).
pub fn livetrace() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var("LIVETRACE_BIN").unwrap_or_else(|_| {
            panic!(
                "LIVETRACE_BIN is not set: run the end-to-end tests with `cargo xtask test`, \
                 which builds livetrace and names the binary"
            )
        });
        assert!(
            Path::new(&path).is_file(),
            "LIVETRACE_BIN names {path}, which is not a file: run `cargo xtask test`"
        );
        path
    })
}

/// Where the C fixtures' sources live: `tests/fixtures/` at the workspace root.
const FIXTURE_SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// How often a wait with a deadline looks at its process again.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Preconditions

/// Panics unless the tests run as root: livetrace loads BPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests load BPF programs and must run as root: run `cargo xtask test`"
    );
}

// ---------------------------------------------------------------------------------------------
// CPU leases
//
// The machine has 2 CPUs and the tests of a binary run in parallel. Tests whose assertions depend
// on how much CPU their fixture gets (sample counts) take the CPUs exclusively; every other test
// that burns CPU takes them shared, so it runs alongside other shared tests but never alongside an
// exclusive one.

static CPUS: RwLock<()> = RwLock::new(());

/// Lets this test burn CPU alongside other tests, but not alongside one that owns the CPUs.
pub fn cpu_shared() -> RwLockReadGuard<'static, ()> {
    // A test that panicked while holding the lease poisons it; the lease itself is still valid.
    CPUS.read().unwrap_or_else(PoisonError::into_inner)
}

/// Gives this test the CPUs to itself, for assertions on sample counts.
pub fn cpu_exclusive() -> RwLockWriteGuard<'static, ()> {
    CPUS.write().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// The path of the fixture built from `tests/fixtures/NAME.c`. Every fixture is built once per
/// test binary, on first use, with frame pointers and without optimisation.
pub fn fixture(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(build_fixtures);
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "no fixture {name}: expected {FIXTURE_SOURCES}/{name}.c"
    );
    path
}

/// Builds every `tests/fixtures/*.c` into `CARGO_TARGET_TMPDIR/fixtures/` and returns that folder.
fn build_fixtures() -> PathBuf {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    fs::create_dir_all(&out_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", out_dir.display()));

    let sources = fs::read_dir(FIXTURE_SOURCES)
        .unwrap_or_else(|e| panic!("cannot list {FIXTURE_SOURCES}: {e}"))
        .map(|entry| entry.expect("cannot read the fixtures folder").path())
        .filter(|path| path.extension() == Some(OsStr::new("c")));

    for source in sources {
        let name = source.file_stem().expect("a .c file has a stem");
        let out = out_dir.join(name);
        // Built under a name of our own, then renamed: another test binary may be building the
        // same fixture at the same time, and must never run a half-written executable.
        let partial = out_dir.join(format!(
            "{}.{}.partial",
            name.to_string_lossy(),
            std::process::id()
        ));
        let result = Command::new("cc")
            .args([
                "-O0",
                "-g",
                "-fno-omit-frame-pointer",
                "-fno-optimize-sibling-calls",
            ])
            .arg("-o")
            .arg(&partial)
            .arg(&source)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run cc to build {}: {e}", source.display()));
        assert!(
            result.status.success(),
            "building {} failed ({}):\n{}",
            source.display(),
            result.status,
            String::from_utf8_lossy(&result.stderr)
        );
        fs::rename(&partial, &out)
            .unwrap_or_else(|e| panic!("cannot move {} into place: {e}", out.display()));
    }
    out_dir
}

/// Builds a fixture that is not a single C file (several files, a shared library, Rust) with
/// `command` plus `-o OUTPUT`, once per test binary, into `CARGO_TARGET_TMPDIR/fixtures/NAME`.
/// Sources are named relative to `tests/fixtures/` with a leading `@`: `@histlib/libhist.c`.
pub fn build_fixture(name: &str, command: &[&str]) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    // The single-file fixtures (and the folder) first: some link against others.
    let dir = fixture("latency")
        .parent()
        .expect("fixtures live in a folder")
        .to_path_buf();
    let out = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if built.iter().any(|n| n == name) {
        return out;
    }
    let partial = dir.join(format!("{name}.{}.partial", std::process::id()));
    let args: Vec<String> = command[1..]
        .iter()
        .map(|arg| match arg.strip_prefix('@') {
            Some(source) => format!("{FIXTURE_SOURCES}/{source}"),
            None => arg.replace("{dir}", &dir.to_string_lossy()),
        })
        .collect();
    let result = Command::new(command[0])
        .args(&args)
        .arg("-o")
        .arg(&partial)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", command[0]));
    assert!(
        result.status.success(),
        "building {name} with {command:?} failed ({}):\n{}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    fs::rename(&partial, &out)
        .unwrap_or_else(|e| panic!("cannot move {} into place: {e}", out.display()));
    built.push(name.to_owned());
    out
}

/// The path of a program these tests need, or a failure that says how to install it.
pub fn require_tool(name: &str, install: &str) -> PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: this test needs it (`{install}`, or `cargo xtask setup`)")
    })
}

/// Starts a fixture with the given arguments; it is killed when the returned guard drops.
pub fn start_fixture(name: &str, args: &[&str]) -> Process {
    let mut command = Command::new(fixture(name));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Process::spawn(command)
}

/// A fixture that measures where its CPU time goes (`tests/fixtures/work.h`) and says so over a
/// window between two marks ([`MeasuredFixture::during`]). It is killed when dropped, like a
/// [`Process`].
pub struct MeasuredFixture {
    process: Process,
    stdout: BufReader<ChildStdout>,
}

impl MeasuredFixture {
    /// Starts the fixture `name` (one that includes work.h) with its stdout piped.
    pub fn start(name: &str, args: &[&str]) -> MeasuredFixture {
        Self::start_path(&fixture(name), args)
    }

    /// The same for a fixture built elsewhere (e.g. by [`build_fixture`]).
    pub fn start_path(program: &Path, args: &[&str]) -> MeasuredFixture {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut process = Process::spawn(command);
        let stdout = process.child.stdout.take().expect("the stdout is piped");
        MeasuredFixture {
            process,
            stdout: BufReader::new(stdout),
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Asks the fixture for its clocks so far (SIGUSR1) and waits for its `mark` line. The
    /// fixture answers between two rounds, within a few milliseconds.
    pub fn mark(&mut self) -> Mark {
        // Until the fixture has set its handler, SIGUSR1 would kill it.
        let pid = self.pid();
        wait_until(
            "the fixture to catch SIGUSR1",
            Duration::from_secs(10),
            || catches_signal(pid, libc::SIGUSR1),
        );
        self.process.signal(libc::SIGUSR1);
        loop {
            let mut line = String::new();
            let read = self
                .stdout
                .read_line(&mut line)
                .expect("cannot read the fixture's stdout");
            assert!(read > 0, "the fixture ended before it printed a mark");
            if line.starts_with("mark ") {
                let mut seconds = parse_fields(line.trim_end());
                let cpu_seconds = seconds
                    .remove("cpu")
                    .unwrap_or_else(|| panic!("no cpu= in {line:?}"));
                return Mark {
                    cpu_seconds,
                    seconds,
                };
            }
        }
    }

    /// Runs `capture` (a profile of this fixture) and returns its result with the fixture's
    /// truth over the same window: the profile is held to what the fixture did while it ran,
    /// not over a whole life that may have had slower phases.
    pub fn during<T>(&mut self, capture: impl FnOnce() -> T) -> (T, Truth) {
        let before = self.mark();
        let result = capture();
        let after = self.mark();
        (result, before.until(&after))
    }
}

/// Whether process `pid` has a handler for `signal` (its SigCgt mask in /proc/PID/status).
fn catches_signal(pid: u32, signal: libc::c_int) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// A fixture's clocks at one moment: its thread CPU time and each timed function's, in seconds.
#[derive(Debug, Clone)]
pub struct Mark {
    cpu_seconds: f64,
    seconds: BTreeMap<String, f64>,
}

impl Mark {
    /// The shares of the CPU time spent between this mark and a `later` one.
    pub fn until(&self, later: &Mark) -> Truth {
        let cpu_seconds = later.cpu_seconds - self.cpu_seconds;
        assert!(
            cpu_seconds > 0.0,
            "no CPU time between {self:?} and {later:?}"
        );
        let shares = later
            .seconds
            .iter()
            .map(|(name, &end)| {
                let start = self.seconds.get(name).copied().unwrap_or(0.0);
                (name.clone(), (end - start) / cpu_seconds)
            })
            .collect();
        Truth {
            cpu_seconds,
            shares,
        }
    }
}

/// `NAME=NUMBER` fields after a line's first word (a fixture's `mark` line).
fn parse_fields(line: &str) -> BTreeMap<String, f64> {
    line.split_whitespace()
        .skip(1)
        .map(|field| {
            let (name, value) = field
                .split_once('=')
                .unwrap_or_else(|| panic!("bad field {field:?} in {line:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value {field:?} in {line:?}"));
            (name.to_owned(), value)
        })
        .collect()
}

/// What a fixture measured of itself with its thread CPU clock: each timed function's share of
/// its CPU time between two marks.
#[derive(Debug, Clone)]
pub struct Truth {
    pub cpu_seconds: f64,
    shares: BTreeMap<String, f64>,
}

impl Truth {
    /// The share of the fixture's CPU time that `function` used.
    pub fn share(&self, function: &str) -> f64 {
        *self
            .shares
            .get(function)
            .unwrap_or_else(|| panic!("the fixture did not time {function}: {self:?}"))
    }
}

/// How far a share measured from `samples` samples may stray from the fixture's measured truth
/// `p`: four binomial standard errors, sqrt(p(1-p)/n), plus 0.02.
///
/// The standard errors cover sampling: a sample lands in a function with probability p, and the
/// fixture's rounds vary in length at random (work.h), so the samples fall at unrelated points of
/// the rounds and behave as independent draws. Four of them make a false alarm about 1 in 15,000
/// per assertion if that held exactly; 0.02 covers what does not: the marks that bound the truth
/// also take in livetrace's start and its writing of outputs, and samples in the clock reads
/// themselves count for neither. Checked on 100 captures of the chain fixture (3 s at 99 Hz,
/// three at once on two CPUs, or two beside a niced CPU loop), each held to its own marks: they
/// spread as wide as independent draws would (0.96 and 1.00 standard errors), and the worst of
/// the 300 shares was 3.5 standard errors off.
pub fn share_tolerance(p: f64, samples: u64) -> f64 {
    assert!(
        samples >= 60,
        "only {samples} samples: the fixture hardly ran; is the machine overloaded?"
    );
    4.0 * (p * (1.0 - p) / samples as f64).sqrt() + 0.02
}

/// Asserts that `what`, measured as `share` from `samples` samples, is the fixture's measured
/// `truth` within [`share_tolerance`]; `context` is shown on failure.
pub fn assert_share(what: &str, share: f64, samples: u64, truth: f64, context: &str) {
    let tolerance = share_tolerance(truth, samples);
    assert!(
        (share - truth).abs() <= tolerance,
        "{what} is {share:.3} of {samples} samples; the fixture measured {truth:.3} of its CPU \
         time (± {tolerance:.3})\n{context}"
    );
}

/// A path as a command-line argument (temporary paths are always UTF-8 here).
pub fn path_arg(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}

/// A PID that no process has: the highest PID Linux can hand out, or the next free one below it.
pub fn unused_pid() -> u32 {
    // PID_MAX_LIMIT is 4194304, so PIDs are below it whatever /proc/sys/kernel/pid_max says.
    (1..4_194_304u32)
        .rev()
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .expect("some PID is free")
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process that is killed (by its PID, with SIGKILL) and reaped when dropped, so that a
/// failing test never leaves it running.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(mut command: Command) -> Process {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Process { child }
    }

    /// Takes charge of a child started elsewhere (e.g. with piped output).
    pub fn from_child(child: Child) -> Process {
        Process { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("PIDs fit in pid_t");
        // SAFETY: kill has no memory-safety preconditions; the PID is our own unreaped child, so
        // it cannot have been reused by another process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert!(
            rc == 0,
            "kill({pid}, {signal}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the process to exit and reaps it; `None` if it is still running at `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot wait for a child") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Child::kill sends SIGKILL to this child's PID, which is ours until we reap it.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting for conditions, not for time: a fixed sleep is a race on a loaded machine

/// Polls `condition` until it holds; panics naming `what` if it does not within `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        thread::sleep(POLL);
    }
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// The same for one thread, from /proc/PID/task/TID/stat.
pub fn thread_cpu_seconds(pid: u32, tid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// utime + stime of a `stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let rest = stat.rsplit_once(')').expect("stat has a comm").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the comm.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Waits until process `pid` has used `seconds` more CPU time than now: a capture of it then
/// has something in it, however busy the machine.
pub fn wait_for_cpu(pid: u32, seconds: f64) {
    let start = cpu_seconds(pid);
    wait_until(
        &format!("pid {pid} has run for {seconds} s more"),
        Duration::from_secs(30),
        || cpu_seconds(pid) - start >= seconds,
    );
}

/// The id of `pid`'s thread named `name`, if it has one.
pub fn thread_named(pid: u32, name: &str) -> Option<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|tid| {
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
}

/// The system call a thread is blocked in (the first field of /proc/PID/task/TID/syscall), or
/// `None` while it runs or cannot be read.
pub fn blocked_syscall(pid: u32, tid: u32) -> Option<i64> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Waits until the offcpu fixture (`tests/fixtures/offcpu.c`) has started its five threads and
/// its reader is blocked in read(2), where it stays.
pub fn wait_for_offcpu_fixture(pid: u32) {
    wait_until(
        &format!("the offcpu fixture (pid {pid}) has its threads, its reader blocked in read"),
        Duration::from_secs(10),
        || {
            ["napper", "spinner", "holder", "waiter"]
                .iter()
                .all(|name| thread_named(pid, name).is_some())
                && thread_named(pid, "reader")
                    .and_then(|tid| blocked_syscall(pid, tid))
                    .is_some_and(|nr| nr == libc::SYS_read)
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Running livetrace

/// A running livetrace, its standard output and error going to anonymous temporary files (a pipe
/// could fill up and block it while the test is not reading).
pub struct Livetrace {
    process: Process,
    started: Instant,
    stdout: File,
    stderr: File,
}

/// How a livetrace run ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From starting livetrace to noticing that it had exited (within 20 ms).
    pub elapsed: Duration,
}

impl Livetrace {
    /// Starts `livetrace ARGS...` with no standard input.
    pub fn start<I, S>(args: I) -> Livetrace
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::start_with_env(args, &[])
    }

    /// Starts `livetrace ARGS...` with extra environment variables (which a command it starts
    /// inherits).
    pub fn start_with_env<I, S>(args: I, env: &[(&str, &str)]) -> Livetrace
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(livetrace());
        command.args(args).envs(env.iter().copied());
        Self::start_command(command)
    }

    /// Starts a prepared command (livetrace itself, or livetrace under a wrapper such as
    /// setpriv) with no standard input and its output captured.
    pub fn start_command(mut command: Command) -> Livetrace {
        let stdout = tempfile::tempfile().expect("cannot create a temporary file");
        let stderr = tempfile::tempfile().expect("cannot create a temporary file");
        command
            .stdin(Stdio::null())
            .stdout(stdout.try_clone().expect("cannot duplicate a file handle"))
            .stderr(stderr.try_clone().expect("cannot duplicate a file handle"));
        let started = Instant::now();
        let process = Process::spawn(command);
        Livetrace {
            process,
            started,
            stdout,
            stderr,
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        self.process.signal(signal);
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits until livetrace's standard error contains `needle` (e.g. its line saying that the
    /// probes are attached); panics with what it printed if that takes longer than `timeout`.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        self.wait_for(&format!("it prints {needle:?}"), timeout, |_, stderr| {
            stderr.contains(needle)
        });
    }

    /// Waits until `condition(stdout, stderr)` holds of everything livetrace has printed so
    /// far; panics with what it printed if that takes longer than `timeout` or it exits first.
    /// Returns its standard error so far.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&str, &str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let stderr = read_all(&self.stderr);
            if condition(&read_all(&self.stdout), &stderr) {
                return stderr;
            }
            if Instant::now() >= deadline || self.process.wait_timeout(Duration::ZERO).is_some() {
                panic!("livetrace never got to where {what}; stderr:\n{stderr}");
            }
            thread::sleep(POLL);
        }
    }

    /// The pid of the command livetrace started (`-- COMMAND`), from its start line
    /// ("... (pid N) ..."), once it has printed it.
    pub fn wait_for_command_pid(&mut self, timeout: Duration) -> u32 {
        let stderr = self.wait_for("it names the command's pid", timeout, |_, stderr| {
            stderr.contains("(pid ")
        });
        let after = stderr.split("(pid ").nth(1).expect("checked just above");
        after[..after.find(')').expect("the pid is in parentheses")]
            .parse()
            .expect("a pid is a number")
    }

    /// Waits for livetrace to exit. Panics, showing what it printed so far, if it has not exited
    /// `timeout` after it started; it is then killed.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let remaining = timeout.saturating_sub(self.started.elapsed());
        let status = self.process.wait_timeout(remaining);
        let elapsed = self.started.elapsed();
        let stdout = read_all(&self.stdout);
        let stderr = read_all(&self.stderr);
        let Some(status) = status else {
            panic!(
                "livetrace was still running {timeout:?} after it started; stderr so far:\n{stderr}"
            );
        };
        Finished {
            status,
            stdout,
            stderr,
            elapsed,
        }
    }
}

/// Runs `livetrace ARGS...` to completion; panics if it takes longer than `timeout`.
pub fn run_livetrace<I, S>(args: I, timeout: Duration) -> Finished
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Livetrace::start(args).finish(timeout)
}

/// Runs `livetrace ARGS... -o OUT.folded` (the output goes before any `-- COMMAND`) to
/// completion, asserts that it succeeded, and returns the folded stacks with the run.
pub fn run_folded(args: &[&str], timeout: Duration) -> (Profile, Finished) {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    let out = dir.path().join("out.folded");
    let at = args.iter().position(|&a| a == "--").unwrap_or(args.len());
    let mut full: Vec<&str> = args[..at].to_vec();
    full.extend(["-o", path_arg(&out)]);
    full.extend(&args[at..]);
    let run = run_livetrace(&full, timeout);
    run.assert_success();
    (Profile::read(&out), run)
}

/// Everything written to `file` so far. Read with `pread`, at explicit offsets: the file
/// description (and its offset) is shared with livetrace's stdout or stderr, so seeking it would
/// move where livetrace writes next, and a line written while we read could overwrite another.
fn read_all(file: &File) -> String {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read = file
            .read_at(&mut chunk, bytes.len() as u64)
            .expect("cannot read livetrace's output back");
        if read == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..read]);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Finished {
    /// Panics, showing stderr, unless livetrace exited with status 0.
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "livetrace failed ({}) after {:?}; stderr:\n{}",
            self.status,
            self.elapsed,
            self.stderr
        );
    }

    /// Panics, showing stderr whole, unless it contains `needle`.
    pub fn assert_stderr_has(&self, needle: &str) {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
    }

    /// Panics, showing stderr, unless livetrace exited with a non-zero status (not by a signal).
    pub fn assert_failure(&self) {
        assert!(
            matches!(self.status.code(), Some(code) if code != 0),
            "livetrace should have failed with a non-zero status, but ended with {}; stderr:\n{}",
            self.status,
            self.stderr
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Folded stacks

/// The suffix livetrace gives kernel frames.
pub const KERNEL_SUFFIX: &str = "_[k]";

pub fn is_kernel_frame(frame: &str) -> bool {
    frame.ends_with(KERNEL_SUFFIX)
}

/// One line of a folded file: `root;frame;...;leaf COUNT`, root first. The root frame is the
/// process name; user frames follow from the outermost, then kernel frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub frames: Vec<String>,
    pub count: u64,
}

impl Stack {
    /// The root frame: the process name.
    pub fn root(&self) -> &str {
        &self.frames[0]
    }

    /// The frames below the root.
    pub fn below_root(&self) -> &[String] {
        &self.frames[1..]
    }

    /// The user frames, outermost first (frames below the root without the kernel suffix).
    pub fn user_frames(&self) -> Vec<&str> {
        self.below_root()
            .iter()
            .map(String::as_str)
            .filter(|frame| !is_kernel_frame(frame))
            .collect()
    }

    /// The innermost user frame, ignoring kernel frames.
    pub fn user_leaf(&self) -> Option<&str> {
        self.user_frames().last().copied()
    }

    pub fn contains(&self, frame: &str) -> bool {
        self.frames.iter().any(|f| f == frame)
    }

    /// Whether `run` appears in this stack as consecutive frames, in that order.
    pub fn contains_run(&self, run: &[&str]) -> bool {
        self.frames
            .windows(run.len())
            .any(|window| window.iter().zip(run).all(|(frame, want)| frame == want))
    }
}

/// The contents of a folded file.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub stacks: Vec<Stack>,
}

impl Profile {
    /// Parses folded text; panics on any line that is not `frame[;frame...] COUNT`.
    pub fn parse(text: &str) -> Profile {
        let stacks = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(index, line)| {
                let bad = |why: &str| -> ! {
                    panic!("folded line {} is malformed ({why}): {line:?}", index + 1)
                };
                let Some((stack, count)) = line.trim_end().rsplit_once(' ') else {
                    bad("no space before the count")
                };
                let Ok(count) = count.parse::<u64>() else {
                    bad("the count is not a number")
                };
                let frames: Vec<String> = stack.split(';').map(str::to_owned).collect();
                if frames.iter().any(String::is_empty) {
                    bad("empty frame");
                }
                Stack { frames, count }
            })
            .collect();
        Profile { stacks }
    }

    /// Reads and parses a folded file.
    pub fn read(path: &Path) -> Profile {
        let text = fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Profile::parse(&text)
    }

    /// The number of samples.
    pub fn total(&self) -> u64 {
        self.stacks.iter().map(|stack| stack.count).sum()
    }

    /// The samples (or weight) of the stacks that satisfy `predicate`.
    pub fn count_where(&self, predicate: impl Fn(&Stack) -> bool) -> u64 {
        self.stacks
            .iter()
            .filter(|stack| predicate(stack))
            .map(|stack| stack.count)
            .sum()
    }

    /// The share of samples whose stack satisfies `predicate` (0 when there are no samples).
    pub fn share_where(&self, predicate: impl Fn(&Stack) -> bool) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        self.count_where(predicate) as f64 / total as f64
    }

    /// The share of samples whose stack contains `frame`.
    pub fn share_containing(&self, frame: &str) -> f64 {
        self.share_where(|stack| stack.contains(frame))
    }

    /// The share of samples whose innermost user frame is `frame`.
    pub fn share_with_leaf(&self, frame: &str) -> f64 {
        self.share_where(|stack| stack.user_leaf() == Some(frame))
    }

    /// Whether any stack contains `frame`.
    pub fn has_frame(&self, frame: &str) -> bool {
        self.stacks.iter().any(|stack| stack.contains(frame))
    }

    /// The heaviest stacks, one a line, for assertion messages.
    pub fn summary(&self) -> String {
        let mut stacks: Vec<&Stack> = self.stacks.iter().collect();
        stacks.sort_by_key(|stack| std::cmp::Reverse(stack.count));
        let mut out = format!("{} samples in {} stacks", self.total(), self.stacks.len());
        for stack in stacks.iter().take(12) {
            let _ = write!(out, "\n  {} {}", stack.frames.join(";"), stack.count);
        }
        if stacks.len() > 12 {
            let _ = write!(out, "\n  ...");
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// SVG

/// Panics unless `svg` looks like a complete SVG document: an XML declaration first, `</svg>`
/// last, and every element closed in order. A cheap check, not a full XML parser; it knows the
/// constructs inferno writes (declaration, doctype, comments, CDATA sections, quoted attributes).
pub fn assert_well_formed_svg(svg: &str) {
    let svg = svg.trim();
    assert!(
        svg.starts_with("<?xml"),
        "the SVG does not start with <?xml: {:?}",
        head(svg)
    );
    assert!(svg.contains("<svg"), "the SVG has no <svg element");
    assert!(
        svg.ends_with("</svg>"),
        "the SVG does not end with </svg>: {:?}",
        tail(svg)
    );
    if let Err(problem) = check_elements_balanced(svg) {
        panic!("the SVG is not well-formed: {problem}");
    }
}

fn check_elements_balanced(xml: &str) -> Result<(), String> {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        rest = &rest[start..];
        let offset = xml.len() - rest.len();
        // Markup that is not an element is skipped up to its terminator.
        let skipped = [
            ("<?", "?>"),
            ("<!--", "-->"),
            ("<![CDATA[", "]]>"),
            ("<!", ">"),
        ]
        .into_iter()
        .find(|(opener, _)| rest.starts_with(opener));
        if let Some((opener, closer)) = skipped {
            let end = rest
                .find(closer)
                .ok_or_else(|| format!("{opener} at byte {offset} is never closed"))?;
            rest = &rest[end + closer.len()..];
            continue;
        }
        let end = element_tag_end(rest)
            .ok_or_else(|| format!("the tag at byte {offset} is never closed"))?;
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(closing) = tag.strip_prefix('/') {
            let name = closing.trim();
            match open.pop() {
                Some(expected) if expected == name => {}
                Some(expected) => {
                    return Err(format!("</{name}> at byte {offset} closes <{expected}>"));
                }
                None => return Err(format!("</{name}> at byte {offset} closes nothing")),
            }
        } else if !tag.ends_with('/') {
            let name = tag.split(char::is_whitespace).next().unwrap_or("");
            if name.is_empty() {
                return Err(format!("a tag without a name at byte {offset}"));
            }
            open.push(name);
        }
    }
    match open.last() {
        None => Ok(()),
        Some(name) => Err(format!("<{name}> is never closed")),
    }
}

/// The index of the `>` that ends the tag `tag` starts with, skipping quoted attribute values.
fn element_tag_end(tag: &str) -> Option<usize> {
    let mut quote = None;
    for (index, c) in tag.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '>') => return Some(index),
            _ => {}
        }
    }
    None
}

fn head(text: &str) -> &str {
    &text[..text.floor_char_boundary(80)]
}

fn tail(text: &str) -> &str {
    &text[text.floor_char_boundary(text.len().saturating_sub(80))..]
}
