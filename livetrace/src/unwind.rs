//! `--unwind dwarf`: unwinding user stacks without frame pointers. The BPF program copies each
//! sample's user registers and the top of its user stack into a ring buffer
//! (`livetrace_common::unwind`); a thread here drains it every few milliseconds and unwinds each
//! sample at once with the modules' `.eh_frame` CFI (framehop), falling back to the frame-pointer
//! chain where there is no CFI (JIT code, such as CPython's `-X perf` trampolines). The stacks
//! are aggregated like the kernel's: one count per distinct (process, thread, kernel stack id,
//! user addresses), so the rest of the pipeline is the frame-pointer path's.
//!
//! Each ELF file is mapped once and its unwind sections shared by every process that maps it;
//! each process gets a framehop unwinder over its executable mappings, rebuilt when an address
//! falls outside them (a library loaded since).

use std::{
    collections::{HashMap, HashSet},
    fs,
    ops::{Deref, Range},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use framehop::{
    ExplicitModuleSectionInfo, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use livetrace_common::{
    stacks::{STACK_KIND_USER, StackKey, stack_errno},
    unwind::{
        HEADER_LEN, MAX_STACK_COPY, RECORD_BLOCK_END, RECORD_BLOCK_START, RECORD_EXEC, RECORD_FORK,
        RECORD_SAMPLE, UnwindSampleHeader,
    },
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use crate::{
    proc::{
        self,
        maps::{Backing, Maps},
    },
    symbolize::{Mapping, Symbolizer},
};

/// How user stacks are walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnwindMode {
    /// Frame pointers, walked in the kernel (`bpf_get_stackid`): cheapest, but stacks of code
    /// built without frame pointers stop after a frame or two.
    Fp,
    /// Copy the stack and unwind it in user space with the binaries' CFI (`.eh_frame`).
    Dwarf,
    /// `dwarf` when targets are given (-p, -t, a command), `fp` for the whole system.
    Auto,
}

/// The unwinding options `profile` and `offcpu` share.
#[derive(clap::Args, Debug, Clone)]
pub struct UnwindArgs {
    /// How user stacks are walked: `fp` follows frame pointers in the kernel (cheap, but stops
    /// early in code built without them); `dwarf` copies the top of the stack and unwinds it here
    /// with the binaries' .eh_frame; `auto`: fp for the whole system; for -p/-t/a command, dwarf in
    /// profile, and in offcpu dwarf only if the target's code lacks frame pointers.
    #[arg(long = "unwind", value_enum, default_value_t = UnwindMode::Auto)]
    pub unwind: UnwindMode,
    /// With dwarf unwinding: bytes of user stack copied per sample or switch-out (at most 16k).
    #[arg(long = "stack-copy-size", value_name = "BYTES", default_value = "16k",
          value_parser = parse_stack_copy_size)]
    pub stack_copy_size: u32,
    /// With dwarf unwinding: size of the ring buffer carrying stack copies to user space
    /// (rounded up to a power of two).
    #[arg(long = "unwind-buffer-size", value_name = "BYTES", default_value = "8m",
          value_parser = parse_buffer_size)]
    pub unwind_buffer_size: u32,
}

impl UnwindArgs {
    /// profile's rule: whether user stacks are copied and unwound here (`auto`: when targets are
    /// given; offcpu's `auto` also looks for frame pointers).
    pub fn dwarf(&self, target: &crate::session::targets::Target, stack_kinds: u8) -> bool {
        let wanted = match self.unwind {
            UnwindMode::Fp => false,
            UnwindMode::Dwarf => true,
            UnwindMode::Auto => *target != crate::session::targets::Target::System,
        };
        wanted && stack_kinds & STACK_KIND_USER != 0
    }

    /// The footer's line on how user stacks were walked; `why`: what `auto` went by;
    /// `dwarf_possible`: whether to suggest `--unwind dwarf` (offcpu --wakers cannot use it).
    pub fn describe(
        &self,
        dwarf: bool,
        stack_kinds: u8,
        why: Option<&str>,
        dwarf_possible: bool,
    ) -> String {
        let flag = match why {
            Some(why) => format!("--unwind auto: {why}"),
            None if dwarf => "--unwind dwarf".into(),
            None => "--unwind fp".into(),
        };
        if dwarf {
            format!(
                "unwound with DWARF CFI (.eh_frame) from {} KiB stack copies ({flag})",
                self.stack_copy_size / 1024
            )
        } else if stack_kinds & STACK_KIND_USER != 0 && dwarf_possible {
            format!(
                "frame pointers, walked in the kernel ({flag}); code built without them shows \
                 short stacks: try --unwind dwarf"
            )
        } else if stack_kinds & STACK_KIND_USER != 0 {
            format!(
                "frame pointers, walked in the kernel ({flag}); code built without them shows \
                 short stacks"
            )
        } else {
            "not collected (-K)".into()
        }
    }
}

/// `16384`, `16k`: a multiple of 8 bytes from 512 to 16 KiB (a per-CPU map value's limit).
fn parse_stack_copy_size(text: &str) -> Result<u32, String> {
    let bytes = parse_bytes(text)?;
    if !(512..=u64::from(MAX_STACK_COPY)).contains(&bytes) {
        return Err(format!(
            "{text} is out of range: the stack copy is 512 bytes to 16k"
        ));
    }
    Ok((bytes / 8 * 8) as u32)
}

/// `8m`, `65536`: rounded up to a power of two, 64 KiB to 1 GiB.
fn parse_buffer_size(text: &str) -> Result<u32, String> {
    let bytes = parse_bytes(text)?;
    if !(64 * 1024..=1 << 30).contains(&bytes) {
        return Err(format!("{text} is out of range: 64k to 1g"));
    }
    Ok(bytes.next_power_of_two() as u32)
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (digits, scale) = match lower.strip_suffix(['k', 'm', 'g']) {
        Some(d) if lower.ends_with('k') => (d, 1 << 10),
        Some(d) if lower.ends_with('m') => (d, 1 << 20),
        Some(d) => (d, 1 << 30),
        None => (lower.as_str(), 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text} is not a size in bytes (e.g. 16k, 8m, 4096)"))
}

/// The deepest stack unwound here. Deeper than the kernel's frame-pointer walks (127 frames):
/// a 16 KiB copy holds a few hundred frames of ordinary code.
pub const MAX_FRAMES: usize = 512;
/// Why a stack is cut short at [`MAX_FRAMES`].
const TOO_DEEP: &str = "deeper than 512 frames, the most unwound: its outermost frames are missing";
/// How long the drain thread sleeps when the ring buffer is empty.
const POLL: Duration = Duration::from_millis(5);
/// How long after its exec a process's map is read again at every poll (then polled every
/// [`YOUNG_POLL`]): ld.so and early dlopen()s map its libraries then, and a short-lived child
/// may exit within milliseconds, after which its map can no longer be read.
const YOUNG: Duration = Duration::from_millis(250);
const YOUNG_POLL: Duration = Duration::from_millis(1);
/// A process's mappings are re-read when a walk reaches an address outside them: a library
/// mapped since they were read (a `dlopen`, or ld.so still at work when the first stack of a
/// new process came in). The first time at once, then, while re-reading finds nothing new (a
/// walk gone astray keeps producing such addresses), less and less often: the wait doubles from
/// `MIN_REFRESH` up to `MAX_REFRESH`, and starts over when a re-read finds the address.
const MIN_REFRESH: Duration = Duration::from_millis(5);
const MAX_REFRESH: Duration = Duration::from_millis(500);
/// Synthetic user stack ids start here, far above any id `bpf_get_stackid` hands out.
pub const FIRST_SYNTHETIC_ID: u32 = 0x4000_0000;

/// Why an unwound stack stops before its root.
pub type CutShort = String;

/// A distinct sample: who, where in the kernel, the user addresses (leaf first), and why the user
/// stack is incomplete (`None`: it ended at its root).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SampleKey {
    tgid: u32,
    tid: u32,
    kernel_stack_id: i32,
    comm: [u8; 16],
    user: Result<Vec<u64>, i32>,
    cut_short: Option<CutShort>,
}

/// The aggregated result of a capture's unwinding.
#[derive(Clone, Default)]
pub struct Unwound {
    counts: HashMap<SampleKey, u64>,
    /// Off-CPU: each blocked thread's stack, by tid, with its switch-out time, until the block's
    /// end brings its weight.
    pending: HashMap<u32, (u64, SampleKey)>,
    /// Samples that could not be parsed (never expected: a layout mismatch).
    pub malformed: u64,
    /// Off-CPU: blocks whose end came without their stack (its copy was lost to a full ring
    /// buffer, counted there), and the nanoseconds they lasted.
    pub unmatched_blocks: u64,
    pub unmatched_block_ns: u64,
}

impl Unwound {
    /// Adds the weight of the block that `tid` began at `start_ns` to the stack it blocked in;
    /// `false` when that stack never arrived (its block is then counted as unmatched).
    pub fn end_block(&mut self, tid: u32, start_ns: u64, weight: u64) -> bool {
        match self.pending.get(&tid) {
            Some((start, _)) if *start == start_ns => {
                let (_, key) = self.pending.remove(&tid).expect("just looked up");
                *self.counts.entry(key).or_default() += weight;
                true
            }
            _ => {
                self.unmatched_blocks += 1;
                self.unmatched_block_ns += weight;
                false
            }
        }
    }

    /// The stack keys (with synthetic user stack ids), their counts, the synthetic traces (leaf
    /// first) and, by synthetic id, why a trace stops short.
    #[expect(clippy::type_complexity, reason = "three parallel outputs, used once")]
    pub fn into_entries(
        self,
    ) -> (
        Vec<(StackKey, u64)>,
        HashMap<u32, Vec<u64>>,
        HashMap<u32, CutShort>,
    ) {
        let mut ids: HashMap<(Vec<u64>, Option<CutShort>), u32> = HashMap::new();
        let mut traces = HashMap::new();
        let mut cut = HashMap::new();
        let mut entries = Vec::with_capacity(self.counts.len());
        for (key, count) in self.counts {
            let user_stack_id = match key.user {
                Err(id) => id,
                Ok(addrs) => {
                    let next = FIRST_SYNTHETIC_ID + ids.len() as u32;
                    let id = *ids
                        .entry((addrs.clone(), key.cut_short.clone()))
                        .or_insert(next);
                    traces.insert(id, addrs);
                    if let Some(cause) = key.cut_short {
                        cut.insert(id, cause);
                    }
                    id as i32
                }
            };
            entries.push((
                StackKey {
                    tgid: key.tgid,
                    tid: key.tid,
                    user_stack_id,
                    kernel_stack_id: key.kernel_stack_id,
                    comm: key.comm,
                },
                count,
            ));
        }
        (entries, traces, cut)
    }
}

/// Why a stack is cut short when its copy was the stack copy's full size.
const COPY_TOO_SMALL: &str = "stack copy too small (raise --stack-copy-size)";
/// The same when that size is the largest there is: nothing to raise.
const DEEPER_THAN_ANY_COPY: &str = "stack deeper than the largest stack copy (16 KiB): its \
     outermost frames are missing";
/// Why it is cut short when the copy was sized from the thread's earlier stacks.
const COPY_SIZED_TOO_SMALL: &str =
    "stack deeper than this thread's earlier ones (its next copies are whole)";
/// Headroom above the deepest stack a thread has needed so far.
const COPY_MARGIN: u32 = 1024;

/// `--unwind dwarf`: how much stack to copy at each thread's next sample or switch-out. Most
/// stacks need a few hundred bytes to a few KiB of the up to 16 KiB a whole copy takes
/// (everything up to the stack's top: the environment, a thread's TLS), and the copy is most of
/// the cost of a sample or switch. A thread's first copy is whole; after each complete unwind its size is the deepest
/// stack it has needed plus [`COPY_MARGIN`], never shrinking; a stack cut short by that size is
/// counted as such, and the thread's copies are whole again once that is seen here (the blocks
/// it starts within the few milliseconds before are cut short too, and counted alike).
pub struct CopyLimits {
    map: aya::maps::HashMap<MapData, u32, u32>,
    whole: u32,
    set: HashMap<u32, u32>,
}

impl CopyLimits {
    pub fn new(map: aya::maps::HashMap<MapData, u32, u32>, whole: u32) -> Self {
        Self {
            map,
            whole,
            set: HashMap::new(),
        }
    }

    fn learn(&mut self, header: &UnwindSampleHeader, key: &mut SampleKey, used: usize) {
        let current = self.set.get(&header.tid).copied();
        let new = match key.cut_short.as_deref() {
            Some(COPY_TOO_SMALL) if header.stack_len < self.whole && current.is_some() => {
                key.cut_short = Some(COPY_SIZED_TOO_SMALL.into());
                self.whole
            }
            Some(COPY_TOO_SMALL) if self.whole >= MAX_STACK_COPY => {
                key.cut_short = Some(DEEPER_THAN_ANY_COPY.into());
                return;
            }
            None => {
                let needed = u32::try_from(used).unwrap_or(u32::MAX);
                needed
                    .saturating_add(COPY_MARGIN)
                    .next_multiple_of(256)
                    .min(self.whole)
            }
            Some(_) => return,
        };
        if current.is_some_and(|c| c >= new) {
            return;
        }
        // A full map leaves the thread's copies whole: nothing is lost, only time.
        if self.map.insert(header.tid, new, 0).is_ok() {
            self.set.insert(header.tid, new);
        }
    }
}

/// A process's executable mappings, as the unwinding thread read them.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    pub files: Vec<Mapping>,
    pub anonymous: Vec<Range<u64>>,
}

/// What the unwinding thread learnt of processes since it was last asked.
#[derive(Default)]
struct Sightings {
    /// Processes sampled (to snapshot their maps for symbolisation).
    pids: HashSet<u32>,
    /// The memory maps it read, newest for each process: a process that has exited since is
    /// still named with the map its stacks were unwound against (libraries it loaded late
    /// included).
    maps: HashMap<u32, ProcessMaps>,
}

/// The drain-and-unwind thread of a capture.
pub struct Collector {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Sightings>>,
    /// Updated by the thread after each batch, so a snapshot can be read mid-capture.
    unwound: Arc<Mutex<Unwound>>,
    thread: JoinHandle<()>,
}

impl Collector {
    /// Starts draining `ring`. `per_thread` keeps thread ids in the keys. `limits`: the
    /// per-thread copy sizes, learnt here from the stacks unwound.
    pub fn start(
        ring: RingBuf<MapData>,
        per_thread: bool,
        limits: Option<CopyLimits>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Sightings::default()));
        let unwound = Arc::new(Mutex::new(Unwound::default()));
        let thread = std::thread::Builder::new().name("unwind".into()).spawn({
            let (stop, seen, unwound) = (stop.clone(), seen.clone(), unwound.clone());
            move || drain_loop(ring, per_thread, limits, &stop, &seen, &unwound)
        })?;
        Ok(Self {
            stop,
            seen,
            unwound,
            thread,
        })
    }

    /// What has been unwound so far (for a SIGUSR1 snapshot); the capture goes on.
    pub fn snapshot(&self) -> Unwound {
        self.unwound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tells the symbolizer what was learnt since the last call: the processes sampled (it
    /// snapshots their maps while they live) and the maps read here.
    pub fn tell(&self, symbolizer: &mut Symbolizer) {
        tell(&self.seen, symbolizer);
    }

    /// Drains what is left, tells the symbolizer what that taught, and returns the aggregated
    /// stacks. Call after the BPF program has stopped recording.
    pub fn finish(self, symbolizer: &mut Symbolizer) -> anyhow::Result<Unwound> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the unwinding thread panicked"))?;
        tell(&self.seen, symbolizer);
        Ok(std::mem::take(
            &mut *self.unwound.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

fn tell(seen: &Mutex<Sightings>, symbolizer: &mut Symbolizer) {
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
    for pid in seen.pids {
        symbolizer.note_process(pid);
    }
    for (pid, maps) in seen.maps {
        symbolizer.learn_mappings(pid, maps.files, maps.anonymous);
    }
}

fn drain_loop(
    mut ring: RingBuf<MapData>,
    per_thread: bool,
    mut limits: Option<CopyLimits>,
    stop: &AtomicBool,
    seen: &Mutex<Sightings>,
    shared: &Mutex<Unwound>,
) {
    let mut unwinder = DwarfUnwinder::default();
    loop {
        // Read the flag before draining, so that the last drain follows the stop.
        let stopping = stop.load(Ordering::Acquire);
        let mut drained = 0usize;
        let mut new_pids = Vec::new();
        let mut out = shared.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(item) = ring.next() {
            drained += 1;
            let Some((header, mut key)) = unwinder.record(&item, per_thread) else {
                out.malformed += 1;
                continue;
            };
            if let (Some(limits), Some(key)) = (&mut limits, &mut key) {
                limits.learn(&header, key, unwinder.stack_used);
            }
            if unwinder.noted.insert(header.tgid) {
                new_pids.push(header.tgid);
            }
            match (header.kind, key) {
                (RECORD_SAMPLE, Some(key)) => *out.counts.entry(key).or_default() += header.weight,
                (RECORD_BLOCK_START, Some(key)) => {
                    out.pending.insert(header.tid, (header.start_ns, key));
                }
                (RECORD_BLOCK_END, _) => {
                    out.end_block(header.tid, header.start_ns, header.weight);
                }
                // What follows runs another program: forget the old one's memory map.
                (RECORD_EXEC, _) => unwinder.exec(header.tgid),
                (RECORD_FORK, _) => unwinder.fork(header.tgid, header.weight as u32),
                _ => out.malformed += 1,
            }
        }
        drop(out);
        if !new_pids.is_empty() || !unwinder.fresh_maps.is_empty() {
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.pids.extend(new_pids);
            seen.maps.extend(unwinder.fresh_maps.drain());
        }
        if stopping {
            return;
        }
        let young = unwinder.reread_young();
        if drained == 0 {
            std::thread::sleep(if young { YOUNG_POLL } else { POLL });
        }
    }
}

/// A module's bytes: a range of a file mapped once and shared (or of synthesized CFI).
#[derive(Clone)]
struct Bytes {
    data: Arc<dyn Deref<Target = [u8]> + Send + Sync>,
    range: Range<usize>,
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

/// CPython 3.12's `-X perf` trampoline on x86-64 (Python/asm_trampoline.S), copied once per
/// Python function into an anonymous mapping: `sub $8,%rsp; call *%rcx; add $8,%rsp; ret`.
/// It keeps no frame pointer, so the frame-pointer fallback cannot step over it; its unwind rule
/// is fixed, though (CFA = rsp + 16, return address at CFA - 8), and is given to framehop as a
/// synthesized `.eh_frame` covering the mapping.
const CPYTHON_TRAMPOLINE: [u8; 11] = [
    0x48, 0x83, 0xec, 0x08, 0xff, 0xd1, 0x48, 0x83, 0xc4, 0x08, 0xc3,
];

/// Section info for a module whose only unwind information is `eh_frame` (synthesized here, at
/// address 0 of the module).
fn eh_frame_only(eh_frame: Vec<u8>) -> ExplicitModuleSectionInfo<Bytes> {
    let len = eh_frame.len();
    ExplicitModuleSectionInfo::<Bytes> {
        eh_frame_svma: Some(0..len as u64),
        eh_frame: Some(Bytes {
            data: Arc::new(eh_frame),
            range: 0..len,
        }),
        ..ExplicitModuleSectionInfo::default()
    }
}

/// An `.eh_frame` with one CIE and one FDE covering `range` (module-relative) with the rule
/// CFA = rsp + `cfa_offset`, return address at CFA - 8.
fn synthetic_eh_frame(range: &Range<u64>, cfa_offset: u8) -> Vec<u8> {
    let mut cie = vec![
        0, 0, 0, 0, // CIE id
        1, // version
        b'z', b'R', 0,    // augmentation: has data, FDE pointer encoding
        1,    // code alignment
        0x78, // data alignment -8
        16,   // return address register (rip)
        1,    // augmentation data length
        0x04, // FDE pointers: DW_EH_PE_udata8, absolute
        0x0c, 7, cfa_offset, // DW_CFA_def_cfa rsp, cfa_offset
        0x90, 1, // DW_CFA_offset rip, CFA - 8
    ];
    cie.resize(cie.len().div_ceil(8) * 8 + 4, 0); // DW_CFA_nop; length field makes it 8n
    let mut out = Vec::new();
    out.extend((cie.len() as u32).to_le_bytes());
    out.extend(&cie);
    let fde_start = out.len();
    let mut fde = Vec::new();
    fde.extend(((fde_start + 4) as u32).to_le_bytes()); // back to the CIE
    fde.extend(range.start.to_le_bytes());
    fde.extend((range.end - range.start).to_le_bytes());
    fde.push(0); // augmentation data length
    fde.resize(fde.len().div_ceil(8) * 8 + 4, 0);
    out.extend((fde.len() as u32).to_le_bytes());
    out.extend(&fde);
    out.extend(0u32.to_le_bytes()); // terminator
    out
}

/// A framehop module for an anonymous mapping that holds only CPython trampolines.
fn cpython_trampolines(pid: u32, range: &Range<u64>) -> Option<Module<Bytes>> {
    use std::os::unix::fs::FileExt as _;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut code = [0u8; CPYTHON_TRAMPOLINE.len()];
    if let Err(err) = mem.read_exact_at(&mut code, range.start) {
        log::debug!("pid {pid}: cannot read code at {:#x}: {err}", range.start);
        return None;
    }
    if code != CPYTHON_TRAMPOLINE {
        return None;
    }
    log::debug!("pid {pid}: CPython trampolines at {range:x?}");
    // framehop looks addresses up relative to the module's base, in 32 bits: the FDE covers
    // 0..size, and the module's base is the mapping's start.
    let eh_frame = synthetic_eh_frame(&(0..range.end - range.start), 16);
    let info = eh_frame_only(eh_frame);
    Some(Module::new(
        "[cpython perf trampolines]".into(),
        range.clone(),
        range.start,
        info,
    ))
}

/// What unwinding needs from one ELF file, found once per file.
struct ElfUnwindInfo {
    map: Arc<memmap2::Mmap>,
    /// (vaddr, file offset, file size) of each PT_LOAD segment, to place the file in a process.
    segments: Vec<(u64, u64, u64)>,
    /// (section, address range, file range) for .text, .eh_frame, .eh_frame_hdr, .got.
    sections: Vec<(&'static str, Range<u64>, Range<usize>)>,
    debug_frame: Option<Range<usize>>,
    /// The ELF entry point (`e_entry`), where the kernel starts a program (or its interpreter):
    /// nothing called it, so a walk that reaches it is complete.
    entry: u64,
}

impl ElfUnwindInfo {
    fn open(path: &Path) -> Result<Self, String> {
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

    fn has_cfi(&self) -> bool {
        self.debug_frame.is_some() || self.sections.iter().any(|(n, ..)| *n == ".eh_frame")
    }

    fn bytes(&self, range: &Range<usize>) -> Bytes {
        Bytes {
            data: self.map.clone(),
            range: range.clone(),
        }
    }

    /// The module for a mapping of this file at `start..end` from file offset `offset`.
    fn module(&self, name: &str, start: u64, end: u64, offset: u64) -> Option<Module<Bytes>> {
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

/// One process's view: its unwinder and what lies where.
#[derive(Clone)]
struct ProcessUnwinder {
    unwinder: UnwinderX86_64<Bytes>,
    /// The executable file mappings as read, for the symbolizer.
    mappings: Vec<Mapping>,
    /// Executable file mappings: range and the file's name, and whether it has CFI.
    files: Vec<(Range<u64>, Arc<str>, bool)>,
    /// Executable anonymous mappings (JIT code).
    anonymous: Vec<Range<u64>>,
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
    fresh_maps: HashMap<u32, ProcessMaps>,
    cache: CacheX86_64,
    noted: HashSet<u32>,
    /// Bytes above sp the last walk read: how much of its copy the stack needed.
    stack_used: usize,
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

    /// `pid` has exec'd: its next stack is read against its new mappings, read now and then
    /// again at every poll while it is young.
    fn exec(&mut self, pid: u32) {
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
    fn fork(&mut self, child: u32, parent: u32) {
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
    fn reread_young(&mut self) -> bool {
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
    fn record(
        &mut self,
        record: &[u8],
        per_thread: bool,
    ) -> Option<(UnwindSampleHeader, Option<SampleKey>)> {
        let header_bytes = record.get(..HEADER_LEN)?;
        // SAFETY: `UnwindSampleHeader` is plain integers; read_unaligned copes with alignment.
        let header: UnwindSampleHeader =
            unsafe { std::ptr::read_unaligned(header_bytes.as_ptr().cast()) };
        if matches!(header.kind, RECORD_BLOCK_END | RECORD_EXEC | RECORD_FORK) {
            return Some((header, None));
        }
        let key = self.sample(&header, record, per_thread)?;
        Some((header, Some(key)))
    }

    /// Unwinds the stack of a sample (or block start) record.
    fn sample(
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
    fn unwind(
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

    fn walk(
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
                    // The program's (or ld.so's) entry point: a thread stopped right after exec,
                    // where the default CFI rule would read argc as a return address.
                    if process.entries.contains(&frame.address()) || addrs.len() >= MAX_FRAMES {
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
    fn cause(
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
            Place::Anonymous if !crate::perf_map::PerfMap::exists(pid) => {
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

impl ProcessUnwinder {
    fn empty() -> Self {
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

    fn place(&self, addr: u64) -> Place {
        if let Some((_, name, cfi)) = self.files.iter().find(|(r, ..)| r.contains(&addr)) {
            return Place::File(name.clone(), *cfi);
        }
        if self.anonymous.iter().any(|r| r.contains(&addr)) {
            return Place::Anonymous;
        }
        Place::Unmapped
    }
}

/// What to add to an address in the ELF file's address space to get the address where a mapping
/// of it (`start..end`, from file offset `offset`) put it. The mapping is of the segment that
/// starts in its first page: a segment's file offset need not be page-aligned (lld and ld's
/// `-z separate-code` put the code segment at 0x18d10 of the file and 0x19d10 in memory, mapped
/// from offset 0x18000), so the segment is not simply the one whose file range holds `offset`
/// (that one is the read-only segment before it, 0x1000 off).
fn load_bias(segments: &[(u64, u64, u64)], start: u64, end: u64, offset: u64) -> Option<u64> {
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

#[cfg(test)]
mod trampoline_tests {
    use super::*;

    /// The synthesized CFI steps over a CPython trampoline frame: CFA = rsp + 16.
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

    #[test]
    fn synthetic_cfi_steps_over_a_trampoline() {
        let range = 0x10_0000..0x10_1000;
        let eh_frame = synthetic_eh_frame(&range, 16);
        let info = eh_frame_only(eh_frame);
        let mut unwinder = UnwinderX86_64::new();
        unwinder.add_module(Module::new("t".into(), range.clone(), 0, info));
        let mut cache = CacheX86_64::new();
        // sp -> [padding][return address 0x2222][...]
        let stack = [0u64, 0x2222, 0, 0];
        let sp = 0x8000;
        let mut read = |addr: u64| -> Result<u64, ()> {
            stack.get(((addr - sp) / 8) as usize).copied().ok_or(())
        };
        let mut frames = unwinder.iter_frames(
            0x10_0006,
            UnwindRegsX86_64::new(0x10_0006, sp, 0),
            &mut cache,
            &mut read,
        );
        let mut addrs = Vec::new();
        let error = loop {
            match frames.next() {
                Ok(Some(f)) => addrs.push(f.address()),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        assert_eq!(addrs.get(..2), Some(&[0x10_0006, 0x2222][..]), "{error:?}");
    }
}
