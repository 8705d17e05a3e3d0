//! `cargo xtask dist`: the binary an SRE copies onto a production host. Static (musl), with the
//! BPF object inside and no runtime dependency, without its own symbol table; beside it a
//! checksum file, the man pages and the shell completions, all generated from the clap
//! definitions by the binary itself.
//!
//!   target/dist/livetrace            the binary
//!   target/dist/livetrace.sha256     `sha256sum -c livetrace.sha256`
//!   target/dist/man/man1/*.1         livetrace(1) and one page per subcommand
//!   target/dist/completions/         livetrace.bash, _livetrace (zsh), livetrace.fish

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use crate::{run_command, workspace_root};

pub const MUSL: &str = "x86_64-unknown-linux-musl";

pub fn run() -> anyhow::Result<()> {
    let binary = build_static_livetrace()?;
    let dist = workspace_root().join("target/dist");
    if dist.exists() {
        fs::remove_dir_all(&dist).with_context(|| format!("emptying {}", dist.display()))?;
    }
    fs::create_dir_all(&dist)?;
    let installed = dist.join("livetrace");
    fs::copy(&binary, &installed).context("copying the binary")?;
    ensure_static(&installed)?;

    let bytes = fs::read(&installed)?;
    let digest = hex(&Sha256::digest(&bytes));
    fs::write(
        dist.join("livetrace.sha256"),
        format!("{digest}  livetrace\n"),
    )?;

    let man = dist.join("man/man1");
    run_command(Command::new(&installed).arg("generate-man").arg(&man))?;
    let completions = dist.join("completions");
    fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "livetrace.bash"),
        ("zsh", "_livetrace"),
        ("fish", "livetrace.fish"),
    ] {
        let output = Command::new(&installed)
            .args(["completions", shell])
            .output()
            .context("running livetrace completions")?;
        if !output.status.success() || output.stdout.is_empty() {
            bail!("livetrace completions {shell} failed: {}", output.status);
        }
        fs::write(completions.join(file), output.stdout)?;
    }

    let pages = fs::read_dir(&man)?.count();
    eprintln!(
        "xtask: {} ({:.1} MiB, static, stripped), sha256 {digest}\n\
         xtask: {pages} man pages in {}, completions for bash, zsh and fish in {}",
        installed.display(),
        bytes.len() as f64 / (1024.0 * 1024.0),
        man.display(),
        completions.display()
    );
    Ok(())
}

/// Builds livetrace statically against musl, in the `dist` profile (release, stripped), with
/// its BPF object inside; adds the musl target (rustup) and musl-gcc (for the allocator's C
/// code) where they are missing.
pub fn build_static_livetrace() -> anyhow::Result<PathBuf> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout).contains(MUSL) {
        run_command(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    if !crate::on_path("musl-gcc") {
        crate::apt_install(&["musl-tools"])?;
    }
    run_command(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--profile",
        "dist",
        "--target",
        MUSL,
        "-p",
        "livetrace",
    ]))?;
    Ok(crate::target_dir().join(format!("{MUSL}/dist/livetrace")))
}

/// Refuses a binary that would need anything from the host: an ELF interpreter or a shared
/// library.
fn ensure_static(binary: &Path) -> anyhow::Result<()> {
    let output = Command::new("readelf")
        .args(["--program-headers", "--dynamic"])
        .arg(binary)
        .output()
        .context("running readelf")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.contains("INTERP") || text.contains("(NEEDED)") {
        bail!(
            "{} is not static (it names an interpreter or a shared library):\n{text}",
            binary.display()
        );
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
