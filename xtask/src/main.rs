//! `cargo xtask <chore>`: the project's chores, each doing its own set-up first so that a fresh
//! machine needs nothing but this repository, rustup and cargo.
//!
//!   cargo xtask setup   install the toolchain pieces (nightly rust-src, bpf-linker)
//!   cargo xtask demo    build everything, run the demo service, and show livetrace on it
//!   cargo xtask test    every test: unit tests, and the BPF integration tests (needs root)
//!   cargo xtask bench   livetrace beside its peers (bpftrace, perf), written to docs/benchmarks.md

mod bench;
mod demo;

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
    /// Measure livetrace beside bpftrace and perf (start-up, cost, overhead, memory) and write
    /// docs/benchmarks.md; needs root, installs missing peers.
    Bench(bench::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.chore {
        Chore::Setup => setup(),
        Chore::Demo(args) => setup().and_then(|()| demo::run(&args)),
        Chore::Test { cargo_args } => setup().and_then(|()| test(&cargo_args)),
        Chore::Bench(args) => setup().and_then(|()| bench::run(&args)),
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

fn setup() -> anyhow::Result<()> {
    run_command(Command::new("bash").arg(workspace_root().join("scripts/setup.sh")))
}

fn test(cargo_args: &[String]) -> anyhow::Result<()> {
    require_root("the integration tests load BPF programs")?;
    // Unit tests of every crate, then the integration tests that load the real BPF programs
    // against fixture programs; both in one cargo invocation so the summary counts them all.
    run_command(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["test", "--release"])
            .args(cargo_args),
    )
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
