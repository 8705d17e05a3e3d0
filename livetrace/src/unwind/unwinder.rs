//! The unwinder: each process's framehop unwinder over its executable mappings, rebuilt when an
//! address falls outside them, with the frame-pointer chain where there is no CFI.

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use framehop::{
    Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use livetrace_common::{
    stacks::stack_errno,
    unwind::{HEADER_LEN, RECORD_BLOCK_END, RECORD_EXEC, RECORD_FORK, UnwindSampleHeader},
};

use crate::{
    proc::{
        self,
        maps::{Backing, Maps},
    },
    symbolize::Mapping,
};

use super::{
    CutShort, MAX_FRAMES, MAX_REFRESH, MIN_REFRESH, ProcessMaps, SampleKey, TOO_DEEP, YOUNG,
    cpython::cpython_trampolines,
    elf::{Bytes, ElfUnwindInfo, load_bias},
    limits::COPY_TOO_SMALL,
};

/// One process's view: its unwinder and what lies where.
#[derive(Clone)]
struct ProcessUnwinder {
    unwinder: UnwinderX86_64<Bytes>,
    /// The executable file mappings as read, for the symbolizer.
    mappings: Vec<Mapping>,
    /// Executable file mappings: range and the file's name, and whether it has CFI.
    pub(super) files: Vec<(Range<u64>, Arc<str>, bool)>,
    /// Executable anonymous mappings (JIT code).
    pub(super) anonymous: Vec<Range<u64>>,
    /// Where the kernel starts the program and its interpreter (ld.so): roots of every stack.
    entries: Vec<u64>,
    read_at: Instant,
    /// How long after `read_at` an address outside the mappings makes them be read again.
    refresh_after: Duration,
}

#[derive(Default)]
pub struct DwarfUnwinder {
    /// By path (as reachable from here); `None`: unreadable, with why.
    elves: HashMap<PathBuf, Result<Arc<ElfUnwindInfo>, String>>,
    processes: HashMap<u32, ProcessUnwinder>,
    /// Processes that exec'd lately, and when (see [`YOUNG`]).
    young: HashMap<u32, Instant>,
    /// Memory maps read since the symbolizer last took them (see [`Sightings::maps`]).
    pub(super) fresh_maps: HashMap<u32, ProcessMaps>,
    cache: CacheX86_64,
    pub(super) noted: HashSet<u32>,
    /// Bytes above sp the last walk read: how much of its copy the stack needed.
    pub(super) stack_used: usize,
    /// Processes found gone at the last [`Self::forget_exited`].
    gone: HashSet<u32>,
}

impl DwarfUnwinder {
    /// Unwinds a stack copied from a thread that is not running (a thread found blocked at the
    /// start of a capture): its user addresses, leaf first, and whether the walk reached the
    /// root. `bp` may be a guess; it only matters where a frame's CFA is rbp-based.
    pub fn unwind_copy(
        &mut self,
        pid: u32,
        (ip, sp, bp): (u64, u64, u64),
        stack: &[u8],
    ) -> (Vec<u64>, bool) {
        let regs = UnwindSampleHeader {
            tgid: pid,
            ip,
            sp,
            bp,
            ..UnwindSampleHeader::default()
        };
        let (addrs, cut_short) = self.unwind(pid, &regs, stack);
        (addrs, cut_short.is_none())
    }

    /// Forgets the processes that were already gone at the previous call, so that a long
    /// capture of processes that come and go (`record`) does not keep each one's maps and
    /// unwinder. Gone for a whole interval: their last samples, drained within milliseconds,
    /// were unwound.
    pub(super) fn forget_exited(&mut self) {
        let gone: HashSet<u32> = (self.processes.keys())
            .chain(&self.noted)
            .chain(self.young.keys())
            .copied()
            .filter(|&pid| !crate::proc::task::is_alive(pid))
            .collect();
        for pid in gone.intersection(&self.gone) {
            self.processes.remove(pid);
            self.noted.remove(pid);
            self.young.remove(pid);
        }
        self.gone = gone;
    }

    /// `pid` has exec'd: its next stack is read against its new mappings, read now and then
    /// again at every poll while it is young.
    pub(super) fn exec(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.young.insert(pid, Instant::now());
        if let Some(process) = self.read_young(pid) {
            self.processes.insert(pid, process);
        }
    }

    /// [`Self::read_process`] for a young process: a walk that leaves its map reads it again at
    /// once (ld.so may have mapped a library a moment after the last read).
    fn read_young(&mut self, pid: u32) -> Option<ProcessUnwinder> {
        let mut process = self.read_process(pid)?;
        process.refresh_after = Duration::ZERO;
        Some(process)
    }

    /// `child` was forked by `parent`: until it execs, it maps what its parent maps, and it may
    /// be gone before its own map is read.
    pub(super) fn fork(&mut self, child: u32, parent: u32) {
        if let Some(process) = self.processes.get(&parent).cloned() {
            self.fresh_maps.insert(
                child,
                ProcessMaps {
                    files: process.mappings.clone(),
                    anonymous: process.anonymous.clone(),
                },
            );
            self.processes.insert(child, process);
        }
    }

    /// Reads the maps of processes that exec'd lately again (see [`YOUNG`]); returns whether
    /// some are still young.
    pub(super) fn reread_young(&mut self) -> bool {
        let pids: Vec<u32> = self.young.keys().copied().collect();
        for pid in pids {
            let born = self.young[&pid];
            match self.read_young(pid) {
                Some(process) if born.elapsed() < YOUNG => {
                    self.processes.insert(pid, process);
                }
                Some(mut process) => {
                    process.refresh_after = MIN_REFRESH;
                    self.processes.insert(pid, process);
                    self.young.remove(&pid);
                }
                // Gone: what was read last stays.
                None => {
                    self.young.remove(&pid);
                }
            }
        }
        !self.young.is_empty()
    }

    /// Reads one ring buffer record, and unwinds its stack if it carries one; `None` if it is
    /// malformed.
    pub(super) fn record(
        &mut self,
        record: &[u8],
        per_thread: bool,
    ) -> Option<(UnwindSampleHeader, Option<SampleKey>)> {
        let header_bytes = record.get(..HEADER_LEN)?;
        // SAFETY: `UnwindSampleHeader` is plain integers; read_unaligned copes with alignment.
        let header: UnwindSampleHeader =
            unsafe { std::ptr::read_unaligned(header_bytes.as_ptr().cast()) };
        if matches!(
            header.kind,
            RECORD_BLOCK_END | RECORD_EXEC | RECORD_FORK | livetrace_common::python::RECORD_PYTHON
        ) {
            return Some((header, None));
        }
        let key = self.sample(&header, record, per_thread)?;
        Some((header, Some(key)))
    }

    /// Unwinds the stack of a sample (or block start) record.
    pub(super) fn sample(
        &mut self,
        header: &UnwindSampleHeader,
        record: &[u8],
        per_thread: bool,
    ) -> Option<SampleKey> {
        let stack = record.get(HEADER_LEN..HEADER_LEN + header.stack_len as usize)?;
        let user = if header.sp == 0 && header.ip == 0 {
            // No user context (a kernel thread): as bpf_get_stackid would say.
            (Err(-stack_errno::EFAULT), None)
        } else {
            let (addrs, cut) = self.unwind(header.tgid, header, stack);
            if addrs.is_empty() {
                (Err(-stack_errno::EFAULT), None)
            } else {
                (Ok(addrs), cut)
            }
        };
        Some(SampleKey {
            tgid: header.tgid,
            tid: if per_thread { header.tid } else { 0 },
            kernel_stack_id: header.kernel_stack_id,
            comm: header.comm,
            user: user.0,
            cut_short: user.1,
        })
    }

    /// The user addresses of a sample, leaf first, and why they stop short, if they do.
    pub(super) fn unwind(
        &mut self,
        pid: u32,
        regs: &UnwindSampleHeader,
        stack: &[u8],
    ) -> (Vec<u64>, Option<CutShort>) {
        let (addrs, error) = self.walk(pid, regs, stack);
        log::trace!(
            "pid {pid}: ip {:#x} sp {:#x} bp {:#x} stack {} bytes: {addrs:x?} {error:?}",
            regs.ip,
            regs.sp,
            regs.bp,
            stack.len()
        );
        // An address outside every known mapping, where the walk stopped or where the
        // frame-pointer fallback stepped through, may be in a library mapped since the mappings
        // were read: read them again (see MIN_REFRESH) and walk again.
        let stopped_at = error
            .is_some()
            .then(|| addrs.last().copied().unwrap_or(regs.ip));
        let outside = self.processes.get(&pid).and_then(|p| {
            stopped_at
                .into_iter()
                .chain(addrs.iter().copied())
                .find(|&addr| p.place(addr) == Place::Unmapped)
                .filter(|_| p.read_at.elapsed() >= p.refresh_after)
                .map(|addr| (addr, p.refresh_after))
        });
        let (addrs, error) = match outside {
            Some((addr, waited)) => {
                match self.read_process(pid) {
                    Some(mut fresh) => {
                        fresh.refresh_after = if fresh.place(addr) == Place::Unmapped {
                            (waited * 2).clamp(MIN_REFRESH, MAX_REFRESH)
                        } else if self.young.contains_key(&pid) {
                            Duration::ZERO
                        } else {
                            MIN_REFRESH
                        };
                        self.processes.insert(pid, fresh);
                    }
                    // Gone: keep what was read, and do not try again soon.
                    None => {
                        if let Some(known) = self.processes.get_mut(&pid) {
                            known.read_at = Instant::now();
                            known.refresh_after = MAX_REFRESH;
                        }
                    }
                }
                self.walk(pid, regs, stack)
            }
            None => (addrs, error),
        };
        let Some(error) = error else {
            let deep = (addrs.len() >= MAX_FRAMES).then(|| TOO_DEEP.to_owned());
            return (addrs, deep);
        };
        let cause = self.cause(pid, &addrs, regs, stack, error);
        (addrs, Some(cause))
    }

    pub(super) fn walk(
        &mut self,
        pid: u32,
        regs: &UnwindSampleHeader,
        stack: &[u8],
    ) -> (Vec<u64>, Option<framehop::Error>) {
        if !self.processes.contains_key(&pid) {
            // A process that is gone before it was looked at gets an empty map: its walk stops
            // at once, named as such (and it is not looked for again).
            let process = self
                .read_process(pid)
                .unwrap_or_else(ProcessUnwinder::empty);
            self.processes.insert(pid, process);
        }
        let process = &self.processes[&pid];
        let sp = regs.sp;
        let used = std::cell::Cell::new(0usize);
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let at = addr.checked_sub(sp).ok_or(())? as usize;
            let word = stack.get(at..at + 8).ok_or(())?;
            used.set(used.get().max(at + 8));
            Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
        };
        let mut frames = process.unwinder.iter_frames(
            regs.ip,
            UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp),
            &mut self.cache,
            &mut read_stack,
        );
        let mut addrs = Vec::new();
        let error = loop {
            match frames.next() {
                Ok(Some(frame)) => {
                    addrs.push(frame.address());
                    if process.is_entry_stub(frame.address()) || addrs.len() >= MAX_FRAMES {
                        break None;
                    }
                }
                Ok(None) => break None,
                Err(err) => break Some(err),
            }
        };
        self.stack_used = used.get();
        (addrs, error)
    }

    /// Names the cause of an unwind that stopped short, after the frame at `addrs.last()`.
    pub(super) fn cause(
        &self,
        pid: u32,
        addrs: &[u64],
        regs: &UnwindSampleHeader,
        stack: &[u8],
        error: framehop::Error,
    ) -> CutShort {
        let last = addrs.last().copied().unwrap_or(regs.ip);
        let place = self
            .processes
            .get(&pid)
            .map_or(Place::Unmapped, |p| p.place(last));
        match place {
            Place::Anonymous if !crate::symbolize::perf_map::PerfMap::exists(pid) => {
                return "JIT or anonymous code without a perf map".into();
            }
            Place::Anonymous => {
                return "JIT code whose frame-pointer chain broke".into();
            }
            Place::File(name, false) => return format!("no unwind info (.eh_frame) in {name}"),
            _ => {}
        }
        match error {
            framehop::Error::CouldNotReadStack(addr)
                if addr >= regs.sp + stack.len() as u64
                    && addr < regs.sp + stack.len() as u64 + (1 << 20) =>
            {
                COPY_TOO_SMALL.into()
            }
            framehop::Error::CouldNotReadStack(_) => {
                "unwinding read outside the copied stack (bad unwind info or frame pointer)".into()
            }
            _ if place == Place::Unmapped => "unwinding reached an unmapped address".into(),
            other => format!("unwinding failed ({other})"),
        }
    }

    /// The process's current memory map, or `None` if it cannot be read (it is gone, or going:
    /// an exiting process's map reads empty).
    fn read_process(&mut self, pid: u32) -> Option<ProcessUnwinder> {
        let maps = Maps::of(pid).ok()?;
        if maps.is_empty() {
            return None;
        }
        let process = self.parse_process(pid, &maps, ProcessUnwinder::empty());
        self.fresh_maps.insert(
            pid,
            ProcessMaps {
                files: process.mappings.clone(),
                anonymous: process.anonymous.clone(),
            },
        );
        Some(process)
    }

    fn parse_process(
        &mut self,
        pid: u32,
        maps: &Maps,
        mut process: ProcessUnwinder,
    ) -> ProcessUnwinder {
        for region in maps.regions().iter().filter(|r| r.executable) {
            let (start, end, offset) = (region.range.start, region.range.end, region.offset);
            // A file deleted since it was mapped (a binary upgraded under a running process)
            // is still there through map_files; its path may hold a new version by now.
            // Parsed once per file (keyed by its path in the process), once per mapping if
            // deleted.
            let (path, opened, key) = match &region.backing {
                Backing::File(path) => (path, proc::reachable(pid, path), path.clone()),
                Backing::Deleted(path) => {
                    let opened = proc::map_file(pid, &region.range);
                    (path, opened.clone(), opened)
                }
                Backing::Anonymous | Backing::Pseudo(_) => {
                    // [vdso] has CFI of its own but no file; treat it like anonymous code (the
                    // frame-pointer fallback handles its leaf frames well enough).
                    if region.backing == Backing::Anonymous
                        && let Some(module) = cpython_trampolines(pid, &region.range)
                    {
                        process.unwinder.add_module(module);
                    }
                    process.anonymous.push(start..end);
                    continue;
                }
            };
            let path = path.to_string_lossy().into_owned();
            let name: Arc<str> = Arc::from(
                Path::new(&path)
                    .file_name()
                    .map_or(path.clone(), |n| n.to_string_lossy().into_owned()),
            );
            let elf = self
                .elves
                .entry(key)
                .or_insert_with(|| ElfUnwindInfo::open(&opened).map(Arc::new))
                .clone();
            process.mappings.push(Mapping {
                start,
                end,
                offset,
                path: PathBuf::from(&path),
            });
            match elf {
                Ok(elf) => {
                    let has_cfi = elf.has_cfi();
                    if let Some(module) = elf.module(&path, start, end, offset) {
                        process.unwinder.add_module(module);
                    }
                    if let Some(bias) = load_bias(&elf.segments, start, end, offset)
                        && elf.entry != 0
                        && (start..end).contains(&(elf.entry.wrapping_add(bias)))
                    {
                        process.entries.push(elf.entry.wrapping_add(bias));
                    }
                    process.files.push((start..end, name, has_cfi));
                }
                Err(why) => {
                    log::debug!("no unwind info from {path}: {why}");
                    process.files.push((start..end, name, false));
                }
            }
        }
        process
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Place {
    File(Arc<str>, bool),
    Anonymous,
    Unmapped,
}

/// The bytes after an entry point within which a return address is still in its stub. ld.so's
/// `_start` calls `_dl_start` and then `_dl_init` (running the libraries' constructors) from its
/// first 0x30 bytes, and has no unwind info: a walk through it would read garbage as a caller.
const ENTRY_STUB_BYTES: u64 = 64;

impl ProcessUnwinder {
    /// Whether `addr` is in a program's or ld.so's entry stub: the root of its stack. At the
    /// entry itself, a thread stopped right after exec, where the default CFI rule would read
    /// argc as a return address; just after, a return into ld.so's `_start`.
    fn is_entry_stub(&self, addr: u64) -> bool {
        self.entries
            .iter()
            .any(|&entry| addr.wrapping_sub(entry) < ENTRY_STUB_BYTES)
    }

    pub(super) fn empty() -> Self {
        Self {
            unwinder: UnwinderX86_64::new(),
            mappings: Vec::new(),
            files: Vec::new(),
            anonymous: Vec::new(),
            entries: Vec::new(),
            read_at: Instant::now(),
            refresh_after: MIN_REFRESH,
        }
    }

    pub(super) fn place(&self, addr: u64) -> Place {
        if let Some((_, name, cfi)) = self.files.iter().find(|(r, ..)| r.contains(&addr)) {
            return Place::File(name.clone(), *cfi);
        }
        if self.anonymous.iter().any(|r| r.contains(&addr)) {
            return Place::Anonymous;
        }
        Place::Unmapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This very test binary unwinds itself from its own registers and stack, through CFI, down
    /// past the test function (std's test runner calls it from a thread).
    #[test]
    fn unwinds_own_stack() {
        #[inline(never)]
        fn capture() -> (UnwindSampleHeader, Vec<u8>) {
            let (ip, sp, bp): (u64, u64, u64);
            // SAFETY: reads three registers, touches no memory.
            unsafe {
                std::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp",
                    ip = out(reg) ip, sp = out(reg) sp, bp = out(reg) bp);
            }
            // Only up to the top of this thread's stack: a test thread's top is often a few KiB
            // above sp, and reading past the end of its mapping faults.
            let maps = Maps::of_self().expect("/proc/self/maps");
            let stack_end = maps.region_of(sp).expect("sp is in a mapping").range.end;
            let len = (64 * 1024).min(stack_end - sp) as usize;
            // SAFETY: [sp, sp + len) lies inside the mapping that holds this thread's stack.
            let stack = unsafe { std::slice::from_raw_parts(sp as *const u8, len) }.to_vec();
            let header = UnwindSampleHeader {
                tgid: std::process::id(),
                ip,
                sp,
                bp,
                stack_len: len as u32,
                ..Default::default()
            };
            (header, stack)
        }
        let (header, stack) = capture();
        let mut unwinder = DwarfUnwinder::default();
        let (addrs, cut) = unwinder.unwind(header.tgid, &header, &stack);
        let here = unwinds_own_stack as *const () as u64;
        assert!(addrs.len() >= 3, "{addrs:x?} {cut:?}");
        assert!(
            addrs.iter().any(|&a| (here..here + 4096).contains(&a)),
            "the test function is on the stack: {addrs:x?} (it starts at {here:#x}); {cut:?}"
        );
    }
}
