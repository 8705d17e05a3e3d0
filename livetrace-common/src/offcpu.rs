//! Shared definitions of `livetrace offcpu`: time from a thread's switch-out to its next
//! switch-in, keyed by the stacks it blocked in. Weights in `STACK_COUNTS` are nanoseconds.

use crate::stacks::StackKey;

/// Threads currently off-CPU: tid -> [`OffcpuStart`].
pub const OFFCPU_START: &str = "OFFCPU_START";
/// `--wakers`: tid of a blocked thread -> the [`StackKey`] of the thread that woke it.
pub const WAKERS: &str = "WAKERS";
/// `--wakers`: [`WakeKey`] -> nanoseconds blocked.
pub const WAKE_COUNTS: &str = "WAKE_COUNTS";

/// Load-time globals (`u32`): byte offsets in `struct task_struct`, from the kernel's BTF.
pub const TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
pub const TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
pub const TASK_FLAGS_OFFSET: &str = "TASK_FLAGS_OFFSET";
/// Load-time globals (`u32`): byte offsets in the classic `sched_switch` tracepoint record, from
/// tracefs' format file (the fallback when BTF is missing).
pub const TP_PREV_STATE_OFFSET: &str = "TP_PREV_STATE_OFFSET";
pub const TP_NEXT_PID_OFFSET: &str = "TP_NEXT_PID_OFFSET";
/// Load-time global (`u32`): which switch-outs to record, [`STATE_PREEMPTED`] etc.
pub const STATE_MASK: &str = "STATE_MASK";
/// Load-time globals (`u64`): blocks outside `[MIN_BLOCK_NS, MAX_BLOCK_NS]` are not recorded.
pub const MIN_BLOCK_NS: &str = "MIN_BLOCK_NS";
pub const MAX_BLOCK_NS: &str = "MAX_BLOCK_NS";
/// Load-time global (`u8`): nonzero records kernel threads too.
pub const INCLUDE_KERNEL_THREADS: &str = "INCLUDE_KERNEL_THREADS";
/// Load-time global (`u8`): nonzero joins blocked stacks with their wakers.
pub const RECORD_WAKERS: &str = "RECORD_WAKERS";

/// Switched out while still runnable (preempted): waiting for a CPU, not for an event.
pub const STATE_PREEMPTED: u32 = 1;
/// `TASK_INTERRUPTIBLE` (S): sleeping until an event or a signal.
pub const STATE_INTERRUPTIBLE: u32 = 2;
/// `TASK_UNINTERRUPTIBLE` (D): usually disk or a kernel lock.
pub const STATE_UNINTERRUPTIBLE: u32 = 4;

/// The kernel's `task_struct::__state` bits that the mask above maps from.
pub const TASK_INTERRUPTIBLE: u32 = 0x1;
pub const TASK_UNINTERRUPTIBLE: u32 = 0x2;
/// `task_struct::__state` of a task switching out for the last time (it is exiting).
pub const TASK_DEAD: u32 = 0x80;
/// `task_struct::flags` bit of kernel threads.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Capacity of [`OFFCPU_START`] and [`WAKERS`]: threads off-CPU at once.
pub const MAX_THREADS: u32 = 64 * 1024;

/// Maps a `prev_state` to the [`STATE_MASK`] bit it belongs to.
pub const fn state_bit(prev_state: u32) -> u32 {
    if prev_state & TASK_UNINTERRUPTIBLE != 0 {
        STATE_UNINTERRUPTIBLE
    } else if prev_state & TASK_INTERRUPTIBLE != 0 {
        STATE_INTERRUPTIBLE
    } else {
        STATE_PREEMPTED
    }
}

/// A switch-out waiting for its switch-in. Entries are reused in place for a thread's lifetime;
/// `start_ns == 0` marks one whose block was already counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffcpuStart {
    pub key: StackKey,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at switch-out; 0 while the thread runs;
    /// [`START_FILTERED`] while it is off-CPU in a state that `--state` leaves out.
    pub start_ns: u64,
}

/// [`OffcpuStart::start_ns`] of a block that `--state` leaves out: its switch-in is expected,
/// and is neither timed nor counted as a switch-in without a switch-out.
pub const START_FILTERED: u64 = u64::MAX;

/// A blocked stack joined with the stack of its waker.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WakeKey {
    pub blocked: StackKey,
    pub waker: StackKey,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` integers and byte arrays; sizes are multiples of 8, no padding.
    unsafe impl aya::Pod for super::OffcpuStart {}
    unsafe impl aya::Pod for super::WakeKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// D wins over S (the bits can be set together with modifiers), and 0 means preempted.
    #[test]
    fn states_map_to_mask_bits() {
        assert_eq!(state_bit(0), STATE_PREEMPTED);
        assert_eq!(state_bit(TASK_INTERRUPTIBLE), STATE_INTERRUPTIBLE);
        assert_eq!(state_bit(TASK_UNINTERRUPTIBLE), STATE_UNINTERRUPTIBLE);
        // TASK_UNINTERRUPTIBLE | TASK_NOLOAD, as idle kernel threads sleep.
        assert_eq!(state_bit(0x402), STATE_UNINTERRUPTIBLE);
        assert_eq!(core::mem::size_of::<OffcpuStart>(), 40);
        assert_eq!(core::mem::size_of::<WakeKey>(), 64);
    }
}
