//! JIT symbol files, `/tmp/perf-PID.map`: one `START SIZE name` line per piece of generated
//! code (perf's jit-interface.txt). CPython (`-X perf`), Node (`--perf-basic-prof`) and the JVM
//! (`jcmd PID Compiler.perfmap`) write them.
//!
//! livetrace reads them itself rather than through blazesym because the writers do not agree on
//! the format: the JVM prefixes both numbers with `0x`, which perf accepts and blazesym rejects
//! (one such line fails the whole file, and every Java frame goes unnamed). Here a line that
//! cannot be read is skipped and counted, not fatal. The files live in world-writable /tmp, so
//! one is trusted only if it is a regular file owned by the process's user or by root.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// Bytes read at most: Node appends to its map for as long as it runs, and a long-lived server's
/// can grow to gigabytes. What lies beyond is counted as not read.
const MAX_BYTES: u64 = 256 << 20;

/// One named range of generated code.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    start: u64,
    end: u64,
    name: String,
}

/// A parsed perf map.
#[derive(Clone, Debug, Default)]
pub struct PerfMap {
    /// Where it was read from, for the frames' module and for messages.
    pub path: PathBuf,
    /// Sorted by start; of entries with the same start, only the last written (the newest code
    /// at that address) is kept.
    entries: Vec<Entry>,
    /// Lines that could not be read.
    pub malformed: usize,
    /// Whether the file was longer than [`MAX_BYTES`] and its end was not read.
    pub truncated: bool,
    /// Size and modification time when read: a runtime appends (Node) or rewrites (jcmd) its
    /// map while it runs, and a changed file is read again.
    stamp: Option<(u64, std::time::SystemTime)>,
}

impl PerfMap {
    /// The perf map of process `pid`, if it wrote one that can be trusted. Inside a container
    /// the file is in the container's /tmp and named after the PID the process sees itself as.
    pub fn read(pid: u32) -> Option<Self> {
        let owner = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
        candidates(pid)
            .into_iter()
            .find_map(|path| Self::read_trusted(path, owner))
    }

    /// Whether process `pid` has a perf map, wherever it is looked for (not whether it is
    /// trusted: that is for [`PerfMap::read`]).
    pub fn exists(pid: u32) -> bool {
        candidates(pid).iter().any(|path| path.exists())
    }

    /// Opens without following symlinks and without blocking on a FIFO, then checks what was
    /// opened (not the path, which could be swapped in between).
    fn read_trusted(path: PathBuf, owner: u32) -> Option<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        let meta = file.metadata().ok()?;
        if !meta.file_type().is_file() || (meta.uid() != 0 && meta.uid() != owner) {
            log::debug!(
                "{}: not a regular file of uid {owner} or root",
                path.display()
            );
            return None;
        }
        let mut reader = BufReader::new(file.take(MAX_BYTES));
        let mut map = Self {
            path,
            truncated: meta.len() > MAX_BYTES,
            stamp: meta.modified().ok().map(|t| (meta.len(), t)),
            ..Self::default()
        };
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).ok()? > 0 {
            map.add_line(&line);
            line.clear();
        }
        map.finish();
        Some(map)
    }

    /// Parses a whole map held in memory (tests and fuzzing).
    pub fn parse(text: &[u8]) -> Self {
        let mut map = Self::default();
        for line in text.split(|&b| b == b'\n') {
            map.add_line(line);
        }
        map.finish();
        map
    }

    fn add_line(&mut self, line: &[u8]) {
        let line = line.trim_ascii();
        if line.is_empty() {
            return;
        }
        match parse_line(line) {
            Some(entry) => self.entries.push(entry),
            None => self.malformed += 1,
        }
    }

    fn finish(&mut self) {
        // Stable: among equal starts the file's order survives, and the last one is the newest.
        self.entries.sort_by_key(|e| e.start);
        let mut kept: Vec<Entry> = Vec::with_capacity(self.entries.len());
        for entry in self.entries.drain(..) {
            match kept.last_mut() {
                Some(last) if last.start == entry.start => *last = entry,
                _ => kept.push(entry),
            }
        }
        self.entries = kept;
    }

    /// Whether the file is still as it was read.
    pub fn is_current(&self) -> bool {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        now.is_some() && now == self.stamp
    }

    /// The name of the code at `addr`.
    pub fn find(&self, addr: u64) -> Option<&str> {
        let after = self.entries.partition_point(|e| e.start <= addr);
        let entry = self.entries.get(after.checked_sub(1)?)?;
        (addr < entry.end).then_some(entry.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Where process `pid`'s perf map may be: in its own /tmp (a container's), named after the PID it
/// sees itself as, then in ours.
fn candidates(pid: u32) -> [PathBuf; 2] {
    let own_pid = crate::proc::task::namespace_pid(pid).unwrap_or(pid);
    [
        crate::proc::in_root_of(pid, Path::new(&format!("/tmp/perf-{own_pid}.map"))),
        PathBuf::from(format!("/tmp/perf-{pid}.map")),
    ]
}

/// `START SIZE name`, both numbers hex with or without `0x`; the name is the rest of the line
/// and may contain spaces (`int Serve.parse(byte[])`).
fn parse_line(line: &[u8]) -> Option<Entry> {
    let line = std::str::from_utf8(line).ok()?;
    let (start, rest) = line.split_once(|c: char| c.is_ascii_whitespace())?;
    let (size, name) = rest
        .trim_start()
        .split_once(|c: char| c.is_ascii_whitespace())?;
    let hex = |s: &str| {
        let digits = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        u64::from_str_radix(digits, 16).ok()
    };
    let start = hex(start)?;
    let end = start.checked_add(hex(size)?)?;
    let name = name.trim();
    if name.is_empty() || end == start {
        return None;
    }
    Some(Entry {
        start,
        end,
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// perf's own format, the JVM's 0x-prefixed one and names with spaces all read; bad lines are
    /// counted, not fatal.
    #[test]
    fn reads_every_writers_format() {
        let map = PerfMap::parse(
            b"7f00001000 40 py::serve_request:/srv/app.py\n\
              0x0000007f00002000 0x0000000000000270 int Serve.parseSubtitleTrack(byte[])\n\
              7f00003000 10 JS:*parse /srv/app.js:2:28\r\n\
              not a line\n\
              7f00004000 zz broken size\n\
              7f00005000 8\n\
              \n",
        );
        assert_eq!(map.len(), 3);
        assert_eq!(map.malformed, 3);
        assert_eq!(
            map.find(0x7f00001000),
            Some("py::serve_request:/srv/app.py")
        );
        assert_eq!(
            map.find(0x7f0000103f),
            Some("py::serve_request:/srv/app.py")
        );
        assert_eq!(map.find(0x7f00001040), None);
        assert_eq!(
            map.find(0x7f00002100),
            Some("int Serve.parseSubtitleTrack(byte[])")
        );
        assert_eq!(map.find(0x7f00003004), Some("JS:*parse /srv/app.js:2:28"));
        assert_eq!(map.find(0x1000), None);
    }

    /// Code recompiled at the same address: the entry written last names it.
    #[test]
    fn newest_entry_at_an_address_wins() {
        let map = PerfMap::parse(b"1000 100 old\n2000 10 other\n1000 80 new\n");
        assert_eq!(map.find(0x1010), Some("new"));
        assert_eq!(map.find(0x1090), None);
        assert_eq!(map.find(0x2000), Some("other"));
    }

    /// This process's own map, read through the trusted path: found, and no longer current once
    /// the runtime appends to it.
    #[test]
    fn reads_a_processs_map_and_notices_it_grow() {
        let path = format!("/tmp/perf-{}.map", std::process::id());
        std::fs::write(&path, "7f0000001000 10 first\n").unwrap();
        let map = PerfMap::read(std::process::id()).expect("our own map is trusted");
        assert_eq!(map.find(0x7f0000001004), Some("first"));
        assert!(map.is_current());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"7f0000002000 10 second\n").unwrap();
        assert!(!map.is_current());
        let map = PerfMap::read(std::process::id()).unwrap();
        assert_eq!(map.find(0x7f0000002004), Some("second"));
        std::fs::remove_file(&path).unwrap();
    }

    /// Sizes that overflow the address space are refused rather than wrapped.
    #[test]
    fn refuses_ranges_past_the_address_space() {
        let map = PerfMap::parse(b"ffffffffffffff00 1000 wraps\n");
        assert!(map.is_empty());
        assert_eq!(map.malformed, 1);
    }
}
