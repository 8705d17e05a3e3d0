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
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use super::{
    median,
    process::{Proc, start_tracer, stop_tracer},
};
use crate::{run_command, workspace_root};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls per timed run: about 1 s under a uprobe pair in this VM (~10 us per call).
const CALLS: u64 = 100_000;
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

/// Runs the benchmark with the livetrace binary at `livetrace` and returns a markdown table.
pub fn run(livetrace: &Path, rounds: usize) -> anyhow::Result<String> {
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
    for round in 0..rounds {
        for (index, tracer) in Tracer::ALL.into_iter().enumerate() {
            let ns = measure(tracer, &fixture, livetrace, &dir, round)?;
            eprintln!(
                "bench: round {} {}: {ns:.1} ns/call",
                round + 1,
                tracer.name()
            );
            samples[index].push(ns);
        }
    }
    let medians = samples
        .iter()
        .map(|s| median(s).context("no runs"))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let base = medians[0];
    let floor = medians[1] - base;
    let mut table = format!(
        "uprobe cost per call of a tiny function ({CALLS} calls, median of {rounds} rounds, \
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
    let mut target = Proc::spawn(
        "tight_loop",
        Command::new(fixture)
            .arg(CALLS.to_string())
            .arg(&go)
            .stdout(Stdio::piped()),
    )?;
    let pid = target.pid().to_string();
    let path = fixture.to_string_lossy().into_owned();
    let bpftrace = |script: String| {
        start_tracer(
            "bpftrace",
            Command::new("bpftrace").args(["-p", &pid, "-e", &script]),
            READY,
            READY_TIMEOUT,
        )
    };
    let tracer_process = match tracer {
        Tracer::None => None,
        Tracer::EmptyPair => Some(bpftrace(format!(
            "BEGIN {{ printf(\"{READY}\\n\"); }} \
             uprobe:{path}:tiny {{}} uretprobe:{path}:tiny {{}}"
        ))?),
        Tracer::BpftraceHist => Some(bpftrace(format!(
            "BEGIN {{ printf(\"{READY}\\n\"); }} \
             uprobe:{path}:tiny {{ @start[tid] = nsecs; }} \
             uretprobe:{path}:tiny /@start[tid]/ {{ \
             @ns = hist(nsecs - @start[tid]); delete(@start[tid]); }}"
        ))?),
        Tracer::Livetrace => Some(start_tracer(
            "livetrace uprobe-hist",
            Command::new(livetrace).args(["uprobe-hist", "tiny", "-p", &pid, "--json"]),
            "livetrace: timing",
            READY_TIMEOUT,
        )?),
    };
    std::fs::write(&go, "").context("creating the go file")?;
    let mut output = String::new();
    target
        .child
        .stdout
        .take()
        .context("no stdout from tight_loop")?
        .read_to_string(&mut output)?;
    target
        .wait_success(Duration::from_secs(120))
        .with_context(|| format!("tight_loop under {}", tracer.name()))?;
    if let Some(mut tracer_process) = tracer_process {
        // livetrace ends by itself when its target exits; bpftrace needs a signal.
        stop_tracer(&mut tracer_process, READY_TIMEOUT)?;
    }
    output
        .trim()
        .strip_prefix("ns_per_call=")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("tight_loop printed {output:?}"))
}
