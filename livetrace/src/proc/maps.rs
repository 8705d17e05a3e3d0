//! `/proc/PID/maps`, parsed here and nowhere else. A line is
//! `START-END PERMS OFFSET DEV INODE [PATH]`; the path is the rest of the line after the padding,
//! spaces included, with a newline in it written `\012` and ` (deleted)` appended once the file
//! was removed. Callers ask for what they need: executable file mappings, the files a process
//! maps, its anonymous code (JIT), or the region holding an address.

use std::{
    ops::Range,
    path::{Path, PathBuf},
};

/// One line of the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub range: Range<u64>,
    /// The `x` permission.
    pub executable: bool,
    /// Offset in the file of `range.start`.
    pub offset: u64,
    pub backing: Backing,
}

/// What a region maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A file, by the path the process opened it as (in its own mount namespace).
    File(PathBuf),
    /// A file removed since it was mapped (the path it had): it can no longer be opened by path.
    Deleted(PathBuf),
    /// Memory no file backs: heap, JIT code, a thread's stack.
    Anonymous,
    /// The kernel's own: `[vdso]`, `[stack]`, `[heap]`, `[vsyscall]`.
    Pseudo(String),
}

/// A file-backed executable mapping: where a module's code is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    pub path: PathBuf,
}

impl Mapping {
    /// The file offset of `addr`, an address inside the mapping. Wrapping: the numbers come from
    /// a file, and a nonsensical offset must give a nonsensical answer, not a panic.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr.wrapping_sub(self.start).wrapping_add(self.offset)
    }

    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

/// A process's memory map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    regions: Vec<Region>,
}

impl Maps {
    /// The map of process `pid`. An exiting process's map reads empty.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        Self::read(&format!("/proc/{pid}/maps"))
    }

    /// livetrace's own map.
    pub fn of_self() -> std::io::Result<Self> {
        Self::read("/proc/self/maps")
    }

    fn read(path: &str) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// Parses map text; lines that are not well-formed are skipped.
    pub fn parse(text: &str) -> Self {
        Self {
            regions: text.lines().filter_map(parse_line).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Executable mappings of files that still exist, in address order.
    pub fn code_files(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.regions
            .iter()
            .filter(|r| r.executable)
            .filter_map(|r| {
                let Backing::File(path) = &r.backing else {
                    return None;
                };
                Some(Mapping {
                    start: r.range.start,
                    end: r.range.end,
                    offset: r.offset,
                    path: path.clone(),
                })
            })
    }

    /// The files with code mapped, each once, in address order.
    pub fn code_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = Vec::new();
        for mapping in self.code_files() {
            if !paths.contains(&mapping.path) {
                paths.push(mapping.path);
            }
        }
        paths
    }

    /// Executable memory no file backs: JIT code, CPython's perf trampolines.
    pub fn anonymous_code(&self) -> Vec<Range<u64>> {
        self.regions
            .iter()
            .filter(|r| r.executable && r.backing == Backing::Anonymous)
            .map(|r| r.range.clone())
            .collect()
    }

    /// Every executable range, whatever backs it.
    pub fn code_ranges(&self) -> Vec<Range<u64>> {
        self.regions
            .iter()
            .filter(|r| r.executable)
            .map(|r| r.range.clone())
            .collect()
    }

    /// Whether some region (of any permission) maps a file `matches` accepts.
    pub fn maps_file(&self, mut matches: impl FnMut(&Path) -> bool) -> bool {
        self.regions
            .iter()
            .any(|r| matches!(&r.backing, Backing::File(path) if matches(path)))
    }

    /// The region holding `addr`.
    pub fn region_of(&self, addr: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.range.contains(&addr))
    }
}

fn parse_line(line: &str) -> Option<Region> {
    let mut rest = line;
    let mut field = || {
        let trimmed = rest.trim_start_matches(' ');
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (word, after) = trimmed.split_at(end);
        rest = after;
        (!word.is_empty()).then_some(word)
    };
    let (range, perms, offset, _dev, _inode) = (field()?, field()?, field()?, field()?, field()?);
    let (start, end) = range.split_once('-')?;
    let range = u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?;
    let offset = u64::from_str_radix(offset, 16).ok()?;
    // The path is the rest after the padding, spaces and all.
    let path = rest.trim_start_matches(' ');
    let backing = if path.is_empty() {
        Backing::Anonymous
    } else if path.starts_with('[') {
        Backing::Pseudo(path.to_owned())
    } else if let Some(gone) = path.strip_suffix(" (deleted)") {
        Backing::Deleted(PathBuf::from(unescape(gone)))
    } else {
        Backing::File(PathBuf::from(unescape(path)))
    };
    Some(Region {
        range,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset,
        backing,
    })
}

/// The kernel writes a newline in a path as `\012`.
fn unescape(path: &str) -> String {
    path.replace("\\012", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 123                        /usr/bin/app
55d0c0a01000-55d0c0a05000 r-xp 00001000 fd:01 123                        /usr/bin/app
7f0000000000-7f0000001000 rwxp 00000000 00:00 0 
7f0000002000-7f0000003000 r-xp 00002000 fd:01 77                         /srv/my  app/lib x.so
7f0000004000-7f0000005000 r-xp 00000000 fd:01 78                         /tmp/jit.so (deleted)
7f0000006000-7f0000007000 r-xp 00000000 fd:01 79                         /tmp/new\\012line.so
7ffd1000-7ffd3000 r-xp 00000000 00:00 0                                  [vdso]
not a line
";

    #[test]
    fn reads_every_kind_of_region() {
        let maps = Maps::parse(MAPS);
        assert_eq!(maps.regions().len(), 7);
        let files: Vec<Mapping> = maps.code_files().collect();
        assert_eq!(
            files[0],
            Mapping {
                start: 0x55d0_c0a0_1000,
                end: 0x55d0_c0a0_5000,
                offset: 0x1000,
                path: PathBuf::from("/usr/bin/app"),
            }
        );
        // Spaces inside a path are kept as they are.
        assert_eq!(files[1].path, PathBuf::from("/srv/my  app/lib x.so"));
        assert_eq!(files[2].path, PathBuf::from("/tmp/new\nline.so"));
        assert_eq!(
            files.len(),
            3,
            "deleted files and [vdso] are not code files"
        );
        assert_eq!(
            maps.regions()[4].backing,
            Backing::Deleted(PathBuf::from("/tmp/jit.so"))
        );
        assert_eq!(
            maps.anonymous_code(),
            vec![0x7f00_0000_0000..0x7f00_0000_1000]
        );
        assert_eq!(maps.code_ranges().len(), 6);
        assert_eq!(maps.code_paths().len(), 3);
        assert!(maps.maps_file(|p| p.ends_with("app")));
        assert_eq!(
            maps.region_of(0x7ffd_2000).map(|r| &r.backing),
            Some(&Backing::Pseudo("[vdso]".into()))
        );
        assert_eq!(files[0].file_offset(0x55d0_c0a0_1010), 0x1010);
    }

    #[test]
    fn reads_our_own_map() {
        let maps = Maps::of_self().unwrap();
        let exe = std::env::current_exe().unwrap();
        assert!(maps.code_files().any(|m| m.path == exe), "{maps:?}");
    }
}
