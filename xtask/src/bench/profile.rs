//! The `livetrace profile` sections: livetrace beside bpftrace's `profile:hz` one-liner and
//! `perf record -g`, all sampling user and kernel stacks of one process on cpu-clock.
//!
//! - start-up: launch until sampling is attached, on the demo service;
//! - a 1 s capture from launch to written, symbolised output, minus the second, on the demo;
//! - sampling overhead: the throughput a CPU-bound workload keeps with each tracer attached, at
//!   99 Hz and 999 Hz, relative to no tracer in the same round (rounds rotate the order);
//! - peak RSS and CPU time of a 10 s capture of the demo;
//! - in-kernel cost per sample of the BPF tracers, from the kernel's own BPF statistics.
//!
//! The workload (`xtask/bench/burn.c`) runs one thread per CPU, so the machine is saturated and
//! a tracer's whole cost (its sampling in the kernel and its own user-space work) takes work per
//! second away; on an idle second CPU the user-space part would hide. Work per second also moves
//! with everything else the (shared, small) machine runs, so the workload's work per CPU-second
//! of its own is reported beside it: that is the cost the target pays on its own time (sampling
//! interrupts and BPF programs), and other load barely moves it.

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Ctx, Section, Table, median, mib, min_max, ms_summary,
    process::{self, Exit, Proc},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    Livetrace,
    /// livetrace in frame-pointer mode (`--unwind fp`): in the cost sections only, next to the
    /// default (DWARF unwinding for `-p`), since the peers walk frame pointers too.
    LivetraceFp,
    Bpftrace,
    Perf,
}

const TRACERS: [Tracer; 3] = [Tracer::Livetrace, Tracer::Bpftrace, Tracer::Perf];

/// How long any tracer may take to attach before the bench gives up on it.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

impl Tracer {
    fn name(self) -> &'static str {
        match self {
            Self::Livetrace => "livetrace",
            Self::LivetraceFp => "livetrace --unwind fp",
            Self::Bpftrace => "bpftrace",
            Self::Perf => "perf",
        }
    }

    fn available(self, ctx: &Ctx) -> bool {
        match self {
            Self::Livetrace | Self::LivetraceFp => true,
            Self::Bpftrace => ctx.peers.bpftrace.is_some(),
            Self::Perf => ctx.peers.perf.is_some(),
        }
    }

    /// The command, as a person would type it, for the tables (PID and paths abbreviated).
    fn shown(self, hz: u32, secs: Option<u32>) -> String {
        match (self, secs) {
            (Self::Livetrace, None) => format!("`livetrace profile -p PID -F {hz}`"),
            (Self::LivetraceFp, _) => format!("`livetrace profile -p PID -F {hz} --unwind fp`"),
            (Self::Livetrace, Some(s)) => {
                format!("`livetrace profile -p PID -F {hz} -d {s} -o out.svg`")
            }
            (Self::Bpftrace, None) => {
                format!("`bpftrace -e '{}'`", bpftrace_program(hz, "PID", None))
            }
            (Self::Bpftrace, Some(s)) => {
                format!("`bpftrace -e '{}'`", bpftrace_program(hz, "PID", Some(s)))
            }
            (Self::Perf, None) => format!("`perf record -e cpu-clock -F {hz} -g -p PID`"),
            (Self::Perf, Some(s)) => format!(
                "`perf record -e cpu-clock -F {hz} -g -p PID -- sleep {s}` + \
                 `perf report --stdio > out.txt`"
            ),
        }
    }
}

fn bpftrace_program(hz: u32, pid: &str, exit_after: Option<u32>) -> String {
    let mut program =
        format!("profile:hz:{hz} /pid == {pid}/ {{ @[ustack, kstack, comm] = count(); }}");
    if let Some(s) = exit_after {
        program.push_str(&format!(" interval:s:{s} {{ exit(); }}"));
    }
    program
}

/// A tracer sampling a process until it is killed, and when it was seen to be attached.
struct Running {
    proc: Proc,
    attached: Instant,
    /// The tracer's CPU time when it was seen to be attached.
    cpu_to_attach: Option<Duration>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Running {
    fn startup(&self) -> Duration {
        self.attached - self.proc.started
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.proc.kill();
        if let Some(handle) = self.stderr.take() {
            let _ = handle.join();
        }
    }
}

/// How the bench knows a tracer is attached. livetrace says so on stderr once its perf events
/// carry the program; bpftrace and perf print nothing reliable (bpftrace's "Attaching N
/// probes..." comes before it attaches), so for them it is the moment the process holds as many
/// perf_event file descriptors as it does in steady state, measured once per target beforehand.
#[derive(Clone, Copy)]
enum Readiness {
    Message,
    PerfFds(usize),
}

/// Creates (or empties) a file in the scratch directory, for a tool's output or log.
fn scratch_file(ctx: &Ctx, name: &str) -> anyhow::Result<(PathBuf, File)> {
    let path = ctx.scratch.join(name);
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok((path, file))
}

/// Starts `tracer` sampling process `pid` at `hz` (until killed) and waits until it is attached.
fn start(
    ctx: &Ctx,
    tracer: Tracer,
    pid: u32,
    hz: u32,
    ready: Readiness,
) -> anyhow::Result<Running> {
    let (log_path, log) = scratch_file(ctx, &format!("{}.log", tracer.name()))?;
    let mut command = match tracer {
        Tracer::Livetrace | Tracer::LivetraceFp => {
            let mut c = Command::new(ctx.bin.join("livetrace"));
            c.args([
                "profile",
                "-p",
                &pid.to_string(),
                "-F",
                &hz.to_string(),
                "-d",
                "600",
                "-o",
            ])
            .arg(ctx.scratch.join("long.folded"))
            .stderr(Stdio::piped());
            if tracer == Tracer::LivetraceFp {
                c.args(["--unwind", "fp"]);
            }
            c
        }
        Tracer::Bpftrace => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", &bpftrace_program(hz, &pid.to_string(), None)])
                .stderr(log);
            c
        }
        Tracer::Perf => {
            let mut c = Command::new("perf");
            c.args([
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-F",
                &hz.to_string(),
                "-g",
                "-p",
            ])
            .arg(pid.to_string())
            .arg("-o")
            .arg(ctx.scratch.join("long.perf.data"))
            .stderr(log);
            c
        }
    };
    command.stdin(Stdio::null()).stdout(Stdio::null());
    let mut proc = Proc::spawn(tracer.name(), &mut command)?;
    let attached = match ready {
        Readiness::Message => {
            let stderr = proc.child.stderr.take().context("no stderr pipe")?;
            let (seen, handle) = process::watch_for_line(stderr, "livetrace: profiling");
            if let Ok(at) = seen.recv_timeout(ATTACH_TIMEOUT) {
                return Ok(Running {
                    cpu_to_attach: process::cpu_time(proc.pid()),
                    proc,
                    attached: at,
                    stderr: Some(handle),
                });
            }
            proc.kill();
            let text = handle.join().unwrap_or_default();
            bail!("{} did not attach to pid {pid}:\n{text}", tracer.name());
        }
        Readiness::PerfFds(expected) => {
            process::wait_for_perf_fds(&mut proc, expected, ATTACH_TIMEOUT)
        }
    };
    let Some(attached) = attached else {
        proc.kill();
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        bail!("{} did not attach to pid {pid}:\n{log}", tracer.name());
    };
    Ok(Running {
        cpu_to_attach: process::cpu_time(proc.pid()),
        proc,
        attached,
        stderr: None,
    })
}

/// How each tracer's attachment to `pid` is recognised: for the peers, their steady-state count
/// of perf_event descriptors, read from a run left alone for a few seconds (it also warms caches).
fn readiness(ctx: &Ctx, tracer: Tracer, pid: u32) -> anyhow::Result<Readiness> {
    if matches!(tracer, Tracer::Livetrace | Tracer::LivetraceFp) {
        return Ok(Readiness::Message);
    }
    let running = start(ctx, tracer, pid, 99, Readiness::PerfFds(1))?;
    thread::sleep(Duration::from_secs(3));
    let fds = process::perf_event_fds(running.proc.pid());
    drop(running);
    if fds == 0 {
        bail!(
            "{} holds no perf_event descriptors after 3 s",
            tracer.name()
        );
    }
    Ok(Readiness::PerfFds(fds))
}

/// The bundled demo service (the design notes' incident), serving on its own until killed.
struct Demo {
    proc: Proc,
    pid: u32,
}

fn start_demo(ctx: &Ctx) -> anyhow::Result<Demo> {
    let mut proc = Proc::spawn(
        "livetrace-demo",
        Command::new(ctx.bin.join("livetrace-demo"))
            .args(["--seconds", "900"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    )?;
    let stdout = proc
        .child
        .stdout
        .take()
        .context("no stdout from the demo")?;
    let (seen, handle) = process::watch_for_line(stdout, "pid=");
    seen.recv_timeout(Duration::from_secs(10))
        .context("livetrace-demo printed no banner")?;
    let pid = proc.pid();
    drop(handle); // the thread drains stdout until the demo ends
    // Let it warm up: the first requests build the catalogue.
    thread::sleep(Duration::from_secs(1));
    Ok(Demo { proc, pid })
}

pub fn sections(ctx: &Ctx) -> anyhow::Result<Vec<Section>> {
    let mut notes_missing = Vec::new();
    for tracer in TRACERS {
        if !tracer.available(ctx) {
            notes_missing.push(format!(
                "{} is not available on this machine: left out.",
                tracer.name()
            ));
        }
    }
    let tracers: Vec<Tracer> = TRACERS.into_iter().filter(|t| t.available(ctx)).collect();

    let mut sections = Vec::new();
    {
        let demo = start_demo(ctx)?;
        eprintln!("bench: profile: start-up on the demo (pid {})", demo.pid);
        sections.push(startup(ctx, &tracers, demo.pid)?);
        eprintln!("bench: profile: 1 s captures of the demo");
        sections.push(short_capture(ctx, &tracers, demo.pid)?);
        eprintln!("bench: profile: peak RSS over a capture of the demo");
        sections.push(memory(ctx, &tracers, demo.pid)?);
        drop(demo.proc);
    }
    // The cost sections also show livetrace's cheap mode.
    let mut costed = tracers.clone();
    costed.insert(1, Tracer::LivetraceFp);
    eprintln!("bench: profile: sampling overhead on the CPU-bound workload");
    sections.push(overhead(ctx, &costed)?);
    eprintln!("bench: profile: in-kernel cost per sample");
    sections.push(in_kernel(ctx, &costed)?);
    if let Some(first) = sections.first_mut() {
        first.notes.extend(notes_missing);
    }
    Ok(sections)
}

/// The indices `0..n` starting at `round % n`: each round of a measurement visits the tools in
/// a different order, so a drift in the machine's speed does not favour whichever goes first.
fn rotated(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + round) % n)
}

fn ratio_cell(value: f64, base: f64) -> String {
    if base > 0.0 && value.is_finite() {
        format!("{:.1}×", value / base)
    } else {
        "n/a".to_owned()
    }
}

/// 1. Launch until attached, on the demo service.
fn startup(ctx: &Ctx, tracers: &[Tracer], pid: u32) -> anyhow::Result<Section> {
    let mut table = Table::new(&[
        "tool",
        "command",
        "launch → attached, median (min–max)",
        "vs livetrace",
        "CPU time to attach, median",
        "attached means",
    ]);
    let mut setups = Vec::new();
    for &tracer in tracers {
        let ready = readiness(ctx, tracer, pid)?;
        // One unmeasured run first, so every tool starts with warm caches.
        drop(start(ctx, tracer, pid, 99, ready)?);
        setups.push((tracer, ready));
    }
    let mut times = vec![Vec::new(); setups.len()];
    let mut cpu = vec![Vec::new(); setups.len()];
    for round in 0..ctx.runs {
        for i in rotated(setups.len(), round) {
            let (tracer, ready) = setups[i];
            let running = start(ctx, tracer, pid, 99, ready)?;
            times[i].push(running.startup());
            cpu[i].extend(running.cpu_to_attach.map(|d| d.as_secs_f64() * 1e3));
            drop(running);
            thread::sleep(Duration::from_millis(200));
        }
    }
    let mut base = None;
    for (i, &(tracer, ready)) in setups.iter().enumerate() {
        let secs: Vec<f64> = times[i].iter().map(Duration::as_secs_f64).collect();
        let m = median(&secs).unwrap_or(f64::NAN);
        let base = *base.get_or_insert(m);
        table.row(vec![
            tracer.name().to_owned(),
            tracer.shown(99, None),
            ms_summary(&times[i]),
            ratio_cell(m, base),
            median(&cpu[i]).map_or_else(|| "n/a".to_owned(), |c| format!("{c:.0} ms")),
            match ready {
                Readiness::Message => "its `livetrace: profiling ...` line on stderr".to_owned(),
                Readiness::PerfFds(n) => format!("holds its steady-state {n} perf_event fds"),
            },
        ]);
    }
    let mut section = Section::new(
        "profile: start-up",
        "Time from launching the tracer until it samples the demo service (pid given with `-p`). \
         Lower is better: mid-incident, this is time with no data. Wall times here move with \
         whatever else the machine runs; the tracer's CPU time up to that point \
         (`/proc/PID/task/*/schedstat`) moves much less. The tools take turns, in a rotated \
         order, for every run after one unmeasured warm-up each.",
    );
    section.table = Some(table);
    section.notes.push(
        "perf_event fds are polled every 2 ms. Checked by hand: bpftrace's first sample (a \
         `printf` in the probe, at 999 Hz) arrives 2–3 ms after its fds are all open."
            .to_owned(),
    );
    Ok(section)
}

/// 2. A whole 1 s capture with symbolised output on disk, minus the second itself.
fn short_capture(ctx: &Ctx, tracers: &[Tracer], pid: u32) -> anyhow::Result<Section> {
    let mut table = Table::new(&[
        "tool",
        "command",
        "wall time − 1 s, median (min–max)",
        "vs livetrace",
        "CPU time, median",
    ]);
    // The first run of each warms caches and is not counted.
    for &tracer in tracers {
        capture(ctx, tracer, pid, 1)?;
    }
    let mut fixed = vec![Vec::new(); tracers.len()];
    let mut cpu = vec![Vec::new(); tracers.len()];
    for round in 0..ctx.runs {
        for i in rotated(tracers.len(), round) {
            let run = capture(ctx, tracers[i], pid, 1)?;
            fixed[i].push(run.wall.saturating_sub(Duration::from_secs(1)));
            cpu[i].push(run.cpu.as_secs_f64() * 1e3);
        }
    }
    let mut base = None;
    for (i, &tracer) in tracers.iter().enumerate() {
        let m = median(
            &fixed[i]
                .iter()
                .map(Duration::as_secs_f64)
                .collect::<Vec<_>>(),
        )
        .unwrap_or(f64::NAN);
        let base = *base.get_or_insert(m);
        table.row(vec![
            tracer.name().to_owned(),
            tracer.shown(99, Some(1)),
            ms_summary(&fixed[i]),
            ratio_cell(m, base),
            format!("{:.0} ms", median(&cpu[i]).unwrap_or(f64::NAN)),
        ]);
    }
    let mut section = Section::new(
        "profile: fixed cost of a 1 s capture",
        "Wall time of a complete 1 s capture of the demo service at 99 Hz, from launch to a \
         symbolised result on disk (livetrace: a flamegraph; bpftrace: its printed map; perf: \
         record, then `perf report --stdio`), minus the 1 s of sampling: start-up, attaching, \
         draining, symbolising and writing. CPU time is the tracer's user + system time. The \
         tools take turns, in a rotated order, after one unmeasured warm-up each.",
    );
    section.table = Some(table);
    Ok(section)
}

struct CaptureRun {
    wall: Duration,
    cpu: Duration,
    /// Peak RSS of the tracer; for perf, of `perf record` (see `report_rss`).
    max_rss: u64,
    /// perf only: peak RSS of `perf report`.
    report_rss: Option<u64>,
    report_cpu: Option<Duration>,
}

/// One fixed-length capture of `pid` at 99 Hz, from launch to output written.
fn capture(ctx: &Ctx, tracer: Tracer, pid: u32, secs: u32) -> anyhow::Result<CaptureRun> {
    let (log_path, log) = scratch_file(ctx, &format!("{}-capture.log", tracer.name()))?;
    let limit = Duration::from_secs(u64::from(secs) + 60);
    let pid_s = pid.to_string();
    let secs_s = secs.to_string();
    // Runs one process of the capture to its end; its log is shown if it fails.
    let run = |what: &str, command: &mut Command| -> anyhow::Result<(Instant, Exit)> {
        let mut proc = Proc::spawn(what, command)?;
        let exit = proc.wait(limit)?;
        if !exit.success() {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            bail!("{what} failed:\n{log}");
        }
        Ok((proc.started, exit))
    };
    // livetrace and bpftrace capture and report in one process.
    let one_process = |(started, exit): (Instant, Exit)| CaptureRun {
        wall: exit.at - started,
        cpu: exit.cpu,
        max_rss: exit.max_rss,
        report_rss: None,
        report_cpu: None,
    };
    match tracer {
        Tracer::Livetrace | Tracer::LivetraceFp => {
            let unwind = if tracer == Tracer::LivetraceFp {
                "fp"
            } else {
                "auto"
            };
            let ran = run(
                "livetrace profile",
                Command::new(ctx.bin.join("livetrace"))
                    .args([
                        "profile", "-p", &pid_s, "-d", &secs_s, "--unwind", unwind, "-o",
                    ])
                    .arg(ctx.scratch.join("capture.svg"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log),
            )?;
            Ok(one_process(ran))
        }
        Tracer::Bpftrace => {
            let (_, out) = scratch_file(ctx, "bpftrace-capture.txt")?;
            let ran = run(
                "bpftrace",
                Command::new("bpftrace")
                    .args(["-e", &bpftrace_program(99, &pid_s, Some(secs))])
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(log),
            )?;
            Ok(one_process(ran))
        }
        Tracer::Perf => {
            let data = ctx.scratch.join("capture.perf.data");
            let (started, recorded) = run(
                "perf record",
                Command::new("perf")
                    .args([
                        "record",
                        "-q",
                        "-e",
                        "cpu-clock",
                        "-F",
                        "99",
                        "-g",
                        "-p",
                        &pid_s,
                        "-o",
                    ])
                    .arg(&data)
                    .args(["--", "sleep", &secs_s])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log.try_clone()?),
            )?;
            let (_, out) = scratch_file(ctx, "perf-report.txt")?;
            let (_, reported) = run(
                "perf report",
                Command::new("perf")
                    .args(["report", "--stdio", "-i"])
                    .arg(&data)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(log),
            )?;
            Ok(CaptureRun {
                wall: reported.at - started,
                cpu: recorded.cpu + reported.cpu,
                max_rss: recorded.max_rss,
                report_rss: Some(reported.max_rss),
                report_cpu: Some(reported.cpu),
            })
        }
    }
}

/// 4. Peak RSS (and CPU time) of the tracer over a longer capture of the demo.
fn memory(ctx: &Ctx, tracers: &[Tracer], pid: u32) -> anyhow::Result<Section> {
    let secs = if ctx.quick { 3 } else { 10 };
    let mut table = Table::new(&["tool", "peak RSS", "vs livetrace", "CPU time (user + sys)"]);
    let mut base = None;
    for &tracer in tracers {
        let run = capture(ctx, tracer, pid, secs)?;
        let rss = run.max_rss as f64;
        let base = *base.get_or_insert(rss);
        table.row(vec![
            if tracer == Tracer::Perf {
                "perf record".to_owned()
            } else {
                tracer.name().to_owned()
            },
            mib(run.max_rss),
            ratio_cell(rss, base),
            format!(
                "{:.0} ms",
                (run.cpu - run.report_cpu.unwrap_or_default()).as_secs_f64() * 1e3
            ),
        ]);
        if let (Some(report_rss), Some(report_cpu)) = (run.report_rss, run.report_cpu) {
            table.row(vec![
                "perf report (afterwards)".to_owned(),
                mib(report_rss),
                ratio_cell(report_rss as f64, base),
                format!("{:.0} ms", report_cpu.as_secs_f64() * 1e3),
            ]);
        }
    }
    let mut section = Section::new(
        format!("profile: memory over a {secs} s capture"),
        format!(
            "Peak resident set (`ru_maxrss` from `wait4`) of the tracer process over a whole {secs} s \
             capture of the demo service at 99 Hz, output included (same commands as above with \
             `{secs}` for `1`). One run each: peak RSS varies little between runs."
        ),
    );
    section.table = Some(table);
    Ok(section)
}

/// One run of the workload, with or without a tracer attached.
struct WorkloadRun {
    /// Units of work per second of wall time (the whole machine's cost).
    per_second: f64,
    /// Units of work per second of the workload's own CPU time (the cost paid on its time).
    per_cpu_second: f64,
    /// The tracer's own CPU time over the window, as a share of one CPU.
    tracer_cpu: Option<f64>,
    /// The tracer's BPF program statistics over the window (when the kernel counts them), and
    /// the time between the two readings.
    bpf: Option<(process::BpfStats, Duration)>,
}

/// Runs the workload for `window` seconds, with `tracer` attached at `hz` first if given.
fn workload(
    ctx: &Ctx,
    tracer: Option<(Tracer, Readiness)>,
    hz: u32,
    window: f64,
) -> anyhow::Result<WorkloadRun> {
    let mut burn = Proc::spawn(
        "burn (workload)",
        Command::new(&ctx.burn)
            .arg(format!("{window}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )?;
    // Its threads exist once it is blocked reading stdin; give it a moment to get there.
    thread::sleep(Duration::from_millis(50));
    let running = match tracer {
        Some((tracer, ready)) => Some(start(ctx, tracer, burn.pid(), hz, ready)?),
        None => None,
    };
    let tracer_pid = running.as_ref().map(|r| r.proc.pid());
    let bpf_before = tracer_pid
        .and_then(|p| process::bpf_prog_stats(p).ok())
        .map(|stats| (stats, Instant::now()));
    let cpu_before = tracer_pid.and_then(process::cpu_time);
    let mut stdin = burn
        .child
        .stdin
        .take()
        .context("no stdin pipe to the workload")?;
    stdin.write_all(b"go\n").context("starting the workload")?;
    stdin.flush()?;
    // The result line comes at the end of the window; the workload then idles until its stdin
    // closes, so a tracer that stops when its target exits is still there to be read.
    let mut out = String::new();
    let stdout = burn
        .child
        .stdout
        .take()
        .context("no stdout from the workload")?;
    BufReader::new(stdout)
        .read_line(&mut out)
        .context("reading the workload's result")?;
    let bpf_after = tracer_pid
        .and_then(|p| process::bpf_prog_stats(p).ok())
        .map(|stats| (stats, Instant::now()));
    let cpu_after = tracer_pid.and_then(process::cpu_time);
    drop(stdin);
    burn.wait_success(Duration::from_secs(30))?;
    drop(running);
    let field = |name: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let (Some(units), Some(seconds), Some(cpu)) =
        (field("units="), field("seconds="), field("cpu="))
    else {
        bail!("the workload printed no result: {out:?}");
    };
    Ok(WorkloadRun {
        per_second: units / seconds,
        per_cpu_second: units / cpu,
        tracer_cpu: cpu_before
            .zip(cpu_after)
            .map(|(b, a)| a.saturating_sub(b).as_secs_f64() / seconds),
        bpf: bpf_before.zip(bpf_after).map(|((b, from), (a, to))| {
            let stats = process::BpfStats {
                run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
                run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
            };
            (stats, to - from)
        }),
    })
}

/// Readiness of each tracer on a workload process (they all have the same threads).
fn workload_readiness(ctx: &Ctx, tracers: &[Tracer]) -> anyhow::Result<Vec<(Tracer, Readiness)>> {
    let idle = Proc::spawn(
        "burn (workload)",
        Command::new(&ctx.burn)
            .arg("1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null()),
    )?;
    thread::sleep(Duration::from_millis(50));
    let result = tracers
        .iter()
        .map(|&t| Ok((t, readiness(ctx, t, idle.pid())?)))
        .collect();
    drop(idle);
    result
}

/// "median (min–max)" of ratios, three decimals.
fn ratio_summary(values: &[f64]) -> String {
    let (lo, hi) = min_max(values);
    match median(values) {
        Some(m) => format!("{m:.3} ({lo:.3}–{hi:.3})"),
        None => "n/a".to_owned(),
    }
}

/// 3. Throughput kept by the workload with each tracer attached, against none, at 99 and 999 Hz.
fn overhead(ctx: &Ctx, tracers: &[Tracer]) -> anyhow::Result<Section> {
    let window = if ctx.quick { 1.0 } else { 3.0 };
    let ready = workload_readiness(ctx, tracers)?;
    let mut table = Table::new(&[
        "Hz",
        "tool",
        "work per CPU-second kept, median (min–max)",
        "cost",
        "work per second kept (whole machine)",
        "tracer's own CPU",
    ]);
    let mut notes = Vec::new();
    for hz in [99, 999] {
        // Each round runs no tracer and every tracer once, in an order rotated every round, and
        // compares each tracer with that round's run without one.
        let mut configs: Vec<Option<(Tracer, Readiness)>> = vec![None];
        configs.extend(ready.iter().copied().map(Some));
        let mut rounds: Vec<Vec<WorkloadRun>> = Vec::new();
        for round in 0..ctx.runs {
            let mut runs: Vec<Option<WorkloadRun>> = (0..configs.len()).map(|_| None).collect();
            for i in rotated(configs.len(), round) {
                runs[i] = Some(workload(ctx, configs[i], hz, window)?);
            }
            rounds.push(
                runs.into_iter()
                    .map(|r| r.expect("every configuration ran"))
                    .collect(),
            );
        }
        // The noise floor: each round's run without a tracer against the previous round's.
        let noise = |f: fn(&WorkloadRun) -> f64| -> Vec<f64> {
            rounds
                .windows(2)
                .map(|w| f(&w[1][0]) / f(&w[0][0]))
                .collect()
        };
        if rounds.len() > 1 {
            table.row(vec![
                hz.to_string(),
                "none (noise: each round ÷ the one before)".to_owned(),
                ratio_summary(&noise(|r| r.per_cpu_second)),
                String::new(),
                ratio_summary(&noise(|r| r.per_second)),
                String::new(),
            ]);
        }
        for (i, config) in configs.iter().enumerate().skip(1) {
            let Some((tracer, _)) = config else { continue };
            let kept = |f: fn(&WorkloadRun) -> f64| -> Vec<f64> {
                rounds.iter().map(|r| f(&r[i]) / f(&r[0])).collect()
            };
            let per_cpu = kept(|r| r.per_cpu_second);
            let own: Vec<f64> = rounds.iter().filter_map(|r| r[i].tracer_cpu).collect();
            table.row(vec![
                hz.to_string(),
                tracer.name().to_owned(),
                ratio_summary(&per_cpu),
                median(&per_cpu).map_or_else(
                    || "n/a".to_owned(),
                    |m| format!("{:.1} %", (1.0 - m) * 100.0),
                ),
                ratio_summary(&kept(|r| r.per_second)),
                median(&own).map_or_else(
                    || "n/a".to_owned(),
                    |m| format!("{:.1} % of a CPU", m * 100.0),
                ),
            ]);
        }
        let baseline = |f: fn(&WorkloadRun) -> f64| {
            median(&rounds.iter().map(|r| f(&r[0])).collect::<Vec<_>>()).unwrap_or(f64::NAN) / 1e6
        };
        notes.push(format!(
            "{hz} Hz, no tracer: {:.2} M units per CPU-second, {:.2} M units per second (medians).",
            baseline(|r| r.per_cpu_second),
            baseline(|r| r.per_second),
        ));
    }
    let mut section = Section::new(
        "profile: sampling overhead",
        format!(
            "A CPU-bound workload (`xtask/bench/burn.c`: one thread per CPU hashing a buffer) \
             runs for {window:.0} s with the tracer attached to it; its work is divided by its \
             work with no tracer in the same round. Every round runs each configuration once, \
             in an order rotated every round; the median of {} rounds is shown, with the range. \
             *Work per CPU-second* counts only the workload's own CPU time, which is where the \
             sampling interrupt and BPF program run (this kernel charges interrupt time to the \
             interrupted thread), so it is the cost the traced program pays, and it does not \
             move when other processes take the CPU; 1.000 means no measurable cost. *Work per \
             second* also loses what the tracer's own process takes from the saturated \
             machine, and whatever else runs on it. *Tracer's own CPU* is the tracer \
             process's CPU time over the window (`/proc/PID/task/*/schedstat`). The `none` rows show how much two \
             runs without a tracer differ on this machine: differences smaller than that are \
             noise.",
            ctx.runs
        ),
    );
    section.table = Some(table);
    section.notes = notes;
    Ok(section)
}

/// 5. The BPF tracers' own in-kernel time per sample, as the kernel counts it.
fn in_kernel(ctx: &Ctx, tracers: &[Tracer]) -> anyhow::Result<Section> {
    let window = if ctx.quick { 1.0 } else { 2.0 };
    let hz = 999;
    let bpf_tracers: Vec<Tracer> = tracers
        .iter()
        .copied()
        .filter(|&t| t != Tracer::Perf)
        .collect();
    let ready = workload_readiness(ctx, &bpf_tracers)?;
    let mut table = Table::new(&[
        "tool",
        "ns per sample, median (min–max)",
        "vs livetrace",
        "samples per second",
        "share of all CPU time",
    ]);
    {
        let _stats_on = process::Sysctl::set("kernel.bpf_stats_enabled", "1")?;
        let mut per_run = vec![Vec::new(); ready.len()];
        let mut rates = vec![Vec::new(); ready.len()];
        let mut shares = vec![Vec::new(); ready.len()];
        for round in 0..ctx.runs {
            for i in rotated(ready.len(), round) {
                let (tracer, _) = ready[i];
                let run = workload(ctx, Some(ready[i]), hz, window)?;
                let (stats, interval) = run.bpf.with_context(|| {
                    format!("could not read {}'s BPF program statistics", tracer.name())
                })?;
                if stats.run_cnt == 0 {
                    continue;
                }
                let seconds = interval.as_secs_f64();
                per_run[i].push(stats.run_time_ns as f64 / stats.run_cnt as f64);
                rates[i].push(stats.run_cnt as f64 / seconds);
                shares[i].push(stats.run_time_ns as f64 / (seconds * 1e9 * ctx.cpus as f64));
            }
        }
        let mut base = None;
        for (i, &(tracer, _)) in ready.iter().enumerate() {
            let m = median(&per_run[i]).unwrap_or(f64::NAN);
            let (lo, hi) = min_max(&per_run[i]);
            let base = *base.get_or_insert(m);
            table.row(vec![
                tracer.name().to_owned(),
                format!("{m:.0} ns ({lo:.0}–{hi:.0})"),
                ratio_cell(m, base),
                format!("{:.0}", median(&rates[i]).unwrap_or(f64::NAN)),
                format!("{:.3} %", median(&shares[i]).unwrap_or(f64::NAN) * 100.0),
            ]);
        }
    }
    let mut section = Section::new(
        "profile: in-kernel cost per sample",
        format!(
            "Run time of each BPF tracer's programs as the kernel counts it \
             (`kernel.bpf_stats_enabled=1` for this section only, then restored; `run_time_ns` \
             and `run_cnt` from `/proc/PID/fdinfo`), over a {window:.0} s window of the saturated \
             workload at {hz} Hz; {} runs, alternating between the tools. It excludes the perf event's own interrupt handling, \
             which all three tools pay alike.",
            ctx.runs
        ),
    );
    section.table = Some(table);
    section.notes.push(
        "perf has no BPF program: its per-sample kernel work (copying the stack into its ring \
         buffer) is not counted this way and is not shown."
            .to_owned(),
    );
    Ok(section)
}
