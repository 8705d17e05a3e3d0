//! `livetrace offcpu`'s object: where threads block, and for how long. On `sched_switch`, the thread
//! leaving the CPU (the current task) has its stacks recorded with a timestamp; when it is
//! switched back in, the time in between is added to those stacks. No kprobes: `tp_btf`
//! (kernel 5.5+, needs BTF, no tracefs), or the classic tracepoint as a fallback (needs tracefs).
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_map, btf_tracepoint, map, tracepoint},
    maps::HashMap,
    programs::{BtfTracePointContext, TracePointContext, tracing::StackIdContext},
};
use livetrace_common::{
    offcpu::{MAX_THREADS, OffcpuStart, PF_KTHREAD, START_FILTERED, TASK_DEAD, WakeKey, state_bit},
    stacks::{Counter, STACK_ID_UNWOUND, StackKey, stack_errno},
};

use livetrace_ebpf::{
    control, python,
    stacks::{
        Counts, add_weight, add_weight_to, announce, count, current_key, is_target,
        kernel_stack_id, wants_user_stacks,
    },
    task::read_u32 as read_task_u32,
    unwind,
};

livetrace_ebpf::license!();
livetrace_ebpf::control_map!();
livetrace_ebpf::target_maps!();
livetrace_ebpf::stack_maps!();
livetrace_ebpf::unwind_maps!();
livetrace_ebpf::python_maps!();
livetrace_ebpf::follow_exec!();
livetrace_ebpf::follow_fork!(
    livetrace_ebpf::follow::count_in_stack_counters,
    livetrace_ebpf::unwind::forked
);

#[map]
static OFFCPU_START: HashMap<u32, OffcpuStart> = HashMap::with_max_entries(MAX_THREADS, 0);
#[map]
static WAKERS: HashMap<u32, StackKey> = HashMap::with_max_entries(MAX_THREADS, 0);
/// Sized at load (one entry unless --wakers).
#[btf_map]
static WAKE_COUNTS: Counts<WakeKey> = Counts::new();

#[unsafe(no_mangle)]
static TASK_PID_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_FLAGS_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TP_PREV_STATE_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TP_NEXT_PID_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static STATE_MASK: Global<u32> = Global::new(u32::MAX);
#[unsafe(no_mangle)]
static MIN_BLOCK_NS: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static MAX_BLOCK_NS: Global<u64> = Global::new(u64::MAX);
#[unsafe(no_mangle)]
static INCLUDE_KERNEL_THREADS: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static RECORD_WAKERS: Global<u8> = Global::new(0);

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`.
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_switch(ctx: BtfTracePointContext) -> i32 {
    if control::stopped() {
        return 0;
    }
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    let now = unsafe { bpf_ktime_get_ns() };
    let prev_flags = read_task_u32(prev, TASK_FLAGS_OFFSET.load()).unwrap_or(0);
    switch_out(
        &ctx,
        prev_state as u32,
        prev_flags & PF_KTHREAD != 0,
        now,
        unwind::enabled(),
    );
    if let Some(next_tid) = read_task_u32(next, TASK_PID_OFFSET.load()) {
        switch_in(next_tid, now, || {
            read_task_u32(next, TASK_TGID_OFFSET.load())
        });
    }
    0
}

/// The Python frames of a CPython thread switching out to block, sent just before the block's
/// stack copy: a program of its own on the same tracepoint, attached before
/// [`offcpu_switch`] so that it runs first. In `offcpu_switch` itself the walk made the program
/// too big for Linux 6.1's verifier (more than 1M instructions processed).
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_python(ctx: BtfTracePointContext) -> i32 {
    if control::stopped() || !unwind::enabled() || !wants_user_stacks() {
        return 0;
    }
    let prev_state: u64 = ctx.arg(3);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // The blocks offcpu_switch records, and only those: another Python record would wait in
    // user space for a block that never comes.
    let recorded = tid != 0
        && prev_state as u32 & TASK_DEAD == 0
        && state_bit(prev_state as u32) & STATE_MASK.load() != 0
        && is_target(tgid, tid);
    if recorded {
        python::submit(tgid, tid);
    }
    0
}

/// The same from the classic tracepoint's record, whose field offsets come from tracefs.
/// The record has no task flags, so kernel threads cannot be told apart here.
#[tracepoint(category = "sched", name = "sched_switch")]
pub fn offcpu_switch_tracepoint(ctx: TracePointContext) -> u32 {
    if control::stopped() {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let prev_state: u32 =
        unsafe { ctx.read_at::<u32>(TP_PREV_STATE_OFFSET.load() as usize) }.unwrap_or(0);
    // No stack copies here: this fallback runs where there is no BTF, which they need.
    switch_out(&ctx, prev_state, false, now, false);
    if let Ok(next_tid) = unsafe { ctx.read_at::<u32>(TP_NEXT_PID_OFFSET.load() as usize) } {
        switch_in(next_tid, now, || None);
    }
    0
}

/// `sched_wakeup(struct task_struct *p)`, run by the waker: remember who woke a blocked target.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn offcpu_wakeup(ctx: BtfTracePointContext) -> i32 {
    if control::stopped() {
        return 0;
    }
    let task: *const u8 = ctx.arg(0);
    let Some(tid) = read_task_u32(task, TASK_PID_OFFSET.load()) else {
        return 0;
    };
    // Only a target that is blocked now (its entry not yet consumed by a switch-in).
    if !unsafe { OFFCPU_START.get(tid) }
        .is_some_and(|start| start.start_ns != 0 && start.start_ns != START_FILTERED)
    {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let waker = current_key(&ctx, (pid_tgid >> 32) as u32, pid_tgid as u32, true);
    if WAKERS.insert(tid, waker, 0).is_err() {
        count(Counter::WakerMapFull);
    }
    0
}

/// Records the current thread's switch-out. `copy_stack`: send its user stack to user space for
/// unwinding (`--unwind dwarf`) instead of walking frame pointers here.
#[inline(always)]
fn switch_out<C: StackIdContext>(
    ctx: &C,
    prev_state: u32,
    kernel_thread: bool,
    now: u64,
    copy_stack: bool,
) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tid == 0 {
        return; // the idle task leaving the CPU: not a block
    }
    count(Counter::Events);
    if prev_state & TASK_DEAD != 0 {
        // Its last switch: nothing will switch it back in, so its entries go with it.
        let _ = OFFCPU_START.remove(tid);
        if copy_stack {
            unwind::forget_thread(tid);
        }
        return;
    }
    if kernel_thread && INCLUDE_KERNEL_THREADS.load() == 0 {
        count(Counter::KernelThread);
        return;
    }
    if !is_target(tgid, tid) {
        count(Counter::NotTarget);
        return;
    }
    if state_bit(prev_state) & STATE_MASK.load() == 0 {
        count(Counter::StateFiltered);
        // Its switch-in is then known to end a block that was left out, not one missed.
        write_start(
            tid,
            OffcpuStart {
                key: StackKey {
                    tgid,
                    tid,
                    user_stack_id: STACK_ID_UNWOUND,
                    kernel_stack_id: STACK_ID_UNWOUND,
                    comm: [0; 16],
                },
                start_ns: START_FILTERED,
            },
        );
        return;
    }
    let key = if copy_stack && wants_user_stacks() {
        let mut key = StackKey {
            tgid,
            tid,
            user_stack_id: STACK_ID_UNWOUND,
            kernel_stack_id: kernel_stack_id(ctx, true),
            comm: ctx.command().unwrap_or_default(),
        };
        // A Python thread's frames went just before, from offcpu_python.
        if !unwind::submit_block_start(&key, now) {
            // The copy could not be sent (counted): the block keeps its time and kernel stack,
            // under a user stack marked lost.
            key.user_stack_id = -stack_errno::ENOSPC;
        }
        key
    } else {
        current_key(ctx, tgid, tid, true)
    };
    write_start(tid, OffcpuStart { key, start_ns: now });
}

/// Writes a thread's entry: in place after its first block (a lookup is much cheaper than a
/// hash-map update, and than the delete it would need at switch-in); a full map is counted.
#[inline(always)]
fn write_start(tid: u32, start: OffcpuStart) {
    match OFFCPU_START.get_ptr_mut(tid) {
        Some(slot) => unsafe { *slot = start },
        None => {
            if OFFCPU_START.insert(tid, start, 0).is_err() {
                count(Counter::StartMapFull);
            }
        }
    }
}

#[inline(always)]
fn switch_in(next_tid: u32, now: u64, next_tgid: impl FnOnce() -> Option<u32>) {
    if next_tid == 0 {
        return;
    }
    let slot = OFFCPU_START.get_ptr_mut(next_tid);
    let start = slot.map(|slot| unsafe { *slot });
    let Some(start) = start.filter(|start| start.start_ns != 0) else {
        if next_tgid().is_some_and(|tgid| is_target(tgid, next_tid)) {
            count(Counter::UnmatchedSwitchIn);
        }
        return;
    };
    if let Some(slot) = slot {
        unsafe { (*slot).start_ns = 0 };
    }
    if start.start_ns == START_FILTERED {
        // A block --state left out (counted at its switch-out).
        let _ = WAKERS.remove(next_tid);
        return;
    }
    let blocked_ns = now.saturating_sub(start.start_ns);
    if blocked_ns < MIN_BLOCK_NS.load() || blocked_ns > MAX_BLOCK_NS.load() {
        count(Counter::BlockFiltered);
        let _ = WAKERS.remove(next_tid);
        return;
    }
    if RECORD_WAKERS.load() != 0
        && let Some(waker) = unsafe { WAKERS.get(next_tid) }.copied()
    {
        let _ = WAKERS.remove(next_tid);
        let key = WakeKey {
            blocked: start.key,
            waker,
        };
        add_weight_to(&WAKE_COUNTS, &key, blocked_ns, Counter::WakeCountsMapFull);
        return;
    }
    if start.key.user_stack_id == STACK_ID_UNWOUND {
        // The stack went to user space at switch-out; the time joins it there.
        announce(start.key.tgid);
        unwind::submit_block_end(start.key.tgid, next_tid, start.start_ns, blocked_ns);
        return;
    }
    add_weight(&start.key, blocked_ns);
}
