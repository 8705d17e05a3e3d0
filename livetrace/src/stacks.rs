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
    maps::{HashMap as BpfHashMap, MapData, StackTraceMap},
};
use livetrace_common::stacks::{
    STACK_COUNTS, STACK_ID_NOT_COLLECTED, STACK_TRACES, StackKey, stack_errno,
};

use crate::{
    bpf,
    model::{DataQuality, Frame, FrameKind, StackProfile, WeightUnit, WeightedStack},
    symbolize::{Resolved, Symbolizer},
};

/// The maps' contents, copied out of the kernel.
pub struct RawStacks {
    pub entries: Vec<(StackKey, u64)>,
    /// Stack id to its addresses, leaf first.
    pub traces: HashMap<u32, Vec<u64>>,
}

/// The processes that have entries so far (read once a second during a capture, so that each
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

/// Copies the counts and the stacks they refer to out of the kernel.
pub fn drain(bpf: &mut Ebpf) -> anyhow::Result<RawStacks> {
    let counts: BpfHashMap<MapData, StackKey, u64> =
        BpfHashMap::try_from(bpf::take_map(bpf, STACK_COUNTS)?)?;
    let traces: StackTraceMap<MapData> =
        StackTraceMap::try_from(bpf::take_map(bpf, STACK_TRACES)?)?;
    let mut entries = Vec::new();
    for entry in counts.iter() {
        entries.push(entry.context("failed to read the stack counts map")?);
    }
    let mut stacks = HashMap::new();
    for (key, _) in &entries {
        for id in [key.user_stack_id, key.kernel_stack_id] {
            let Ok(id) = u32::try_from(id) else { continue };
            if stacks.contains_key(&id) {
                continue;
            }
            // A missing id is reported as a lost stack when the profile is built.
            if let Ok(trace) = traces.get(&id, 0) {
                stacks.insert(id, trace.frames().iter().map(|f| f.ip).collect());
            }
        }
    }
    Ok(RawStacks {
        entries,
        traces: stacks,
    })
}

/// How a stack tool wants its stacks presented.
pub struct BuildOptions {
    pub title: String,
    pub unit: WeightUnit,
    /// The time one sample stands for, for sampled profiles.
    pub period_ns: Option<u64>,
    pub per_thread: bool,
    /// How many entries the maps could hold, for the advice when they filled up.
    pub stack_storage: u32,
}

/// Symbolises every stack (one batch per process, one for the kernel) and assembles the profile.
pub fn build_profile(
    raw: &RawStacks,
    symbolizer: &mut Symbolizer,
    options: &BuildOptions,
    mut quality: DataQuality,
) -> StackProfile {
    // Every address but the leaf is a return address: look up the call instruction before it,
    // or a call at the very end of a function would be named after the next function.
    let lookup_addrs = |trace: &[u64]| -> Vec<u64> {
        trace
            .iter()
            .enumerate()
            .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
            .collect()
    };

    let mut user_addrs: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
    let mut kernel_addrs: HashSet<u64> = HashSet::new();
    for (key, _) in &raw.entries {
        if let Some(trace) = stack_of(raw, key.user_stack_id) {
            user_addrs
                .entry(key.tgid)
                .or_default()
                .extend(lookup_addrs(trace));
        }
        if let Some(trace) = stack_of(raw, key.kernel_stack_id) {
            kernel_addrs.extend(lookup_addrs(trace));
        }
    }

    let mut user_names: HashMap<(u32, u64), Resolved> = HashMap::new();
    for (pid, addrs) in user_addrs {
        let addrs: Vec<u64> = addrs.into_iter().collect();
        for (addr, resolved) in addrs.iter().zip(symbolizer.user(pid, &addrs)) {
            user_names.insert((pid, *addr), resolved);
        }
    }
    let kernel_addrs: Vec<u64> = kernel_addrs.into_iter().collect();
    let kernel_names: HashMap<u64, Resolved> = kernel_addrs
        .iter()
        .copied()
        .zip(symbolizer.kernel(&kernel_addrs))
        .collect();

    let mut stacks = Vec::with_capacity(raw.entries.len());
    let mut map_full = false;
    // (a process that mapped it, module), for build IDs.
    let mut modules: BTreeSet<(u32, Arc<str>)> = BTreeSet::new();
    for (key, weight) in &raw.entries {
        let mut frames = vec![Frame::new(
            FrameKind::Process,
            symbolizer
                .process_name(key.tgid)
                .map_or_else(|| comm(&key.comm), str::to_owned),
        )];
        if options.per_thread {
            frames.push(Frame::new(
                FrameKind::Thread,
                format!("{}-{}", comm(&key.comm), key.tid),
            ));
        }
        let mut unknown_reasons: Vec<&'static str> = Vec::new();
        for (kind, stack_id) in [
            (FrameKind::User, key.user_stack_id),
            (FrameKind::Kernel, key.kernel_stack_id),
        ] {
            if stack_id == STACK_ID_NOT_COLLECTED {
                continue;
            }
            let Some(trace) = stack_of(raw, stack_id) else {
                let side = if kind == FrameKind::User {
                    "user"
                } else {
                    "kernel"
                };
                let cause = match -stack_id {
                    // Kernel threads have no user stack: nothing is lost.
                    stack_errno::EFAULT if kind == FrameKind::User && key_is_kernel_thread(key) => {
                        continue;
                    }
                    stack_errno::EEXIST => "hash collision in the stack map",
                    stack_errno::ENOMEM => {
                        map_full = true;
                        "stack map full"
                    }
                    stack_errno::EFAULT => "walk failed (EFAULT)",
                    _ if stack_id >= 0 => "evicted from the stack map",
                    _ => "walk failed",
                };
                frames.push(Frame::new(FrameKind::Lost, format!("[lost {side} stack]")));
                *quality
                    .stack_losses
                    .entry(format!("{side} stack: {cause}"))
                    .or_default() += weight;
                continue;
            };
            // BPF gives the leaf first; profiles read root first.
            for addr in lookup_addrs(trace).into_iter().rev() {
                let resolved = match kind {
                    FrameKind::User => user_names.get(&(key.tgid, addr)),
                    _ => kernel_names.get(&addr),
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
                            modules.insert((key.tgid, module.clone()));
                        }
                    }
                    Some(Resolved::Unknown { name, reason }) => {
                        frames.push(Frame::new(kind, name.clone()));
                        unknown_reasons.push(reason);
                    }
                    None => frames.push(Frame::new(kind, "[unknown]")),
                }
            }
        }
        if !unknown_reasons.is_empty() {
            quality.unknown_weight += weight;
            unknown_reasons.sort_unstable();
            unknown_reasons.dedup();
            for reason in unknown_reasons {
                *quality.unknown_frames.entry(reason.to_owned()).or_default() += weight;
            }
        }
        stacks.push(WeightedStack {
            frames,
            weight: *weight,
        });
    }

    let collisions = quality.stack_losses.keys().any(|k| k.contains("collision"));
    if map_full || collisions || quality.counts_map_full > 0 {
        quality.advice.push(format!(
            "stacks were lost to full or colliding maps: raise --stack-storage-size (now {}), \
             or capture for less time",
            options.stack_storage
        ));
    }
    if quality.unknown_weight > 0 {
        quality.advice.push(
            "unresolved frames usually mean stripped binaries or code built without frame \
             pointers: install debug symbols, or build with -fno-omit-frame-pointer \
             (Rust: -C force-frame-pointers=yes)"
                .into(),
        );
    }
    let mut build_ids = BTreeMap::new();
    for (pid, module) in modules {
        if !build_ids.contains_key(&module)
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

fn stack_of(raw: &RawStacks, id: i32) -> Option<&[u64]> {
    let id = u32::try_from(id).ok()?;
    raw.traces.get(&id).map(Vec::as_slice)
}

fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Kernel threads have no user address space, so a failed user-stack walk there is expected.
fn key_is_kernel_thread(key: &StackKey) -> bool {
    crate::targets::is_kernel_thread(key.tgid)
}
