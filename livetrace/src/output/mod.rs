//! Output files: the format is picked from the path's extension, every path is checked before the
//! capture starts, and files are written to a temporary sibling and renamed into place, so an
//! interrupted write never leaves a truncated file and a planted symlink is replaced, not followed.

pub mod flamegraph;
pub mod folded;
pub mod footer;
#[cfg(test)]
pub mod golden;
pub mod histogram_json;
pub mod histogram_text;
pub mod json;
pub mod offcpu_summary;
pub mod pprof;
pub mod speedscope;
pub mod summary;

use std::{
    fs::{self, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::model::StackProfile;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Interactive SVG flamegraph (inferno).
    Svg,
    /// Folded stacks.
    Folded,
    /// Machine-readable summary (documented schema).
    Json,
    /// pprof protobuf, gzip-compressed.
    Pprof,
    /// speedscope's file format.
    Speedscope,
}

/// Extensions and their formats; longer extensions first, so `.speedscope.json` wins over
/// `.json`.
const EXTENSIONS: [(&str, Format, &str); 5] = [
    (".speedscope.json", Format::Speedscope, "speedscope"),
    (".pb.gz", Format::Pprof, "pprof"),
    (".json", Format::Json, "JSON summary"),
    (".svg", Format::Svg, "flamegraph"),
    (".folded", Format::Folded, "folded stacks"),
];

/// `.speedscope.json (speedscope), .pb.gz (pprof), ...`, for error messages.
pub fn supported_extensions() -> String {
    EXTENSIONS
        .iter()
        .map(|(ext, _, what)| format!("{ext} ({what})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where one `-o` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSpec {
    /// `None` is stdout (`-o -`).
    pub path: Option<PathBuf>,
    pub format: Format,
}

impl OutputSpec {
    /// Parses an `-o` value; used as clap's value parser, so errors are usage errors.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "-" {
            return Ok(Self {
                path: None,
                format: Format::Folded,
            });
        }
        let lower = text.to_ascii_lowercase();
        let Some(&(_, format, _)) = EXTENSIONS.iter().find(|(ext, ..)| lower.ends_with(ext)) else {
            return Err(format!(
                "cannot tell the format of '{text}' from its extension: use {}, or - (folded \
                 stacks on stdout)",
                supported_extensions()
            ));
        };
        Ok(Self {
            path: Some(PathBuf::from(text)),
            format,
        })
    }

    pub fn describe(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => "standard output".into(),
        }
    }
}

/// Makes sure every output can be written, before anything is captured: the directory exists and
/// accepts a new file, and the path is not a directory. Also refuses two `-o` naming one file.
pub fn preflight(outputs: &[OutputSpec]) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for output in outputs {
        let Some(path) = &output.path else { continue };
        if seen.contains(&path) {
            return Err(crate::UsageError::error(format!(
                "'{}' is given twice with -o",
                path.display()
            )));
        }
        seen.push(path);
        if path.is_dir() {
            return Err(crate::UsageError::error(format!(
                "output path '{}' is a directory; name a file",
                path.display()
            )));
        }
        let probe = temp_sibling(path)?;
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .with_context(|| {
                format!(
                    "cannot write output '{}' (tried creating {}); check that the directory exists \
                     and is writable",
                    path.display(),
                    probe.display()
                )
            })?;
        let _ = fs::remove_file(&probe);
    }
    Ok(())
}

/// Writes through `render` into a temporary file beside `path`, then renames it over `path`.
pub fn write_atomically(
    path: &Path,
    render: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> anyhow::Result<()> {
    let temp = temp_sibling(path)?;
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&temp)?;
        let mut writer = BufWriter::new(file);
        render(&mut writer)?;
        writer.into_inner().map_err(io::Error::other)?.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&temp);
        return Err(err).with_context(|| format!("failed to write '{}'", path.display()));
    }
    Ok(())
}

fn temp_sibling(path: &Path) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("output path '{}' has no file name", path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    Ok(dir.join(format!(
        ".{}.livetrace-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Writes a stack profile to every requested output.
pub fn write_stack_profile(profile: &StackProfile, outputs: &[OutputSpec]) -> anyhow::Result<()> {
    for output in outputs {
        let render = |out: &mut dyn Write| match output.format {
            Format::Svg => flamegraph::write(profile, out),
            Format::Folded => folded::write(profile, out),
            Format::Json => json::write(profile, out),
            Format::Pprof => pprof::write(profile, out),
            Format::Speedscope => speedscope::write(profile, out),
        };
        match &output.path {
            Some(path) => write_atomically(path, render)?,
            None => render(&mut io::stdout().lock()).context("failed to write to stdout")?,
        }
    }
    Ok(())
}

/// Writes a mid-capture snapshot (SIGUSR1) to every file output, atomically, and says so on
/// stderr. Standard output is left alone: a reader of `-o -` expects one profile, at the end.
/// The end of a stack tool's run on stderr: the data-quality footer, then each file written.
pub fn report_footer_and_files(profile: &StackProfile, outputs: &[OutputSpec]) {
    eprint!("{}", footer::text(profile));
    for output in outputs.iter().filter(|o| o.path.is_some()) {
        eprintln!("livetrace: wrote {}", output.describe());
    }
}

pub fn write_snapshot(profile: &StackProfile, outputs: &[OutputSpec]) -> anyhow::Result<()> {
    let files: Vec<OutputSpec> = outputs
        .iter()
        .filter(|o| o.path.is_some())
        .cloned()
        .collect();
    write_stack_profile(profile, &files)?;
    let names: Vec<String> = files.iter().map(OutputSpec::describe).collect();
    eprintln!(
        "livetrace: snapshot (SIGUSR1): {} {} so far written to {}; the capture goes on",
        profile.total_weight(),
        profile.unit.short_name(),
        if names.is_empty() {
            "no file (standard output gets the final profile only)".to_owned()
        } else {
            names.join(", ")
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats come from extensions; an unknown one is refused with the supported list.
    #[test]
    fn picks_format_from_extension() {
        assert_eq!(OutputSpec::parse("a.svg").unwrap().format, Format::Svg);
        assert_eq!(OutputSpec::parse("A.SVG").unwrap().format, Format::Svg);
        assert_eq!(
            OutputSpec::parse("x/a.folded").unwrap().format,
            Format::Folded
        );
        assert_eq!(OutputSpec::parse("-").unwrap().path, None);
        assert_eq!(OutputSpec::parse("a.json").unwrap().format, Format::Json);
        assert_eq!(
            OutputSpec::parse("a.Speedscope.JSON").unwrap().format,
            Format::Speedscope
        );
        assert_eq!(
            OutputSpec::parse("cpu.pb.gz").unwrap().format,
            Format::Pprof
        );
        let err = OutputSpec::parse("a.txt").unwrap_err();
        for ext in [".svg", ".folded", ".json", ".pb.gz", ".speedscope.json"] {
            assert!(err.contains("'a.txt'") && err.contains(ext), "{err}");
        }
    }

    /// A missing directory, a directory as the path, and a duplicate path fail the preflight.
    #[test]
    fn preflight_refuses_unwritable_paths() {
        let dir = tempfile::tempdir().unwrap();
        let ok = OutputSpec::parse(dir.path().join("a.svg").to_str().unwrap()).unwrap();
        preflight(std::slice::from_ref(&ok)).unwrap();
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe left behind"
        );

        let missing = OutputSpec::parse("/nonexistent-livetrace-dir/a.svg").unwrap();
        let err = format!("{:#}", preflight(&[missing]).unwrap_err());
        assert!(err.contains("/nonexistent-livetrace-dir/a.svg"), "{err}");

        let as_dir = OutputSpec {
            path: Some(dir.path().to_path_buf()),
            format: Format::Svg,
        };
        assert!(preflight(&[as_dir]).is_err());
        assert!(preflight(&[ok.clone(), ok]).is_err());
    }

    /// A write that fails halfway (disk full, a renderer error) leaves the previous file whole
    /// and no temporary file behind: the target is only ever replaced by a complete file.
    #[test]
    fn interrupted_write_never_leaves_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.svg");
        fs::write(&out, "the previous, complete file").unwrap();
        let err = write_atomically(&out, |w| {
            w.write_all(&[b'x'; 100_000])?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("out.svg"), "{err:#}");
        assert_eq!(
            fs::read_to_string(&out).unwrap(),
            "the previous, complete file"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.svg"], "temporary file left behind");
    }

    /// A symlink planted at the temporary name itself is not followed either: the write fails
    /// (the name is taken) rather than writing through it, and the victim is untouched.
    #[test]
    fn planted_temporary_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let out = dir.path().join("out.folded");
        std::os::unix::fs::symlink(&victim, temp_sibling(&out).unwrap()).unwrap();
        assert!(write_atomically(&out, |w| w.write_all(b"new")).is_err());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!out.exists());
    }

    /// Writing replaces a planted symlink instead of writing through it.
    #[test]
    fn atomic_write_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let out = dir.path().join("out.folded");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        write_atomically(&out, |w| w.write_all(b"new")).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(fs::read_to_string(&out).unwrap(), "new");
        assert!(!fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
    }
}
