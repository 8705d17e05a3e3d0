//! Draining the weighted-stack maps that `profile` and `offcpu` fill, and turning them into a
//! symbolised [`StackProfile`]. A sample whose stack could not be collected is kept, under a
//! `[lost ...]` frame that names the cause, and counted in the data-quality record.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, RingBuf, StackTraceMap},
};
use livetrace_common::{
    offcpu::{WAKE_COUNTS, WakeKey},
    stacks::{NEW_PROCESSES, SEEN_PROCESSES, STACK_TRACES, StackKey},
};

mod frames;
mod stack_ref;

use self::frames::{KeyFindings, Names, PYTHON_UNNAMED, key_frames};
use self::stack_ref::RING_FULL;
pub use self::stack_ref::StackRef;
use crate::{
    bpf::{self, counts::Counts},
    model::{DataQuality, Frame, FrameKind, StackProfile, WeightUnit, WeightedStack},
    symbolize::Symbolizer,
};

/// The most frames `bpf_get_stackid` records (`PERF_MAX_STACK_DEPTH`, the size of a stack-trace
/// map's value): a walk that fills them stopped at the limit, not at the stack's root.
pub const KERNEL_MAX_DEPTH: usize = 127;

/// The maps' contents, copied out of the kernel.
#[derive(Default)]
pub struct RawStacks {
    pub entries: Vec<(StackKey, u64)>,
    /// offcpu `--wakers`: blocked stacks joined with their wakers' stacks.
    pub wake_entries: Vec<(WakeKey, u64)>,
    /// Stack id to its addresses, leaf first.
    pub traces: HashMap<u32, Vec<u64>>,
    /// Stacks recovered from /proc for threads already blocked at start, by tid; keys whose
    /// stack ids are [`STACK_ID_RECOVERED`] refer to these.
    pub recovered: HashMap<u32, RecoveredStacks>,
    /// `--unwind dwarf`: why a synthetic user stack (by id) stops short of its root.
    pub cut_short: HashMap<u32, String>,
    /// `--unwind dwarf`: the Python frames that synthetic user stacks hold as tagged values
    /// (`crate::python::merge::PYTHON_TAG`), by index.
    pub python_frames: Vec<crate::python::PythonFrame>,
    /// Samples of Python processes without some or all of their Python frames, by cause.
    pub python_losses: BTreeMap<String, u64>,
    /// Python's names of its threads (`threading`), by tid, for `--per-thread`.
    pub thread_names: HashMap<u32, String>,
}

/// A thread's stacks recovered from /proc rather than by the BPF programs (offcpu: threads
/// already blocked when the capture began).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveredStacks {
    /// Kernel function names, outermost first.
    pub kernel_frames: Vec<String>,
    /// User return addresses, leaf first (as BPF stacks are), `pc` first.
    pub user_addrs: Vec<u64>,
}

/// The footer's note when a second stop signal cut symbolisation short.
pub const INTERRUPTED_NOTE: &str = "symbolisation was interrupted by a second signal: frames not \
     named by then are raw addresses ([module+0xoffset] or 0xaddress)";

/// The marker frame under which recovered stacks of already-blocked threads appear.
pub const RECOVERED_MARKER: &str = "[blocked since before the capture]";

/// The processes that have entries so far (read four times a second during a capture, so that each
/// one's memory map is snapshotted while it still exists).
pub fn processes_seen(counts: &Counts) -> HashSet<u32> {
    counts
        .keys()
        .filter_map(Result::ok)
        .map(|k| k.tgid)
        .collect()
}

/// The ring buffer on which the BPF programs announce each process the first time they record
/// it; take it before the capture and pass it to [`note_new_processes`] often.
pub fn new_processes(bpf: &mut Ebpf) -> anyhow::Result<RingBuf<MapData>> {
    Ok(RingBuf::try_from(bpf::take_map(bpf, NEW_PROCESSES)?)?)
}

/// Snapshots every process announced since the last call, while it is (most likely) alive.
pub fn note_new_processes(ring: &mut RingBuf<MapData>, symbolizer: &mut Symbolizer) {
    while let Some(item) = ring.next() {
        let Some(bytes) = item.get(..4) else { continue };
        let tgid = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        drop(item);
        symbolizer.note_process(tgid);
    }
}

/// Copies the counts (and, with `wakers`, the blocked/waker pairs) and the stacks they refer to
/// out of the kernel: `counts` is the count map in use, read in place (a SIGUSR1 snapshot reads
/// it mid-capture), or one taken out of use ([`bpf::counts::CountSlot::swap`]: `record` cuts its
/// time buckets so). Stacks stay in their map.
///
/// `unwound` adds the stacks unwound in user space (`--unwind dwarf`): their user stacks are
/// synthetic ids into [`RawStacks::traces`], their kernel stacks ids in the kernel's map.
/// `extra` entries (offcpu's blocks still going on) are added before the stacks are fetched.
pub fn drain(
    bpf: &Ebpf,
    (wakers, counts): (bool, &Counts),
    unwound: Option<crate::unwind::Unwound>,
    extra: Vec<(StackKey, u64)>,
) -> anyhow::Result<RawStacks> {
    let mut raw = RawStacks {
        entries: extra,
        ..RawStacks::default()
    };
    raw.entries.extend(bpf::counts::entries(counts)?);
    let mut synthetic = HashMap::new();
    if let Some(mut unwound) = unwound {
        raw.python_frames = std::mem::take(&mut unwound.python_frames);
        raw.python_losses = std::mem::take(&mut unwound.python_losses);
        raw.thread_names = std::mem::take(&mut unwound.thread_names);
        let (entries, traces, cut_short) = unwound.into_entries();
        raw.entries.extend(entries);
        synthetic = traces;
        raw.cut_short = cut_short;
    }
    if wakers {
        let wake: BpfHashMap<&MapData, WakeKey, u64> =
            BpfHashMap::try_from(bpf::map_ref(bpf, WAKE_COUNTS)?)?;
        for entry in wake.iter() {
            raw.wake_entries
                .push(entry.context("failed to read the waker counts map")?);
        }
    }
    let traces: StackTraceMap<&MapData> =
        StackTraceMap::try_from(bpf::map_ref(bpf, STACK_TRACES)?)?;
    let ids: HashSet<u32> = raw
        .keys()
        .flat_map(|k| [k.user_stack_id, k.kernel_stack_id])
        .filter_map(|id| StackRef::of(id).id())
        .filter(|id| !synthetic.contains_key(id))
        .collect();
    for id in ids {
        // A missing id is reported as a lost stack when the profile is built.
        if let Ok(trace) = traces.get(&id, 0) {
            raw.traces
                .insert(id, trace.frames().iter().map(|f| f.ip).collect());
        }
    }
    raw.traces.extend(synthetic);
    Ok(raw)
}

/// Keeps a long capture's kernel maps from filling (`record`, after each take): forgets the
/// processes that have exited from the map of processes announced (so a reused pid is announced
/// again), and empties the stack map once it holds a sixteenth of its capacity. A stack map is
/// a hash table without chaining: a new stack collides (and is lost) about as often as the
/// share of it that is full, so a map let fill loses more and more; emptied at a sixteenth,
/// it loses at most 6% and a steady workload's few hundred stacks never reach it. Emptying
/// races with the programs: a sample counted after the take whose stack was stored before the
/// emptying shows `[lost ... stack]`, counted. Returns whether the stack map was emptied.
pub fn keep_maps_bounded(bpf: &mut Ebpf, stack_storage: u32) -> anyhow::Result<bool> {
    let mut seen: BpfHashMap<&mut MapData, u32, u8> =
        BpfHashMap::try_from(bpf::map_mut(bpf, SEEN_PROCESSES)?)?;
    let gone: Vec<u32> = seen
        .keys()
        .filter_map(Result::ok)
        .filter(|&p| !crate::proc::task::is_alive(p))
        .collect();
    for pid in gone {
        let _ = seen.remove(&pid);
    }
    let mut traces: StackTraceMap<&mut MapData> =
        StackTraceMap::try_from(bpf::map_mut(bpf, STACK_TRACES)?)?;
    let ids: Vec<u32> = traces.stack_ids().filter_map(Result::ok).collect();
    if ids.len() < stack_storage as usize / 16 {
        return Ok(false);
    }
    for id in ids {
        let _ = traces.remove(&id);
    }
    Ok(true)
}

impl RawStacks {
    /// Every stack key, the wakers' included.
    fn keys(&self) -> impl Iterator<Item = &StackKey> {
        self.entries.iter().map(|(k, _)| k).chain(
            self.wake_entries
                .iter()
                .flat_map(|(k, _)| [&k.blocked, &k.waker]),
        )
    }

    fn trace(&self, stack: StackRef) -> Option<&[u64]> {
        self.traces.get(&stack.id()?).map(Vec::as_slice)
    }

    /// The user addresses of a key's stack, leaf first, wherever they came from.
    fn user_trace(&self, key: &StackKey) -> Option<&[u64]> {
        match StackRef::of(key.user_stack_id) {
            StackRef::Recovered => self
                .recovered
                .get(&key.tid)
                .map(|t| t.user_addrs.as_slice()),
            stack => self.trace(stack),
        }
    }
}

/// How a stack tool wants its stacks presented.
pub struct BuildOptions {
    pub title: String,
    pub unit: WeightUnit,
    pub per_thread: bool,
    /// How many entries the maps could hold, for the advice when they filled up.
    pub stack_storage: u32,
    /// Divides raw weights (e.g. 1000 turns offcpu's nanoseconds into microseconds).
    pub weight_divisor: u64,
    /// For sampled profiles, the time one sample stands for (1e9 / Hz).
    pub period_ns: Option<u64>,
    /// Whether `--unwind dwarf` may be suggested for short stacks (offcpu --wakers cannot use
    /// it).
    pub dwarf_possible: bool,
}

/// Symbolises every stack (one batch per process, one for the kernel) and assembles the profile.
pub fn build_profile(
    raw: &RawStacks,
    symbolizer: &mut Symbolizer,
    options: &BuildOptions,
    mut quality: DataQuality,
) -> StackProfile {
    let names = Names::resolve(raw, symbolizer);
    if symbolizer.interrupted() {
        quality.notes.push(INTERRUPTED_NOTE.into());
    }
    let divisor = options.weight_divisor.max(1);
    let mut stacks = Vec::with_capacity(raw.entries.len() + raw.wake_entries.len());
    let mut map_full = false;
    let mut modules: BTreeSet<(u32, Arc<str>)> = BTreeSet::new();
    let mut python_unnamed: BTreeSet<u32> = BTreeSet::new();
    let mut record = |frames: Vec<Frame>, findings: KeyFindings, weight: u64| {
        if !findings.unknown_reasons.is_empty() {
            quality.unknown_weight += weight;
            for reason in findings.unknown_reasons {
                *quality.unknown_frames.entry(reason.to_owned()).or_default() += weight;
            }
        }
        for loss in findings.losses {
            *quality.stack_losses.entry(loss).or_default() += weight;
        }
        for cause in findings.cut_short {
            *quality.stacks_cut_short.entry(cause).or_default() += weight;
        }
        map_full |= findings.map_full;
        modules.extend(findings.modules);
        python_unnamed.extend(findings.python_unnamed);
        stacks.push(WeightedStack { frames, weight });
    };
    for (key, weight) in &raw.entries {
        let weight = (weight + divisor / 2) / divisor;
        let mut findings = KeyFindings::default();
        let frames = key_frames(
            raw,
            &names,
            symbolizer,
            key,
            options.per_thread,
            &mut findings,
        );
        record(frames, findings, weight);
    }
    for (key, weight) in &raw.wake_entries {
        let weight = (weight + divisor / 2) / divisor;
        let mut findings = KeyFindings::default();
        // offwaketime's layout: the blocked stack root first, "--", then the waker's stack
        // leaf first, ending in the waker's name, so the two meet at the hand-off.
        let mut frames = key_frames(
            raw,
            &names,
            symbolizer,
            &key.blocked,
            options.per_thread,
            &mut findings,
        );
        frames.push(Frame::new(FrameKind::Lost, "--"));
        let mut waker = key_frames(raw, &names, symbolizer, &key.waker, false, &mut findings);
        waker.reverse();
        frames.extend(waker);
        record(frames, findings, weight);
    }

    add_advice(&mut quality, options, map_full, symbolizer);
    quality.advice.extend(python_advice(
        &python_unnamed,
        symbolizer,
        options.dwarf_possible,
    ));
    let build_ids = build_ids(symbolizer, modules);
    let mut profile = StackProfile {
        title: options.title.clone(),
        unit: options.unit,
        period_ns: options.period_ns,
        stacks,
        quality,
        build_ids,
    };
    profile.normalize();
    profile
}

/// What to do about the stacks that were lost, cut short or left unnamed.
fn add_advice(
    quality: &mut DataQuality,
    options: &BuildOptions,
    map_full: bool,
    symbolizer: &Symbolizer,
) {
    if options.dwarf_possible
        && quality
            .stacks_cut_short
            .keys()
            .any(|k| k.starts_with("user stack walk filled"))
    {
        quality.advice.push(
            "user stacks that fill the kernel's 127 frames are complete with --unwind dwarf \
             (up to 512 frames, within its 16 KiB stack copy)"
                .into(),
        );
    }
    if quality.stack_losses.keys().any(|k| k.contains(RING_FULL)) {
        quality.advice.push(
            "stack copies were dropped because the unwind ring buffer was full: raise \
             --unwind-buffer-size (default 8m), or lower the sampling rate, or use --unwind fp"
                .into(),
        );
    }
    let collisions = quality.stack_losses.keys().any(|k| k.contains("collision"));
    if map_full || collisions || quality.counts_map_full > 0 {
        quality.advice.push(format!(
            "stacks were lost to full or colliding maps: raise --stack-storage-size (now {})",
            options.stack_storage
        ));
    }
    let dwarf = quality
        .unwind_mode
        .as_deref()
        .is_some_and(|m| m.contains("DWARF"));
    let advice = unknown_frame_advice(
        quality.unknown_frames.keys().map(String::as_str),
        dwarf,
        options.dwarf_possible,
    );
    quality.advice.extend(advice);
    quality.advice.extend(symbolizer.jit_advice());
    quality.notes.extend(symbolizer.perf_map_notes());
}

/// The build IDs of the modules in the stacks, each read once (not after Ctrl-C twice).
fn build_ids(
    symbolizer: &mut Symbolizer,
    modules: BTreeSet<(u32, Arc<str>)>,
) -> BTreeMap<Arc<str>, String> {
    let mut build_ids = BTreeMap::new();
    for (pid, module) in modules {
        if !build_ids.contains_key(&module)
            && !crate::signals::aborted()
            && let Some(id) = symbolizer.build_id(pid, &module)
        {
            build_ids.insert(module, id);
        }
    }
    build_ids
}

/// How to get Python functions named, for the first few processes whose stacks showed them only
/// as the interpreter. `dwarf_possible`: whether this capture could have read them (offcpu
/// --wakers walks frame pointers only, and must not be told to use what it refuses).
fn python_advice(
    pids: &BTreeSet<u32>,
    symbolizer: &Symbolizer,
    dwarf_possible: bool,
) -> Vec<String> {
    pids.iter()
        .take(3)
        .map(|&pid| {
            let runtime = symbolizer
                .runtime_of(pid)
                .unwrap_or(crate::runtimes::Runtime::Python(None));
            let advice = if runtime.frames_read() && !dwarf_possible {
                format!(
                    "its Python functions show as the interpreter's frames \
                     (_PyEval_EvalFrameDefault): stacks walked with frame pointers do not read \
                     them, as --wakers does; without --wakers they are read \
                     (`py-spy dump --pid {pid}` names them meanwhile)"
                )
            } else {
                runtime.advice(pid)
            };
            format!("pid {pid} ({}): {advice}", runtime.name())
        })
        .collect()
}

/// What to do about frames left unnamed, by why they were (`unknown_frames`' reasons); JIT
/// and Python frames get their runtime's own advice elsewhere.
fn unknown_frame_advice<'a>(
    reasons: impl Iterator<Item = &'a str> + Clone,
    dwarf: bool,
    dwarf_possible: bool,
) -> Vec<String> {
    let exited = |reason: &str| reason.contains("exited");
    let mut advice = Vec::new();
    if reasons.clone().any(exited) {
        advice.push(
            "some frames belong to processes that exited before livetrace could read their \
             memory map: start the program under livetrace (-- COMMAND) to follow its \
             short-lived processes from their start"
                .into(),
        );
    }
    if !reasons
        .into_iter()
        .any(|r| !r.starts_with("JIT") && r != PYTHON_UNNAMED && !exited(r))
    {
        return advice;
    }
    advice.push(if dwarf {
        // The stacks were unwound with CFI: what is missing is names, not frames.
        "unresolved frames are code whose binary has no symbols: install its debug symbols \
         (Debian: the -dbgsym package) or profile an unstripped build"
            .into()
    } else {
        format!(
            "unresolved frames usually mean stripped binaries or code built without frame \
             pointers: install debug symbols, or build with -fno-omit-frame-pointer \
             (Rust: -C force-frame-pointers=yes){}",
            if dwarf_possible {
                ", or try --unwind dwarf"
            } else {
                ""
            }
        )
    });
    advice
}

pub fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    crate::names::sanitized(&String::from_utf8_lossy(&bytes[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of processes that exited too soon are not blamed on missing debug symbols.
    #[test]
    fn unnamed_frames_of_exited_processes_get_their_own_advice() {
        let exited = ["process exited before it could be looked at"];
        let advice = unknown_frame_advice(exited.iter().copied(), true, true);
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert!(advice[0].contains("-- COMMAND") && !advice[0].contains("debug symbols"));
        let stripped = ["no symbols in the binary"];
        let advice = unknown_frame_advice(stripped.iter().copied(), true, true);
        assert!(advice[0].contains("debug symbols"), "{advice:?}");
    }

    fn key(tid: u32, user: i32, kernel: i32) -> StackKey {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"demo");
        StackKey {
            tgid: std::process::id(),
            tid,
            user_stack_id: user,
            kernel_stack_id: kernel,
            comm,
        }
    }

    fn names(stack: &WeightedStack) -> Vec<&str> {
        stack.frames.iter().map(|f| f.name.as_str()).collect()
    }

    #[inline(never)]
    fn marker_caller_for_stack_test() -> u64 {
        std::hint::black_box(7)
    }

    /// Every kind of stack id becomes the frames it stands for: a stack named from this very
    /// process, a lost one under its marker with its cause counted, a walk that filled the
    /// kernel's frames marked cut short, a stack recovered from /proc, and a blocked stack
    /// joined with its waker's (offwaketime's layout).
    #[test]
    fn builds_frames_for_every_kind_of_stack() {
        use livetrace_common::stacks::{
            STACK_ID_NOT_COLLECTED as NONE, STACK_ID_RECOVERED, stack_errno,
        };
        let here = marker_caller_for_stack_test as *const () as u64;
        let mut raw = RawStacks::default();
        raw.traces.insert(1, vec![here]);
        raw.traces.insert(2, vec![0x1000; KERNEL_MAX_DEPTH]);
        raw.entries = vec![
            (key(1, 1, NONE), 3),
            (key(2, -stack_errno::EEXIST, NONE), 2),
            (key(3, 2, NONE), 1),
            (key(4, STACK_ID_RECOVERED, STACK_ID_RECOVERED), 5),
        ];
        raw.recovered.insert(
            4,
            RecoveredStacks {
                kernel_frames: vec!["do_syscall_64".into(), "pipe_read".into()],
                user_addrs: vec![here],
            },
        );
        raw.wake_entries = vec![(
            WakeKey {
                blocked: key(5, 1, NONE),
                waker: key(6, 1, NONE),
            },
            4,
        )];
        let mut symbolizer = Symbolizer::new();
        symbolizer.note_process(std::process::id());
        let options = BuildOptions {
            title: "test".into(),
            unit: WeightUnit::Samples,
            per_thread: true,
            stack_storage: 64,
            weight_divisor: 1,
            period_ns: None,
            dwarf_possible: true,
        };
        let profile = build_profile(&raw, &mut symbolizer, &options, DataQuality::default());
        let stack = |tid: &str| {
            profile
                .stacks
                .iter()
                .find(|s| s.frames.iter().any(|f| f.name == format!("demo-{tid}")))
                .unwrap_or_else(|| panic!("no stack of thread {tid}: {:#?}", profile.stacks))
        };
        // The process is named as /proc names it; the thread by the comm the key carries.
        let process = symbolizer
            .process_name(std::process::id())
            .unwrap()
            .to_owned();
        let named = names(stack("1"));
        assert_eq!(named[..2], [process.as_str(), "demo-1"]);
        assert!(
            named[2].ends_with("marker_caller_for_stack_test"),
            "{named:?}"
        );
        assert_eq!(names(stack("2"))[2], "[lost user stack]");
        assert_eq!(
            profile
                .quality
                .stack_losses
                .get("user stack: hash collision in the stack map"),
            Some(&2)
        );
        assert!(
            profile
                .quality
                .advice
                .iter()
                .any(|a| a.contains("--stack-storage-size"))
        );
        assert_eq!(names(stack("3"))[2], "[stack cut short]");
        assert!(
            profile
                .quality
                .advice
                .iter()
                .any(|a| a.contains("complete with --unwind dwarf"))
        );
        let recovered = names(stack("4"));
        assert_eq!(recovered[2], RECOVERED_MARKER);
        assert_eq!(
            recovered[recovered.len() - 2..],
            ["do_syscall_64", "pipe_read"]
        );
        // Blocked root first, "--", then the waker leaf first, ending in its process.
        let joined = names(stack("5"));
        let split = joined
            .iter()
            .position(|&n| n == "--")
            .expect("the join marker");
        assert!(joined[split - 1].ends_with("marker_caller_for_stack_test"));
        assert_eq!(joined.last(), Some(&process.as_str()));
        assert!(
            joined[split + 1].ends_with("marker_caller_for_stack_test"),
            "{joined:?}"
        );
    }
}
