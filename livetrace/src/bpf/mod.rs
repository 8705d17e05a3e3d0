//! livetrace's BPF objects, one per tool, compiled from `livetrace-ebpf` by `build.rs` and
//! embedded in the binary: loading them with settings passed as load-time globals and map sizes
//! fixed before the maps are created, reaching their maps and programs by the names in
//! `livetrace-common`, moving the capture's control slot, and reading the counters back.
//! [`stacks`] holds what the stack tools (profile, offcpu) load in common.

pub mod counts;
mod error;
pub mod stacks;
pub mod verify;

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use livetrace_common::{
    control,
    follow::FOLLOW_EXEC,
    objects,
    stacks::{COUNTER_SLOTS, COUNTERS, Counter, HELD_COMMAND_STARTED, TARGET_TGIDS, TARGET_TIDS},
};

pub use error::{BpfError, errno, program_error, summarize_verifier_log};

/// One tool's BPF object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Profile,
    Offcpu,
    UprobeHist,
}

/// The objects `build.rs` compiled, aligned for the ELF parser.
static PROFILE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profile"));
static OFFCPU: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/offcpu"));
static UPROBE_HIST: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/uprobe-hist"));

impl Object {
    pub const ALL: [Self; 3] = [Self::Profile, Self::Offcpu, Self::UprobeHist];

    pub fn name(self) -> &'static str {
        match self {
            Self::Profile => objects::profile::OBJECT,
            Self::Offcpu => objects::offcpu::OBJECT,
            Self::UprobeHist => objects::uprobe_hist::OBJECT,
        }
    }

    /// The ELF object.
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Self::Profile => PROFILE,
            Self::Offcpu => OFFCPU,
            Self::UprobeHist => UPROBE_HIST,
        }
    }

    /// The names of its programs.
    pub fn programs(self) -> &'static [&'static str] {
        match self {
            Self::Profile => objects::profile::PROGRAMS,
            Self::Offcpu => objects::offcpu::PROGRAMS,
            Self::UprobeHist => objects::uprobe_hist::PROGRAMS,
        }
    }
}

/// Creates the object's maps (sized as `loader` says) and reads its programs; none is loaded
/// into the kernel yet.
pub fn load(object: Object, loader: &mut EbpfLoader<'_>) -> Result<Ebpf, BpfError> {
    loader
        .load(object.bytes())
        .map_err(|source| BpfError::Load {
            object: object.name(),
            source,
        })
}

/// Moves the capture's control slot ([`control::RUNNING`] when the capture starts,
/// [`control::STOPPED`] when it ends: the programs stop recording at once, however long
/// detaching them then takes).
pub fn set_control(bpf: &mut Ebpf, state: u32) -> anyhow::Result<()> {
    let mut slot: Array<_, u32> = Array::try_from(map_mut(bpf, control::CONTROL)?)?;
    slot.set(0, state, 0).context(if state == control::STOPPED {
        "failed to tell the BPF programs to stop"
    } else {
        "failed to tell the BPF programs that the capture runs"
    })
}

/// Fills the target filter maps.
pub fn set_targets(bpf: &mut Ebpf, tgids: &[u32], tids: &[u32]) -> anyhow::Result<()> {
    for (map_name, ids) in [(TARGET_TGIDS, tgids), (TARGET_TIDS, tids)] {
        let mut map: HashMap<_, u32, u8> = HashMap::try_from(map_mut(bpf, map_name)?)?;
        for id in ids {
            map.insert(id, 1, 0)
                .with_context(|| format!("failed to add {id} to the BPF map {map_name}"))?;
        }
    }
    Ok(())
}

/// Loads the `tp_btf` program `name` for the kernel tracepoint `tracepoint` and attaches it,
/// with errors that say which.
pub fn attach_btf_tracepoint(
    bpf: &mut Ebpf,
    name: &str,
    tracepoint: &str,
    btf: &aya::Btf,
) -> anyhow::Result<()> {
    load_btf_tracepoint(bpf, name, tracepoint, btf)?;
    attach_loaded_btf_tracepoint(bpf, name, tracepoint)
}

/// The first half of [`attach_btf_tracepoint`]: the verifier's part, which can take long.
pub fn load_btf_tracepoint(
    bpf: &mut Ebpf,
    name: &str,
    tracepoint: &str,
    btf: &aya::Btf,
) -> anyhow::Result<()> {
    let program: &mut aya::programs::BtfTracePoint = program_mut(bpf, name)?.try_into()?;
    program
        .load(tracepoint, btf)
        .map_err(|e| program_error(e, &format!("load tp_btf/{tracepoint}")))?;
    Ok(())
}

/// The second half of [`attach_btf_tracepoint`]: from here on the program runs.
pub fn attach_loaded_btf_tracepoint(
    bpf: &mut Ebpf,
    name: &str,
    tracepoint: &str,
) -> anyhow::Result<()> {
    let program: &mut aya::programs::BtfTracePoint = program_mut(bpf, name)?.try_into()?;
    program
        .attach()
        .map_err(|e| program_error(e, &format!("attach tp_btf/{tracepoint}")))?;
    Ok(())
}

/// Attaches the exec watcher (`sched_process_exec`, tp_btf): a held command is recorded from its
/// exec on, and the unwinding thread learns of every target's exec in order with its stacks.
/// Where it cannot be attached (no BTF), a held command is recorded from now on instead, as if
/// it had exec'd already, and the unwinding thread finds a new memory map by itself, later; the
/// returned note says so.
pub fn follow_exec(bpf: &mut Ebpf, btf: Option<&aya::Btf>) -> anyhow::Result<Option<String>> {
    let attached = match btf {
        Some(btf) => attach_btf_tracepoint(bpf, FOLLOW_EXEC, "sched_process_exec", btf),
        None => crate::kernel_btf::aya_btf()
            .and_then(|btf| attach_btf_tracepoint(bpf, FOLLOW_EXEC, "sched_process_exec", &btf)),
    };
    let Err(err) = attached else {
        return Ok(None);
    };
    let mut started: Array<_, u32> = Array::try_from(map_mut(bpf, HELD_COMMAND_STARTED)?)?;
    started
        .set(0, 1, 0)
        .context("failed to mark the command as started")?;
    Ok(Some(format!(
        "execs are not followed ({err:#}): the command is recorded from before its exec, and a \
         process that execs may have stacks cut short for half a second after"
    )))
}

/// livetrace's own cost in the kernel, as the kernel counts it (only while
/// `kernel.bpf_stats_enabled=1`, which livetrace does not switch on by itself: it slows every BPF
/// program on the machine a little). Read before the programs are unloaded.
pub fn in_kernel_cost(bpf: &Ebpf) -> String {
    let (mut time, mut runs) = (std::time::Duration::ZERO, 0u64);
    for (_, program) in bpf.programs() {
        if let Ok(info) = program.info() {
            time += info.run_time();
            runs += info.run_count();
        }
    }
    if runs == 0 {
        return "in-kernel cost: not measured (`sysctl kernel.bpf_stats_enabled=1` makes the \
                kernel count it)"
            .into();
    }
    format!(
        "in-kernel cost: {:.0} ns per program run, {runs} runs, {:.3} s of CPU in total",
        time.as_nanos() as f64 / runs as f64,
        time.as_secs_f64()
    )
}

/// Detaches and unloads every program that was loaded.
pub fn unload_all(bpf: &mut Ebpf) {
    use aya::programs::Program;
    for (_, program) in bpf.programs_mut() {
        // Programs never loaded (another hook, an option not given) answer NotLoaded.
        let _ = match program {
            Program::BtfTracePoint(p) => p.unload(),
            Program::TracePoint(p) => p.unload(),
            Program::PerfEvent(p) => p.unload(),
            Program::UProbe(p) => p.unload(),
            _ => Ok(()),
        };
    }
}

fn missing(kind: &'static str, name: &str) -> BpfError {
    BpfError::Missing {
        kind,
        name: name.to_owned(),
    }
}

pub fn program_mut<'a>(
    bpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program, BpfError> {
    bpf.program_mut(name)
        .ok_or_else(|| missing("program", name))
}

pub fn map_mut<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, BpfError> {
    bpf.map_mut(name).ok_or_else(|| missing("map", name))
}

pub fn map_ref<'a>(bpf: &'a Ebpf, name: &str) -> Result<&'a aya::maps::Map, BpfError> {
    bpf.map(name).ok_or_else(|| missing("map", name))
}

pub fn take_map(bpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, BpfError> {
    bpf.take_map(name).ok_or_else(|| missing("map", name))
}

/// The stack tools' per-CPU counters, summed, read in place (the capture may still be running).
pub fn read_counters_in(bpf: &Ebpf) -> anyhow::Result<[u64; COUNTER_SLOTS as usize]> {
    read_counters(&PerCpuArray::try_from(map_ref(bpf, COUNTERS)?)?)
}

/// Sums the per-CPU counters.
pub fn read_counters<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> anyhow::Result<[u64; COUNTER_SLOTS as usize]> {
    let mut totals = [0u64; COUNTER_SLOTS as usize];
    for (slot, total) in totals.iter_mut().enumerate() {
        let values = map
            .get(&(slot as u32), 0)
            .context("failed to read the BPF counters")?;
        *total = values.iter().sum();
    }
    Ok(totals)
}

/// One counter's value on each CPU (indexed by CPU number), read in place.
pub fn per_cpu_counter(bpf: &Ebpf, counter: Counter) -> anyhow::Result<Vec<u64>> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map_ref(bpf, COUNTERS)?)?;
    let values = map
        .get(&(counter as u32), 0)
        .context("failed to read the BPF counters")?;
    Ok(values.iter().copied().collect())
}

pub fn counter(totals: &[u64; COUNTER_SLOTS as usize], counter: Counter) -> u64 {
    totals[counter as usize]
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    use super::*;

    /// The names of an object's programs (sections other than maps, license and data).
    fn programs_in(object: Object) -> Vec<String> {
        let elf = object::File::parse(object.bytes()).expect("an ELF object");
        elf.symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text && s.is_global())
            .filter(|s| {
                s.section_index()
                    .and_then(|i| elf.section_by_index(i).ok())
                    .and_then(|sec| sec.name().ok().map(str::to_owned))
                    .is_some_and(|name| name != ".text")
            })
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .collect()
    }

    fn symbols_in(object: Object) -> Vec<String> {
        let elf = object::File::parse(object.bytes()).expect("an ELF object");
        elf.symbols()
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .collect()
    }

    /// Every program name user space looks up is in its object, and every program in an object
    /// is one user space knows: checked on the embedded objects, without loading them.
    #[test]
    fn program_names_match_the_objects() {
        for object in Object::ALL {
            let mut found = programs_in(object);
            let mut expected: Vec<String> =
                object.programs().iter().map(|&p| p.to_owned()).collect();
            found.sort();
            expected.sort();
            assert_eq!(found, expected, "programs of the {} object", object.name());
        }
    }

    /// Every map and global user space names is in the object of each tool that uses it, and
    /// no object holds another tool's maps.
    #[test]
    fn map_and_global_names_match_the_objects() {
        use livetrace_common::{
            follow, offcpu, python as py, stacks as s, unwind as u, uprobe_hist as h,
        };
        let shared = [
            control::CONTROL,
            s::TARGET_TGIDS,
            s::TARGET_TIDS,
            s::SEEN_PROCESSES,
            s::NEW_PROCESSES,
            s::HELD_COMMAND_STARTED,
            s::FILTER_TARGETS,
            s::HELD_COMMAND,
            follow::FORK_TGID_OFFSET,
        ];
        let stack = [
            s::STACK_COUNTS,
            s::STACK_TRACES,
            s::COUNTERS,
            s::STACK_KINDS,
            s::PER_THREAD,
            u::UNWIND_SAMPLES,
            u::UNWIND_SCRATCH,
            u::COPY_LIMITS,
            u::STACK_COPY_BYTES,
        ];
        let offcpu_own = [
            offcpu::OFFCPU_START,
            offcpu::WAKERS,
            offcpu::WAKE_COUNTS,
            offcpu::TASK_PID_OFFSET,
            offcpu::TASK_TGID_OFFSET,
            offcpu::TASK_FLAGS_OFFSET,
            offcpu::TP_PREV_STATE_OFFSET,
            offcpu::TP_NEXT_PID_OFFSET,
            offcpu::STATE_MASK,
            offcpu::MIN_BLOCK_NS,
            offcpu::MAX_BLOCK_NS,
            offcpu::INCLUDE_KERNEL_THREADS,
            offcpu::RECORD_WAKERS,
        ];
        let uprobe_own = [
            h::HISTOGRAM,
            h::WINDOW,
            h::THREADS,
            h::THREAD_SCRATCH,
            h::SLOW_CALLS,
            h::STACKS,
            h::COUNTERS,
            h::SLOW_NS,
        ];
        let python = [py::PY_PROCESSES, py::PY_THREADS, py::PY_SCRATCH];
        let has = |object: Object, names: &[&str]| {
            let symbols = symbols_in(object);
            names.iter().all(|n| symbols.iter().any(|s| s == n))
        };
        let has_none = |object: Object, names: &[&str]| {
            let symbols = symbols_in(object);
            names.iter().all(|n| !symbols.iter().any(|s| s == n))
        };
        for object in Object::ALL {
            assert!(has(object, &shared), "{}", object.name());
        }
        assert!(has(Object::Profile, &stack) && has(Object::Offcpu, &stack));
        assert!(has(Object::Profile, &python) && has(Object::Offcpu, &python));
        assert!(has_none(Object::UprobeHist, &python));
        assert!(has(Object::Offcpu, &offcpu_own) && has_none(Object::Profile, &offcpu_own));
        assert!(has(Object::UprobeHist, &uprobe_own));
        assert!(has_none(Object::Profile, &uprobe_own) && has_none(Object::Offcpu, &uprobe_own));
        // uprobe-hist's object holds no stack maps (the globals come with the library).
        assert!(
            has_none(Object::UprobeHist, &stack[..3]) && has_none(Object::UprobeHist, &stack[5..8])
        );
    }
}
