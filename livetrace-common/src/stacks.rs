//! Stack-sampling types shared by `profile` (weight: samples) and `offcpu` (weight: microseconds).
//!
//! The kernel aggregates: one `STACK_COUNTS` entry per distinct (process, thread, user stack,
//! kernel stack), and `bpf_get_stackid` deduplicates the stacks themselves in `STACK_TRACES`.
//! A failed stack walk does not drop the sample: the negated errno is stored in place of the
//! stack id, so user space can report every loss by cause and weight.

/// A one-slot map of maps holding the map of [`StackKey`] to its weight (`u64`) that the
/// programs add to (user space swaps it to cut `record`'s buckets).
pub const STACK_COUNTS: &str = "STACK_COUNTS";
/// `BPF_MAP_TYPE_STACK_TRACE` holding the stacks that [`StackKey`] ids refer to.
pub const STACK_TRACES: &str = "STACK_TRACES";
/// Per-CPU `u64` counters indexed by [`Counter`].
pub const COUNTERS: &str = "COUNTERS";
/// Process ids (tgids) to sample when [`FILTER_TARGETS`] is set; `u32 -> u8`.
pub const TARGET_TGIDS: &str = "TARGET_TGIDS";
/// Thread ids to sample when [`FILTER_TARGETS`] is set; `u32 -> u8`.
pub const TARGET_TIDS: &str = "TARGET_TIDS";

/// Processes already seen (`u32` tgid -> `u8`): the first event of a process also sends its
/// tgid to [`NEW_PROCESSES`], so user space reads its memory map while it still lives, however
/// short its life.
pub const SEEN_PROCESSES: &str = "SEEN_PROCESSES";
/// Ring buffer of `u32` tgids, each sent once, when the process is first seen.
pub const NEW_PROCESSES: &str = "NEW_PROCESSES";
/// Capacity of [`SEEN_PROCESSES`]; processes beyond it are only found by the once-a-second scan.
pub const MAX_SEEN_PROCESSES: u32 = 16 * 1024;
/// Size of [`NEW_PROCESSES`] in bytes (a power-of-two multiple of the page size).
pub const NEW_PROCESSES_BYTES: u32 = 64 * 1024;

/// Load-time global (`u32`): the pid of a command livetrace started held (`-- COMMAND`), 0 if
/// none. Until that process execs the command, it is livetrace's own waiting shim, and nothing
/// of it is recorded; from its exec on ([`HELD_COMMAND_STARTED`]) it is a target like any other.
pub const HELD_COMMAND: &str = "HELD_COMMAND";
/// One-slot `u32` array: 1 once the held command has exec'd (set by the exec program, or by
/// user space where that program cannot be attached).
pub const HELD_COMMAND_STARTED: &str = "HELD_COMMAND_STARTED";

/// Load-time global (`u8`): nonzero means sample only the threads in [`TARGET_TGIDS`] or
/// [`TARGET_TIDS`]; zero means every thread the attached perf events see.
pub const FILTER_TARGETS: &str = "FILTER_TARGETS";
/// Load-time global (`u8`): bit 0 collect user stacks, bit 1 collect kernel stacks.
pub const STACK_KINDS: &str = "STACK_KINDS";
/// Load-time global (`u8`): nonzero keeps the thread id in [`StackKey::tid`].
pub const PER_THREAD: &str = "PER_THREAD";

pub const STACK_KIND_USER: u8 = 1;
pub const STACK_KIND_KERNEL: u8 = 2;

/// Default capacity of [`STACK_COUNTS`] and [`STACK_TRACES`]; `--stack-storage-size` changes it.
pub const DEFAULT_STACK_STORAGE: u32 = 16 * 1024;
/// Capacity of the target filter maps.
pub const MAX_TARGETS: u32 = 4096;

/// Stored in `user_stack_id` by user space for a thread found already blocked when the capture
/// began: its stacks were recovered from /proc instead of by the BPF program.
pub const STACK_ID_RECOVERED: i32 = i32::MIN + 1;

/// Stored in `user_stack_id` of an off-CPU start by `--unwind dwarf`: the user stack went to
/// user space as a stack copy, to be unwound there.
pub const STACK_ID_UNWOUND: i32 = i32::MIN + 2;

/// Stored in a stack id field when that stack was not asked for (`-U`, `-K`), or when a sample
/// taken in user mode has no kernel stack to walk. Not a loss.
pub const STACK_ID_NOT_COLLECTED: i32 = i32::MIN;

/// `errno` values `bpf_get_stackid` returns (negated) that user space tells apart.
pub mod stack_errno {
    /// The walk found no frames, or faulted (no user stack: kernel thread; or an unreadable frame).
    pub const EFAULT: i32 = 14;
    /// A different stack already holds this hash bucket: a collision, the stack is lost.
    pub const EEXIST: i32 = 17;
    /// The stack-trace map is full.
    pub const ENOMEM: i32 = 12;
    /// Not from the kernel: offcpu's stack copy could not be sent, the unwind ring buffer was
    /// full.
    pub const ENOSPC: i32 = 28;
}

/// One aggregation key: who was running (or blocked), and where.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    /// Process id (tgid).
    pub tgid: u32,
    /// Thread id, or 0 unless per-thread output was asked for.
    pub tid: u32,
    /// Id in [`STACK_TRACES`], a negated errno, or [`STACK_ID_NOT_COLLECTED`].
    pub user_stack_id: i32,
    /// As `user_stack_id`, for the kernel stack.
    pub kernel_stack_id: i32,
    /// The thread's `comm` at the time, NUL-padded.
    pub comm: [u8; 16],
}

/// Indices into [`COUNTERS`]. Every event the BPF programs see lands in exactly one of the
/// "outcome" counters, so user space can check that nothing went missing.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every time a program ran (a perf sample, a context switch).
    Events = 0,
    /// Outcome: on an idle CPU (pid 0), not recorded.
    Idle = 1,
    /// Outcome: a thread that is not a target, not recorded.
    NotTarget = 2,
    /// Outcome: added to [`STACK_COUNTS`].
    Recorded = 3,
    /// Outcome: [`STACK_COUNTS`] was full, the event is lost.
    CountsMapFull = 4,
    /// offcpu: a switch-out in a state `--state` leaves out (not recorded).
    StateFiltered = 5,
    /// offcpu: a block shorter than `--min-block` or longer than `--max-block` (not recorded).
    BlockFiltered = 6,
    /// offcpu: the map of threads currently off-CPU was full; that block is lost.
    StartMapFull = 7,
    /// offcpu: a target switched in with no recorded switch-out (it was already off-CPU when
    /// the capture began, and was not found by the start-up scan).
    UnmatchedSwitchIn = 8,
    /// offcpu --wakers: the waker map was full; the block is recorded without its waker.
    WakerMapFull = 9,
    /// offcpu --wakers: the map of blocked/waker stack pairs was full; the block is lost.
    WakeCountsMapFull = 10,
    /// Outcome: a kernel thread, left out unless asked for (not recorded).
    KernelThread = 11,
    /// `--unwind dwarf`: the ring buffer was full and a record without a stack (a block's end, an
    /// exec) is lost.
    UnwindRingFull = 12,
    /// Not an outcome: `--unwind dwarf`'s per-CPU scratch buffer was missing (never expected);
    /// the sample or block is kept under a user stack marked lost, as for [`Self::StackCopyLost`].
    UnwindScratchMissing = 13,
    /// Not an outcome: a process seen for the first time could not be announced to user space
    /// ([`SEEN_PROCESSES`] or [`NEW_PROCESSES`] full); its memory map is read at the next
    /// once-a-second scan instead, which a short-lived process may not live to see.
    NewProcessNotAnnounced = 14,
    /// Not an outcome: `--unwind dwarf` could not send a stack copy (the ring buffer was full);
    /// its sample or block is kept, under a user stack marked lost (`-ENOSPC`).
    StackCopyLost = 15,
    /// Not an outcome: a child of a target could not be made a target ([`TARGET_TGIDS`] full);
    /// its events are not recorded.
    TargetMapFull = 16,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 17;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` plain integers and byte arrays without padding.
    unsafe impl aya::Pod for super::StackKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key has no implicit padding, so the kernel hashes every byte deterministically.
    #[test]
    fn stack_key_has_no_padding() {
        assert_eq!(core::mem::size_of::<StackKey>(), 4 * 4 + 16);
    }
}
