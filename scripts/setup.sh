#!/usr/bin/env bash
# Installs what building and testing livetrace needs on a fresh machine, idempotently:
#   - rust-src for the nightly toolchain (BPF programs are built with -Z build-std=core),
#   - bpf-linker, linked against the nightly's own libLLVM (bpf-linker needs an LLVM whose major
#     version equals rustc's, and the nightly ships one that exports the LLVM C API),
#   - the C compiler used by the test fixtures.
# Nothing is downloaded from outside rustup, crates.io and Debian's archive.
set -euo pipefail

say() { printf 'setup: %s\n' "$*" >&2; }

BPF_LINKER_VERSION=0.13.0

if ! rustup toolchain list | grep -q '^nightly'; then
    say "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    say "adding rust-src to the nightly toolchain"
    rustup component add rust-src --toolchain nightly
fi

llvm_major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\)\..*/\1/p')
sysroot=$(rustc +nightly --print sysroot)
libllvm=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n 1)
[ -n "$llvm_major" ] && [ -n "$libllvm" ] || {
    say "cannot find the nightly's LLVM (major '$llvm_major', library '$libllvm')"
    exit 1
}

# The prefix must outlive this script: bpf-linker's rpath points into it.
prefix="${XDG_CACHE_HOME:-$HOME/.cache}/livetrace/llvm-$llvm_major"
stamp="$prefix/bpf-linker-$BPF_LINKER_VERSION.installed"
if [ -f "$stamp" ] && command -v bpf-linker >/dev/null && bpf-linker --version >/dev/null 2>&1; then
    say "bpf-linker $BPF_LINKER_VERSION (LLVM $llvm_major) already installed"
else
    say "building bpf-linker $BPF_LINKER_VERSION against the nightly's LLVM $llvm_major (about a minute)"
    mkdir -p "$prefix/lib"
    ln -sf "$libllvm" "$prefix/lib/libLLVM.so"
    ln -sf "$libllvm" "$prefix/lib/$(basename "$libllvm")"
    LLVM_PREFIX="$prefix" cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
        --no-default-features --features "llvm-$llvm_major" --force
    touch "$stamp"
fi

if ! command -v cc >/dev/null; then
    say "installing gcc for the test fixtures"
    apt-get update -qq && apt-get install -y -qq gcc
fi
say "ready"
