//! Loading the profile program (with stack copies for `--unwind dwarf` where the verifier
//! accepts them, else frame pointers) and attaching it to the perf events that sample.

use anyhow::Context as _;
use aya::{
    maps::RingBuf,
    programs::{
        PerfEvent,
        perf_event::{HardwareEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use livetrace_common::{
    objects::profile::{SAMPLE, SAMPLE_PYTHON},
    stacks::{STACK_KIND_KERNEL, STACK_KIND_USER},
    unwind::{COPY_LIMITS, MAX_STACK_COPY, UNWIND_SAMPLES},
};

use super::Event;
use crate::{
    bpf::{self, Object, stacks::StackSettings},
    unwind,
};

/// Loads the object and the profile program: with stack copies for `--unwind dwarf`, or, where
/// the kernel's verifier refuses them, without them (frame pointers, walked in the kernel),
/// saying so: a mode that cannot load never fails the capture. With copies, the unwinding
/// thread is started before the program is attached, so the ring buffer never fills at start.
/// `python_frames`: load the sampler that reads CPython's frames too (with copies). Returns the
/// name of the program loaded.
pub(super) fn load(
    settings: StackSettings,
    per_thread: bool,
    (pythons, python_frames): (&crate::python::Interpreters, bool),
    notes: &mut Vec<String>,
) -> anyhow::Result<(aya::Ebpf, Option<unwind::Collector>, &'static str)> {
    if settings.stack_copy_bytes != 0 {
        let sampler = if python_frames { SAMPLE_PYTHON } else { SAMPLE };
        match load_program(&settings, sampler) {
            Ok(mut ebpf) => {
                let ring = RingBuf::try_from(bpf::take_map(&mut ebpf, UNWIND_SAMPLES)?)?;
                let limits = unwind::CopyLimits::new(
                    aya::maps::HashMap::try_from(bpf::take_map(&mut ebpf, COPY_LIMITS)?)?,
                    settings.stack_copy_bytes,
                );
                let collector =
                    unwind::Collector::start(ring, per_thread, Some(limits), Some(pythons.clone()))
                        .context("failed to start the unwinding thread")?;
                return Ok((ebpf, Some(collector), sampler));
            }
            Err(err) => {
                let note = format!(
                    "stack copies (--unwind dwarf) could not be loaded on this kernel, so user \
                     stacks are walked with frame pointers instead: {err:#}"
                );
                crate::say!("livetrace: warning: {note}");
                notes.push(note);
            }
        }
    }
    let settings = StackSettings {
        stack_copy_bytes: 0,
        ..settings
    };
    Ok((load_program(&settings, SAMPLE)?, None, SAMPLE))
}

/// Whether this kernel's verifier accepts the profile program, walking user stacks with frame
/// pointers or (`dwarf`) copying them: loaded as a capture would load it, not attached, and
/// unloaded again (`livetrace check`).
pub fn verifier_accepts(dwarf: bool) -> anyhow::Result<()> {
    load_program(&verifier_settings(dwarf), SAMPLE)?;
    if dwarf {
        load_program(&verifier_settings(dwarf), SAMPLE_PYTHON)?;
    }
    Ok(())
}

/// The profile object as a capture loads it, its programs not yet loaded: frame pointers, and
/// stack copies for `--unwind dwarf`, both following a held command's exec and forks.
pub fn objects_for_verifier() -> Vec<(&'static str, anyhow::Result<aya::Ebpf>)> {
    [("frame pointers", false), ("--unwind dwarf", true)]
        .into_iter()
        .map(|(variant, dwarf)| {
            let settings = StackSettings {
                held_command: Some(1),
                fork_tgid_offset: Some(0),
                ..verifier_settings(dwarf)
            };
            (variant, bpf::stacks::load(Object::Profile, &settings))
        })
        .collect()
}

fn verifier_settings(dwarf: bool) -> StackSettings {
    StackSettings {
        filter: false,
        tgids: Vec::new(),
        tids: Vec::new(),
        stack_kinds: STACK_KIND_USER | STACK_KIND_KERNEL,
        per_thread: false,
        stack_storage: 1024,
        stack_copy_bytes: if dwarf { MAX_STACK_COPY } else { 0 },
        unwind_buffer: 1 << 20,
        held_command: None,
        fork_tgid_offset: None,
    }
}

fn load_program(settings: &StackSettings, sampler: &str) -> anyhow::Result<aya::Ebpf> {
    let mut ebpf = bpf::stacks::load(Object::Profile, settings)?;
    let program: &mut PerfEvent = bpf::program_mut(&mut ebpf, sampler)?.try_into()?;
    program
        .load()
        .map_err(|e| bpf::program_error(e, &format!("load the {sampler} BPF program")))?;
    Ok(ebpf)
}

/// Attaches the program to one perf event per online CPU (whole system, or targets filtered in
/// the kernel), or, given `per_task`, to that held command with `inherit`, so its children and
/// threads are followed from their first instruction. Returns the event's name and the online
/// CPUs.
pub(super) fn attach(
    program: &mut PerfEvent,
    event: Event,
    frequency: u64,
    per_task: Option<u32>,
    notes: &mut Vec<String>,
) -> anyhow::Result<(&'static str, Vec<u32>)> {
    let cpus = aya::util::online_cpus()
        .map_err(|(path, err)| anyhow::anyhow!("failed to read {path}: {err}"))?;
    let mut config = match event {
        Event::CpuClock => PerfEventConfig::Software(SoftwareEvent::CpuClock),
        Event::Cycles => PerfEventConfig::Hardware(HardwareEvent::CpuCycles),
    };
    let mut name = match event {
        Event::CpuClock => "cpu-clock",
        Event::Cycles => "cycles",
    };
    loop {
        let result = match per_task {
            Some(pid) => program
                .attach(
                    config,
                    PerfEventScope::OneProcess { pid, cpu: None },
                    SamplePolicy::Frequency(frequency),
                    true,
                )
                .map(|_| ()),
            None => cpus.iter().try_for_each(|&cpu| {
                program
                    .attach(
                        config,
                        PerfEventScope::AllProcessesOneCpu { cpu },
                        SamplePolicy::Frequency(frequency),
                        false,
                    )
                    .map(|_| ())
            }),
        };
        match result {
            Ok(()) => return Ok((name, cpus)),
            Err(err) if name == "cycles" => {
                let note = format!(
                    "the cycles hardware event is not available here ({err}); sampling on the \
                     cpu-clock software event instead"
                );
                crate::say!("livetrace: {note}");
                notes.push(note);
                config = PerfEventConfig::Software(SoftwareEvent::CpuClock);
                name = "cpu-clock";
                // Links made before the failure stay attached to the same program, and would
                // double-count: start again from a clean program.
                program.unload().ok();
                program
                    .load()
                    .map_err(|e| bpf::program_error(e, "reload the profile_cpu BPF program"))?;
            }
            Err(err) => {
                return Err(
                    bpf::program_error(err, &format!("attach to the {name} perf event")).into(),
                );
            }
        }
    }
}
