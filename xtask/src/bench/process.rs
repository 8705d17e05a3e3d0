//! Processes the benchmark starts, and what it reads about them: wall time, CPU time and peak RSS
//! from `wait4`, perf_event and BPF program file descriptors from `/proc`.
//!
//! Every process is held by a [`Proc`], which kills it by its PID (SIGKILL) and reaps it when
//! dropped, and asks the kernel to kill it if the bench itself dies (`PR_SET_PDEATHSIG`), so no
//! failure path leaves a tracer or workload running.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read},
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// What `wait4` says about a process that ended.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    /// Raw wait status.
    pub status: i32,
    /// When it was seen to end (polled every millisecond).
    pub at: Instant,
    /// User + system CPU time of the process and the children it waited for.
    pub cpu: Duration,
    /// Peak resident set size in bytes (`ru_maxrss`).
    pub max_rss: u64,
}

impl Exit {
    pub fn success(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }
}

/// A started process, killed (SIGKILL, by PID) and reaped when dropped unless it was waited for.
pub struct Proc {
    pub child: Child,
    pub started: Instant,
    name: String,
    exit: Option<Exit>,
}

impl Proc {
    /// Starts `command`; `name` is how errors refer to it.
    pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Self> {
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("failed to start {name} ({command:?})"))?;
        Ok(Self {
            child,
            started,
            name: name.to_owned(),
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end by itself; kills it and fails after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.try_reap(libc::WNOHANG)? {
                return Ok(exit);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("{} did not end within {timeout:?}; killed it", self.name);
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for a successful exit; any other ending is an error naming the process.
    pub fn wait_success(&mut self, timeout: Duration) -> anyhow::Result<Exit> {
        let exit = self.wait(timeout)?;
        if !exit.success() {
            bail!("{} failed (wait status {:#x})", self.name, exit.status);
        }
        Ok(exit)
    }

    /// Kills the process (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            signal(self.pid(), libc::SIGKILL);
        }
        self.try_reap(0).ok().flatten()
    }

    fn try_reap(&mut self, flags: i32) -> anyhow::Result<Option<Exit>> {
        if let Some(exit) = self.exit {
            return Ok(Some(exit));
        }
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to a status and an rusage owned by this frame.
        let reaped = unsafe { libc::wait4(pid, &raw mut status, flags, &raw mut usage) };
        match reaped {
            0 => Ok(None),
            r if r == pid => {
                let exit = Exit {
                    status,
                    at: Instant::now(),
                    cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
                    max_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
                };
                self.exit = Some(exit);
                Ok(Some(exit))
            }
            _ => Err(std::io::Error::last_os_error())
                .with_context(|| format!("wait4 on {} (pid {pid})", self.name)),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn timeval(tv: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(tv.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(tv.tv_usec).unwrap_or(0))
}

/// Sends `sig` to one process, by its PID.
pub fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Reads `stream` line by line on a thread until it ends, and reports the instant the first line
/// containing `needle` arrived. Every line is kept for error messages.
pub fn watch_for_line(
    stream: impl Read + Send + 'static,
    needle: &'static str,
) -> (mpsc::Receiver<Instant>, thread::JoinHandle<String>) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut all = String::new();
        let mut seen = false;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if !seen && line.contains(needle) {
                seen = true;
                let _ = tx.send(Instant::now());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    (rx, handle)
}

/// Counts the perf_event file descriptors that process `pid` holds.
pub fn perf_event_fds(pid: u32) -> usize {
    fds_linking_to(pid, "anon_inode:[perf_event]")
}

fn fds_linking_to(pid: u32, target: &str) -> usize {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == target))
        .count()
}

/// Polls until `pid` holds at least `expected` perf_event file descriptors; returns when that
/// was first seen, or `None` if the process ended or `timeout` passed first.
pub fn wait_for_perf_fds(proc: &mut Proc, expected: usize, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if perf_event_fds(proc.pid()) >= expected {
            return Some(Instant::now());
        }
        if proc.try_reap(libc::WNOHANG).ok().flatten().is_some() {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
    None
}

/// CPU time process `pid`'s live threads have had so far, in nanoseconds' resolution: the sum of
/// the first field (time on CPU) of `/proc/PID/task/*/schedstat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    for task in tasks.filter_map(Result::ok) {
        let Ok(stat) = fs::read_to_string(task.path().join("schedstat")) else {
            continue; // the thread ended meanwhile
        };
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

/// In-kernel run time and run count of the BPF programs process `pid` holds, summed, from
/// `/proc/PID/fdinfo` (the kernel fills them in while `kernel.bpf_stats_enabled` is 1).
#[derive(Clone, Copy, Debug, Default)]
pub struct BpfStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

pub fn bpf_prog_stats(pid: u32) -> anyhow::Result<BpfStats> {
    let mut stats = BpfStats::default();
    let mut programs = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
    {
        let entry = entry?;
        if !fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:bpf-prog") {
            continue;
        }
        let info_path = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(info) = fs::read_to_string(&info_path) else {
            continue;
        };
        programs += 1;
        for line in info.lines() {
            let mut parts = line.split(':');
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let value = value.trim().parse::<u64>().unwrap_or(0);
            match key {
                "run_time_ns" => stats.run_time_ns += value,
                "run_cnt" => stats.run_cnt += value,
                _ => {}
            }
        }
    }
    if programs == 0 {
        bail!("process {pid} holds no BPF programs");
    }
    Ok(stats)
}

/// Sets a sysctl for as long as it lives, and puts the old value back when dropped.
pub struct Sysctl {
    path: String,
    old: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> anyhow::Result<Self> {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        let old = fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_owned();
        fs::write(&path, value).with_context(|| format!("setting {name}={value}"))?;
        Ok(Self { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(err) = fs::write(&self.path, &self.old) {
            eprintln!(
                "bench: warning: could not restore {} to {}: {err}",
                self.path, self.old
            );
        }
    }
}

/// Starts a tracer in the background and returns once a line of its stdout or stderr contains
/// `ready` (attached); fails, showing what it printed, if it exits first or takes over `timeout`.
pub fn start_tracer(
    name: &str,
    command: &mut Command,
    ready: &'static str,
    timeout: Duration,
) -> anyhow::Result<Proc> {
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut proc = Proc::spawn(name, command)?;
    let stdout = proc.child.stdout.take().context("no stdout")?;
    let stderr = proc.child.stderr.take().context("no stderr")?;
    let (out_ready, out_text) = watch_for_line(stdout, ready);
    let (err_ready, err_text) = watch_for_line(stderr, ready);
    let deadline = Instant::now() + timeout;
    loop {
        if out_ready.try_recv().is_ok() || err_ready.try_recv().is_ok() {
            return Ok(proc);
        }
        let exited = proc.try_reap(libc::WNOHANG)?.is_some();
        if exited || Instant::now() >= deadline {
            proc.kill();
            let printed = [out_text, err_text]
                .into_iter()
                .filter_map(|h| h.join().ok())
                .collect::<Vec<_>>()
                .join("");
            bail!(
                "{name} {} before printing {ready:?}:\n{printed}",
                if exited { "exited" } else { "timed out" }
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Ends a tracer as a user would (SIGINT) and waits for it to write its results and exit.
pub fn stop_tracer(proc: &mut Proc, timeout: Duration) -> anyhow::Result<Exit> {
    signal(proc.pid(), libc::SIGINT);
    proc.wait(timeout)
}
