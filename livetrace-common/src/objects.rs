//! livetrace's BPF objects, one per tool (the binaries of `livetrace-ebpf`), and the programs
//! each holds: the names user space looks them up by. `livetrace`'s tests check every name here
//! against the objects themselves, without loading them.

/// `livetrace profile`.
pub mod profile {
    pub const OBJECT: &str = "profile";
    /// The perf-event sampler.
    pub const SAMPLE: &str = "profile_cpu";
    /// The same that also reads CPython's frames (`--unwind dwarf` where a target may run it).
    pub const SAMPLE_PYTHON: &str = "profile_cpu_python";
    pub const PROGRAMS: &[&str] = &[
        SAMPLE,
        SAMPLE_PYTHON,
        crate::follow::FOLLOW_EXEC,
        crate::follow::FOLLOW_FORK,
    ];
}

/// `livetrace offcpu`.
pub mod offcpu {
    pub const OBJECT: &str = "offcpu";
    /// `sched_switch` through `tp_btf`.
    pub const SWITCH: &str = "offcpu_switch";
    /// `sched_switch` through the classic tracepoint (no BTF).
    pub const SWITCH_TRACEPOINT: &str = "offcpu_switch_tracepoint";
    /// `sched_wakeup` (`--wakers`).
    pub const WAKEUP: &str = "offcpu_wakeup";
    /// `sched_switch` through `tp_btf`, run before [`SWITCH`]: a Python thread's frames.
    pub const PYTHON: &str = "offcpu_python";
    pub const PROGRAMS: &[&str] = &[
        PYTHON,
        SWITCH,
        SWITCH_TRACEPOINT,
        WAKEUP,
        crate::follow::FOLLOW_EXEC,
        crate::follow::FOLLOW_FORK,
    ];
}

/// `livetrace uprobe-hist`.
pub mod uprobe_hist {
    pub const OBJECT: &str = "uprobe-hist";
    pub const ENTRY: &str = "uprobe_hist_entry";
    pub const RETURN: &str = "uprobe_hist_return";
    /// `--from`: a USDT probe that opens a span on its thread.
    pub const SPAN_FROM: &str = "uprobe_hist_span_from";
    /// `--to`: a USDT probe that closes the thread's span and records it.
    pub const SPAN_TO: &str = "uprobe_hist_span_to";
    /// `sched_process_exit`: calls a thread still had open when it exited.
    pub const THREAD_EXIT: &str = "uprobe_hist_thread_exit";
    pub const PROGRAMS: &[&str] = &[
        ENTRY,
        RETURN,
        SPAN_FROM,
        SPAN_TO,
        THREAD_EXIT,
        crate::follow::FOLLOW_FORK,
    ];
}
