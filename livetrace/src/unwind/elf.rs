//! What unwinding needs from one ELF file (its unwind sections, segments and entry point), found
//! once per file and shared by every process that maps it.

use std::{
    fs,
    ops::{Deref, Range},
    path::Path,
    sync::Arc,
};

use framehop::{ExplicitModuleSectionInfo, Module};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// A module's bytes: a range of a file mapped once and shared (or of synthesized CFI).
#[derive(Clone)]
pub(super) struct Bytes {
    pub(super) data: Arc<dyn Deref<Target = [u8]> + Send + Sync>,
    pub(super) range: Range<usize>,
}

/// Empty; only there so that framehop's section info can be built with `..Default::default()`.
impl Default for Bytes {
    fn default() -> Self {
        Self {
            data: Arc::new(Vec::new()),
            range: 0..0,
        }
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[self.range.clone()]
    }
}

/// What unwinding needs from one ELF file, found once per file.
pub(super) struct ElfUnwindInfo {
    pub(super) map: Arc<memmap2::Mmap>,
    /// (vaddr, file offset, file size) of each PT_LOAD segment, to place the file in a process.
    pub(super) segments: Vec<(u64, u64, u64)>,
    /// (section, address range, file range) for .text, .eh_frame, .eh_frame_hdr, .got.
    sections: Vec<(&'static str, Range<u64>, Range<usize>)>,
    debug_frame: Option<Range<usize>>,
    /// The ELF entry point (`e_entry`), where the kernel starts a program (or its interpreter):
    /// nothing called it, so a walk that reaches it is complete.
    pub(super) entry: u64,
}

impl ElfUnwindInfo {
    pub(super) fn open(path: &Path) -> Result<Self, String> {
        let file = fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        // SAFETY: the mapping is read-only; a binary truncated while mapped would fault, which
        // package managers avoid by replacing files rather than rewriting them.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot map: {e}"))?;
        let elf = object::File::parse(&*map).map_err(|e| format!("not an ELF file: {e}"))?;
        let segments = elf
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (s.address(), offset, size)
            })
            .collect();
        let mut sections = Vec::new();
        let mut debug_frame = None;
        for name in [
            ".text",
            ".eh_frame",
            ".eh_frame_hdr",
            ".got",
            ".debug_frame",
        ] {
            let Some(section) = elf.section_by_name(name) else {
                continue;
            };
            let Some((offset, size)) = section.file_range() else {
                continue; // compressed or NOBITS
            };
            let file = offset as usize..(offset + size) as usize;
            if file.end > map.len() {
                continue;
            }
            if name == ".debug_frame" {
                debug_frame = Some(file);
            } else {
                let addr = section.address()..section.address() + section.size();
                sections.push((name, addr, file));
            }
        }
        let entry = elf.entry();
        Ok(Self {
            map: Arc::new(map),
            segments,
            sections,
            debug_frame,
            entry,
        })
    }

    pub(super) fn has_cfi(&self) -> bool {
        self.debug_frame.is_some() || self.sections.iter().any(|(n, ..)| *n == ".eh_frame")
    }

    pub(super) fn bytes(&self, range: &Range<usize>) -> Bytes {
        Bytes {
            data: self.map.clone(),
            range: range.clone(),
        }
    }

    /// The module for a mapping of this file at `start..end` from file offset `offset`.
    pub(super) fn module(
        &self,
        name: &str,
        start: u64,
        end: u64,
        offset: u64,
    ) -> Option<Module<Bytes>> {
        let bias = load_bias(&self.segments, start, end, offset)?;
        let mut info = ExplicitModuleSectionInfo::<Bytes> {
            debug_frame: self.debug_frame.as_ref().map(|r| self.bytes(r)),
            ..ExplicitModuleSectionInfo::default()
        };
        for (name, addr, file) in &self.sections {
            let (svma, data) = (Some(addr.clone()), Some(self.bytes(file)));
            match *name {
                ".text" => (info.text_svma, info.text) = (svma, data),
                ".eh_frame" => (info.eh_frame_svma, info.eh_frame) = (svma, data),
                ".eh_frame_hdr" => (info.eh_frame_hdr_svma, info.eh_frame_hdr) = (svma, data),
                ".got" => info.got_svma = svma,
                _ => {}
            }
        }
        Some(Module::new(name.to_owned(), start..end, bias, info))
    }
}

/// What to add to an address in the ELF file's address space to get the address where a mapping
/// of it (`start..end`, from file offset `offset`) put it. The mapping is of the segment that
/// starts in its first page: a segment's file offset need not be page-aligned (lld and ld's
/// `-z separate-code` put the code segment at 0x18d10 of the file and 0x19d10 in memory, mapped
/// from offset 0x18000), so the segment is not simply the one whose file range holds `offset`
/// (that one is the read-only segment before it, 0x1000 off).
pub(super) fn load_bias(
    segments: &[(u64, u64, u64)],
    start: u64,
    end: u64,
    offset: u64,
) -> Option<u64> {
    let len = end.saturating_sub(start);
    let (vaddr, seg_offset) = segments
        .iter()
        .filter(|&&(_, off, _)| off >= offset && off - offset < len)
        .min_by_key(|&&(_, off, _)| off)
        .map(|&(vaddr, off, _)| (vaddr, off))
        .or_else(|| {
            // A mapping that starts inside a segment (a partial mapping): the segment holding it.
            segments
                .iter()
                .find(|&&(_, off, size)| (off..off + size.max(1)).contains(&offset))
                .map(|&(vaddr, off, _)| (vaddr, off))
        })?;
    // The mapping's start corresponds to file offset `offset`, i.e. to `vaddr - (seg_offset -
    // offset)` in the file's address space (for a segment found the second way, plus the
    // distance into it).
    let mapped_vaddr = vaddr.wrapping_add(offset).wrapping_sub(seg_offset);
    Some(start.wrapping_sub(mapped_vaddr))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo binary's layout (lld / `-z separate-code`): the code segment's file offset is not
    /// page-aligned and differs from its address by 0x1000. A mapping of it from offset 0x18000
    /// has the bias that puts 0x19d10 at start + 0xd10, not the read-only segment's.
    #[test]
    fn load_bias_follows_the_segment_the_mapping_starts() {
        let segments = [
            (0x0, 0x0, 0x18d10),
            (0x19d10, 0x18d10, 0x4beb0),
            (0x66bc0, 0x64bc0, 0x32e8),
        ];
        let start = 0x5555_0000_0000;
        let bias = load_bias(&segments, start, start + 0x4d000, 0x18000).unwrap();
        assert_eq!(bias, start - 0x19000);
        // Page-aligned segments (most of Debian's): the bias is the mapping's start less the
        // segment's address.
        let libc = [(0x0, 0x0, 0x26000), (0x26000, 0x26000, 0x156000)];
        let bias = load_bias(&libc, start, start + 0x156000, 0x26000).unwrap();
        assert_eq!(bias, start - 0x26000);
    }
}
