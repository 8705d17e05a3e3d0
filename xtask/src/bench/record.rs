//! The flight recorder's always-on cost, side by side with perf's nearest equivalent,
//! `perf record --switch-output` (a new perf.data every 10 s), both at record's default 49 Hz:
//! the throughput the CPU-bound workload (burn, one thread per CPU) keeps, and the pipe
//! ping-pong's time per round trip (two context switches: what the off-CPU part costs), each
//! against no tracer, alternating within each round. Then livetrace's resident memory over a
//! minute of recording with `--keep 10m`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    Ctx, median, min_max,
    process::{self, Proc, start_tracer, stop_tracer},
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const HZ: &str = "49";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    None,
    Record,
    RecordNoOffcpu,
    Perf,
}

impl Config {
    const ALL: [Config; 4] = [Self::None, Self::Record, Self::RecordNoOffcpu, Self::Perf];

    fn label(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::Record => "livetrace record (49 Hz, and off-CPU)",
            Self::RecordNoOffcpu => "livetrace record --no-offcpu (49 Hz)",
            Self::Perf => "perf record -F 49 -g --switch-output=10s",
        }
    }

    /// The tracer's command line, its target given by `target` (`-p PID`, or `-- COMMAND`).
    fn tracer(self, ctx: &Ctx, target: &[String]) -> Option<Command> {
        let socket = ctx.scratch.join("record.sock");
        let mut command = match self {
            Self::None => return None,
            Self::Record | Self::RecordNoOffcpu => {
                let mut c = Command::new(ctx.bin.join("livetrace"));
                c.args(["record", "--socket"]).arg(&socket);
                if self == Self::RecordNoOffcpu {
                    c.arg("--no-offcpu");
                }
                c
            }
            Self::Perf => {
                let mut c = Command::new("perf");
                c.args(["record", "-q", "-e", "cpu-clock", "-F", HZ, "-g"])
                    .arg("--switch-output=10s")
                    .arg("-o")
                    .arg(ctx.scratch.join("record.perf.data"));
                c
            }
        };
        command.args(target);
        Some(command)
    }
}

pub fn run(ctx: &Ctx, rounds: usize) -> anyhow::Result<String> {
    if ctx.peers.perf.is_none() {
        anyhow::bail!("perf is missing");
    }
    let pingpong = super::offcpu::build_pingpong()?;
    let window = if ctx.quick { 1.0 } else { 3.0 };
    let mut burn: Vec<Vec<f64>> = vec![Vec::new(); Config::ALL.len()];
    let mut pong: Vec<Vec<f64>> = vec![Vec::new(); Config::ALL.len()];
    for round in 0..rounds {
        for (i, config) in Config::ALL.into_iter().enumerate() {
            let units = burn_run(ctx, config, window)
                .with_context(|| format!("round {round}, burn, {}", config.label()))?;
            let ns = pingpong_run(ctx, config, &pingpong, window)
                .with_context(|| format!("round {round}, pingpong, {}", config.label()))?;
            eprintln!(
                "bench record: round {round} {:<44} {units:>12.0} units/s {ns:>8.0} ns/round trip",
                config.label()
            );
            burn[i].push(units);
            pong[i].push(ns);
        }
    }
    let (burn_base, pong_base) = (
        median(&burn[0]).context("no baseline")?,
        median(&pong[0]).context("no baseline")?,
    );
    let mut out = String::from(
        "| configuration | CPU-bound work kept, median (min–max) | ping-pong round trip, median | \
         added per context switch | vs no tracer |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for (i, config) in Config::ALL.into_iter().enumerate() {
        let kept: Vec<f64> = burn[i].iter().map(|u| u / burn_base).collect();
        let (lo, hi) = min_max(&kept);
        let ns = median(&pong[i]).context("no runs")?;
        out.push_str(&format!(
            "| {} | {:.2} % ({:.2}–{:.2}) | {ns:.0} ns | {:+.2} us | {:.2}x |\n",
            config.label(),
            median(&kept).unwrap_or_default() * 100.0,
            lo * 100.0,
            hi * 100.0,
            (ns - pong_base) / 2.0 / 1000.0,
            ns / pong_base
        ));
    }
    out.push_str(&format!(
        "\n{rounds} rounds, configurations alternating within each; CPU-bound: `burn` with one \
         thread per CPU for {window} s, traced with `-p` (work done against no tracer's median); \
         ping-pong: two processes on one CPU passing a byte for {window} s, traced as \
         `-- COMMAND` (a round trip is two context switches). perf keeps no off-CPU time. The \
         ping-pong is the worst case for off-CPU recording, a switch every 2 us: what it adds per \
         switch is offcpu's own cost (see its section), mostly the kernel stack's walk; a service \
         that switches that often is recorded with `--no-offcpu`.\n\n"
    ));
    out.push_str(&memory_over_time(ctx)?);
    Ok(out)
}

/// The burn workload's units per second with `config` attached by pid.
fn burn_run(ctx: &Ctx, config: Config, window: f64) -> anyhow::Result<f64> {
    let mut burn = Proc::spawn(
        "burn (workload)",
        Command::new(&ctx.burn)
            .arg(format!("{window}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )?;
    thread::sleep(Duration::from_millis(50));
    let target = ["-p".to_owned(), burn.pid().to_string()];
    let tracer = match config.tracer(ctx, &target) {
        Some(mut command) if config == Config::Perf => {
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut proc = Proc::spawn("perf record", &mut command)?;
            // perf says nothing when it is attached: one event per workload thread.
            process::wait_for_perf_fds(&mut proc, ctx.cpus, READY_TIMEOUT)
                .context("perf did not attach")?;
            Some(proc)
        }
        Some(mut command) => Some(start_tracer(
            "livetrace record",
            &mut command,
            "livetrace: recording",
            READY_TIMEOUT,
        )?),
        None => None,
    };
    let mut stdin = burn.child.stdin.take().context("no stdin pipe")?;
    stdin.write_all(b"go\n")?;
    stdin.flush()?;
    let mut out = String::new();
    let stdout = burn.child.stdout.take().context("no stdout")?;
    BufReader::new(stdout).read_line(&mut out)?;
    drop(stdin);
    burn.wait_success(Duration::from_secs(30))?;
    if let Some(mut tracer) = tracer {
        stop_tracer(&mut tracer, STOP_TIMEOUT)?;
    }
    clean_perf_data(ctx);
    let field = |name: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (field("units="), field("seconds=")) {
        (Some(units), Some(seconds)) => Ok(units / seconds),
        _ => anyhow::bail!("the workload printed no result: {out:?}"),
    }
}

/// The ping-pong's ns per round trip, run by `config` as its command.
fn pingpong_run(ctx: &Ctx, config: Config, pingpong: &Path, window: f64) -> anyhow::Result<f64> {
    let target = [
        "--".to_owned(),
        pingpong.to_string_lossy().into_owned(),
        window.to_string(),
    ];
    let output = match config.tracer(ctx, &target) {
        Some(mut command) => command
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()?,
        None => Command::new(pingpong).arg(window.to_string()).output()?,
    };
    clean_perf_data(ctx);
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "ns_per_round_trip")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("pingpong printed no result: {text:?}"))
}

/// perf's rotated files: not measured, and not to pile up.
fn clean_perf_data(ctx: &Ctx) {
    if let Ok(entries) = std::fs::read_dir(&ctx.scratch) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("record.perf.data")
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// livetrace record's resident memory over a minute on the CPU-bound workload, `--keep 10m`.
fn memory_over_time(ctx: &Ctx) -> anyhow::Result<String> {
    let seconds = if ctx.quick { 20 } else { 60 };
    let mut burn = Proc::spawn(
        "burn (workload)",
        Command::new(&ctx.burn)
            .arg(seconds.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )?;
    thread::sleep(Duration::from_millis(50));
    let target = [
        "-p".to_owned(),
        burn.pid().to_string(),
        "--keep".into(),
        "10m".into(),
    ];
    let mut command = Config::Record.tracer(ctx, &target).context("a tracer")?;
    let mut tracer = start_tracer(
        "livetrace record",
        &mut command,
        "livetrace: recording",
        READY_TIMEOUT,
    )?;
    let started = Instant::now();
    let mut stdin = burn.child.stdin.take().context("no stdin pipe")?;
    stdin.write_all(b"go\n")?;
    stdin.flush()?;
    let mut row = Vec::new();
    for at in [1u64, 10, 20, 30, 45, 60]
        .into_iter()
        .filter(|&s| s <= seconds)
    {
        if let Some(wait) = Duration::from_secs(at).checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
        row.push((at, rss_kib(tracer.pid())));
    }
    stop_tracer(&mut tracer, STOP_TIMEOUT)?;
    drop(stdin);
    let _ = burn.wait_success(Duration::from_secs(30));
    let mut out = String::from(
        "Resident memory of `livetrace record -p PID --keep 10m` (default 10 s buckets, 49 Hz, \
         off-CPU on) on the CPU-bound workload:\n\n| seconds recording |",
    );
    for (at, _) in &row {
        out.push_str(&format!(" {at} |"));
    }
    out.push_str("\n| --- |");
    out.push_str(&" ---: |".repeat(row.len()));
    out.push_str("\n| RSS (MiB) |");
    for (_, kib) in &row {
        out.push_str(&format!(" {:.1} |", *kib as f64 / 1024.0));
    }
    out.push('\n');
    Ok(out)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
