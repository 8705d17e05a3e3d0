//! Following a command livetrace started: through its exec (`sched_process_exec`: the held
//! command becomes a target, and with `--unwind dwarf` user space learns, in order with the
//! stack copies, that a process runs another program) and its forks (`sched_process_fork`:
//! children of targets become targets, and are announced at once). `tp_btf`, kernel 5.5+.
//!
//! The programs are defined in each tool's binary by [`follow_exec!`](crate::follow_exec) and
//! [`follow_fork!`](crate::follow_fork), so that only the tools that follow carry them.

use aya_ebpf::{Global, helpers::bpf_get_current_pid_tgid, programs::BtfTracePointContext};
use livetrace_common::stacks::Counter;

use crate::{
    stacks::{self, add_target_tgid, announce_first_sight, is_target, note_exec},
    task, unwind,
};

/// `task_struct.tgid`'s offset, from BTF (the forked child is not the current task).
#[unsafe(no_mangle)]
static FORK_TGID_OFFSET: Global<u32> = Global::new(0);

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`, run
/// by the process that has just exec'd, before the new program's first instruction.
#[inline(always)]
pub fn on_exec(_ctx: &BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    note_exec(tgid);
    if unwind::enabled() && is_target(tgid, tid) {
        unwind::submit_exec(tgid, tid);
    }
    0
}

/// What following a fork could not do, for the tool to count in its own counters.
#[derive(Clone, Copy)]
pub enum Lost {
    /// The child could not be made a target: the target map is full.
    TargetMapFull,
    /// The child could not be announced to user space.
    NotAnnounced,
}

/// What the stack tools count when following a fork lost something (in their counters).
#[inline(always)]
pub fn count_in_stack_counters(lost: Lost) {
    stacks::count(match lost {
        Lost::TargetMapFull => Counter::TargetMapFull,
        Lost::NotAnnounced => Counter::NewProcessNotAnnounced,
    });
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`, run by the
/// parent. `lost` counts what could not be done; `forked(child, parent)` is the tool's own
/// business with a new target process (the stack tools tell their unwinder).
#[inline(always)]
pub fn on_fork(
    ctx: &BtfTracePointContext,
    lost: impl Fn(Lost),
    forked: impl FnOnce(u32, u32),
) -> i32 {
    let child: *const u8 = ctx.arg(1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let parent_tgid = (pid_tgid >> 32) as u32;
    if is_target(parent_tgid, pid_tgid as u32)
        && let Some(child_tgid) = task::read_u32(child, FORK_TGID_OFFSET.load())
        && child_tgid != parent_tgid
    {
        if !add_target_tgid(child_tgid) {
            lost(Lost::TargetMapFull);
        }
        announce_first_sight(child_tgid, || lost(Lost::NotAnnounced));
        forked(child_tgid, parent_tgid);
    }
    0
}

/// Defines the `follow_exec` program (`livetrace_common::follow::FOLLOW_EXEC`).
#[macro_export]
macro_rules! follow_exec {
    () => {
        #[aya_ebpf::macros::btf_tracepoint(function = "sched_process_exec")]
        pub fn follow_exec(ctx: aya_ebpf::programs::BtfTracePointContext) -> i32 {
            $crate::follow::on_exec(&ctx)
        }
    };
}

/// Defines the `follow_fork` program (`livetrace_common::follow::FOLLOW_FORK`), with the
/// tool's `lost` and `forked` (see [`on_fork`]).
#[macro_export]
macro_rules! follow_fork {
    ($lost:expr, $forked:expr) => {
        #[aya_ebpf::macros::btf_tracepoint(function = "sched_process_fork")]
        pub fn follow_fork(ctx: aya_ebpf::programs::BtfTracePointContext) -> i32 {
            $crate::follow::on_fork(&ctx, $lost, $forked)
        }
    };
}
