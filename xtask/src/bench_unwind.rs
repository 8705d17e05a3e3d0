//! `--unwind fp` vs `--unwind dwarf` vs `perf record --call-graph dwarf`, on one workload at
//! 99 Hz: tests/fixtures/chain.c built without frame pointers (-O2 -fomit-frame-pointer), one
//! busy thread. For each: the share of samples whose stack is complete (main;a;b;c), the
//! tracer's own CPU time (user + system, from wait4), the in-kernel time of livetrace's BPF
//! program per sample (kernel.bpf_stats_enabled, read from the program's fdinfo), and for perf
//! the CPU time of `perf script`, where its unwinding happens.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{build_release, require_root, run_command, workspace_root};

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

pub fn run() -> anyhow::Result<String> {
    require_root("the benchmark loads BPF programs and runs perf")?;
    let bin = build_release()?;
    let livetrace = bin.join("livetrace");
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
    let stats_before = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok();
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("failed to enable kernel.bpf_stats_enabled")?;
    let result = measure(&livetrace, &chain, &dir);
    if let Some(before) = stats_before {
        let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", before.trim());
    }
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
    let mut workload = Command::new(chain)
        .arg((SECONDS * 4 + 5).to_string())
        .stdout(Stdio::null())
        .spawn()
        .context("failed to start the workload")?;
    let pid = workload.id().to_string();
    std::thread::sleep(Duration::from_millis(300));
    let mut rows = Vec::new();
    for mode in ["fp", "dwarf"] {
        let folded = dir.join(format!("{mode}.folded"));
        let mut child = Command::new(livetrace)
            .args(["profile", "-U", "-F", HZ, "--unwind", mode, "-p", &pid])
            .args(["-d", &SECONDS.to_string(), "-o"])
            .arg(&folded)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start livetrace")?;
        // The program's run time, read near the end of the capture (it is gone afterwards).
        std::thread::sleep(Duration::from_secs(SECONDS) - Duration::from_millis(300));
        let stats = bpf_stats(child.id());
        let cpu = wait_cpu(&mut child)?;
        let (samples, complete) = folded_shares(&fs::read_to_string(&folded)?);
        rows.push(Row {
            label: format!("livetrace --unwind {mode}"),
            samples,
            complete,
            tracer_cpu: cpu,
            post_cpu: None,
            bpf_ns_per_sample: stats.map(|(ns, n)| ns as f64 / n.max(1) as f64),
        });
    }
    let data = dir.join("perf.data");
    let mut perf = Command::new("perf")
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
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start perf record (apt-get install linux-perf)")?;
    let record_cpu = wait_cpu(&mut perf)?;
    let started = Instant::now();
    let mut script = Command::new("perf")
        .args(["script", "-F", "ip,sym", "-i"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start perf script")?;
    let mut text = String::new();
    std::io::Read::read_to_string(script.stdout.as_mut().context("no stdout")?, &mut text)?;
    let script_cpu = wait_cpu(&mut script)?;
    log_elapsed("perf script", started);
    let (samples, complete) = perf_script_shares(&text);
    rows.push(Row {
        label: "perf record --call-graph dwarf".into(),
        samples,
        complete,
        tracer_cpu: record_cpu,
        post_cpu: Some(script_cpu),
        bpf_ns_per_sample: None,
    });
    let _ = workload.kill();
    let _ = workload.wait();
    Ok(rows)
}

fn log_elapsed(what: &str, started: Instant) {
    eprintln!(
        "bench-unwind: {what} took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// (run_time_ns, run_cnt) summed over the BPF programs a process holds.
fn bpf_stats(pid: u32) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()? {
        let Ok(text) = fs::read_to_string(entry.ok()?.path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(ns), Some(n)) = (field("run_time_ns:"), field("run_cnt:")) {
            total.0 += ns;
            total.1 += n;
        }
    }
    (total.1 > 0).then_some(total)
}

/// Waits for a child and returns its user + system CPU time.
fn wait_cpu(child: &mut std::process::Child) -> anyhow::Result<Duration> {
    let pid = libc::pid_t::try_from(child.id())?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our unreaped child; both pointers are valid for the call.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        bail!("wait4({pid}) failed: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
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
