//! `sched_process_exec`, for profile and offcpu: a command livetrace started held becomes a
//! target at its exec (before that it is livetrace's own shim, waiting to be released), and with
//! `--unwind dwarf` user space learns, in order with the stack copies, that a process now runs
//! another program, so that it stops unwinding with the old program's memory map. `tp_btf`,
//! kernel 5.5+.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};

use crate::{
    stacks::{is_target, note_exec},
    unwind,
};

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`, run
/// by the process that has just exec'd, before the new program's first instruction.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn follow_exec(_ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    note_exec(tgid);
    if unwind::enabled() && is_target(tgid, tid) {
        unwind::submit_exec(tgid, tid);
    }
    0
}
