//! `cargo xtask <chore>`: the project's chores, each doing its own set-up first so that a fresh
//! machine needs nothing but this repository, rustup and cargo.
//!
//!   cargo xtask setup   install the toolchain pieces (nightly rust-src, bpf-linker)
//!   cargo xtask demo    build everything, run the demo service, and show livetrace on it
//!   cargo xtask test    every test: unit tests, and the BPF integration tests (needs root)
//!   cargo xtask bench-uprobe   uprobe-hist's per-call cost beside bpftrace (needs root)
//!   cargo xtask bench-unwind   profile's fp and dwarf unwinding beside perf --call-graph dwarf

mod bench_offcpu;
mod bench_unwind;
mod bench_uprobe;
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
    /// offcpu's cost per context switch against no tracer and bpftrace.
    BenchOffcpu {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Run every test; the integration tests load BPF programs and need root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        cargo_args: Vec<String>,
    },
    /// Nanoseconds uprobe-hist adds per call, beside the kernel's floor and bpftrace.
    BenchUprobe,
    /// profile --unwind fp vs dwarf vs perf --call-graph dwarf: cost and complete stacks.
    /// (Temporary chore, until `cargo xtask bench` runs every benchmark.)
    BenchUnwind,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.chore {
        Chore::Setup => setup(),
        Chore::Demo(args) => setup().and_then(|()| demo::run(&args)),
        Chore::BenchOffcpu { rounds } => setup().and_then(|()| {
            let bin = build_release()?;
            println!(
                "{}",
                bench_offcpu::run(&bin.join("livetrace"), rounds, 2.0)?
            );
            Ok(())
        }),
        Chore::Test { cargo_args } => setup().and_then(|()| test(&cargo_args)),
        Chore::BenchUprobe => setup()
            .and_then(|()| bench_uprobe::run())
            .map(|table| print!("{table}")),
        Chore::BenchUnwind => setup()
            .and_then(|()| bench_unwind::run())
            .map(|table| print!("{table}")),
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
