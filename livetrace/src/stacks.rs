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
    stacks::{
        NEW_PROCESSES, STACK_COUNTS, STACK_ID_NOT_COLLECTED, STACK_ID_RECOVERED, STACK_TRACES,
        StackKey, stack_errno,
    },
};

use crate::{
    bpf,
    model::{DataQuality, Frame, FrameKind, StackProfile, WeightUnit, WeightedStack},
    symbolize::{Resolved, Symbolizer},
};

/// Why a stack is missing when its copy could not be sent to the unwinding thread.
const RING_FULL: &str = "stack copy lost to the full unwind ring buffer";

/// The most frames `bpf_get_stackid` records (`PERF_MAX_STACK_DEPTH`, the size of a stack-trace
/// map's value): a walk that fills them stopped at the limit, not at the stack's root.
pub const KERNEL_MAX_DEPTH: usize = 127;

/// Whether a stack id is one the unwinding thread gave out (`--unwind dwarf`), not the kernel.
fn is_synthetic(id: i32) -> bool {
    u32::try_from(id).is_ok_and(|id| id >= crate::unwind::FIRST_SYNTHETIC_ID)
}

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
pub fn processes_seen(bpf: &Ebpf) -> HashSet<u32> {
    let Some(map) = bpf.map(STACK_COUNTS) else {
        return HashSet::new();
    };
    let Ok(counts) = BpfHashMap::<_, StackKey, u64>::try_from(map) else {
        return HashSet::new();
    };
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
/// out of the kernel, leaving the maps as they are (a SIGUSR1 snapshot reads them mid-capture).
///
/// `unwound` adds the stacks unwound in user space (`--unwind dwarf`): their user stacks are
/// synthetic ids into [`RawStacks::traces`], their kernel stacks ids in the kernel's map.
/// `extra` entries (offcpu's blocks still going on) are added before the stacks are fetched.
pub fn drain(
    bpf: &Ebpf,
    wakers: bool,
    unwound: Option<crate::unwind::Unwound>,
    extra: Vec<(StackKey, u64)>,
) -> anyhow::Result<RawStacks> {
    let counts: BpfHashMap<&MapData, StackKey, u64> =
        BpfHashMap::try_from(bpf::map_ref(bpf, STACK_COUNTS)?)?;
    let mut raw = RawStacks {
        entries: extra,
        ..RawStacks::default()
    };
    for entry in counts.iter() {
        raw.entries
            .push(entry.context("failed to read the stack counts map")?);
    }
    let mut synthetic = HashMap::new();
    if let Some(unwound) = unwound {
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
        .filter_map(|id| u32::try_from(id).ok())
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

impl RawStacks {
    /// Every stack key, the wakers' included.
    fn keys(&self) -> impl Iterator<Item = &StackKey> {
        self.entries.iter().map(|(k, _)| k).chain(
            self.wake_entries
                .iter()
                .flat_map(|(k, _)| [&k.blocked, &k.waker]),
        )
    }

    fn trace(&self, id: i32) -> Option<&[u64]> {
        let id = u32::try_from(id).ok()?;
        self.traces.get(&id).map(Vec::as_slice)
    }

    /// The user addresses of a key's stack, leaf first, wherever they came from.
    fn user_trace(&self, key: &StackKey) -> Option<&[u64]> {
        if key.user_stack_id == STACK_ID_RECOVERED {
            return self
                .recovered
                .get(&key.tid)
                .map(|t| t.user_addrs.as_slice());
        }
        self.trace(key.user_stack_id)
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

/// Every address but the leaf is a return address: look up the call instruction before it, or a
/// call at the very end of a function would be named after the next function.
fn lookup_addrs(trace: &[u64]) -> Vec<u64> {
    trace
        .iter()
        .enumerate()
        .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
        .collect()
}

/// Resolved names for every address of every stack, symbolised in one batch per process and
/// one for the kernel.
struct Names {
    user: HashMap<(u32, u64), Resolved>,
    kernel: HashMap<u64, Resolved>,
}

impl Names {
    fn resolve(raw: &RawStacks, symbolizer: &mut Symbolizer) -> Self {
        let mut user_addrs: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
        let mut kernel_addrs: HashSet<u64> = HashSet::new();
        for key in raw.keys() {
            if let Some(trace) = raw.user_trace(key) {
                user_addrs
                    .entry(key.tgid)
                    .or_default()
                    .extend(lookup_addrs(trace));
            }
            if let Some(trace) = raw.trace(key.kernel_stack_id) {
                kernel_addrs.extend(lookup_addrs(trace));
            }
        }
        let mut user = HashMap::new();
        for (pid, addrs) in user_addrs {
            let addrs: Vec<u64> = addrs.into_iter().collect();
            for (addr, resolved) in addrs.iter().zip(symbolizer.user(pid, &addrs)) {
                user.insert((pid, *addr), resolved);
            }
        }
        let kernel_addrs: Vec<u64> = kernel_addrs.into_iter().collect();
        let kernel = kernel_addrs
            .iter()
            .copied()
            .zip(symbolizer.kernel(&kernel_addrs))
            .collect();
        Self { user, kernel }
    }
}

/// What building one key's frames found out, for the data-quality record.
#[derive(Default)]
struct KeyFindings {
    unknown_reasons: Vec<&'static str>,
    losses: Vec<String>,
    cut_short: Vec<String>,
    map_full: bool,
    /// (a process that mapped it, module), for build IDs.
    modules: Vec<(u32, Arc<str>)>,
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
    let mut build_ids = BTreeMap::new();
    for (pid, module) in modules {
        if !build_ids.contains_key(&module)
            && !crate::session::capture::aborted()
            && let Some(id) = symbolizer.build_id(pid, &module)
        {
            build_ids.insert(module, id);
        }
    }
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

/// The frames of one key, root first: process, optional thread, user frames, kernel frames.
fn key_frames(
    raw: &RawStacks,
    names: &Names,
    symbolizer: &Symbolizer,
    key: &StackKey,
    per_thread: bool,
    findings: &mut KeyFindings,
) -> Vec<Frame> {
    let mut frames = vec![Frame::new(
        FrameKind::Process,
        symbolizer
            .process_name(key.tgid)
            .map_or_else(|| comm(&key.comm), str::to_owned),
    )];
    if per_thread {
        frames.push(Frame::new(
            FrameKind::Thread,
            format!("{}-{}", comm(&key.comm), key.tid),
        ));
    }
    let recovered = (key.user_stack_id == STACK_ID_RECOVERED)
        .then(|| raw.recovered.get(&key.tid))
        .flatten();
    if key.user_stack_id == STACK_ID_RECOVERED {
        frames.push(Frame::new(FrameKind::Lost, RECOVERED_MARKER));
    }
    for kind in [FrameKind::User, FrameKind::Kernel] {
        let stack_id = match kind {
            FrameKind::User => key.user_stack_id,
            _ => key.kernel_stack_id,
        };
        if stack_id == STACK_ID_NOT_COLLECTED {
            continue;
        }
        if stack_id == STACK_ID_RECOVERED && kind == FrameKind::Kernel {
            if let Some(thread) = recovered {
                frames.extend(
                    thread
                        .kernel_frames
                        .iter()
                        .map(|n| Frame::new(FrameKind::Kernel, n.clone())),
                );
            }
            continue;
        }
        let trace = match kind {
            FrameKind::User => raw.user_trace(key),
            _ => raw.trace(stack_id),
        };
        let Some(trace) = trace else {
            let side = if kind == FrameKind::User {
                "user"
            } else {
                "kernel"
            };
            let cause = match -stack_id {
                // Kernel threads have no user stack: nothing is lost.
                stack_errno::EFAULT
                    if kind == FrameKind::User && crate::proc::task::is_kernel_thread(key.tgid) =>
                {
                    continue;
                }
                stack_errno::EEXIST => "hash collision in the stack map",
                stack_errno::ENOMEM => {
                    findings.map_full = true;
                    "stack map full"
                }
                stack_errno::EFAULT => "walk failed (EFAULT)",
                stack_errno::ENOSPC => RING_FULL,
                _ if stack_id == STACK_ID_RECOVERED => "not recoverable from /proc",
                _ if stack_id >= 0 => "evicted from the stack map",
                _ => "walk failed",
            };
            frames.push(Frame::new(FrameKind::Lost, format!("[lost {side} stack]")));
            findings.losses.push(format!("{side} stack: {cause}"));
            continue;
        };
        let cause = match kind {
            FrameKind::User => u32::try_from(stack_id)
                .ok()
                .and_then(|id| raw.cut_short.get(&id))
                .cloned(),
            _ => None,
        };
        // A walk in the kernel that stopped at its depth limit gives the leaf end of the stack.
        let cause = cause.or_else(|| {
            let full = stack_id >= 0 && trace.len() >= KERNEL_MAX_DEPTH && !is_synthetic(stack_id);
            let side = if kind == FrameKind::User {
                "user"
            } else {
                "kernel"
            };
            full.then(|| {
                format!(
                    "{side} stack walk filled the kernel's {KERNEL_MAX_DEPTH} frames: the stack \
                     is deeper (its outermost frames are missing), or the walk went astray in \
                     code without frame pointers"
                )
            })
        });
        if let Some(cause) = cause {
            // The frames that could not be unwound would sit here, under the process (or
            // between the user and the kernel frames).
            let marker = if kind == FrameKind::User {
                "[stack cut short]"
            } else {
                "[kernel stack cut short]"
            };
            frames.push(Frame::new(FrameKind::Lost, marker));
            findings.cut_short.push(cause);
        }
        let first_frame = frames.len();
        // BPF gives the leaf first; profiles read root first.
        for addr in lookup_addrs(trace).into_iter().rev() {
            let resolved = match kind {
                FrameKind::User => names.user.get(&(key.tgid, addr)),
                _ => names.kernel.get(&addr),
            };
            match resolved {
                Some(Resolved::Frames(located)) => {
                    for (depth, symbol) in located.symbols.iter().enumerate() {
                        frames.push(Frame {
                            name: symbol.name.clone(),
                            kind,
                            module: located.module.clone(),
                            address: Some(located.address),
                            inlined: depth > 0,
                            file: symbol.file.clone(),
                            line: symbol.line,
                        });
                    }
                    if let Some(module) = &located.module {
                        findings.modules.push((key.tgid, module.clone()));
                    }
                }
                Some(Resolved::Unknown { name, reason }) => {
                    frames.push(Frame::new(kind, name.clone()));
                    if !findings.unknown_reasons.contains(reason) {
                        findings.unknown_reasons.push(reason);
                    }
                }
                None => frames.push(Frame::new(kind, "[unknown]")),
            }
        }
        if kind == FrameKind::Kernel {
            // A stack taken from a tracepoint ends in the tracer's own frames (the trampoline
            // and the BPF program): they say nothing about the traced thread.
            if let Some(at) = frames[first_frame..]
                .iter()
                .position(|f| is_tracer_frame(&f.name))
            {
                frames.truncate(first_frame + at);
            }
        }
    }
    frames
}

/// What to do about frames left unnamed, by why they were (`unknown_frames`' reasons); JIT
/// frames get their runtime's own advice elsewhere.
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
        .any(|r| !r.starts_with("JIT") && !exited(r))
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

fn is_tracer_frame(name: &str) -> bool {
    name.starts_with("bpf_trace_run")
        || name.starts_with("__traceiter_")
        || name.starts_with("__bpf_trace_")
        || name.starts_with("bpf_prog_")
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
}
