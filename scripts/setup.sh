#!/usr/bin/env bash
# Installs what building and testing livetrace needs on a fresh machine, idempotently:
#   - rust-src for the nightly toolchain (BPF programs are built with -Z build-std=core),
#   - bpf-linker, linked against the nightly's own libLLVM (bpf-linker needs an LLVM whose major
#     version equals rustc's, and the nightly ships one that exports the LLVM C API),
#   - the C compiler used by the test fixtures,
#   - the musl target and musl-gcc, for the static binary (`cargo xtask dist`, which the tests
#     run in an empty root),
#   - bash's, zsh's and fish's completion machinery, which the completion tests load ours into,
#   - the third-party readers the output tests check our files with: `go tool pprof` (Debian's
#     golang-go) and, from npm, speedscope's own importer and the ajv JSON Schema validator,
#   - py-spy from PyPI, the oracle the Python frames are compared with.
# Nothing is downloaded from outside rustup, crates.io, Debian's archive, npm and PyPI.
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
apt_updated=
apt_install() {
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    apt-get install -y -qq "$@"
}
if ! rustup target list --installed | grep -q '^x86_64-unknown-linux-musl$'; then
    say "adding the musl target (the static binary)"
    rustup target add x86_64-unknown-linux-musl
fi
if ! command -v musl-gcc >/dev/null; then
    say "installing musl-tools (the static binary's allocator is C, built with musl-gcc)"
    apt_install musl-tools
fi
for shell in zsh fish; do
    if ! command -v "$shell" >/dev/null; then
        say "installing $shell (the completion tests load our completions into it)"
        apt_install "$shell"
    fi
done
if ! command -v go >/dev/null; then
    say "installing golang-go (go tool pprof reads our pprof files in the tests)"
    apt_install golang-go
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    say "installing nodejs and npm (speedscope's importer reads our speedscope files in the tests)"
    apt_install nodejs npm
fi
if ! command -v java >/dev/null || ! command -v jcmd >/dev/null; then
    say "installing a JDK (the tests profile a JVM's JIT-compiled methods through jcmd's perf map)"
    apt_install default-jdk-headless
fi

if [ ! -e /usr/include/x86_64-linux-gnu/sys/sdt.h ] && [ ! -e /usr/include/sys/sdt.h ]; then
    say "installing systemtap-sdt-dev (sys/sdt.h: the USDT test fixture declares its probes with it)"
    apt_install systemtap-sdt-dev
fi
if ! command -v bpftrace >/dev/null; then
    say "installing bpftrace (the oracle for the USDT probes livetrace lists and times)"
    apt_install bpftrace
fi
if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
    say "installing postgresql-15 (a real program with USDT probes, for the tests)"
    apt_install postgresql-15
fi

# Pinned: the speedscope test hooks into this release's bundled importer.
SPEEDSCOPE_VERSION=1.25.0
AJV_VERSION=8.17.1
node_dir="${XDG_CACHE_HOME:-$HOME/.cache}/livetrace/node"
installed_version() {
    node -e 'try { console.log(require(process.argv[1]).version) } catch { }' \
        "$node_dir/node_modules/$1/package.json"
}
if [ "$(installed_version speedscope)" != "$SPEEDSCOPE_VERSION" ] ||
    [ "$(installed_version ajv)" != "$AJV_VERSION" ]; then
    say "installing speedscope@$SPEEDSCOPE_VERSION and ajv@$AJV_VERSION into $node_dir"
    mkdir -p "$node_dir"
    npm install --prefix "$node_dir" --no-audit --no-fund --silent \
        "speedscope@$SPEEDSCOPE_VERSION" "ajv@$AJV_VERSION"
fi
# Pinned: the Python tests compare livetrace's Python frames with this py-spy's, on the same
# process at the same time. PyPI's wheel carries the binary; a venv of its own keeps it apart.
PY_SPY_VERSION=0.4.3
py_spy_dir="${XDG_CACHE_HOME:-$HOME/.cache}/livetrace/py-spy-$PY_SPY_VERSION"
if ! "$py_spy_dir/bin/py-spy" --version 2>/dev/null | grep -qx "py-spy $PY_SPY_VERSION"; then
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    say "installing py-spy $PY_SPY_VERSION from PyPI into $py_spy_dir"
    rm -rf "$py_spy_dir"
    python3 -m venv "$py_spy_dir"
    "$py_spy_dir/bin/pip" install --quiet "py-spy==$PY_SPY_VERSION"
fi
say "ready"
