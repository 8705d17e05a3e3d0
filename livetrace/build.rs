//! Builds the BPF programs in `livetrace-ebpf` for `bpfel-unknown-none` with the nightly toolchain
//! and bpf-linker, so the object embedded in the binary always matches the sources.
//! `scripts/setup.sh` (run by every `cargo xtask` command) installs what this needs.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // Fuzz builds (`cargo fuzz`, which passes `--cfg fuzzing`) exercise the parsers only and never
    // load BPF; building the BPF object there would also hand the sanitizer flags to the nested
    // BPF build. Embed an empty object instead.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("livetrace"), b"").context("writing the empty BPF object")?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "livetrace-ebpf")
        .ok_or_else(|| anyhow!("livetrace-ebpf is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("livetrace-ebpf's manifest has no parent directory"))?
        .as_str();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the BPF programs failed; if bpf-linker or the nightly's rust-src is missing, \
         run scripts/setup.sh (or any `cargo xtask` command)",
    )
}
