//! `livetrace uprobe-hist`'s object: the latency of one user-space function, as a histogram built in the
//! kernel. The entry probe pushes (time, stack pointer) on the thread's stack of open calls; the
//! return probe pops back to the entry whose stack pointer is its own, so recursive calls pair
//! correctly and calls whose return never came are counted, not mispaired. A `tp_btf`
//! `sched_process_exit` program counts (and frees) what a thread still had open when it exited.
//! Needs kernel 5.8+ (ring buffer, `tp_btf`).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_user_str_bytes,
    },
    macros::{btf_tracepoint, map, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{BtfTracePointContext, ProbeContext, RetProbeContext, tracing::StackIdContext},
};
use livetrace_common::{
    histogram::{BUCKETS, bucket_index},
    uprobe_hist::{
        BY_INTEGER, BY_STRING, COUNTER_SLOTS, Counter, KEY_BYTES, LatencyHistogram, MAX_NESTING,
        OpenCall, OpenSpan, SlowCall, SpanKey, ThreadCalls, Window,
    },
    usdt::ArgSpec,
};

use livetrace_ebpf::{
    control,
    stacks::{atomic_add, is_target},
    usdt,
};

livetrace_ebpf::license!();
livetrace_ebpf::control_map!();
livetrace_ebpf::target_maps!();
livetrace_ebpf::follow_fork!(
    |lost| add(
        match lost {
            livetrace_ebpf::follow::Lost::TargetMapFull => Counter::TargetMapFull,
            livetrace_ebpf::follow::Lost::NotAnnounced => Counter::NewProcessNotAnnounced,
        },
        1
    ),
    |_, _| {}
);

#[map]
static UPROBE_HIST: PerCpuArray<LatencyHistogram> = PerCpuArray::with_max_entries(1, 0);
#[map]
static UPROBE_WINDOW: PerCpuArray<Window> = PerCpuArray::with_max_entries(1, 0);
#[map]
static UPROBE_THREADS: HashMap<u32, ThreadCalls> = HashMap::with_max_entries(1, 0);
#[map]
static UPROBE_THREAD_SCRATCH: PerCpuArray<ThreadCalls> = PerCpuArray::with_max_entries(1, 0);
#[map]
static UPROBE_SLOW_CALLS: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static UPROBE_STACKS: StackTrace = StackTrace::with_max_entries(1, 0);
#[map]
static UPROBE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static UPROBE_SPANS: HashMap<u32, OpenSpan> = HashMap::with_max_entries(1, 0);
#[map]
static UPROBE_SPAN_SCRATCH: PerCpuArray<OpenSpan> = PerCpuArray::with_max_entries(1, 0);
#[map]
static UPROBE_ARG_SPECS: Array<ArgSpec> = Array::with_max_entries(1, 0);
#[map]
static UPROBE_BY_KEY: HashMap<SpanKey, LatencyHistogram> =
    HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static UPROBE_EMPTY_HISTOGRAM: PerCpuArray<LatencyHistogram> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static UPROBE_SLOW_NS: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static UPROBE_BY: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static UPROBE_BY_LENGTH: Global<u32> = Global::new(0);

/// `calls[depth & MASK]`: a bound the verifier can see.
const MASK: usize = MAX_NESTING - 1;
const _: () = assert!(MAX_NESTING.is_power_of_two());

/// Where `ret` leaves the stack pointer relative to the entry probe's: x86-64's `call` pushed
/// the return address, which `ret` pops; arm64 keeps it in a register.
#[cfg(bpf_target_arch = "x86_64")]
const RETURN_SP_OFFSET: u64 = 8;
#[cfg(not(bpf_target_arch = "x86_64"))]
const RETURN_SP_OFFSET: u64 = 0;

#[uprobe]
pub fn uprobe_hist_entry(ctx: ProbeContext) -> u32 {
    let Some((_, tid)) = opening_thread() else {
        return 0;
    };
    let sp = stack_pointer(ctx.regs);
    let Some(calls) = thread_calls(tid) else {
        return 0;
    };
    // SAFETY: a map value of this thread's own; only this thread (and its exit) touches it.
    let calls = unsafe { &mut *calls };
    // Open calls at or below this stack pointer were unwound without returning (longjmp,
    // exception): their frames are gone, so their returns will never come.
    let mut depth = calls.depth as usize;
    let mut abandoned = 0;
    for _ in 0..MAX_NESTING {
        if depth == 0 || calls.calls[(depth - 1) & MASK].sp > sp {
            break;
        }
        depth -= 1;
        abandoned += 1;
    }
    if abandoned > 0 {
        add(Counter::Abandoned, abandoned);
    }
    if depth >= MAX_NESTING {
        calls.depth = depth as u32;
        add(Counter::TooDeep, 1);
        return 0;
    }
    calls.calls[depth & MASK] = OpenCall {
        // Read last, so the probe's own cost before the function runs is left out.
        start_ns: unsafe { bpf_ktime_get_ns() },
        sp,
    };
    calls.depth = depth as u32 + 1;
    0
}

#[uretprobe]
pub fn uprobe_hist_return(ctx: RetProbeContext) -> u32 {
    // Read first, so the probe's own cost after the function returned is left out.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((tgid, tid)) = closing_thread() else {
        return 0;
    };
    let entry_sp = stack_pointer(ctx.regs).wrapping_sub(RETURN_SP_OFFSET);
    let Some(calls) = UPROBE_THREADS.get_ptr_mut(tid) else {
        add(unmatched(Counter::ReturnWithoutEntry), 1);
        return 0;
    };
    // SAFETY: as in the entry probe.
    let calls = unsafe { &mut *calls };
    let depth = calls.depth as usize;
    // Open calls are ordered by stack pointer, innermost (lowest) on top. Skip the deeper ones
    // (abandoned) down to the one whose frame this return leaves.
    let mut index = depth;
    let mut found = None;
    for _ in 0..MAX_NESTING {
        if index == 0 {
            break;
        }
        let call = calls.calls[(index - 1) & MASK];
        if call.sp == entry_sp {
            found = Some((index - 1, call.start_ns));
            break;
        }
        if call.sp > entry_sp {
            break;
        }
        index -= 1;
    }
    let Some((index, start_ns)) = found else {
        add(unmatched(Counter::ReturnUnmatched), 1);
        return 0;
    };
    if depth - 1 > index {
        add(Counter::Abandoned, (depth - 1 - index) as u64);
    }
    calls.depth = index as u32;
    record(&ctx, now.saturating_sub(start_ns), tgid, tid);
    0
}

/// The thread (tgid, tid) a call's (or span's) first probe fired on, if it is timed: not once
/// the capture has stopped (its end will count as outside the capture), and only in targets.
#[inline(always)]
fn opening_thread() -> Option<(u32, u32)> {
    if control::stopped() {
        return None;
    }
    let thread = target_thread()?;
    add(Counter::Entries, 1);
    Some(thread)
}

/// The thread a call's (or span's) last probe fired on, if it is a target.
#[inline(always)]
fn closing_thread() -> Option<(u32, u32)> {
    let thread = target_thread()?;
    add(Counter::Returns, 1);
    Some(thread)
}

/// The current thread, if it is a target (counted otherwise).
#[inline(always)]
fn target_thread() -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !is_target(tgid, tid) {
        add(Counter::NotTarget, 1);
        return None;
    }
    Some((tgid, tid))
}

/// Whether spans are broken down by an argument (`--by`).
#[inline(always)]
fn broken_down() -> bool {
    matches!(UPROBE_BY.load(), BY_INTEGER | BY_STRING)
}

/// How to count a return that matched no entry: as `counter` while the capture runs, or as a
/// call that began outside it while the entry probe is being attached or detached.
#[inline(always)]
fn unmatched(counter: Counter) -> Counter {
    if control::running() {
        counter
    } else {
        Counter::ReturnOutsideCapture
    }
}

/// A thread is exiting (the current task is the exiting thread): whatever it still had open
/// will never return. Counted, and its entry freed for the next thread.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn uprobe_hist_thread_exit(_ctx: BtfTracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(span) = UPROBE_SPANS.get_ptr(tid) {
        if unsafe { (*span).start_ns } != 0 {
            add(Counter::ExitedInside, 1);
        }
        if UPROBE_SPANS.remove(tid).is_err() {
            add(Counter::HelperFailed, 1);
        }
    }
    let Some(calls) = UPROBE_THREADS.get_ptr(tid) else {
        return 0;
    };
    let depth = unsafe { (*calls).depth };
    if depth > 0 {
        add(Counter::ExitedInside, u64::from(depth));
    }
    if UPROBE_THREADS.remove(tid).is_err() {
        add(Counter::HelperFailed, 1);
    }
    0
}

/// The thread's open calls, created empty on its first call.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "passing the value itself would copy 1 KiB onto the 512-byte BPF stack"
)]
fn thread_calls(tid: u32) -> Option<*mut ThreadCalls> {
    if let Some(calls) = UPROBE_THREADS.get_ptr_mut(tid) {
        return Some(calls);
    }
    let Some(scratch) = UPROBE_THREAD_SCRATCH.get_ptr_mut(0) else {
        add(Counter::HelperFailed, 1);
        return None;
    };
    // SAFETY: this CPU's scratch value; only `depth` needs to be valid.
    unsafe { (*scratch).depth = 0 };
    if UPROBE_THREADS
        .insert(tid, unsafe { &*scratch }, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Only this thread inserts its own id, so the only failure is a full map.
        add(Counter::ThreadMapFull, 1);
        return None;
    }
    let calls = UPROBE_THREADS.get_ptr_mut(tid);
    if calls.is_none() {
        add(Counter::HelperFailed, 1);
    }
    calls
}

/// Adds one call of `duration` ns to this CPU's histogram and, if it is slow, sends it to the
/// ring buffer with its caller's stack.
#[inline(always)]
fn record<C: StackIdContext>(ctx: &C, duration: u64, tgid: u32, tid: u32) {
    let Some(hist) = UPROBE_HIST.get_ptr_mut(0) else {
        add(Counter::HelperFailed, 1);
        return;
    };
    if !add_to_histogram(hist, duration) {
        return;
    }
    if let Some(window) = UPROBE_WINDOW.get_ptr_mut(0) {
        unsafe {
            if (*window).min_ns == 0 || duration < (*window).min_ns {
                (*window).min_ns = duration;
            }
            if duration > (*window).max_ns {
                (*window).max_ns = duration;
            }
        }
    } else {
        add(Counter::HelperFailed, 1);
    }
    add(Counter::Recorded, 1);

    let slow = UPROBE_SLOW_NS.load();
    if slow == 0 || duration < slow {
        return;
    }
    let Some(mut entry) = UPROBE_SLOW_CALLS.reserve::<SlowCall>(0) else {
        add(Counter::SlowRingFull, 1);
        return;
    };
    // At the return probe the registers are the caller's: its stack is the caller's stack (at
    // a `--to` probe, the stack that reached it).
    let user_stack_id = match ctx.get_stackid(&UPROBE_STACKS, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id as i32,
        Err(err) => {
            add(Counter::SlowStackLost, 1);
            if err < 0 { err } else { -14 }
        }
    };
    entry.write(SlowCall {
        end_ns: unsafe { bpf_ktime_get_ns() },
        duration_ns: duration,
        tgid,
        tid,
        user_stack_id,
        _pad: 0,
    });
    entry.submit(0);
    add(Counter::SlowRecorded, 1);
}

/// Adds one call of `duration` ns to a histogram (this CPU's, or a `--by` key's); false when
/// the bucket could not be computed (counted).
#[inline(always)]
fn add_to_histogram(hist: *mut LatencyHistogram, duration: u64) -> bool {
    // bucket_index never returns more than the last bucket, and LLVM knows it, so it would drop
    // this check; the verifier cannot follow the bit tricks of leading_zeros and needs it.
    // Reading the index back through a volatile load hides it from LLVM.
    let bucket = bucket_index(duration) as usize;
    let bucket = unsafe { core::ptr::read_volatile(&bucket) };
    if bucket >= BUCKETS {
        add(Counter::HelperFailed, 1);
        return false;
    }
    // SAFETY: a map value. Uprobe programs can be preempted by another thread's on the same
    // CPU (and a `--by` key is shared by every CPU), so counts are added atomically; min and max
    // are compared and stored, and a race there could at worst miss one extreme by a hair.
    unsafe {
        atomic_add(&raw mut (*hist).buckets[bucket], 1);
        atomic_add(&raw mut (*hist).count, 1);
        atomic_add(&raw mut (*hist).sum_ns, duration);
        if (*hist).min_ns == 0 || duration < (*hist).min_ns {
            (*hist).min_ns = duration;
        }
        if duration > (*hist).max_ns {
            (*hist).max_ns = duration;
        }
    }
    true
}

/// `--from`: opens a span on this thread, keyed by the `--by` argument. A span already open
/// (its `--to` never came) is abandoned, and counted.
#[uprobe]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "passing the value itself would copy it onto the 512-byte BPF stack"
)]
pub fn uprobe_hist_span_from(ctx: ProbeContext) -> u32 {
    let Some((_, tid)) = opening_thread() else {
        return 0;
    };
    let Some(span) = UPROBE_SPAN_SCRATCH.get_ptr_mut(0) else {
        add(Counter::HelperFailed, 1);
        return 0;
    };
    // SAFETY: this CPU's scratch value, written here and copied into the map below.
    let span = unsafe { &mut *span };
    span_key(&ctx, &mut span.key);
    if let Some(open) = UPROBE_SPANS.get_ptr(tid)
        && unsafe { (*open).start_ns } != 0
    {
        add(Counter::Abandoned, 1);
    }
    // Read last, so the probe's own cost before the span is left out.
    span.start_ns = unsafe { bpf_ktime_get_ns() };
    if UPROBE_SPANS.insert(tid, &*span, 0).is_err() {
        add(Counter::ThreadMapFull, 1);
    }
    0
}

/// The `--by` key of a span, from the argument this site's cookie names.
#[inline(always)]
fn span_key(ctx: &ProbeContext, key: &mut SpanKey) {
    if !broken_down() {
        return;
    }
    // SAFETY: a helper reading the cookie the link was created with.
    let site = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let value = UPROBE_ARG_SPECS
        .get(site)
        .and_then(|spec| usdt::read(ctx, spec));
    key.unreadable = 0;
    key.bytes = [0; KEY_BYTES];
    let Some(value) = value else {
        key.unreadable = 1;
        add(Counter::ArgUnreadable, 1);
        return;
    };
    if UPROBE_BY.load() == BY_INTEGER {
        let bytes = value.to_le_bytes();
        key.bytes[..8].copy_from_slice(&bytes);
        return;
    }
    // The mask gives the verifier its bound; user space keeps the length below KEY_BYTES.
    let length = (UPROBE_BY_LENGTH.load() as usize) & (KEY_BYTES - 1);
    // SAFETY: a read of the traced process's memory, checked by the helper.
    if unsafe { bpf_probe_read_user_str_bytes(value as *const u8, &mut key.bytes[..length]) }
        .is_err()
    {
        key.unreadable = 1;
        add(Counter::ArgUnreadable, 1);
    }
}

/// `--to`: closes this thread's span and records it, in the total and under its key.
#[uprobe]
pub fn uprobe_hist_span_to(ctx: ProbeContext) -> u32 {
    // Read first, so the probe's own cost after the span is left out.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((tgid, tid)) = closing_thread() else {
        return 0;
    };
    let Some(span) = UPROBE_SPANS.get_ptr_mut(tid) else {
        add(unmatched(Counter::ReturnWithoutEntry), 1);
        return 0;
    };
    // SAFETY: this thread's own map value.
    let span = unsafe { &mut *span };
    if span.start_ns == 0 {
        add(unmatched(Counter::ReturnWithoutEntry), 1);
        return 0;
    }
    let duration = now.saturating_sub(span.start_ns);
    span.start_ns = 0;
    record(&ctx, duration, tgid, tid);
    if broken_down() {
        record_by_key(&span.key, duration);
    }
    0
}

/// Adds a span to its key's histogram, creating it (from a value that stays zero) if new.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "passing the value itself would copy 9 KiB onto the 512-byte BPF stack"
)]
fn record_by_key(key: &SpanKey, duration: u64) {
    let hist = match UPROBE_BY_KEY.get_ptr_mut(key) {
        Some(hist) => hist,
        None => {
            let Some(empty) = UPROBE_EMPTY_HISTOGRAM.get_ptr(0) else {
                add(Counter::HelperFailed, 1);
                return;
            };
            // Another CPU may have added the key meanwhile: then the lookup below finds it.
            let _ = UPROBE_BY_KEY.insert(key, unsafe { &*empty }, u64::from(BPF_NOEXIST));
            match UPROBE_BY_KEY.get_ptr_mut(key) {
                Some(hist) => hist,
                None => {
                    add(Counter::KeysMapFull, 1);
                    return;
                }
            }
        }
    };
    add_to_histogram(hist, duration);
}

#[inline(always)]
fn add(counter: Counter, value: u64) {
    if let Some(slot) = UPROBE_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the map value just looked up.
        unsafe { atomic_add(slot, value) };
    }
}

#[inline(always)]
fn stack_pointer(regs: *mut pt_regs) -> u64 {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        unsafe { (*regs).rsp }
    }
    #[cfg(bpf_target_arch = "aarch64")]
    {
        unsafe { (*regs.cast::<aya_ebpf::bindings::user_pt_regs>()).sp }
    }
    #[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
    {
        // The loader refuses uprobe-hist on other architectures.
        let _ = regs;
        0
    }
}
