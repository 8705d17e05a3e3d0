//! offcpu's BPF object: its settings, loading it, attaching it to `sched_switch` through
//! `tp_btf` or the classic tracepoint (falling back from the first to the second, and from stack
//! copies to frame pointers, as the kernel allows), and starting the clocks of threads found
//! already blocked.

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, RingBuf},
    programs::TracePoint,
};
use livetrace_common::{
    follow::FOLLOW_FORK,
    objects::offcpu::{PYTHON, SWITCH, SWITCH_TRACEPOINT, WAKEUP},
    offcpu::{self, MAX_THREADS, OFFCPU_START, OffcpuStart},
    stacks::{STACK_ID_RECOVERED, STACK_KIND_KERNEL, STACK_KIND_USER, StackKey},
    unwind::{COPY_LIMITS, MAX_STACK_COPY, UNWIND_SAMPLES},
};

use super::{Attach, already_blocked, tracefs};
use crate::{
    bpf::{
        self, Object,
        counts::CountSlot,
        stacks::{StackSettings, refuse_stack_copies_for_test},
    },
    kernel_btf::KernelBtf,
    session::{capture::monotonic_ns, targets::Target},
    unwind,
};

/// Settings of the offcpu programs (see `livetrace_common::offcpu`).
#[derive(Clone, Debug, Default)]
pub struct OffcpuSettings {
    pub task_pid_offset: u32,
    pub task_tgid_offset: u32,
    pub task_flags_offset: u32,
    pub tp_prev_state_offset: u32,
    pub tp_next_pid_offset: u32,
    pub state_mask: u32,
    pub min_block_ns: u64,
    pub max_block_ns: u64,
    pub include_kernel_threads: bool,
    pub wakers: bool,
}

impl OffcpuSettings {
    /// Sets offcpu's own globals and map sizes on `loader`.
    fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>, storage: u32) {
        let flag = |on: bool| if on { &1u8 } else { &0u8 };
        loader
            .override_global(offcpu::TASK_PID_OFFSET, &self.task_pid_offset, true)
            .override_global(offcpu::TASK_TGID_OFFSET, &self.task_tgid_offset, true)
            .override_global(offcpu::TASK_FLAGS_OFFSET, &self.task_flags_offset, true)
            .override_global(
                offcpu::TP_PREV_STATE_OFFSET,
                &self.tp_prev_state_offset,
                true,
            )
            .override_global(offcpu::TP_NEXT_PID_OFFSET, &self.tp_next_pid_offset, true)
            .override_global(offcpu::STATE_MASK, &self.state_mask, true)
            .override_global(offcpu::MIN_BLOCK_NS, &self.min_block_ns, true)
            .override_global(offcpu::MAX_BLOCK_NS, &self.max_block_ns, true)
            .override_global(
                offcpu::INCLUDE_KERNEL_THREADS,
                flag(self.include_kernel_threads),
                true,
            )
            .override_global(offcpu::RECORD_WAKERS, flag(self.wakers), true)
            .map_max_entries(offcpu::OFFCPU_START, MAX_THREADS)
            // Hash maps are preallocated: the wakers' maps stay at one entry without --wakers.
            .map_max_entries(offcpu::WAKERS, if self.wakers { MAX_THREADS } else { 1 })
            .map_max_entries(offcpu::WAKE_COUNTS, if self.wakers { storage } else { 1 });
    }
}

/// Loads offcpu's object (no program is loaded into the kernel yet).
fn load(settings: &StackSettings, offcpu: &OffcpuSettings) -> anyhow::Result<Ebpf> {
    refuse_stack_copies_for_test(settings)?;
    let mut loader = EbpfLoader::new();
    settings.apply(&mut loader);
    offcpu.apply(&mut loader, settings.stack_storage);
    let mut ebpf = bpf::load(Object::Offcpu, &mut loader)?;
    settings.fill_targets(&mut ebpf)?;
    Ok(ebpf)
}

/// The offcpu object as a capture loads it, its programs not yet loaded: frame pointers, and
/// stack copies with `--wakers`, both following a held command's exec and forks.
pub fn objects_for_verifier() -> Vec<(&'static str, anyhow::Result<Ebpf>)> {
    [("frame pointers", false), ("--unwind dwarf --wakers", true)]
        .into_iter()
        .map(|(variant, all)| {
            let settings = StackSettings {
                filter: true,
                tgids: vec![1],
                tids: Vec::new(),
                stack_kinds: STACK_KIND_USER | STACK_KIND_KERNEL,
                per_thread: true,
                stack_storage: 1024,
                stack_copy_bytes: if all { MAX_STACK_COPY } else { 0 },
                unwind_buffer: 1 << 20,
                held_command: Some(1),
                fork_tgid_offset: Some(0),
            };
            let offcpu = OffcpuSettings {
                wakers: all,
                state_mask: u32::MAX,
                max_block_ns: u64::MAX,
                ..OffcpuSettings::default()
            };
            (variant, load(&settings, &offcpu))
        })
        .collect()
}

/// The programs loaded and attached.
pub(super) struct Attached {
    pub ebpf: Ebpf,
    /// The count map the programs add to.
    pub counts: CountSlot,
    /// The hook's name, for the start line.
    pub hook: &'static str,
    /// The unwinding thread, when user stacks are copied (`tp_btf` only).
    pub collector: Option<unwind::Collector>,
    /// CLOCK_MONOTONIC just before the switch program was attached (after its verification):
    /// no block the programs time starts earlier, so the capture's window starts here.
    pub since_ns: u64,
}

/// Loads the programs with the offsets their hook needs and attaches them: `tp_btf` where the
/// kernel has BTF, else the classic tracepoint.
pub(super) fn load_and_attach(
    attach: Attach,
    mut settings: StackSettings,
    mut offcpu: OffcpuSettings,
    target: &Target,
    python: (&mut crate::python::Watch, &[u32]),
    notes: &mut Vec<String>,
) -> anyhow::Result<Attached> {
    let (watch, python_pids) = python;
    if attach != Attach::Tracepoint {
        let mut attempt = try_tp_btf(
            &mut settings,
            &mut offcpu,
            target,
            (&mut *watch, python_pids),
            notes,
        );
        if let Err(err) = &attempt
            && settings.stack_copy_bytes != 0
        {
            // Frame pointers before the classic tracepoint: tp_btf keeps --wakers, the
            // command's children and kernel threads told apart.
            let note = format!(
                "stack copies (--unwind dwarf) could not be loaded on this kernel, so user \
                 stacks are walked with frame pointers instead: {err:#}"
            );
            crate::say!("livetrace: warning: {note}");
            notes.push(note);
            settings.stack_copy_bytes = 0;
            attempt = try_tp_btf(
                &mut settings,
                &mut offcpu,
                target,
                (&mut *watch, python_pids),
                notes,
            );
        }
        match attempt {
            Ok((ebpf, counts, collector, since_ns)) => {
                return Ok(Attached {
                    ebpf,
                    counts,
                    hook: "tp_btf/sched_switch",
                    collector,
                    since_ns,
                });
            }
            Err(err) if attach == Attach::Auto => {
                let note = format!(
                    "tp_btf could not be used ({err:#}); falling back to the classic tracepoint"
                );
                crate::say!("livetrace: {note}");
                notes.push(note);
            }
            Err(err) => return Err(err),
        }
    }
    let fields = tracefs::field_offsets("sched", "sched_switch").context(
        "the classic sched_switch tracepoint is unavailable too; offcpu needs kernel BTF \
         (/sys/kernel/btf/vmlinux) or tracefs",
    )?;
    let field = |name: &str| {
        fields
            .get(name)
            .map(|&(offset, _)| offset)
            .ok_or_else(|| anyhow!("the sched_switch tracepoint has no field {name}"))
    };
    offcpu.tp_prev_state_offset = field("prev_state")?;
    offcpu.tp_next_pid_offset = field("next_pid")?;
    if offcpu.wakers {
        notes.push("--wakers needs tp_btf; waker stacks are not recorded in this mode".into());
    }
    if matches!(target, Target::Command(_)) {
        notes.push(
            "in tracepoint mode the command's children are not followed, only its threads".into(),
        );
    }
    offcpu.wakers = false;
    if settings.stack_copy_bytes != 0 {
        notes.push(
            "stack copies (--unwind dwarf) need tp_btf; user stacks were walked with frame \
             pointers"
                .into(),
        );
        settings.stack_copy_bytes = 0;
    }
    let mut ebpf = load(&settings, &offcpu)?;
    let counts = CountSlot::fill(&mut ebpf, settings.stack_storage)?;
    let program: &mut TracePoint = bpf::program_mut(&mut ebpf, SWITCH_TRACEPOINT)?.try_into()?;
    program
        .load()
        .map_err(|e| bpf::program_error(e, "load the sched_switch tracepoint program"))?;
    let since_ns = monotonic_ns();
    program
        .attach("sched", "sched_switch")
        .map_err(|e| bpf::program_error(e, "attach to sched:sched_switch"))?;
    if matches!(target, Target::Command(_)) {
        notes.extend(bpf::follow_exec(&mut ebpf, None)?);
    }
    Ok(Attached {
        ebpf,
        counts,
        hook: "the sched:sched_switch tracepoint",
        collector: None,
        since_ns,
    })
}

fn try_tp_btf(
    settings: &mut StackSettings,
    offcpu: &mut OffcpuSettings,
    target: &Target,
    (watch, python_pids): (&mut crate::python::Watch, &[u32]),
    notes: &mut Vec<String>,
) -> anyhow::Result<(Ebpf, CountSlot, Option<unwind::Collector>, u64)> {
    let kernel = KernelBtf::from_sys_fs()?;
    offcpu.task_pid_offset = kernel.member_offset("task_struct", "pid")?;
    offcpu.task_tgid_offset = kernel.member_offset("task_struct", "tgid")?;
    settings.fork_tgid_offset = Some(offcpu.task_tgid_offset);
    offcpu.task_flags_offset = kernel.member_offset("task_struct", "flags")?;
    let wakers = offcpu.wakers;
    let btf = crate::kernel_btf::aya_btf()?;
    let mut ebpf = load(settings, offcpu)?;
    let counts = CountSlot::fill(&mut ebpf, settings.stack_storage)?;
    // Drained from before the first switch, so that the ring buffer never fills at start.
    let collector = if settings.stack_copy_bytes != 0 {
        let ring = RingBuf::try_from(bpf::take_map(&mut ebpf, UNWIND_SAMPLES)?)?;
        let limits = unwind::CopyLimits::new(
            BpfHashMap::try_from(bpf::take_map(&mut ebpf, COPY_LIMITS)?)?,
            settings.stack_copy_bytes,
        );
        Some(
            unwind::Collector::start(ring, true, Some(limits), Some(watch.interpreters.clone()))
                .context("failed to start the unwinding thread")?,
        )
    } else {
        None
    };
    // Programs on one tracepoint run in the order they were attached: a Python thread's frames
    // go out just before its block's stack copy, which user space joins them to. The Python
    // processes are told of first, or the first blocks would go without their frames. A second
    // program costs every context switch its call (about 0.5 us here): it is attached only
    // where a target runs CPython, or may (a command, which has not started it yet).
    let mut hooks = Vec::new();
    if collector.is_some() {
        watch.refresh(&mut ebpf, python_pids.iter().copied());
        if watch.found_any() || matches!(target, Target::Command(_)) {
            hooks.push((PYTHON, "sched_switch"));
        }
    }
    hooks.push((SWITCH, "sched_switch"));
    if wakers {
        hooks.push((WAKEUP, "sched_wakeup"));
    }
    if matches!(target, Target::Command(_)) {
        hooks.push((FOLLOW_FORK, "sched_process_fork"));
    }
    // The window starts as the switch program starts (its verification, which can take a
    // while, before): it alone starts blocks.
    let mut since_ns = 0;
    for (name, tracepoint) in hooks {
        bpf::load_btf_tracepoint(&mut ebpf, name, tracepoint, &btf)?;
        if name == SWITCH {
            since_ns = monotonic_ns();
        }
        bpf::attach_loaded_btf_tracepoint(&mut ebpf, name, tracepoint)?;
    }
    // A held command is traced from its exec on; copied stacks are unwound against the memory
    // map of the program that made them.
    if matches!(target, Target::Command(_)) || collector.is_some() {
        notes.extend(bpf::follow_exec(&mut ebpf, Some(&btf))?);
    }
    Ok((ebpf, counts, collector, since_ns))
}

/// `BPF_NOEXIST`: the update fails (EEXIST) if the key is there.
const BPF_NOEXIST: u64 = 1;

/// Starts the clocks of the threads found asleep at `start_ns`, under keys whose stacks are the
/// recovered ones (or, with [`START_FILTERED`], marks them left out by --state). A thread that
/// switched out by itself in the meantime keeps its own entry. Returns how many could not be
/// started (a full map).
pub(super) fn seed_blocked(
    ebpf: &mut Ebpf,
    threads: &[already_blocked::BlockedThread],
    start_ns: u64,
) -> anyhow::Result<usize> {
    let mut starts: BpfHashMap<_, u32, OffcpuStart> =
        BpfHashMap::try_from(bpf::map_mut(ebpf, OFFCPU_START)?)?;
    let mut unseeded = 0;
    for thread in threads {
        let mut comm = [0u8; 16];
        for (dst, src) in comm.iter_mut().zip(thread.comm.bytes().take(15)) {
            *dst = src;
        }
        let start = OffcpuStart {
            key: StackKey {
                tgid: thread.tgid,
                tid: thread.tid,
                user_stack_id: STACK_ID_RECOVERED,
                kernel_stack_id: STACK_ID_RECOVERED,
                comm,
            },
            start_ns,
        };
        // BPF_NOEXIST: never replace an entry the kernel made (the thread blocked again
        // since the scan); a full map is counted.
        match starts.insert(thread.tid, start, BPF_NOEXIST) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(_) => unseeded += 1,
        }
    }
    Ok(unseeded)
}
