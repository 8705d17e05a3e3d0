//! The probes an ELF file declares in its `.note.stapsdt` section, as `sys/sdt.h` writes them:
//! one note (owner `stapsdt`, type 3) per probe site, holding the site's address, the link-time
//! address of `.stapsdt.base`, the semaphore's address (0 when there is none), then the
//! provider, the name and the argument specs as three NUL-terminated strings.
//!
//! The section is not allocated, so it survives `strip`. Addresses are virtual; the kernel
//! places uprobes by file offset, found through the loadable segment that holds each address.
//! The file is the traced program's: every field is checked, and a bad note is skipped with
//! its reason, never trusted.

use object::{
    Endianness,
    elf::{FileHeader64, PF_X, PT_LOAD},
    read::elf::{FileHeader as _, ProgramHeader as _, SectionHeader as _},
};

/// The note type `sys/sdt.h` gives its probe descriptors.
const NT_STAPSDT: u32 = 3;

/// One probe site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    pub provider: String,
    pub name: String,
    /// The argument specs as written (`-4@%eax 8@-16(%rbp)`); parsed by [`super::args`].
    pub args: String,
    /// The site's virtual address (the `nop` the uprobe replaces), prelink-adjusted.
    pub address: u64,
    /// Where the kernel places the uprobe: the site's offset in the file.
    pub file_offset: u64,
    /// The semaphore (a `u16` the program tests before it evaluates the arguments), if any.
    pub semaphore: Option<Semaphore>,
}

/// A probe's semaphore: nonzero while someone traces the probe. The kernel raises it for each
/// uprobe attached with its offset (`ref_ctr_offset`), and lowers it on detach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Semaphore {
    pub address: u64,
    pub file_offset: u64,
}

/// What a file's notes hold: the sites, and the notes that could not be used, with why.
#[derive(Debug, Default)]
pub struct Notes {
    pub sites: Vec<ProbeSite>,
    pub skipped: Vec<String>,
}

/// Why a file's probes cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum NotesError {
    #[error("it is not a 64-bit ELF file ({0})")]
    NotElf(String),
    #[error("it has no USDT probes (no .note.stapsdt section)")]
    NoProbes,
}

/// Reads the probe sites of a 64-bit ELF file.
pub fn read(data: &[u8]) -> Result<Notes, NotesError> {
    let bad = |err: object::read::Error| NotesError::NotElf(err.to_string());
    let header = FileHeader64::<Endianness>::parse(data).map_err(bad)?;
    let endian = header.endian().map_err(bad)?;
    let sections = header.sections(endian, data).map_err(bad)?;
    let (_, note_section) = sections
        .section_by_name(endian, b".note.stapsdt")
        .ok_or(NotesError::NoProbes)?;
    // The link-time address of `.stapsdt.base`; a prelinked file moved it, and its sites with it.
    let base = sections
        .section_by_name(endian, b".stapsdt.base")
        .map(|(_, s)| s.sh_addr(endian));
    let segments: Vec<Segment> = header
        .program_headers(endian, data)
        .map_err(bad)?
        .iter()
        .filter(|p| p.p_type(endian) == PT_LOAD)
        .map(|p| Segment {
            vaddr: p.p_vaddr(endian),
            size: p.p_memsz(endian),
            offset: p.p_offset(endian),
            executable: p.p_flags(endian) & PF_X != 0,
        })
        .collect();

    let mut notes = Notes::default();
    let mut iter = match note_section.notes(endian, data) {
        Ok(Some(iter)) => iter,
        Ok(None) => return Err(NotesError::NoProbes),
        Err(err) => {
            notes
                .skipped
                .push(format!("the .note.stapsdt section is unreadable: {err}"));
            return Ok(notes);
        }
    };
    loop {
        let note = match iter.next() {
            Ok(Some(note)) => note,
            Ok(None) => break,
            Err(err) => {
                notes.skipped.push(format!(
                    "the notes after site {} are unreadable: {err}",
                    notes.sites.len()
                ));
                break;
            }
        };
        if note.name() != b"stapsdt" || note.n_type(endian) != NT_STAPSDT {
            continue;
        }
        match site(note.desc(), endian, base, &segments) {
            Ok(site) => notes.sites.push(site),
            Err(why) => notes.skipped.push(why),
        }
    }
    Ok(notes)
}

/// A loadable segment: where its bytes sit in memory and in the file.
struct Segment {
    vaddr: u64,
    size: u64,
    offset: u64,
    executable: bool,
}

/// The file offset of `address`, in a segment that is (or, for data, is not) executable.
fn file_offset(segments: &[Segment], address: u64, executable: bool) -> Option<u64> {
    segments
        .iter()
        .find(|s| s.executable == executable && address >= s.vaddr && address - s.vaddr < s.size)
        .and_then(|s| (address - s.vaddr).checked_add(s.offset))
}

/// Decodes one note's descriptor: three addresses, then three strings.
fn site(
    desc: &[u8],
    endian: Endianness,
    base: Option<u64>,
    segments: &[Segment],
) -> Result<ProbeSite, String> {
    let word = |at: usize| -> Option<u64> {
        let bytes: [u8; 8] = desc.get(at..at + 8)?.try_into().ok()?;
        Some(match endian {
            Endianness::Little => u64::from_le_bytes(bytes),
            Endianness::Big => u64::from_be_bytes(bytes),
        })
    };
    let (Some(pc), Some(note_base), Some(semaphore)) = (word(0), word(8), word(16)) else {
        return Err(format!(
            "a probe note of {} bytes is too short for its addresses",
            desc.len()
        ));
    };
    let mut strings = desc[24..].split(|&b| b == 0);
    let mut text = |what: &str| -> Result<String, String> {
        let bytes = strings
            .next()
            .ok_or_else(|| format!("a probe note at {pc:#x} has no {what}"))?;
        Ok(crate::names::sanitized(&String::from_utf8_lossy(bytes)))
    };
    let (provider, name, args) = (text("provider")?, text("name")?, text("arguments")?);
    if provider.is_empty() || name.is_empty() {
        return Err(format!(
            "a probe note at {pc:#x} has an empty provider or name"
        ));
    }
    // As libbpf does: move the site by how far `.stapsdt.base` moved, when both are known.
    let delta = match base {
        Some(base) if base != 0 && note_base != 0 => base.wrapping_sub(note_base),
        _ => 0,
    };
    let address = pc.wrapping_add(delta);
    let site_offset = file_offset(segments, address, true).ok_or_else(|| {
        format!("probe {provider}:{name} at {address:#x} is in no executable segment")
    })?;
    let semaphore = match semaphore {
        0 => None,
        address => {
            let address = address.wrapping_add(delta);
            let offset = file_offset(segments, address, false).ok_or_else(|| {
                format!(
                    "the semaphore of probe {provider}:{name} at {address:#x} is in no writable \
                     segment"
                )
            })?;
            Some(Semaphore {
                address,
                file_offset: offset,
            })
        }
    };
    // sys/sdt.h writes ":" or nothing for a probe without arguments.
    let args = if args.starts_with(':') {
        String::new()
    } else {
        args
    };
    Ok(ProbeSite {
        provider,
        name,
        args,
        address,
        file_offset: site_offset,
        semaphore,
    })
}
