//! What `livetrace --version` says about this binary: its version and commit, how it was
//! linked, and what its BPF programs can do (read from the object by `build.rs`).

use livetrace_common::unwind::MAX_STACK_COPY;

use crate::{stacks::KERNEL_MAX_DEPTH, unwind::MAX_FRAMES};

/// `0.1.0 (5f8755c1a2b3 2026-12-07)`: `-V`, and the first line of `--version`.
pub fn short_version() -> String {
    let version = env!("CARGO_PKG_VERSION");
    match (
        option_env!("LIVETRACE_GIT_COMMIT"),
        option_env!("LIVETRACE_GIT_DATE"),
    ) {
        (Some(commit), Some(date)) if !commit.is_empty() => format!("{version} ({commit} {date})"),
        _ => version.to_owned(),
    }
}

/// `--version`: the short version, then how the binary and its BPF programs were built.
pub fn long_version() -> String {
    let linkage = if cfg!(target_env = "musl") {
        "static (musl): runs on any x86-64 Linux host, with nothing else installed"
    } else {
        "dynamic (glibc)"
    };
    let programs = option_env!("LIVETRACE_BPF_PROGRAMS").unwrap_or("");
    let toolchain = option_env!("LIVETRACE_BPF_TOOLCHAIN").unwrap_or("");
    format!(
        "{short}\n\
         binary:    {arch} Linux, {linkage}\n\
         BPF:       one object per tool (profile, offcpu, uprobe-hist), with these kinds of \
         program: {programs}\n\
         built by:  {toolchain}\n\
         unwinding: frame pointers in the kernel ({kernel_depth} frames); DWARF from {copy} KiB stack \
         copies ({frames} frames)\n\
         kernels:   5.8 or newer (ring buffers); --unwind dwarf 5.15; offcpu without BTF uses \
         the classic tracepoint",
        short = short_version(),
        arch = std::env::consts::ARCH,
        copy = MAX_STACK_COPY / 1024,
        frames = MAX_FRAMES,
        kernel_depth = KERNEL_MAX_DEPTH,
    )
}
