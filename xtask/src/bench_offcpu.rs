//! offcpu's cost per context switch, the number that decides whether it can run in production:
//! sched_switch fires on every switch of the machine. Workload: two processes pinned to one CPU
//! passing a byte over pipes (`bench/pingpong.c`), two switches per round trip. Compared in one
//! run, alternating: no tracer; livetrace on the ping-pong only (`-- COMMAND`); livetrace on the
//! whole system; and a bpftrace sched_switch script that also keeps kernel stacks.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{run_command, workspace_root};

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
    LivetraceUserOnly,
    LivetraceCommand,
    LivetraceSystem,
    Bpftrace,
}

impl Config {
    const ALL: [Config; 6] = [
        Self::None,
        Self::BpftraceEmpty,
        Self::LivetraceUserOnly,
        Self::LivetraceCommand,
        Self::LivetraceSystem,
        Self::Bpftrace,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::BpftraceEmpty => "empty sched_switch program (bpftrace; the floor)",
            Self::LivetraceUserOnly => "livetrace offcpu -U -- pingpong (user stacks)",
            Self::LivetraceCommand => "livetrace offcpu -- pingpong (user + kernel stacks)",
            Self::LivetraceSystem => "livetrace offcpu, whole system (user + kernel stacks)",
            Self::Bpftrace => "bpftrace sched_switch script keeping kstack",
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
    let base = median(&results[0]);
    let mut out = String::from(
        "| configuration | ns per round trip (median) | added per context switch | vs no tracer |\n\
         | --- | ---: | ---: | ---: |\n",
    );
    for (config, samples) in Config::ALL.into_iter().zip(&results) {
        let m = median(samples);
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

fn build_pingpong() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("pingpong");
    run_command(
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(workspace_root().join("bench/pingpong.c")),
    )?;
    Ok(out)
}

/// One run of the workload under `config`; returns its ns per round trip.
fn measure(config: Config, livetrace: &Path, pingpong: &Path, seconds: f64) -> anyhow::Result<f64> {
    let secs = seconds.to_string();
    let folded =
        std::env::temp_dir().join(format!("livetrace-bench-{}.folded", std::process::id()));
    let output = match config {
        Config::None => Command::new(pingpong).arg(&secs).output()?,
        Config::LivetraceCommand | Config::LivetraceUserOnly => {
            let mut command = Command::new(livetrace);
            command.args(["offcpu", "-d", "60"]);
            if config == Config::LivetraceUserOnly {
                command.arg("-U");
            }
            let out = command
                .arg("-o")
                .arg(&folded)
                .arg("--")
                .arg(pingpong)
                .arg(&secs)
                .stderr(Stdio::null())
                .output()?;
            let _ = std::fs::remove_file(&folded);
            out
        }
        Config::LivetraceSystem => {
            let mut tracer = Command::new(livetrace);
            tracer.args(["offcpu", "-o"]).arg(&folded);
            let tracer = Tracer::start(tracer, "livetrace: tracing", Stream::Stderr)?;
            let out = Command::new(pingpong).arg(&secs).output()?;
            tracer.stop()?;
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
            let mut tracer = Command::new("bpftrace");
            tracer.args(["-e", script]);
            let tracer = Tracer::start(tracer, "Attaching", Stream::Stdout)?;
            let out = Command::new(pingpong).arg(&secs).output()?;
            tracer.stop()?;
            out
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "ns_per_round_trip")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("pingpong printed no result: {text:?}"))
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// A tracer running in the background, killed by PID if not stopped cleanly.
struct Tracer(Option<Child>);

impl Tracer {
    /// Starts `command` and waits (30 s at most) for `ready` on the given stream.
    fn start(mut command: Command, ready: &'static str, stream: Stream) -> anyhow::Result<Self> {
        match stream {
            Stream::Stdout => command.stdout(Stdio::piped()).stderr(Stdio::null()),
            Stream::Stderr => command.stderr(Stdio::piped()).stdout(Stdio::null()),
        };
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let reader: Box<dyn std::io::Read + Send> = match stream {
            Stream::Stdout => Box::new(child.stdout.take().context("no stdout")?),
            Stream::Stderr => Box::new(child.stderr.take().context("no stderr")?),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(reader).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                if line.contains(ready) {
                    let _ = tx.send(());
                    break;
                }
            }
            // Keep draining so the tracer never blocks on a full pipe.
            for _ in lines {}
        });
        let tracer = Self(Some(child));
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            bail!("{command:?} did not print {ready:?} within 30 s");
        }
        Ok(tracer)
    }

    /// Ends the tracer with SIGINT, as a user would, and waits for it.
    fn stop(mut self) -> anyhow::Result<()> {
        let mut child = self.0.take().context("tracer already stopped")?;
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        for _ in 0..600 {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("the tracer did not exit within 30 s of SIGINT")
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// bpftrace 0.17 attaches tracepoints through tracefs, which a fresh machine has not mounted.
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok(());
    }
    run_command(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
