//! `--unwind fp` vs `--unwind dwarf` vs `perf record --call-graph dwarf`, on one workload at
//! 99 Hz: tests/fixtures/chain.c built without frame pointers (-O2 -fomit-frame-pointer), one
//! busy thread. For each: the share of samples whose stack is complete (main;a;b;c), the
//! tracer's own CPU time (user + system, from wait4), the in-kernel time of livetrace's BPF
//! program per sample (kernel.bpf_stats_enabled, read from the program's fdinfo), and for perf
//! the CPU time of `perf script`, where its unwinding happens.

use std::{
    fs,
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use super::process::{Proc, Sysctl, bpf_prog_stats};
use crate::{run_command, workspace_root};

const SECONDS: u64 = 5;
const HZ: &str = "99";

struct Row {
    label: String,
    samples: u64,
    complete: f64,
    tracer_cpu: Duration,
    post_cpu: Option<Duration>,
    bpf_ns_per_sample: Option<f64>,
}

/// Runs the comparison with the livetrace binary at `livetrace`; returns a markdown table.
pub fn run(livetrace: &Path) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("livetrace-bench-unwind-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let chain = dir.join("chain_nofp");
    run_command(
        Command::new("cc")
            .args([
                "-O2",
                "-g",
                "-fomit-frame-pointer",
                "-fno-optimize-sibling-calls",
                "-fno-ipa-icf",
                "-o",
            ])
            .arg(&chain)
            .arg(workspace_root().join("tests/fixtures/chain.c")),
    )?;
    let stats = Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    let result = measure(livetrace, &chain, &dir);
    drop(stats);
    let _ = fs::remove_dir_all(&dir);
    let rows = result?;
    let mut out = format!(
        "| {SECONDS} s at {HZ} Hz, chain.c -O2 -fomit-frame-pointer | samples | complete \
         main;a;b;c | tracer CPU | post-processing CPU | BPF ns/sample |\n|---|---|---|---|---|---|\n"
    );
    for row in rows {
        out += &format!(
            "| {} | {} | {:.1}% | {:.3} s | {} | {} |\n",
            row.label,
            row.samples,
            row.complete * 100.0,
            row.tracer_cpu.as_secs_f64(),
            row.post_cpu
                .map_or("-".into(), |d| format!("{:.3} s", d.as_secs_f64())),
            row.bpf_ns_per_sample
                .map_or("-".into(), |ns| format!("{ns:.0}")),
        );
    }
    Ok(out)
}

fn measure(livetrace: &Path, chain: &Path, dir: &Path) -> anyhow::Result<Vec<Row>> {
    let workload = Proc::spawn(
        "chain (no frame pointers)",
        Command::new(chain)
            .arg((SECONDS * 4 + 5).to_string())
            .stdout(Stdio::null()),
    )?;
    let pid = workload.pid().to_string();
    std::thread::sleep(Duration::from_millis(300));
    let limit = Duration::from_secs(SECONDS + 60);
    let mut rows = Vec::new();
    for mode in ["fp", "dwarf"] {
        let folded = dir.join(format!("{mode}.folded"));
        let mut tracer = Proc::spawn(
            "livetrace profile",
            Command::new(livetrace)
                .args(["profile", "-U", "-F", HZ, "--unwind", mode, "-p", &pid])
                .args(["-d", &SECONDS.to_string(), "-o"])
                .arg(&folded)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        // The program's run time, read near the end of the capture (it is gone afterwards).
        std::thread::sleep(Duration::from_secs(SECONDS) - Duration::from_millis(300));
        let stats = bpf_prog_stats(tracer.pid()).ok();
        let exit = tracer.wait_success(limit)?;
        let (samples, complete) = folded_shares(&fs::read_to_string(&folded)?);
        rows.push(Row {
            label: format!("livetrace --unwind {mode}"),
            samples,
            complete,
            tracer_cpu: exit.cpu,
            post_cpu: None,
            bpf_ns_per_sample: stats.map(|s| s.run_time_ns as f64 / s.run_cnt.max(1) as f64),
        });
    }
    let data = dir.join("perf.data");
    let record = Proc::spawn(
        "perf record",
        Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                HZ,
                "--call-graph",
                "dwarf",
                "-p",
                &pid,
            ])
            .arg("-o")
            .arg(&data)
            .args(["--", "sleep", &SECONDS.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?
    .wait_success(limit)?;
    let mut script = Proc::spawn(
        "perf script",
        Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let mut text = String::new();
    script
        .child
        .stdout
        .take()
        .map(|mut out| out.read_to_string(&mut text))
        .transpose()?;
    let script_exit = script.wait_success(limit)?;
    let (samples, complete) = perf_script_shares(&text);
    rows.push(Row {
        label: "perf record --call-graph dwarf".into(),
        samples,
        complete,
        tracer_cpu: record.cpu,
        post_cpu: Some(script_exit.cpu),
        bpf_ns_per_sample: None,
    });
    drop(workload);
    Ok(rows)
}

/// (samples, share with main;a;b;c) of folded stacks.
fn folded_shares(text: &str) -> (u64, f64) {
    let (mut total, mut complete) = (0u64, 0u64);
    for line in text.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let count: u64 = count.parse().unwrap_or(0);
        total += count;
        if stack.contains(";main;a;b;c;") {
            complete += count;
        }
    }
    (total, complete as f64 / total.max(1) as f64)
}

/// (samples, share with main;a;b;c) of `perf script -F ip,sym` output: one sample per
/// paragraph, leaf first.
fn perf_script_shares(text: &str) -> (u64, f64) {
    let (mut total, mut complete) = (0u64, 0u64);
    for sample in text.split("\n\n").filter(|s| !s.trim().is_empty()) {
        total += 1;
        let mut frames: Vec<&str> = sample
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|s| s.split('+').next().unwrap_or(s))
            .collect();
        frames.reverse();
        if frames.windows(4).any(|w| w == ["main", "a", "b", "c"]) {
            complete += 1;
        }
    }
    (total, complete as f64 / total.max(1) as f64)
}
