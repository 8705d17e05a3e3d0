//! uprobe-hist's BPF object: its settings, and loading it.

use aya::{Ebpf, EbpfLoader};
use livetrace_common::{follow, stacks, uprobe_hist};

use crate::bpf::{self, Object};

/// Settings of `uprobe-hist`'s programs.
#[derive(Clone, Copy)]
pub struct UprobeHistSettings {
    /// Calls at least this long (ns) go to the slow-call ring buffer; 0 = off.
    pub slow_ns: u64,
    /// Threads that can be inside the function at once.
    pub max_threads: u32,
    /// Distinct caller stacks of slow calls.
    pub stack_storage: u32,
    /// Slow-call ring buffer size in bytes (a power of two, at least a page).
    pub slow_buffer: u32,
    /// `-- COMMAND`: its pid, whose forks are followed and announced (`follow_fork`), and
    /// `task_struct.tgid`'s offset, which that program reads.
    pub follow: Option<(u32, u32)>,
    /// Spans between two USDT probes (`--from`, `--to`), instead of a function's calls.
    pub spans: Option<SpanSettings>,
}

/// Settings of the span programs.
#[derive(Clone, Copy)]
pub struct SpanSettings {
    /// What `--by` keys on (`uprobe_hist::BY_*`).
    pub by: u8,
    /// Bytes of a string key kept, below `KEY_BYTES`.
    pub by_length: u32,
    /// Distinct keys kept.
    pub max_keys: u32,
    /// `--from` sites, each with its `--by` argument's spec.
    pub from_sites: u32,
}

/// Loads uprobe-hist's object, its maps sized for this run.
pub fn load(settings: &UprobeHistSettings) -> anyhow::Result<Ebpf> {
    let (filter, tgid_offset) = match &settings.follow {
        Some((_, offset)) => (&1u8, offset),
        None => (&0u8, &0),
    };
    let spans = settings.spans.unwrap_or(SpanSettings {
        by: uprobe_hist::BY_NONE,
        by_length: 0,
        max_keys: 1,
        from_sites: 1,
    });
    // Hash maps are preallocated: the mode not in use keeps one entry.
    let (threads, span_threads) = match settings.spans {
        Some(_) => (1, settings.max_threads),
        None => (settings.max_threads, 1),
    };
    let mut loader = EbpfLoader::new();
    loader
        .override_global(uprobe_hist::SLOW_NS, &settings.slow_ns, true)
        .override_global(uprobe_hist::BY, &spans.by, true)
        .override_global(uprobe_hist::BY_LENGTH, &spans.by_length, true)
        .map_max_entries(uprobe_hist::SPANS, span_threads)
        .map_max_entries(uprobe_hist::ARG_SPECS, spans.from_sites.max(1))
        .map_max_entries(uprobe_hist::BY_KEY, spans.max_keys.max(1))
        .override_global(stacks::FILTER_TARGETS, filter, true)
        .override_global(follow::FORK_TGID_OFFSET, tgid_offset, true)
        .map_max_entries(uprobe_hist::THREADS, threads)
        .map_max_entries(uprobe_hist::STACKS, settings.stack_storage)
        .map_max_entries(uprobe_hist::SLOW_CALLS, settings.slow_buffer)
        .map_max_entries(
            stacks::SEEN_PROCESSES,
            if settings.follow.is_some() {
                stacks::MAX_TARGETS
            } else {
                1
            },
        );
    let mut ebpf = bpf::load(Object::UprobeHist, &mut loader)?;
    if let Some((pid, _)) = settings.follow {
        bpf::set_targets(&mut ebpf, &[pid], &[])?;
    }
    Ok(ebpf)
}

/// The uprobe-hist object as a capture loads it, its programs not yet loaded: timing only, and
/// with slow calls' stacks while following a command's forks.
pub fn objects_for_verifier() -> Vec<(&'static str, anyhow::Result<Ebpf>)> {
    let plain = UprobeHistSettings {
        slow_ns: 0,
        max_threads: 64,
        stack_storage: 64,
        slow_buffer: 4096,
        follow: None,
        spans: None,
    };
    let all = UprobeHistSettings {
        slow_ns: 1,
        follow: Some((1, 0)),
        ..plain
    };
    vec![("timing", load(&plain)), ("--slow -- COMMAND", load(&all))]
}

/// Writes each `--from` site's `--by` argument spec, at the index its link's cookie names.
pub fn fill_arg_specs(
    ebpf: &mut Ebpf,
    specs: &[livetrace_common::usdt::ArgSpec],
) -> anyhow::Result<()> {
    let mut map: aya::maps::Array<_, livetrace_common::usdt::ArgSpec> =
        aya::maps::Array::try_from(bpf::map_mut(ebpf, uprobe_hist::ARG_SPECS)?)?;
    for (index, spec) in specs.iter().enumerate() {
        map.set(index as u32, spec, 0)
            .map_err(|e| anyhow::anyhow!("failed to write the --by argument specs: {e}"))?;
    }
    Ok(())
}
