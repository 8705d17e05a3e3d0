//! `livetrace profile`'s object: on-CPU stack sampling. A perf event (software cpu-clock, or a
//! hardware cycles event where the PMU exists) fires `-F` times a second on every CPU, or on the
//! spawned command's threads; each sample adds 1 to its (process, stacks) key. Kernel 4.9+.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_current_pid_tgid, macros::perf_event, programs::PerfEventContext,
};
use livetrace_common::stacks::Counter;

use livetrace_ebpf::{
    control, python,
    stacks::{add_weight, count, current_key, is_target, wants_user_stacks},
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

/// The sampler.
#[perf_event]
pub fn profile_cpu(ctx: PerfEventContext) -> u32 {
    sample(&ctx, false)
}

/// The sampler that also reads the Python frames of CPython threads (`--unwind dwarf`): loaded
/// only where a target may run CPython, since the kernel takes some 30 ms longer to verify it,
/// which every capture would wait for at start.
#[perf_event]
pub fn profile_cpu_python(ctx: PerfEventContext) -> u32 {
    sample(&ctx, true)
}

#[inline(always)]
fn sample(ctx: &PerfEventContext, python_frames: bool) -> u32 {
    if control::stopped() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    count(Counter::Events);
    if tid == 0 {
        count(Counter::Idle);
        return 0;
    }
    if !is_target(tgid, tid) {
        count(Counter::NotTarget);
        return 0;
    }
    let in_kernel = interrupted_kernel_mode(ctx);
    if unwind::enabled() && wants_user_stacks() {
        if python_frames {
            // A Python thread's frames first: user space joins them to the sample that follows.
            python::submit(tgid, tid);
        }
        // A copy that could not be sent keeps its sample, under a user stack marked lost.
        if let Some(key) = unwind::submit(ctx, tgid, tid, in_kernel) {
            add_weight(&key, 1);
        }
        return 0;
    }
    let key = current_key(ctx, tgid, tid, in_kernel);
    add_weight(&key, 1);
    0
}

/// The interrupted context's privilege level, from the low bits of its code segment selector.
#[inline(always)]
fn interrupted_kernel_mode(ctx: &PerfEventContext) -> bool {
    let data = ctx
        .as_ptr()
        .cast::<aya_ebpf::bindings::bpf_perf_event_data>();
    #[cfg(bpf_target_arch = "x86_64")]
    {
        unsafe { (*data).regs.cs & 3 == 0 }
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    {
        let _ = data;
        true
    }
}
