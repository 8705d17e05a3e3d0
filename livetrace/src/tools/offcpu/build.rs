//! Building the off-CPU profile from the maps: the blocks, the blocks still going on at the
//! end, the stacks recovered from /proc, and the footer's account of what was counted and lost.

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use livetrace_common::{
    offcpu::{OFFCPU_START, OffcpuStart, START_FILTERED},
    stacks::{Counter, StackKey},
};

use super::{Args, State, already_blocked};
use crate::{
    bpf::{self, counts::Counts},
    model::{DataQuality, StackProfile, WeightUnit},
    session::capture::{self, StopReason},
    stacks::{self, BuildOptions, RECOVERED_MARKER, StackRef},
    symbolize::Symbolizer,
    unwind,
};

/// What [`build`] needs besides the maps and the arguments.
pub(super) struct BuildContext {
    pub(super) title: String,
    /// How user stacks were walked, for the footer.
    pub(super) unwind_mode: String,
    pub(super) notes: Vec<String>,
    pub(super) blocked_at_start: Vec<already_blocked::BlockedThread>,
    pub(super) min_block: Duration,
    pub(super) max_block: Duration,
    /// When the clocks were seeded (CLOCK_MONOTONIC ns).
    pub(super) start_ns: u64,
}

/// Reads the maps in place and builds the profile by thread and the one to write: at the end
/// (with why the capture stopped), or mid-capture for a SIGUSR1 snapshot, blocks still going on
/// counted up to `end_ns`; or, `taken`, from a count map `record` swapped out of use.
/// `unwound`: the stacks unwound here, with `--unwind dwarf`.
pub(super) fn build(
    ebpf: &Ebpf,
    symbolizer: &mut Symbolizer,
    args: &Args,
    context: &BuildContext,
    (end_ns, stop): (u64, Option<&StopReason>),
    mut unwound: Option<unwind::Unwound>,
    (counts, taken): (&Counts, bool),
) -> anyhow::Result<(StackProfile, StackProfile)> {
    let (min_block, max_block) = (context.min_block, context.max_block);
    let blocked_at_start = &context.blocked_at_start;
    // The window is what blocks were measured against: from seeding the clocks to the end.
    let elapsed = Duration::from_nanos(end_ns.saturating_sub(context.start_ns));
    let counters = bpf::read_counters_in(ebpf)?;
    // Taking a bucket, a block still going on counts in the bucket where it ends, whole.
    let still_blocked = if taken {
        Vec::new()
    } else {
        still_blocked(ebpf, end_ns, min_block, max_block, unwound.as_mut())?
    };
    let (unmatched_blocks, unmatched_ns) = unwound
        .as_ref()
        .map_or((0, 0), |u| (u.unmatched_blocks, u.unmatched_block_ns));
    let still_blocked_count = still_blocked.len();
    // Their stacks may be in no finished block: drained with the rest, so they are fetched.
    let mut raw = stacks::drain(ebpf, (args.wakers, counts), unwound, still_blocked)?;
    let mut recovered = HashMap::new();
    for t in blocked_at_start {
        // Their Python frames join the capture's list: their tags index it from its end.
        let first = raw.python_frames.len() as u64;
        raw.python_frames.extend(t.python_frames.iter().cloned());
        let user_addrs = t
            .user_addrs
            .iter()
            .map(|&a| match crate::python::python_index(a) {
                Some(i) => crate::python::merge::PYTHON_TAG | (first + i as u64),
                None => a,
            })
            .collect();
        let stacks = stacks::RecoveredStacks {
            kernel_frames: t.kernel_frames.clone(),
            user_addrs,
        };
        recovered.insert(t.tid, stacks);
    }
    raw.recovered = recovered;

    let mut quality = capture_quality(
        context,
        &counters,
        elapsed,
        still_blocked_count,
        (unmatched_blocks, unmatched_ns),
        stop,
    );
    // Counted per block: its weight was not known when its stack was taken.
    for (cause, blocks) in &raw.python_losses {
        quality.notes.push(format!("{cause}: {blocks} blocks"));
    }

    let by_thread = stacks::build_profile(
        &raw,
        symbolizer,
        &BuildOptions {
            title: context.title.clone(),
            unit: WeightUnit::Microseconds,
            per_thread: true,
            stack_storage: args.stack_storage,
            weight_divisor: 1000,
            period_ns: None,
            dwarf_possible: !args.wakers,
        },
        quality,
    );
    let profile = if args.per_thread {
        by_thread.clone()
    } else {
        by_thread.without_threads()
    };
    Ok((by_thread, profile))
}

/// The footer's data quality: what the programs counted, and what was left out and why.
fn capture_quality(
    context: &BuildContext,
    counters: &[u64; livetrace_common::stacks::COUNTER_SLOTS as usize],
    elapsed: Duration,
    still_blocked_count: usize,
    (unmatched_blocks, unmatched_ns): (u64, u64),
    stop: Option<&StopReason>,
) -> DataQuality {
    let counter = |c| bpf::counter(counters, c);
    let mut quality = DataQuality {
        duration: elapsed,
        events: counter(Counter::Events),
        recorded: counter(Counter::Recorded),
        not_target: counter(Counter::NotTarget) + counter(Counter::KernelThread),
        counts_map_full: counter(Counter::CountsMapFull) + counter(Counter::WakeCountsMapFull),
        // Records lost whole; a block whose stack copy was lost is kept (a stack loss).
        unwind_ring_full: counter(Counter::UnwindRingFull),
        unwind_mode: Some(context.unwind_mode.clone()),
        notes: context.notes.clone(),
        ..DataQuality::default()
    };
    quality.notes.push(format!(
        "{} context switches seen; {} blocks recorded; {} left out by --state, {} by \
         --min-block/--max-block",
        counter(Counter::Events),
        counter(Counter::Recorded),
        counter(Counter::StateFiltered),
        counter(Counter::BlockFiltered),
    ));
    if !context.blocked_at_start.is_empty() {
        quality.notes.push(format!(
            "{} threads were already blocked when the capture began; their stacks were recovered \
             from /proc (marked {RECOVERED_MARKER})",
            context.blocked_at_start.len()
        ));
    }
    if still_blocked_count > 0 {
        quality.notes.push(format!(
            "{still_blocked_count} blocks were still going on at the end; counted up to the end"
        ));
    }
    if unmatched_blocks > 0 {
        // Their stack copies were lost to a full ring buffer (counted above): the time is too.
        *quality
            .stack_losses
            .entry(format!(
                "{unmatched_blocks} blocks whose stack copy was lost to the full unwind ring \
                 buffer"
            ))
            .or_default() += unmatched_ns / 1000;
    }
    let unmatched = counter(Counter::UnmatchedSwitchIn);
    if unmatched > 0 {
        quality.notes.push(format!(
            "{unmatched} switch-ins had no recorded switch-out (the thread was off-CPU before \
             the capture began and not found by the start-up scan); that time is not counted"
        ));
    }
    for (counter_kind, what, fix) in [
        (
            Counter::StartMapFull,
            "blocks lost: too many threads off-CPU at once",
            "narrow the target with -p",
        ),
        (
            Counter::WakerMapFull,
            "blocks recorded without their waker: waker map full",
            "narrow the target with -p",
        ),
    ] {
        let n = counter(counter_kind);
        if n > 0 {
            *quality.stack_losses.entry(what.to_owned()).or_default() += n;
            quality.advice.push(format!("{what}: {fix}"));
        }
    }
    capture::note_capture_end(&mut quality, counter(Counter::NewProcessNotAnnounced), stop);
    quality
}

/// Why a capture recorded no blocked time, from what the programs counted, and what to try.
pub(super) fn why_nothing(
    args: &Args,
    counters: &[u64; livetrace_common::stacks::COUNTER_SLOTS as usize],
) -> String {
    let count = |c: Counter| bpf::counter(counters, c);
    let (by_length, by_state) = (count(Counter::BlockFiltered), count(Counter::StateFiltered));
    if by_length > 0 {
        let bound = |d: Option<Duration>| d.map_or("any".into(), |d| format!("{d:?}"));
        return format!(
            "no blocked time was kept: all {by_length} blocks were left out by --min-block \
             ({}) and --max-block ({}); widen them",
            bound(args.min_block),
            bound(args.max_block)
        );
    }
    if by_state > 0 {
        return format!(
            "no blocked time was kept: all {by_state} blocks were in states --state {} leaves \
             out; try --state any",
            match args.state {
                State::Any => "any",
                State::Uninterruptible => "D",
                State::Interruptible => "S",
            }
        );
    }
    "no samples: no blocked time was recorded; the target's threads did not leave the CPU. If \
     it is busy, try `livetrace profile` with the same target."
        .into()
}

/// Blocks still going on at the end, counted up to the end, under the same --min-block and
/// --max-block filters as the finished ones (applied to the time blocked so far). Those whose
/// stack was copied for unwinding here are ended in `unwound` instead.
fn still_blocked(
    ebpf: &Ebpf,
    end_ns: u64,
    min_block: Duration,
    max_block: Duration,
    mut unwound: Option<&mut unwind::Unwound>,
) -> anyhow::Result<Vec<(StackKey, u64)>> {
    let starts: BpfHashMap<&MapData, u32, OffcpuStart> =
        BpfHashMap::try_from(bpf::map_ref(ebpf, OFFCPU_START)?)?;
    let mut merged: HashMap<StackKey, u64> = HashMap::new();
    for entry in starts.iter() {
        let (tid, start) = entry.context("failed to read the off-CPU start map")?;
        if start.start_ns == 0 || start.start_ns == START_FILTERED {
            // Running (its last block was counted), or off-CPU in a state --state leaves out.
            continue;
        }
        let blocked = Duration::from_nanos(end_ns.saturating_sub(start.start_ns));
        if !(min_block..=max_block).contains(&blocked) {
            continue;
        }
        let blocked_ns = blocked.as_nanos() as u64;
        match unwound.as_deref_mut() {
            Some(unwound) if StackRef::of(start.key.user_stack_id) == StackRef::Unwound => {
                unwound.end_block(tid, start.start_ns, blocked_ns);
            }
            _ => *merged.entry(start.key).or_default() += blocked_ns,
        }
    }
    Ok(merged.into_iter().collect())
}
