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

mod collector;
mod cpython;
mod elf;
mod limits;
mod python;
mod unwinder;

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use livetrace_common::{
    stacks::{STACK_KIND_USER, StackKey},
    unwind::MAX_STACK_COPY,
};

pub use self::{
    collector::{Collector, ProcessMaps},
    limits::CopyLimits,
    unwinder::DwarfUnwinder,
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

pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
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
    /// The Python frames in the stacks, by the index their tagged values carry
    /// ([`crate::python::merge::PYTHON_TAG`]), and that index by frame.
    pub python_frames: Vec<crate::python::PythonFrame>,
    python_ids: HashMap<crate::python::PythonFrame, u32>,
    /// Samples of Python processes without some or all of their Python frames, by cause.
    pub python_losses: BTreeMap<String, u64>,
    /// Off-CPU: blocks whose end came without their stack (its copy was lost to a full ring
    /// buffer, counted there), and the nanoseconds they lasted.
    pub unmatched_blocks: u64,
    pub unmatched_block_ns: u64,
    /// Python's names of the threads of the interpreters read, by tid.
    pub thread_names: HashMap<u32, String>,
}

impl Unwound {
    /// What was aggregated since the last take, leaving the blocks still going on (and the
    /// Python frames, which tags of later stacks index) for the next: `record`'s time buckets.
    pub fn take(&mut self) -> Unwound {
        Unwound {
            counts: std::mem::take(&mut self.counts),
            pending: HashMap::new(),
            malformed: std::mem::take(&mut self.malformed),
            python_frames: self.python_frames.clone(),
            python_ids: HashMap::new(),
            python_losses: std::mem::take(&mut self.python_losses),
            unmatched_blocks: std::mem::take(&mut self.unmatched_blocks),
            unmatched_block_ns: std::mem::take(&mut self.unmatched_block_ns),
            thread_names: self.thread_names.clone(),
        }
    }

    /// The index of `frame` among the capture's Python frames.
    fn intern_python(&mut self, frame: crate::python::PythonFrame) -> u32 {
        if let Some(&id) = self.python_ids.get(&frame) {
            return id;
        }
        let id = self.python_frames.len() as u32;
        self.python_frames.push(frame.clone());
        self.python_ids.insert(frame, id);
        id
    }

    fn lose_python(&mut self, cause: &str, weight: u64) {
        *self.python_losses.entry(cause.to_owned()).or_default() += weight;
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// offcpu --unwind dwarf: a block's end joins the stack its thread switched out with, by
    /// thread and switch-out time; an end whose stack never came (a lost copy) is counted with
    /// its time, not given to another block.
    #[test]
    fn block_ends_join_their_starts() {
        let key = SampleKey {
            tgid: 10,
            tid: 11,
            kernel_stack_id: -1,
            comm: [0; 16],
            user: Ok(vec![0x1234]),
            cut_short: None,
        };
        let mut unwound = Unwound::default();
        unwound.pending.insert(11, (100, key.clone()));
        assert!(!unwound.end_block(11, 99, 5), "another block's end");
        assert!(unwound.end_block(11, 100, 7));
        assert!(!unwound.end_block(11, 100, 3), "a start is joined once");
        assert!(!unwound.end_block(12, 1, 2), "a thread with no start");
        assert_eq!(unwound.counts.get(&key), Some(&7));
        assert_eq!(
            (unwound.unmatched_blocks, unwound.unmatched_block_ns),
            (3, 10)
        );
        let (entries, traces, _) = unwound.into_entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1, 7);
        let id = u32::try_from(entries[0].0.user_stack_id).unwrap();
        assert_eq!(traces.get(&id), Some(&vec![0x1234]));
    }
}
