//! `cargo xtask demo`: the incident from the design notes, end to end. Starts the bundled
//! catalogue API (whose `validate_subtitle_track` walks all 37 caption tracks of every request),
//! lets it serve, profiles it with livetrace, then times `validate_subtitle_track` itself with
//! `uprobe-hist` (its latency distribution and slowest calls), leaves the results on disk, and
//! stops the service.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{build_release, require_root, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds to profile for.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Where to leave the results.
    #[arg(long, default_value = "livetrace-out")]
    out: PathBuf,
}

/// Kills the demo service by its PID when dropped, so a failed step never leaves it running.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    require_root("livetrace loads BPF programs")?;
    let bin = build_release()?;
    let out = workspace_root().join(&args.out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    // The service ends itself 60 s after the capture would, whatever happens here.
    let mut child = Command::new(bin.join("livetrace-demo"))
        .args(["--seconds", &(args.seconds + 60).to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("failed to start livetrace-demo")?;
    let stdout = child
        .stdout
        .take()
        .context("no stdout from livetrace-demo")?;
    let service = Service(child);
    let mut banner = String::new();
    BufReader::new(stdout)
        .read_line(&mut banner)
        .context("reading livetrace-demo's banner")?;
    let pid = banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse::<u32>().ok());
    let Some(pid) = pid else {
        bail!("livetrace-demo printed no pid: {banner:?}");
    };
    println!("demo: {}", banner.trim());
    // Let it warm up: the first requests build the catalogue.
    std::thread::sleep(Duration::from_secs(1));

    // 1. Where does the CPU time go?
    let profile_svg = out.join("demo-profile.svg");
    let profile_folded = out.join("demo-profile.folded");
    livetrace(
        &bin,
        &[
            "profile",
            "-p",
            &pid.to_string(),
            "-d",
            &args.seconds.to_string(),
        ],
        &[&profile_svg, &profile_folded],
    )?;
    // 2. Which threads are blocked, where, and for how long?
    let offcpu_svg = out.join("demo-offcpu.svg");
    let offcpu_folded = out.join("demo-offcpu.folded");
    livetrace(
        &bin,
        &["offcpu", "-p", &pid.to_string(), "-d", "5"],
        &[&offcpu_svg, &offcpu_folded],
    )?;
    // 3. The profile named the hot function; now its latency distribution. A one-second look
    // at its median sets the slow-call threshold at twice it, whatever this machine's speed.
    let function = "livetrace_demo::validate_subtitle_track";
    let p50 = median_ns(&bin, function, pid)?;
    let slow = format!("{}us", (2 * p50).div_ceil(1000));
    let hist = out.join("demo-uprobe-hist.txt");
    let slow_svg = out.join("demo-slow-calls.svg");
    livetrace(
        &bin,
        &[
            "uprobe-hist",
            function,
            "-p",
            &pid.to_string(),
            "-d",
            "5",
            "--slow",
            &slow,
        ],
        &[&hist, &slow_svg],
    )?;
    drop(service);
    println!("\ndemo: the catalogue API is stopped. Results (open the SVGs in a browser):");
    for path in [
        &profile_svg,
        &profile_folded,
        &offcpu_svg,
        &offcpu_folded,
        &hist,
        &slow_svg,
    ] {
        println!("  {}", path.display());
    }
    Ok(())
}

/// Runs one livetrace command on the demo, echoing it first, with an `-o` per output.
fn livetrace(bin: &Path, args: &[&str], outputs: &[&Path]) -> anyhow::Result<()> {
    let mut command = Command::new(bin.join("livetrace"));
    command.args(args);
    for output in outputs {
        command.arg("-o").arg(output);
    }
    let shown: Vec<String> = std::iter::once("livetrace".to_owned())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .chain(outputs.iter().map(|o| format!("-o {}", o.display())))
        .collect();
    println!("\ndemo: $ {}\n", shown.join(" "));
    run_command(&mut command)
}
/// The function's median latency in ns, from a one-second `uprobe-hist --json`.
fn median_ns(bin: &std::path::Path, function: &str, pid: u32) -> anyhow::Result<u64> {
    let output = Command::new(bin.join("livetrace"))
        .args([
            "uprobe-hist",
            function,
            "-p",
            &pid.to_string(),
            "-d",
            "1",
            "--json",
        ])
        .stderr(Stdio::null())
        .output()
        .context("failed to run livetrace uprobe-hist")?;
    if !output.status.success() {
        bail!("livetrace uprobe-hist failed: {}", output.status);
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("livetrace uprobe-hist --json printed something that is not JSON")?;
    report["percentiles_ns"]["p50"]
        .as_u64()
        .with_context(|| format!("{function} was not called during the calibration second"))
}
