//! offcpu's cost per context switch, the number that decides whether it can run in production:
//! sched_switch fires on every switch of the machine. Workload: two processes pinned to one CPU
//! passing a byte over pipes (`xtask/bench/pingpong.c`), two switches per round trip. Compared in one
//! run, alternating: no tracer; livetrace on the ping-pong only (`-- COMMAND`) with each kind of
//! stack and unwinding (`--unwind dwarf` copies the user stack at every switch-out); livetrace on
//! the whole system; and a bpftrace sched_switch script that also keeps kernel stacks.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use super::{
    median,
    process::{self, start_tracer, stop_tracer},
};
use crate::{run_command, workspace_root};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

const BPFTRACE_OFFCPU: &str = r#"tracepoint:sched:sched_switch {
  @start[args->prev_pid] = nsecs;
  @stack[args->prev_pid] = kstack;
  $s = @start[args->next_pid];
  if ($s) {
    @us[@stack[args->next_pid]] = sum((nsecs - $s) / 1000);
    delete(@start[args->next_pid]);
  }
}"#;

/// The floor: any program on this tracepoint costs at least this much per switch.
const BPFTRACE_EMPTY: &str = "tracepoint:sched:sched_switch { }";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    None,
    BpftraceEmpty,
    LivetraceUserFp,
    LivetraceUserDwarf,
    LivetraceKernelOnly,
    LivetraceBothFp,
    LivetraceBothDwarf,
    LivetraceSystem,
    Bpftrace,
}

impl Config {
    const ALL: [Config; 9] = [
        Self::None,
        Self::BpftraceEmpty,
        Self::LivetraceUserFp,
        Self::LivetraceUserDwarf,
        Self::LivetraceKernelOnly,
        Self::LivetraceBothFp,
        Self::LivetraceBothDwarf,
        Self::LivetraceSystem,
        Self::Bpftrace,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::BpftraceEmpty => "empty sched_switch program (bpftrace; the floor)",
            Self::LivetraceUserFp => "livetrace offcpu -U --unwind fp -- pingpong",
            Self::LivetraceUserDwarf => "livetrace offcpu -U --unwind dwarf -- pingpong",
            Self::LivetraceKernelOnly => {
                "livetrace offcpu -K -- pingpong (kernel stacks, as bpftrace)"
            }
            Self::LivetraceBothFp => "livetrace offcpu --unwind fp -- pingpong (user + kernel)",
            Self::LivetraceBothDwarf => {
                "livetrace offcpu -- pingpong (user + kernel; auto: dwarf, libc has no frame pointers)"
            }
            Self::LivetraceSystem => "livetrace offcpu, whole system (user + kernel, fp)",
            Self::Bpftrace => "bpftrace sched_switch script keeping kstack",
        }
    }

    /// livetrace's options for the configurations that trace the command only.
    fn command_args(self) -> Option<&'static [&'static str]> {
        match self {
            Self::LivetraceUserFp => Some(&["-U", "--unwind", "fp"]),
            Self::LivetraceUserDwarf => Some(&["-U", "--unwind", "dwarf"]),
            Self::LivetraceKernelOnly => Some(&["-K"]),
            Self::LivetraceBothFp => Some(&["--unwind", "fp"]),
            Self::LivetraceBothDwarf => Some(&[]),
            _ => None,
        }
    }
}

/// Runs the comparison and returns a markdown section.
pub fn run(livetrace: &Path, rounds: usize, seconds: f64) -> anyhow::Result<String> {
    let pingpong = build_pingpong()?;
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); Config::ALL.len()];
    for round in 0..rounds {
        for (i, config) in Config::ALL.into_iter().enumerate() {
            let ns = measure(config, livetrace, &pingpong, seconds)
                .with_context(|| format!("round {round}, {}", config.label()))?;
            eprintln!(
                "bench offcpu: round {round} {:<34} {ns:>8.0} ns/round trip",
                config.label()
            );
            results[i].push(ns);
        }
    }
    let base = median(&results[0]).context("no baseline runs")?;
    let mut out = String::from(
        "| configuration | ns per round trip (median) | added per context switch | vs no tracer |\n\
         | --- | ---: | ---: | ---: |\n",
    );
    for (config, samples) in Config::ALL.into_iter().zip(&results) {
        let m = median(samples).context("no runs")?;
        out.push_str(&format!(
            "| {} | {:.0} | {:+.2} us | {:.2}x |\n",
            config.label(),
            m,
            (m - base) / 2.0 / 1000.0,
            m / base
        ));
    }
    out.push_str(&format!(
        "\n{rounds} rounds of {seconds} s each, configurations alternating within each round; \
         a round trip is two context switches on one CPU.\n"
    ));
    Ok(out)
}

pub fn build_pingpong() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("pingpong");
    run_command(
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(workspace_root().join("xtask/bench/pingpong.c")),
    )?;
    Ok(out)
}

/// One run of the workload under `config`; returns its ns per round trip.
fn measure(config: Config, livetrace: &Path, pingpong: &Path, seconds: f64) -> anyhow::Result<f64> {
    let secs = seconds.to_string();
    let folded =
        std::env::temp_dir().join(format!("livetrace-bench-{}.folded", std::process::id()));
    let output = if let Some(args) = config.command_args() {
        let out = Command::new(livetrace)
            .args(["offcpu", "-d", "60"])
            .args(args)
            .arg("-o")
            .arg(&folded)
            .arg("--")
            .arg(pingpong)
            .arg(&secs)
            .stderr(Stdio::null())
            .output()?;
        let _ = std::fs::remove_file(&folded);
        out
    } else {
        match config {
            Config::None => Command::new(pingpong).arg(&secs).output()?,
            Config::LivetraceSystem => {
                let mut tracer = start_tracer(
                    "livetrace offcpu",
                    Command::new(livetrace).args(["offcpu", "-o"]).arg(&folded),
                    "livetrace: tracing",
                    READY_TIMEOUT,
                )?;
                let out = Command::new(pingpong).arg(&secs).output()?;
                stop_quietly(&mut tracer, config);
                let _ = std::fs::remove_file(&folded);
                out
            }
            Config::Bpftrace | Config::BpftraceEmpty => {
                ensure_tracefs()?;
                let script = if config == Config::Bpftrace {
                    BPFTRACE_OFFCPU
                } else {
                    BPFTRACE_EMPTY
                };
                let mut tracer = start_tracer(
                    "bpftrace",
                    Command::new("bpftrace").args(["-e", script]),
                    "Attaching",
                    READY_TIMEOUT,
                )?;
                let out = Command::new(pingpong).arg(&secs).output()?;
                stop_quietly(&mut tracer, config);
                out
            }
            _ => anyhow::bail!("{} has no way to run", config.label()),
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "ns_per_round_trip")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("pingpong printed no result: {text:?}"))
}

/// Stops a tracer after its measured run. The workload's result is already in hand, so a tracer
/// slow to exit (bpftrace detaching from sched_switch on a busy machine once took over 30 s) is
/// killed and reported, not a reason to throw the whole benchmark away.
fn stop_quietly(tracer: &mut process::Proc, config: Config) {
    if let Err(err) = stop_tracer(tracer, STOP_TIMEOUT) {
        eprintln!(
            "bench offcpu: {}: {err:#} (the measurement stands)",
            config.label()
        );
    }
}

/// bpftrace 0.17 attaches tracepoints through tracefs, which a fresh machine has not mounted.
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok(());
    }
    run_command(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}
