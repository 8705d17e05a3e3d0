//! Builds the BPF programs in `livetrace-ebpf` for `bpfel-unknown-none` with the nightly toolchain
//! and bpf-linker, so the object embedded in the binary always matches the sources.
//! `scripts/setup.sh` (run by every `cargo xtask` command) installs what this needs.

use anyhow::{Context as _, anyhow};

/// The objects `livetrace-ebpf`'s binaries compile to, one per tool (aya-build copies each to
/// `OUT_DIR/<bin name>`).
const OBJECTS: [&str; 3] = ["profile", "offcpu", "uprobe-hist"];

fn main() -> anyhow::Result<()> {
    // Fuzz builds (`cargo fuzz`, which passes `--cfg fuzzing`) exercise the parsers only and never
    // load BPF; building the BPF object there would also hand the sanitizer flags to the nested
    // BPF build. Embed an empty object instead.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        for object in OBJECTS {
            std::fs::write(out.join(object), b"").context("writing an empty BPF object")?;
        }
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
    let built = aya_build::build_ebpf(
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
    );
    built?;
    describe_build(root_dir)
}

/// What `livetrace --version` reports about how it was built: the git commit of the sources,
/// the BPF programs in the object (read from it), and the toolchain that built them. Each is
/// left out when it cannot be known (a source tarball has no commit).
fn describe_build(ebpf_dir: &str) -> anyhow::Result<()> {
    use object::{Object as _, ObjectSection as _};
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    let mut programs: Vec<String> = Vec::new();
    for name in OBJECTS {
        let bytes = std::fs::read(out.join(name)).context("reading a BPF object")?;
        let object = object::File::parse(&*bytes).context("parsing a BPF object")?;
        for section in object.sections() {
            if section.kind() == object::SectionKind::Text
                && section.size() > 0
                && let Ok(section) = section.name()
                && section != ".text"
                && !programs.iter().any(|p| p == section)
            {
                programs.push(section.to_owned());
            }
        }
    }
    programs.sort();
    println!(
        "cargo:rustc-env=LIVETRACE_BPF_PROGRAMS={}",
        programs.join(" ")
    );

    let output = |program: &str, args: &[&str]| -> Option<String> {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    let rustc = output("rustc", &["+nightly", "--version"]).unwrap_or_default();
    println!("cargo:rustc-env=LIVETRACE_BPF_TOOLCHAIN={rustc}, {linker}");

    // The commit, and the files whose change means a new one: HEAD, and the branch it names.
    let git = |args: &[&str]| output("git", &[&["-C", ebpf_dir], args].concat());
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_default();
    let date = git(&["show", "-s", "--format=%cs", "HEAD"]).unwrap_or_default();
    println!("cargo:rustc-env=LIVETRACE_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=LIVETRACE_GIT_DATE={date}");
    let watched = ["HEAD".to_owned()]
        .into_iter()
        .chain(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = std::path::Path::new(ebpf_dir).join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Ok(())
}
