//! `--unwind dwarf`: copy the user registers and the top of the user stack of a sample (or of a
//! thread switching out) into a ring buffer, for user space to unwind with CFI (see
//! `livetrace_common::unwind`). The user registers come from the perf event's interrupted
//! context when it was in user mode, else from the task's saved user `pt_regs`
//! (`bpf_task_pt_regs`, kernel 5.15+).

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{BPF_RB_NO_WAKEUP, bpf_perf_event_data, pt_regs},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs},
    },
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::PerfEventContext,
};
use livetrace_common::{
    stacks::{Counter, StackKey, stack_errno},
    unwind::{
        HEADER_LEN, MAX_STACK_COPY, RECORD_BLOCK_END, RECORD_BLOCK_START, RECORD_EXEC, RECORD_FORK,
        RECORD_SAMPLE, STACK_CHUNK, UnwindSampleHeader, UnwindScratch,
    },
};

use crate::stacks::{count, kernel_stack_id, per_thread};

// Defined by the binaries of the tools that copy stacks ([`unwind_maps!`](crate::unwind_maps)).
unsafe extern "Rust" {
    static UNWIND_SAMPLES: RingBuf;
    static UNWIND_SCRATCH: PerCpuArray<UnwindScratch>;
    static COPY_LIMITS: HashMap<u32, u32>;
}

/// Defines the stack-copy maps; the loader sizes the ring buffer and the copy limits.
#[macro_export]
macro_rules! unwind_maps {
    () => {
        #[aya_ebpf::macros::map]
        static UNWIND_SAMPLES: aya_ebpf::maps::RingBuf = aya_ebpf::maps::RingBuf::with_byte_size(
            livetrace_common::unwind::DEFAULT_UNWIND_BUFFER,
            0,
        );
        #[aya_ebpf::macros::map]
        static UNWIND_SCRATCH: aya_ebpf::maps::PerCpuArray<
            livetrace_common::unwind::UnwindScratch,
        > = aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);
        #[aya_ebpf::macros::map]
        static COPY_LIMITS: aya_ebpf::maps::HashMap<u32, u32> =
            aya_ebpf::maps::HashMap::with_max_entries(1, 0);
    };
}

#[unsafe(no_mangle)]
static STACK_COPY_BYTES: Global<u32> = Global::new(0);

/// A target's fork, for the unwinder to learn the child's memory map from its parent's.
#[inline(always)]
pub fn forked(child: u32, parent: u32) {
    if enabled() {
        submit_fork(child, parent);
    }
}

/// Whether samples go to user space for unwinding instead of `bpf_get_stackid`.
#[inline(always)]
pub fn enabled() -> bool {
    STACK_COPY_BYTES.load() != 0
}

/// Sends one profile sample (registers, stack copy, kernel stack id) to user space. If it cannot
/// be sent (a full ring buffer, counted), returns the key to count it under instead: its user
/// stack marked lost, its kernel stack kept.
#[inline(always)]
pub fn submit(ctx: &PerfEventContext, tgid: u32, tid: u32, in_kernel: bool) -> Option<StackKey> {
    let regs = user_registers(ctx, in_kernel);
    let header = UnwindSampleHeader {
        tgid,
        tid,
        kernel_stack_id: kernel_stack_id(ctx, in_kernel),
        kind: RECORD_SAMPLE,
        weight: 1,
        comm: ctx.command().unwrap_or_default(),
        ..UnwindSampleHeader::default()
    };
    if send_with_stack(header, regs, copy_limit(tid)) {
        count(Counter::Recorded);
        return None;
    }
    Some(StackKey {
        tgid,
        tid: if per_thread() { tid } else { 0 },
        user_stack_id: -stack_errno::ENOSPC,
        kernel_stack_id: header.kernel_stack_id,
        comm: header.comm,
    })
}

/// Off-CPU: the current thread is switching out at `start_ns`; sends its user stack (frozen
/// until it runs again). Returns whether it was sent.
#[inline(always)]
pub fn submit_block_start(key: &StackKey, start_ns: u64) -> bool {
    let header = UnwindSampleHeader {
        tgid: key.tgid,
        tid: key.tid,
        kernel_stack_id: key.kernel_stack_id,
        kind: RECORD_BLOCK_START,
        start_ns,
        comm: key.comm,
        ..UnwindSampleHeader::default()
    };
    send_with_stack(header, task_user_registers(), copy_limit(key.tid))
}

/// How much of this thread's stack to copy: what user space learnt from its earlier stacks, or
/// all of `STACK_COPY_BYTES` until it has.
#[inline(always)]
fn copy_limit(tid: u32) -> u32 {
    // SAFETY: a plain u32 value, copied out at once.
    unsafe { COPY_LIMITS.get(tid) }.copied().unwrap_or(u32::MAX)
}

/// Off-CPU: forgets a thread's learnt copy size at its last switch-out.
#[inline(always)]
pub fn forget_thread(tid: u32) {
    let _ = unsafe { &COPY_LIMITS }.remove(tid);
}

/// Off-CPU: the block of `tid` that began at `start_ns` lasted `blocked_ns`.
#[inline(always)]
pub fn submit_block_end(tgid: u32, tid: u32, start_ns: u64, blocked_ns: u64) {
    let header = UnwindSampleHeader {
        tgid,
        tid,
        kind: RECORD_BLOCK_END,
        start_ns,
        weight: blocked_ns,
        ..UnwindSampleHeader::default()
    };
    match unsafe { &UNWIND_SAMPLES }
        .output::<UnwindSampleHeader>(&header, u64::from(BPF_RB_NO_WAKEUP))
    {
        Ok(()) => count(Counter::Recorded),
        Err(_) => count(Counter::UnwindRingFull),
    }
}

/// The process `tgid` has exec'd (`tid` is the thread that did): user space drops what it knew
/// of its memory map, and the thread's learnt copy size (its stack is a new one). A record lost
/// to a full ring buffer is counted; user space then finds the new map when addresses stop
/// making sense in the old one.
#[inline(always)]
pub fn submit_exec(tgid: u32, tid: u32) {
    forget_thread(tid);
    let header = UnwindSampleHeader {
        tgid,
        tid,
        kind: RECORD_EXEC,
        ..UnwindSampleHeader::default()
    };
    if unsafe { &UNWIND_SAMPLES }
        .output::<UnwindSampleHeader>(&header, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count(Counter::UnwindRingFull);
    }
}

/// The process `child` was forked by `parent`: user space unwinds it with its parent's memory
/// map until it execs (it may not live to be looked at). A lost record is counted.
#[inline(always)]
pub fn submit_fork(child: u32, parent: u32) {
    let header = UnwindSampleHeader {
        tgid: child,
        tid: child,
        kind: RECORD_FORK,
        weight: u64::from(parent),
        ..UnwindSampleHeader::default()
    };
    if unsafe { &UNWIND_SAMPLES }
        .output::<UnwindSampleHeader>(&header, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count(Counter::UnwindRingFull);
    }
}

/// Completes `header` with the user registers and a copy of at most `limit` bytes of the stack
/// above `sp`, and sends it.
#[inline(always)]
fn send_with_stack(
    mut header: UnwindSampleHeader,
    (ip, sp, bp): (u64, u64, u64),
    limit: u32,
) -> bool {
    let Some(scratch) = unsafe { &UNWIND_SCRATCH }.get_ptr_mut(0) else {
        count(Counter::UnwindScratchMissing);
        return false;
    };
    // SAFETY: the per-CPU slot is ours while this program runs on this CPU.
    let scratch = unsafe { &mut *scratch };
    header.stack_len = if sp == 0 {
        0 // a kernel thread: no user stack
    } else {
        copy_stack(&mut scratch.stack, sp, limit)
    };
    (header.ip, header.sp, header.bp) = (ip, sp, bp);
    let len = HEADER_LEN + header.stack_len as usize;
    scratch.header = header;
    if len > core::mem::size_of::<UnwindScratch>() {
        return false;
    }
    // SAFETY: `len` is within the scratch value, checked just above.
    let bytes =
        unsafe { core::slice::from_raw_parts((scratch as *const UnwindScratch).cast::<u8>(), len) };
    // User space polls; waking it for every record would cost more than the record.
    match unsafe { &UNWIND_SAMPLES }.output::<[u8]>(bytes, u64::from(BPF_RB_NO_WAKEUP)) {
        Ok(()) => true,
        Err(_) => {
            count(Counter::StackCopyLost);
            false
        }
    }
}

/// (ip, sp, bp) of the thread's user-mode context.
#[inline(always)]
fn user_registers(ctx: &PerfEventContext, in_kernel: bool) -> (u64, u64, u64) {
    if !in_kernel {
        let data = ctx.as_ptr().cast::<bpf_perf_event_data>();
        // SAFETY: the context of a perf_event program is a `bpf_perf_event_data`.
        let regs = unsafe { &(*data).regs };
        return (regs.rip, regs.rsp, regs.rbp);
    }
    task_user_registers()
}

/// (ip, sp, bp) the current task saved on entering the kernel: its user-mode context.
#[inline(always)]
fn task_user_registers() -> (u64, u64, u64) {
    // SAFETY: helpers that take the current task; the result is read with probe_read.
    let regs = unsafe {
        let task = bpf_get_current_task_btf();
        let ptr = bpf_task_pt_regs(task) as *const pt_regs;
        bpf_probe_read_kernel(ptr)
    };
    match regs {
        Ok(regs) => (regs.rip, regs.rsp, regs.rbp),
        Err(_) => (0, 0, 0),
    }
}

/// Copies up to `STACK_COPY_BYTES` (and `limit`) of the stack above `sp`, a page at a time,
/// stopping at the first page that cannot be read (the top of the stack). Returns the bytes
/// copied.
///
/// Written for the verifiers of kernels before 6.8 too, which bound a register by comparisons
/// with constants only, not with another register: each read's offset is masked to the copy's
/// size, a bound every verifier tracks. `limit` is deliberately not clamped to
/// `MAX_STACK_COPY` here: if LLVM could see `copied < limit <= MAX_STACK_COPY`, it would drop
/// the mask as redundant, leaving only `copied < limit`, which 6.1 rejects ("R1 max value is
/// outside of the allowed memory range"). User space never sets `STACK_COPY_BYTES` above it.
#[inline(always)]
fn copy_stack(dst: &mut [u8; (MAX_STACK_COPY + STACK_CHUNK) as usize], sp: u64, limit: u32) -> u32 {
    let limit = STACK_COPY_BYTES.load().min(limit);
    let mut copied: u32 = 0;
    // The first read ends at the page boundary above sp; each further read is one page.
    let mut want = STACK_CHUNK - (sp as u32 & (STACK_CHUNK - 1));
    for _ in 0..=(MAX_STACK_COPY / STACK_CHUNK) {
        if copied >= limit {
            break;
        }
        if want > limit - copied {
            want = limit - copied;
        }
        let off = (copied & (MAX_STACK_COPY - 1)) as usize;
        let size = want & (STACK_CHUNK * 2 - 1);
        if size > STACK_CHUNK {
            break;
        }
        // SAFETY: off < MAX_STACK_COPY (masked) and size <= STACK_CHUNK, so the write stays
        // within dst.
        let rc = unsafe {
            bpf_probe_read_user(
                dst.as_mut_ptr().add(off).cast(),
                size,
                (sp + u64::from(copied)) as *const _,
            )
        };
        if rc != 0 {
            break;
        }
        copied += size;
        want = STACK_CHUNK;
    }
    // A bound on what the caller sends that old verifiers see (the loop never copies more).
    copied.min(MAX_STACK_COPY)
}
