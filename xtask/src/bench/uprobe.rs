//! The uprobe-hist benchmarks: nanoseconds a tracer adds to each call of a tiny function, and to
//! each span between two USDT probes.
//!
//! `tests/fixtures/tight_loop.c` times N calls of `tiny()` with CLOCK_MONOTONIC and prints
//! ns/call. It runs under four conditions, in the same run and interleaved round by round so
//! that a busy machine affects them alike: no tracer; an empty uprobe + uretprobe pair (bpftrace
//! with empty bodies: the kernel's floor, what any uprobe tool pays); `livetrace uprobe-hist`;
//! and bpftrace's `uprobe`/`uretprobe` + `hist()` one-liner. Each tracer is scoped to the
//! fixture's pid and attached before the timed loop starts. The median of the rounds is
//! reported, with what each adds per call and that as a ratio to the floor.
//!
//! `tests/fixtures/usdt/tight_usdt.c` does the same around a pair of semaphore-guarded USDT
//! probes: no tracer; bpftrace's `usdt:` probes with empty bodies (the floor); `livetrace
//! uprobe-hist --from --to`, without and with `--by arg0`; and bpftrace's `usdt:` + `hist()`.

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

/// Starts a tracer on the fixture's pid (given its path), or nothing for the baseline.
type Start<'a> = Box<dyn Fn(&str, &str) -> anyhow::Result<Option<Proc>> + 'a>;

/// bpftrace on one pid with `script`, ready once its BEGIN probe has printed.
fn bpftrace(pid: &str, script: String) -> anyhow::Result<Option<Proc>> {
    start_tracer(
        "bpftrace",
        Command::new("bpftrace").args(["-p", pid, "-e", &script]),
        READY,
        READY_TIMEOUT,
    )
    .map(Some)
}

/// livetrace with `args` and `-p PID --json`, ready once it says it is timing.
fn livetrace_on(livetrace: &Path, pid: &str, args: &[&str]) -> anyhow::Result<Option<Proc>> {
    start_tracer(
        "livetrace uprobe-hist",
        Command::new(livetrace)
            .arg("uprobe-hist")
            .args(args)
            .args(["-p", pid, "--json"]),
        "livetrace: timing",
        READY_TIMEOUT,
    )
    .map(Some)
}

/// Runs the function benchmark with the livetrace binary at `livetrace`; a markdown table.
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
    let conditions: Vec<(&str, Start<'_>)> = vec![
        ("no tracer", Box::new(|_, _| Ok(None))),
        (
            "empty uprobe + uretprobe (floor; bpftrace, empty bodies)",
            Box::new(|pid, path| {
                bpftrace(
                    pid,
                    format!(
                        "BEGIN {{ printf(\"{READY}\\n\"); }} \
                         uprobe:{path}:tiny {{}} uretprobe:{path}:tiny {{}}"
                    ),
                )
            }),
        ),
        (
            "livetrace uprobe-hist",
            Box::new(|pid, _| livetrace_on(livetrace, pid, &["tiny"])),
        ),
        (
            "bpftrace uprobe/uretprobe + hist()",
            Box::new(|pid, path| {
                bpftrace(
                    pid,
                    format!(
                        "BEGIN {{ printf(\"{READY}\\n\"); }} \
                         uprobe:{path}:tiny {{ @start[tid] = nsecs; }} \
                         uretprobe:{path}:tiny /@start[tid]/ {{ \
                         @ns = hist(nsecs - @start[tid]); delete(@start[tid]); }}"
                    ),
                )
            }),
        ),
    ];
    let title = format!(
        "uprobe cost per call of a tiny function ({CALLS} calls, median of {rounds} rounds, \
         `tests/fixtures/tight_loop.c`)"
    );
    table(&title, &fixture, &dir, &conditions, rounds)
}

/// Runs the USDT span benchmark; a markdown table.
pub fn run_usdt(livetrace: &Path, rounds: usize) -> anyhow::Result<String> {
    let dir = workspace_root().join("target/bench-uprobe");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fixture = dir.join("tight_usdt");
    run_command(
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&fixture)
            .arg(workspace_root().join("tests/fixtures/usdt/tight_usdt.c")),
    )?;
    let usdt = |path: &str, name: &str| format!("usdt:{path}:lt:{name}");
    let conditions: Vec<(&str, Start<'_>)> = vec![
        ("no tracer", Box::new(|_, _| Ok(None))),
        (
            "empty usdt pair (floor; bpftrace, empty bodies)",
            Box::new(|pid, path| {
                bpftrace(
                    pid,
                    format!(
                        "BEGIN {{ printf(\"{READY}\\n\"); }} {} {{}} {} {{}}",
                        usdt(path, "op__start"),
                        usdt(path, "op__done")
                    ),
                )
            }),
        ),
        (
            "livetrace uprobe-hist --from --to",
            Box::new(|pid, path| {
                let (from, to) = (usdt(path, "op__start"), usdt(path, "op__done"));
                livetrace_on(livetrace, pid, &["--from", &from, "--to", &to])
            }),
        ),
        (
            "livetrace uprobe-hist --from --to --by arg0",
            Box::new(|pid, path| {
                let (from, to) = (usdt(path, "op__start"), usdt(path, "op__done"));
                livetrace_on(
                    livetrace,
                    pid,
                    &["--from", &from, "--to", &to, "--by", "arg0"],
                )
            }),
        ),
        (
            "bpftrace usdt + hist()",
            Box::new(|pid, path| {
                bpftrace(
                    pid,
                    format!(
                        "BEGIN {{ printf(\"{READY}\\n\"); }} \
                         {} {{ @start[tid] = nsecs; }} \
                         {} /@start[tid]/ {{ @ns = hist(nsecs - @start[tid]); \
                         delete(@start[tid]); }}",
                        usdt(path, "op__start"),
                        usdt(path, "op__done")
                    ),
                )
            }),
        ),
    ];
    let title = format!(
        "USDT cost per span between two semaphore-guarded probes ({CALLS} spans, median of \
         {rounds} rounds, `tests/fixtures/usdt/tight_usdt.c`)"
    );
    table(&title, &fixture, &dir, &conditions, rounds)
}

/// Times the fixture under each condition, interleaved round by round; the medians as a table
/// with what each tracer adds and that as a ratio to the floor (the second condition).
fn table(
    title: &str,
    fixture: &Path,
    dir: &Path,
    conditions: &[(&str, Start<'_>)],
    rounds: usize,
) -> anyhow::Result<String> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); conditions.len()];
    for round in 0..rounds {
        for (index, (name, start)) in conditions.iter().enumerate() {
            let ns = measure(fixture, dir, round, name, start)?;
            eprintln!("bench: round {} {name}: {ns:.1} ns/call", round + 1);
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
        "{title}\n\n\
         | tracer | ns/call | added ns/call | added / floor |\n\
         | --- | ---: | ---: | ---: |\n"
    );
    for (index, ((name, _), ns)) in conditions.iter().zip(&medians).enumerate() {
        let added = ns - base;
        let (added, ratio) = if index == 0 {
            ("-".to_owned(), "-".to_owned())
        } else if floor <= 0.0 {
            (format!("{added:.0}"), "-".to_owned())
        } else {
            (format!("{added:.0}"), format!("{:.2}", added / floor))
        };
        table.push_str(&format!("| {name} | {ns:.0} | {added} | {ratio} |\n"));
    }
    Ok(table)
}

/// One timed run of the fixture under the tracer `start` starts; returns ns per call.
fn measure(
    fixture: &Path,
    dir: &Path,
    round: usize,
    name: &str,
    start: &Start<'_>,
) -> anyhow::Result<f64> {
    let go = dir.join(format!("go-{round}"));
    let _ = std::fs::remove_file(&go);
    let mut target = Proc::spawn(
        "fixture",
        Command::new(fixture)
            .arg(CALLS.to_string())
            .arg(&go)
            .stdout(Stdio::piped()),
    )?;
    let pid = target.pid().to_string();
    let path = fixture.to_string_lossy().into_owned();
    let tracer_process = start(&pid, &path)?;
    std::fs::write(&go, "").context("creating the go file")?;
    let mut output = String::new();
    target
        .child
        .stdout
        .take()
        .context("no stdout from the fixture")?
        .read_to_string(&mut output)?;
    target
        .wait_success(Duration::from_secs(120))
        .with_context(|| format!("{} under {name}", fixture.display()))?;
    if let Some(mut tracer_process) = tracer_process {
        // livetrace ends by itself when its target exits; bpftrace needs a signal.
        stop_tracer(&mut tracer_process, READY_TIMEOUT)?;
    }
    output
        .trim()
        .strip_prefix("ns_per_call=")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{} printed {output:?}", fixture.display()))
}
