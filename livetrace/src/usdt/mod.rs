//! USDT probes (SystemTap SDT, `sys/sdt.h`): the points a program's authors placed for tracing,
//! such as PostgreSQL's `query__start`. [`notes`] reads where they are from a file's
//! `.note.stapsdt` section, and [`args`] what their argument specs say.

pub mod args;
pub mod notes;

use std::path::Path;

use anyhow::Context as _;

pub use self::notes::{NotesError, ProbeSite, Semaphore};

/// One probe of a file: every site it has (a probe placed in an inlined function has several),
/// each with its own argument specs.
#[derive(Clone, Debug)]
pub struct Probe {
    pub provider: String,
    pub name: String,
    pub sites: Vec<ProbeSite>,
}

impl Probe {
    /// `provider:name`, as bpftrace and `livetrace uprobe-hist` name it.
    pub fn full_name(&self) -> String {
        format!("{}:{}", self.provider, self.name)
    }
}

/// A file's probes, by provider and name, and the notes that could not be read.
#[derive(Debug, Default)]
pub struct FileProbes {
    pub probes: Vec<Probe>,
    pub skipped: Vec<String>,
}

/// Reads the probes of an ELF file.
pub fn probes_in(path: &Path) -> anyhow::Result<Result<FileProbes, NotesError>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(notes::read(&data).map(group))
}

/// Groups sites by probe, in the order the probes first appear.
fn group(notes: notes::Notes) -> FileProbes {
    let mut probes: Vec<Probe> = Vec::new();
    for site in notes.sites {
        match probes
            .iter_mut()
            .find(|p| p.provider == site.provider && p.name == site.name)
        {
            Some(probe) => probe.sites.push(site),
            None => probes.push(Probe {
                provider: site.provider.clone(),
                name: site.name.clone(),
                sites: vec![site],
            }),
        }
    }
    FileProbes {
        probes,
        skipped: notes.skipped,
    }
}
