//! The uprobe-hist benchmark: nanoseconds a tracer adds to each call of a tiny function.
//!
//! `tests/fixtures/tight_loop.c` times N calls of `tiny()` with CLOCK_MONOTONIC and prints
//! ns/call. It runs under four conditions, in the same run and interleaved round by round so
//! that a busy machine affects them alike: no tracer; an empty uprobe + uretprobe pair (bpftrace
//! with empty bodies: the kernel's floor, what any uprobe tool pays); `livetrace uprobe-hist`;
//! and bpftrace's `uprobe`/`uretprobe` + `hist()` one-liner. Each tracer is scoped to the
//! fixture's pid and attached before the timed loop starts. The median of the rounds is
//! reported, with what each adds per call and that as a ratio to the floor.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{build_release, require_root, run_command, workspace_root};

/// Calls per timed run: about 1 s under a uprobe pair in this VM (~10 us per call).
const CALLS: u64 = 100_000;
/// Rounds of the four conditions; the median is reported.
const ROUNDS: usize = 5;
/// What the bpftrace scripts print from BEGIN, which runs once every probe is attached
/// ("Attaching N probes..." comes before the attaching).
const READY: &str = "livetrace-bench-ready";

/// One tracer condition.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracer {
    None,
    EmptyPair,
    Livetrace,
    BpftraceHist,
}

impl Tracer {
    const ALL: [Self; 4] = [
        Self::None,
        Self::EmptyPair,
        Self::Livetrace,
        Self::BpftraceHist,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::EmptyPair => "empty uprobe + uretprobe (floor; bpftrace, empty bodies)",
            Self::Livetrace => "livetrace uprobe-hist",
            Self::BpftraceHist => "bpftrace uprobe/uretprobe + hist()",
        }
    }
}

/// Runs the benchmark and returns its results as a markdown table.
pub fn run() -> anyhow::Result<String> {
    require_root("the benchmark attaches uprobes")?;
    ensure_bpftrace()?;
    let bin = build_release()?;
    let livetrace = bin.join("livetrace");
    let dir = workspace_root().join("target/bench-uprobe");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fixture = dir.join("tight_loop");
    run_command(
        Command::new("cc")
            .args(["-O0", "-fno-omit-frame-pointer", "-o"])
            .arg(&fixture)
            .arg(workspace_root().join("tests/fixtures/tight_loop.c")),
    )?;

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Tracer::ALL.len()];
    for round in 0..ROUNDS {
        for (index, tracer) in Tracer::ALL.into_iter().enumerate() {
            let ns = measure(tracer, &fixture, &livetrace, &dir, round)?;
            eprintln!(
                "bench: round {} {}: {ns:.1} ns/call",
                round + 1,
                tracer.name()
            );
            samples[index].push(ns);
        }
    }
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    let base = medians[0];
    let floor = medians[1] - base;
    let mut table = format!(
        "uprobe cost per call of a tiny function ({CALLS} calls, median of {ROUNDS} rounds, \
         `tests/fixtures/tight_loop.c`)\n\n\
         | tracer | ns/call | added ns/call | added / floor |\n\
         | --- | ---: | ---: | ---: |\n"
    );
    for (tracer, ns) in Tracer::ALL.into_iter().zip(&medians) {
        let added = ns - base;
        let ratio = if tracer == Tracer::None || floor <= 0.0 {
            "-".to_owned()
        } else {
            format!("{:.2}", added / floor)
        };
        table.push_str(&format!(
            "| {} | {ns:.0} | {} | {ratio} |\n",
            tracer.name(),
            if tracer == Tracer::None {
                "-".to_owned()
            } else {
                format!("{added:.0}")
            }
        ));
    }
    Ok(table)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One timed run of the fixture under `tracer`; returns ns per call.
fn measure(
    tracer: Tracer,
    fixture: &Path,
    livetrace: &Path,
    dir: &Path,
    round: usize,
) -> anyhow::Result<f64> {
    let go = dir.join(format!("go-{round}"));
    let _ = std::fs::remove_file(&go);
    let target = Guard(
        Command::new(fixture)
            .arg(CALLS.to_string())
            .arg(&go)
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to start tight_loop")?,
    );
    let pid = target.0.id().to_string();
    let path = fixture.to_string_lossy().into_owned();
    let tracer_process = match tracer {
        Tracer::None => None,
        Tracer::EmptyPair => Some(start_tracer(
            Command::new("bpftrace").args([
                "-p",
                &pid,
                "-e",
                &format!(
                    "BEGIN {{ printf(\"{READY}\\n\"); }} \
                     uprobe:{path}:tiny {{}} uretprobe:{path}:tiny {{}}"
                ),
            ]),
            READY,
        )?),
        Tracer::BpftraceHist => Some(start_tracer(
            Command::new("bpftrace").args([
                "-p",
                &pid,
                "-e",
                &format!(
                    "BEGIN {{ printf(\"{READY}\\n\"); }} \
                     uprobe:{path}:tiny {{ @start[tid] = nsecs; }} \
                     uretprobe:{path}:tiny /@start[tid]/ {{ \
                     @ns = hist(nsecs - @start[tid]); delete(@start[tid]); }}"
                ),
            ]),
            READY,
        )?),
        Tracer::Livetrace => Some(start_tracer(
            Command::new(livetrace).args(["uprobe-hist", "tiny", "-p", &pid, "--json"]),
            "livetrace: timing",
        )?),
    };
    std::fs::write(&go, "").context("creating the go file")?;
    let mut target = target;
    let mut output = String::new();
    target
        .0
        .stdout
        .take()
        .context("no stdout from tight_loop")?
        .read_to_string(&mut output)?;
    let status = target.0.wait()?;
    if !status.success() {
        bail!("tight_loop failed under {}: {status}", tracer.name());
    }
    if let Some(mut tracer_process) = tracer_process {
        // livetrace ends by itself when its target exits; bpftrace needs a signal.
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(tracer_process.0.id() as i32, libc::SIGINT) };
        let _ = tracer_process.0.wait();
    }
    output
        .trim()
        .strip_prefix("ns_per_call=")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("tight_loop printed {output:?}"))
}

/// Kills a child by its pid when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts a tracer and waits until one of its output lines contains `ready`.
fn start_tracer(command: &mut Command, ready: &str) -> anyhow::Result<Guard> {
    let mut child = Guard(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {command:?}"))?,
    );
    let (tx, rx) = mpsc::channel();
    for stream in [
        child
            .0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains(ready) => return Ok(child),
            Ok(line) => seen.push(line),
            Err(_) => {
                if let Ok(Some(status)) = child.0.try_wait() {
                    bail!(
                        "{command:?} exited ({status}) before attaching:\n{}",
                        seen.join("\n")
                    );
                }
            }
        }
    }
    bail!(
        "{command:?} did not attach within 30 s:\n{}",
        seen.join("\n")
    )
}

/// Installs bpftrace (the peer and the floor's probe attacher) if it is missing.
fn ensure_bpftrace() -> anyhow::Result<()> {
    let installed = Command::new("bpftrace")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return Ok(());
    }
    eprintln!("bench: installing bpftrace (apt-get)");
    run_command(Command::new("apt-get").args(["update", "-qq"]))?;
    run_command(Command::new("apt-get").args(["install", "-y", "-qq", "bpftrace"]))
}
