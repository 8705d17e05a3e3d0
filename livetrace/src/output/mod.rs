//! Output files: the format is picked from the path's extension, every path is checked before the
//! capture starts, and files are written to a temporary sibling and renamed into place, so an
//! interrupted write never leaves a truncated file and a planted symlink is replaced, not followed.
//! The temporary name is a fresh random one, created exclusively (tempfile), so a file planted at
//! a guessable name can neither be written through nor make the write fail. Every output is
//! attempted even when another one fails ([`Written`]), and each failure is reported by path.

pub mod flamegraph;
pub mod folded;
pub mod footer;
#[cfg(test)]
pub mod golden;
pub mod histogram_json;
pub mod histogram_text;
pub mod offcpu_summary;
pub mod pprof;
pub mod profile_json;
pub mod profile_summary;
pub mod speedscope;

use std::{
    ffi::OsString,
    fs,
    io::{self, BufWriter, Write},
    os::unix::fs::PermissionsExt as _,
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

    /// The same format in a file beside this one, `tag` before the format's extension:
    /// `x.svg` -> `x.offcpu.svg`, `x.pb.gz` -> `x.offcpu.pb.gz`. Standard output stays itself.
    pub fn beside(&self, tag: &str) -> Self {
        let Some(path) = &self.path else {
            return self.clone();
        };
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let lower = name.to_ascii_lowercase();
        let suffix = EXTENSIONS
            .iter()
            .find(|(ext, ..)| lower.ends_with(ext))
            .map_or(0, |(ext, ..)| ext.len());
        let (stem, ext) = name.split_at(name.len() - suffix);
        Self {
            path: Some(path.with_file_name(format!("{stem}.{tag}{ext}"))),
            format: self.format,
        }
    }

    pub fn describe(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => "standard output".into(),
        }
    }
}

/// Makes sure every output can be written, before anything is captured: the directory exists and
/// accepts a new file, and the path is not a directory. Also refuses two `-o` naming one file
/// (however spelt) and `-o -` twice: each would be written twice.
pub fn preflight(outputs: &[OutputSpec]) -> anyhow::Result<()> {
    let mut seen: Vec<(PathBuf, &OutputSpec)> = Vec::new();
    let mut stdout = false;
    for output in outputs {
        let Some(path) = &output.path else {
            if stdout {
                return Err(crate::UsageError::error(
                    "-o - is given twice: standard output takes one profile",
                ));
            }
            stdout = true;
            continue;
        };
        let (dir, _) = dir_and_name(path)?;
        let same = canonical(path);
        if let Some((_, first)) = seen.iter().find(|(p, _)| *p == same) {
            return Err(crate::UsageError::error(format!(
                "'{}' and '{}' are one file, given twice with -o",
                first.describe(),
                output.describe()
            )));
        }
        seen.push((same, output));
        if path.is_dir() {
            return Err(crate::UsageError::error(format!(
                "output path '{}' is a directory; name a file",
                path.display()
            )));
        }
        temp_file(dir, path).with_context(|| {
            format!(
                "cannot write output '{}' (no new file can be made in {}); check that the \
                 directory exists and is writable",
                path.display(),
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// The path as the file system resolves it: its directory canonicalised (symlinks, `..`, a
/// relative spelling), its name kept. The path itself where the directory does not resolve.
fn canonical(path: &Path) -> PathBuf {
    match (dir_and_name(path), path.file_name()) {
        (Ok((dir, _)), Some(name)) => fs::canonicalize(dir)
            .map(|dir| dir.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// Writes through `render` into a temporary file beside `path`, then renames it over `path`.
pub fn write_atomically(
    path: &Path,
    render: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> anyhow::Result<()> {
    let result = (|| {
        let (dir, _) = dir_and_name(path)?;
        let mut temp = temp_file(dir, path)?;
        let mut writer = BufWriter::new(temp.as_file_mut());
        render(&mut writer)?;
        writer.flush()?;
        drop(writer);
        temp.as_file().sync_all()?;
        // rename(2): a symlink at `path` is replaced, not followed. On failure the temporary
        // file is removed when `temp` drops.
        temp.persist(path).map_err(|e| e.error)?;
        anyhow::Ok(())
    })();
    result.with_context(|| format!("failed to write '{}'", path.display()))
}

/// A new file with a fresh random name beside `path` (`.NAME.XXXXXX.livetrace.tmp`), created
/// exclusively; removed when dropped unless persisted.
fn temp_file(dir: &Path, path: &Path) -> io::Result<tempfile::NamedTempFile> {
    let mut prefix = OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".livetrace.tmp")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
}

/// The directory an output goes to (`.` for a bare name) and its file name.
fn dir_and_name(path: &Path) -> anyhow::Result<(&Path, &std::ffi::OsStr)> {
    let name = path
        .file_name()
        .with_context(|| format!("output path '{}' has no file name", path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

/// Which outputs of a run were written, and why the others were not. Every output is attempted;
/// a failure does not stop the next one.
#[derive(Default)]
pub struct Written {
    written: Vec<String>,
    failed: Vec<String>,
}

impl Written {
    /// Records the outcome of writing `what` (a path, or standard output).
    pub fn attempt(&mut self, what: String, result: anyhow::Result<()>) {
        match result {
            Ok(()) => self.written.push(what),
            Err(err) => self.failed.push(format!("{err:#}")),
        }
    }

    /// `livetrace: wrote PATH` on stderr for each file written.
    pub fn report(&self) {
        for path in &self.written {
            crate::say!("livetrace: wrote {path}");
        }
    }

    /// The paths written.
    pub fn paths(&self) -> &[String] {
        &self.written
    }

    /// An error naming each output that could not be written, if any could not.
    pub fn finish(self) -> anyhow::Result<()> {
        match self.failed.len() {
            0 => Ok(()),
            1 => Err(anyhow::anyhow!("{}", self.failed[0])),
            n => Err(anyhow::anyhow!(
                "{n} outputs could not be written:\n  {}",
                self.failed.join("\n  ")
            )),
        }
    }
}

/// Writes a stack profile to every requested output, each whatever happened to the others.
pub fn write_stack_profile(profile: &StackProfile, outputs: &[OutputSpec]) -> Written {
    let mut written = Written::default();
    for output in outputs {
        let render = |out: &mut dyn Write| match output.format {
            Format::Svg => flamegraph::write(profile, out),
            Format::Folded => folded::write(profile, out),
            Format::Json => profile_json::write(profile, out),
            Format::Pprof => pprof::write(profile, out),
            Format::Speedscope => speedscope::write(profile, out),
        };
        match &output.path {
            Some(path) => written.attempt(output.describe(), write_atomically(path, render)),
            None => {
                let mut buf = Vec::new();
                match render(&mut buf) {
                    Ok(()) => crate::console::stdout(&buf),
                    Err(err) => written.attempt(
                        output.describe(),
                        Err(anyhow::Error::from(err).context("failed to render standard output")),
                    ),
                }
            }
        }
    }
    written
}

/// The end of a stack tool's run on stderr: the data-quality footer, then each file written.
pub fn report_footer_and_files(profile: &StackProfile, written: &Written) {
    crate::say_raw!("{}", footer::text(profile));
    written.report();
}

/// Writes a mid-capture snapshot (SIGUSR1) to every file output, atomically, and says so on
/// stderr. Standard output is left alone: a reader of `-o -` expects one profile, at the end.
pub fn write_snapshot(profile: &StackProfile, outputs: &[OutputSpec]) -> anyhow::Result<()> {
    let files: Vec<OutputSpec> = outputs
        .iter()
        .filter(|o| o.path.is_some())
        .cloned()
        .collect();
    let written = write_stack_profile(profile, &files);
    crate::say!(
        "livetrace: snapshot (SIGUSR1): {} {} so far written to {}; the capture goes on",
        profile.total_weight(),
        profile.unit.short_name(),
        if written.paths().is_empty() {
            "no file (standard output gets the final profile only)".to_owned()
        } else {
            written.paths().join(", ")
        }
    );
    written.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file beside another keeps its format's whole extension, whatever its case.
    #[test]
    fn a_file_beside_keeps_the_format_extension() {
        let beside = |path: &str| {
            let spec = OutputSpec::parse(path).unwrap().beside("offcpu");
            spec.path.unwrap().to_string_lossy().into_owned()
        };
        assert_eq!(beside("/d/x.svg"), "/d/x.offcpu.svg");
        assert_eq!(beside("x.pb.gz"), "x.offcpu.pb.gz");
        assert_eq!(beside("a.b.speedscope.json"), "a.b.offcpu.speedscope.json");
        assert_eq!(beside("cpu.json"), "cpu.offcpu.json");
        assert_eq!(beside("X.SVG"), "X.offcpu.SVG");
        assert_eq!(OutputSpec::parse("-").unwrap().beside("offcpu").path, None);
    }

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

    /// Files planted where a temporary name could be guessed (a symlink to a victim, a hard
    /// link to it) neither make the write fail nor are written through: the temporary name is a
    /// fresh random one, and the victim and the planted files are untouched.
    #[test]
    fn planted_temporary_files_are_neither_followed_nor_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let out = dir.path().join("out.folded");
        let pid = std::process::id();
        let symlink = dir.path().join(format!(".out.folded.livetrace-{pid}.tmp"));
        let hard_link = dir.path().join(".out.folded.tmp");
        std::os::unix::fs::symlink(&victim, &symlink).unwrap();
        fs::hard_link(&victim, &hard_link).unwrap();
        write_atomically(&out, |w| w.write_all(b"new")).unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "new");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(
            fs::symlink_metadata(&symlink)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&hard_link).unwrap(), "keep");
    }

    /// One output that cannot be written does not stop the others: each is attempted, and
    /// the failure names its path.
    #[test]
    fn a_failing_output_does_not_lose_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let profile = StackProfile {
            title: "test".into(),
            unit: crate::model::WeightUnit::Samples,
            period_ns: None,
            stacks: Vec::new(),
            quality: crate::model::DataQuality::default(),
            build_ids: Default::default(),
        };
        let good = OutputSpec::parse(dir.path().join("a.folded").to_str().unwrap()).unwrap();
        let bad = OutputSpec::parse("/nonexistent-livetrace-dir/b.folded").unwrap();
        let also_good = OutputSpec::parse(dir.path().join("c.svg").to_str().unwrap()).unwrap();
        let written = write_stack_profile(&profile, &[good, bad, also_good]);
        assert_eq!(written.paths().len(), 2, "{:?}", written.paths());
        let err = format!("{:#}", written.finish().unwrap_err());
        assert!(err.contains("/nonexistent-livetrace-dir/b.folded"), "{err}");
        assert!(dir.path().join("a.folded").exists() && dir.path().join("c.svg").exists());
    }

    /// `-o -` twice, and one file named twice in different spellings, are refused.
    #[test]
    fn preflight_refuses_one_output_twice() {
        let dir = tempfile::tempdir().unwrap();
        let stdout = OutputSpec::parse("-").unwrap();
        assert!(preflight(&[stdout.clone(), stdout]).is_err());
        let absolute = dir.path().join("a.svg");
        let roundabout = dir.path().join(".").join("a.svg");
        let specs = [absolute, roundabout].map(|p| OutputSpec::parse(p.to_str().unwrap()).unwrap());
        let err = format!("{:#}", preflight(&specs).unwrap_err());
        assert!(err.contains("one file"), "{err}");
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
