//! Types shared by `livetrace uprobe-hist`'s BPF programs and its loader.
//!
//! The entry probe pushes (entry time, stack pointer) on a small per-thread stack; the return
//! probe pops back to the entry whose stack pointer matches its own, so recursion pairs each
//! return with its own entry, and entries whose return never came (longjmp, exceptions, the
//! kernel's uretprobe nesting limit) are found and counted instead of being paired wrongly. The
//! latency goes into a per-CPU log-linear histogram ([`crate::histogram`]) with exact count, sum,
//! min and max; calls slower than [`SLOW_NS`] also go to a ring buffer with their caller's stack.

use crate::histogram::BUCKETS;

/// Per-CPU array with one [`LatencyHistogram`].
pub const HISTOGRAM: &str = "UPROBE_HIST";
/// Per-CPU array with one [`Window`]: min and max since user space last reset it (`-i`).
pub const WINDOW: &str = "UPROBE_WINDOW";
/// Hash map of thread id (`u32`) to its [`ThreadCalls`].
pub const THREADS: &str = "UPROBE_THREADS";
/// Per-CPU array with one [`ThreadCalls`], used to create a thread's entry (the value is too
/// large for the 512-byte BPF stack).
pub const THREAD_SCRATCH: &str = "UPROBE_THREAD_SCRATCH";
/// Ring buffer of [`SlowCall`] records (`--slow`).
pub const SLOW_CALLS: &str = "UPROBE_SLOW_CALLS";
/// `BPF_MAP_TYPE_STACK_TRACE` holding the slow calls' caller stacks.
pub const STACKS: &str = "UPROBE_STACKS";
/// Per-CPU `u64` counters indexed by [`Counter`].
pub const COUNTERS: &str = "UPROBE_COUNTERS";

/// Load-time global (`u64`): calls at least this long (ns) are sent to [`SLOW_CALLS`]; 0 = off.
pub const SLOW_NS: &str = "UPROBE_SLOW_NS";

// Spans between two USDT probes (`--from`, `--to`), and their breakdown by an argument (`--by`).

/// Hash map of thread id (`u32`) to its [`OpenSpan`]: one span open per thread.
pub const SPANS: &str = "UPROBE_SPANS";
/// Per-CPU array with one [`OpenSpan`], where the `--from` probe builds a span (with its key)
/// before storing it.
pub const SPAN_SCRATCH: &str = "UPROBE_SPAN_SCRATCH";
/// Array of `usdt::ArgSpec`: the `--by` argument at each `--from` site, by the site's cookie.
pub const ARG_SPECS: &str = "UPROBE_ARG_SPECS";
/// Hash map of [`SpanKey`] to its own [`LatencyHistogram`] (`--by`), not preallocated.
pub const BY_KEY: &str = "UPROBE_BY_KEY";
/// Per-CPU array with one [`LatencyHistogram`] that stays zero: a new key's first value.
pub const EMPTY_HISTOGRAM: &str = "UPROBE_EMPTY_HISTOGRAM";
/// Load-time global (`u8`): what `--by` keys on, one of the `BY_*` values.
pub const BY: &str = "UPROBE_BY";
/// Load-time global (`u32`): the bytes of a string key kept (`--by-length`), below [`KEY_BYTES`].
pub const BY_LENGTH: &str = "UPROBE_BY_LENGTH";

/// No breakdown.
pub const BY_NONE: u8 = 0;
/// `--by argN`: the argument's value.
pub const BY_INTEGER: u8 = 1;
/// `--by str(argN)`: the NUL-terminated string the argument points to.
pub const BY_STRING: u8 = 2;

/// The bytes of a string key, its terminating NUL included.
pub const KEY_BYTES: usize = 128;
/// The most distinct keys `--by` keeps by default.
pub const DEFAULT_MAX_KEYS: u32 = 1024;

/// What a span is broken down by.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanKey {
    /// Nonzero when the argument could not be read (the bytes are then zero).
    pub unreadable: u64,
    /// The integer (8 bytes, little-endian), or the string up to its NUL.
    pub bytes: [u8; KEY_BYTES],
}

/// A span begun on a thread: when, and its key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenSpan {
    /// 0 when no span is open.
    pub start_ns: u64,
    pub key: SpanKey,
}

/// Nested calls of the probed function one thread can have open: the kernel's own limit
/// (`MAX_URETPROBE_DEPTH`), beyond which it stops hijacking return addresses, so deeper calls
/// never return through a uretprobe anyway.
pub const MAX_NESTING: usize = 64;
/// Default capacity of [`THREADS`]: threads that can be inside the function at once.
pub const DEFAULT_MAX_THREADS: u32 = 8192;
/// Default capacity of [`STACKS`]: distinct caller stacks of slow calls.
pub const DEFAULT_STACK_STORAGE: u32 = 4096;
/// Default size of [`SLOW_CALLS`] in bytes (a power of two; 32 bytes per record).
pub const DEFAULT_SLOW_BUFFER: u32 = 1 << 20;

/// Exact statistics and the bucket counts of every measured call on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LatencyHistogram {
    pub count: u64,
    pub sum_ns: u64,
    /// Smallest duration seen; 0 until the first call (durations are never 0 ns).
    pub min_ns: u64,
    pub max_ns: u64,
    pub buckets: [u64; BUCKETS],
}

/// Min and max since the last reset by user space, for per-interval output.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub min_ns: u64,
    pub max_ns: u64,
}

/// One open call: when it started and where the stack pointer was.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenCall {
    pub start_ns: u64,
    pub sp: u64,
}

/// A thread's open calls, outermost first; `depth` of them are valid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadCalls {
    pub depth: u32,
    pub _pad: u32,
    pub calls: [OpenCall; MAX_NESTING],
}

/// One call slower than `--slow`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlowCall {
    /// `CLOCK_MONOTONIC` time of the return, in ns.
    pub end_ns: u64,
    pub duration_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Id of the caller's user stack in `stacks::STACK_TRACES`, or a negated errno.
    pub user_stack_id: i32,
    pub _pad: u32,
}

/// Indices into [`COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// The entry probe ran.
    Entries = 0,
    /// The return probe ran.
    Returns = 1,
    /// A call was paired and added to the histogram.
    Recorded = 2,
    /// An entry was not recorded: the thread map was full (`--max-threads`).
    ThreadMapFull = 3,
    /// An entry was not recorded: more than [`MAX_NESTING`] calls open on one thread (the kernel
    /// does not probe the return of those either).
    TooDeep = 4,
    /// An open call whose return never came (longjmp, exception, a tail call into the function,
    /// or the kernel dropped the return probe), found when a later call or return passed it.
    Abandoned = 5,
    /// Calls still open when their thread exited (pthread_exit or exit inside the function).
    ExitedInside = 6,
    /// A return on a thread with no recorded entry: the call began before the entry probe was
    /// attached (the return probe is attached first), or its entry had no room in the map.
    ReturnWithoutEntry = 7,
    /// A return whose entry is not among the thread's open calls.
    ReturnUnmatched = 8,
    /// A slow call was sent to the ring buffer.
    SlowRecorded = 9,
    /// A slow call was lost: the ring buffer was full.
    SlowRingFull = 10,
    /// A slow call's caller stack could not be collected (the record is kept, without stack).
    SlowStackLost = 11,
    /// A map lookup that cannot fail did (per-CPU arrays): the call is lost.
    HelperFailed = 12,
    /// A return that matched no entry while the entry probe was being attached or detached:
    /// the call began outside the capture. Not a loss.
    ReturnOutsideCapture = 13,
    /// The probe fired in a process that is not a target (a probe on a whole file, filtered to
    /// the command's processes in the kernel). Not a loss; not in Entries or Returns.
    NotTarget = 14,
    /// A child of the command could not be made a target (the target map was full): its calls
    /// are not timed.
    TargetMapFull = 15,
    /// A child of the command could not be announced to user space (its ring buffer was
    /// full): it is probed only once found otherwise, and its calls until then are not timed.
    NewProcessNotAnnounced = 16,
    /// The `--by` argument could not be read (the span is timed under an "unreadable" key).
    ArgUnreadable = 17,
    /// A span was timed but not broken down: `--by` had no room for another key.
    KeysMapFull = 18,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 19;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` structs of integers with explicit padding fields.
    unsafe impl aya::Pod for super::LatencyHistogram {}
    unsafe impl aya::Pod for super::Window {}
    unsafe impl aya::Pod for super::ThreadCalls {}
    unsafe impl aya::Pod for super::SlowCall {}
    unsafe impl aya::Pod for super::SpanKey {}
    unsafe impl aya::Pod for super::OpenSpan {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared structs have no implicit padding, so both sides agree on every byte.
    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<LatencyHistogram>(), 8 * (4 + BUCKETS));
        assert_eq!(size_of::<ThreadCalls>(), 8 + 16 * MAX_NESTING);
        assert_eq!(size_of::<SlowCall>(), 32);
        assert_eq!(size_of::<SpanKey>(), 8 + KEY_BYTES);
        assert_eq!(size_of::<OpenSpan>(), 16 + KEY_BYTES);
        // Per-CPU values are limited to 32 KiB by the kernel.
        assert!(size_of::<LatencyHistogram>() <= 32 * 1024);
    }
}
