//! `cargo xtask <chore>`: the project's chores, each doing its own set-up first so that a fresh
//! machine needs nothing but this repository, rustup and cargo.
//!
//!   cargo xtask setup   install the toolchain pieces (nightly rust-src, bpf-linker)
//!   cargo xtask demo    build everything, run the demo service, and show livetrace on it
//!   cargo xtask test    every test: unit tests, and the end-to-end BPF suite (needs root)
//!   cargo xtask bench   livetrace beside its peers (bpftrace, perf), written to docs/benchmarks.md
//!   cargo xtask test-kernel [--kernel K]   the smoke checks on LTS kernels in QEMU, and the host
//!   cargo xtask fuzz [TARGET] [--seconds N]   fuzz the parsers of untrusted input (nightly)
//!   cargo xtask dist    the static binary for production hosts, its checksum, man pages and
//!                       completions, in target/dist/

mod bench;
mod demo;
mod dist;
mod kernel;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "livetrace's chores")]
struct Cli {
    #[command(subcommand)]
    chore: Chore,
}

#[derive(Subcommand)]
enum Chore {
    /// Install what building livetrace needs (idempotent).
    Setup,
    /// Build livetrace and the demo service, then profile the demo while it serves.
    Demo(demo::Args),
    /// Run every test; the integration tests load BPF programs and need root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        cargo_args: Vec<String>,
    },
    /// Run the smoke checks of every tool on the kernels production fleets run (Debian 12's 6.1
    /// and 6.12, booted in QEMU) and on the host's kernel; needs root.
    TestKernel(kernel::Args),
    /// Measure livetrace beside bpftrace and perf (start-up, cost, overhead, memory) and write
    /// docs/benchmarks.md; needs root, installs missing peers.
    Bench(bench::Args),
    /// Build the static binary to copy onto a host (target/dist/livetrace), with its checksum,
    /// man pages and shell completions.
    Dist,
    /// Fuzz the parsers of untrusted input (cargo-fuzz, libFuzzer, nightly); installs
    /// cargo-fuzz if it is missing. A crash leaves its input in fuzz/artifacts/TARGET/.
    Fuzz {
        /// One fuzz target (see fuzz/fuzz_targets/); default: each in turn.
        target: Option<String>,
        /// How long to run each target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.chore {
        Chore::Setup => setup(),
        Chore::Demo(args) => setup().and_then(|()| demo::run(&args)),
        Chore::Test { cargo_args } => setup().and_then(|()| test(&cargo_args)),
        Chore::Bench(args) => setup().and_then(|()| bench::run(&args)),
        Chore::TestKernel(args) => setup().and_then(|()| kernel::run(&args)),
        Chore::Fuzz { target, seconds } => fuzz(target.as_deref(), seconds),
        Chore::Dist => setup().and_then(|()| dist::run()),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where cargo puts what it builds.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

fn setup() -> anyhow::Result<()> {
    run_command(Command::new("bash").arg(workspace_root().join("scripts/setup.sh")))
}

fn test(cargo_args: &[String]) -> anyhow::Result<()> {
    require_root("the integration tests load BPF programs")?;
    // The end-to-end suite (livetrace-tests) runs the binary built here, and the sidecar tests
    // the static binary that `cargo xtask dist` ships.
    run_command(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "livetrace",
    ]))?;
    let binary = target_dir().join("release/livetrace");
    let static_binary = dist::build_static_livetrace()?;
    // Unit tests of every crate, then the end-to-end tests that load the real BPF programs
    // against fixture programs; one cargo invocation, so its summary counts them all. The BPF
    // crate builds only for the BPF target, inside livetrace's build script.
    run_command(
        Command::new("cargo")
            .current_dir(workspace_root())
            // Every test binary runs even after one fails, so a red run shows every failure.
            .args([
                "test",
                "--release",
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                "livetrace-ebpf",
            ])
            .args(cargo_args)
            .env("LIVETRACE_BIN", binary)
            .env("LIVETRACE_STATIC", static_binary),
    )
}

/// Runs each fuzz target (or the one asked for) for `seconds`, from its checked-in seeds
/// (fuzz/seeds/TARGET, read-only) and the corpus it grew before (fuzz/corpus/TARGET).
fn fuzz(only: Option<&str>, seconds: u64) -> anyhow::Result<()> {
    let dir = workspace_root().join("fuzz");
    let has_cargo_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_cargo_fuzz {
        eprintln!("xtask: installing cargo-fuzz");
        run_command(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let mut targets: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))
        .context("listing fuzz/fuzz_targets")?
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(str::to_owned))
        .collect();
    targets.sort();
    if let Some(only) = only {
        if !targets.iter().any(|t| t == only) {
            bail!("no fuzz target {only}; there are: {}", targets.join(", "));
        }
        targets = vec![only.to_owned()];
    }
    for target in &targets {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        run_command(
            Command::new("cargo")
                .current_dir(&dir)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .arg(dir.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=4096"),
        )
        .with_context(|| {
            format!(
                "fuzz target {target} failed; the crashing input is in fuzz/artifacts/{target}/"
            )
        })?;
    }
    Ok(())
}

pub fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{why}, so this needs root: run it as root, or with \
             `sudo -E env \"PATH=$PATH\" cargo xtask ...`"
        );
    }
    Ok(())
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Installs Debian packages (the machines this runs on are Debian).
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask: installing {}", packages.join(" "));
    run_command(Command::new("apt-get").args(["update", "-qq"]))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn run_command(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Builds livetrace and the demo in release mode and returns the binaries' directory.
pub fn build_release() -> anyhow::Result<PathBuf> {
    run_command(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "livetrace",
        "-p",
        "livetrace-demo",
    ]))?;
    Ok(workspace_root().join("target/release"))
}
