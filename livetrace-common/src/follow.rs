//! Following a command through its execs and forks, shared by every tool's object.

/// `sched_process_exec` (`tp_btf`): a held command becomes a target at its exec, and
/// `--unwind dwarf` learns that a process's memory map changed.
pub const FOLLOW_EXEC: &str = "follow_exec";
/// `sched_process_fork` (`tp_btf`): children of targets become targets.
pub const FOLLOW_FORK: &str = "follow_fork";
/// Load-time global (`u32`): `task_struct.tgid`'s offset, from the kernel's BTF.
pub const FORK_TGID_OFFSET: &str = "FORK_TGID_OFFSET";
