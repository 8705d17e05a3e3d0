//! `--unwind dwarf`: instead of walking the user stack in the kernel (which needs frame
//! pointers), the profile program copies the user registers and the top of the user stack into a
//! ring buffer, and user space unwinds it with the binaries' `.eh_frame` CFI.
//!
//! `livetrace offcpu --unwind dwarf` uses the same ring: the stack is copied when a thread switches
//! out ([`RECORD_BLOCK_START`]; it cannot change while the thread is off-CPU), and the time it
//! was blocked follows when it switches back in ([`RECORD_BLOCK_END`]), joined by thread and
//! switch-out time in user space.
//!
//! A record is a [`UnwindSampleHeader`] followed by `stack_len` bytes of stack, starting at `sp`.
//! The stack is read a page at a time (the first read ends at the page boundary above `sp`), so
//! a stack whose top is nearer than `--stack-copy-size` is copied up to its last readable page.

/// `BPF_MAP_TYPE_RINGBUF` of samples (header + stack bytes).
pub const UNWIND_SAMPLES: &str = "UNWIND_SAMPLES";
/// Per-CPU one-slot array holding the sample being assembled ([`UnwindScratch`]).
pub const UNWIND_SCRATCH: &str = "UNWIND_SCRATCH";
/// Load-time global (`u32`): bytes of user stack to copy per sample; 0 = frame-pointer mode
/// (the kernel walks the stack with `bpf_get_stackid`).
pub const STACK_COPY_BYTES: &str = "STACK_COPY_BYTES";

/// `--unwind dwarf`: tid -> bytes of stack to copy at its next sample or switch-out, learnt by
/// user space from how deep its earlier stacks went (absent: the whole `STACK_COPY_BYTES`).
pub const COPY_LIMITS: &str = "COPY_LIMITS";

/// Most stack bytes one sample can carry. A per-CPU array value is limited to 32 KiB.
pub const MAX_STACK_COPY: u32 = 16 * 1024;
/// The default `--stack-copy-size`.
pub const DEFAULT_STACK_COPY: u32 = 16 * 1024;
/// Default ring buffer size: at 99 Hz a 16 KiB copy per sample is ~1.6 MB/s per CPU, and user
/// space drains it every few milliseconds.
pub const DEFAULT_UNWIND_BUFFER: u32 = 8 * 1024 * 1024;
/// The unit the stack is read in: a page, so that a read never crosses into an unmapped one.
pub const STACK_CHUNK: u32 = 4096;

/// A profile sample: count `weight` for this stack now.
pub const RECORD_SAMPLE: u32 = 0;
/// A thread switched out at `start_ns` with this stack; its weight comes with the block's end.
pub const RECORD_BLOCK_START: u32 = 1;
/// The block that began at `start_ns` lasted `weight` ns (no stack follows).
pub const RECORD_BLOCK_END: u32 = 2;
/// The process `tgid` has exec'd (no stack follows): every record after this one comes from
/// its new program, whose memory map is a new one.
pub const RECORD_EXEC: u32 = 3;
/// The process `tgid` was forked by the process in `weight` (no stack follows): until it
/// execs, its memory map is its parent's.
pub const RECORD_FORK: u32 = 4;

/// The registers framehop needs on x86-64, who was running, and what the record counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindSampleHeader {
    pub tgid: u32,
    pub tid: u32,
    /// As [`crate::stacks::StackKey::kernel_stack_id`].
    pub kernel_stack_id: i32,
    /// Bytes of stack that follow the header.
    pub stack_len: u32,
    /// [`RECORD_SAMPLE`], [`RECORD_BLOCK_START`], [`RECORD_BLOCK_END`], [`RECORD_EXEC`] or
    /// [`RECORD_FORK`].
    pub kind: u32,
    pub _reserved: u32,
    /// User-mode instruction pointer, stack pointer and frame pointer at the sample.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Blocks: when the thread switched out (`bpf_ktime_get_ns`), which identifies the block.
    pub start_ns: u64,
    /// Samples: 1. Block ends: nanoseconds blocked.
    pub weight: u64,
    pub comm: [u8; 16],
}

/// Bytes of [`UnwindSampleHeader`].
pub const HEADER_LEN: usize = core::mem::size_of::<UnwindSampleHeader>();

/// The per-CPU buffer a sample is assembled in. The stack area has one chunk of slack beyond
/// [`MAX_STACK_COPY`] so that the verifier can bound every chunk's end without knowing the
/// earlier chunks' sizes.
#[repr(C)]
pub struct UnwindScratch {
    pub header: UnwindSampleHeader,
    pub stack: [u8; (MAX_STACK_COPY + STACK_CHUNK) as usize],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` plain integers and byte arrays without padding.
    unsafe impl aya::Pod for super::UnwindSampleHeader {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header has no implicit padding, and stack bytes after it stay 8-byte aligned.
    #[test]
    fn header_layout() {
        assert_eq!(HEADER_LEN, 6 * 4 + 5 * 8 + 16);
        assert_eq!(HEADER_LEN % 8, 0);
    }
}
