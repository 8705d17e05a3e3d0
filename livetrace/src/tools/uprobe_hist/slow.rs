//! `--slow`: the slowest calls and the stacks they were called from.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use livetrace_common::{
    stacks::{STACK_ID_NOT_COLLECTED, StackKey},
    uprobe_hist::{DEFAULT_STACK_STORAGE, SlowCall},
};

use crate::{
    histogram::{LatencyReport, SlowCallView, SlowCalls, format_ns},
    model::{DataQuality, Frame, FrameKind, WeightUnit},
    stacks::{self, BuildOptions, RawStacks},
    symbolize::{Resolved, Symbolizer},
};

/// Keeps what `--slow` needs from the ring buffer: per (process, stack) counts and time, and the
/// slowest calls.
pub(super) struct SlowCollector {
    pub(super) threshold_ns: u64,
    pub(super) total: u64,
    total_ns: u64,
    pub(super) by_stack: HashMap<(u32, i32), (u64, u64)>,
    slowest: Vec<SlowCall>,
    processes: BTreeSet<u32>,
}

/// How many of the slowest calls are listed.
const SLOWEST: usize = 10;

impl SlowCollector {
    pub(super) fn new(threshold_ns: u64) -> Self {
        Self {
            threshold_ns,
            total: 0,
            total_ns: 0,
            by_stack: HashMap::new(),
            slowest: Vec::new(),
            processes: BTreeSet::new(),
        }
    }

    pub(super) fn drain(&mut self, ring: &mut RingBuf<MapData>, symbolizer: &mut Symbolizer) {
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<SlowCall>() {
                continue;
            }
            // SAFETY: the record is a SlowCall written by the BPF program; read unaligned.
            let call: SlowCall = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            self.add(call);
            if self.processes.insert(call.tgid) {
                // Snapshot its memory map while it is alive, for symbolising later.
                symbolizer.note_process(call.tgid);
            }
        }
    }

    pub(super) fn add(&mut self, call: SlowCall) {
        self.total += 1;
        self.total_ns = self.total_ns.saturating_add(call.duration_ns);
        let entry = self
            .by_stack
            .entry((call.tgid, call.user_stack_id))
            .or_default();
        entry.0 += 1;
        entry.1 = entry.1.saturating_add(call.duration_ns);
        if self.slowest.len() < SLOWEST
            || self
                .slowest
                .last()
                .is_some_and(|s| call.duration_ns > s.duration_ns)
        {
            self.slowest.push(call);
            self.slowest
                .sort_by_key(|call| std::cmp::Reverse(call.duration_ns));
            self.slowest.truncate(SLOWEST);
        }
    }

    pub(super) fn report(
        &self,
        traces: &HashMap<u32, Vec<u64>>,
        symbolizer: &mut Symbolizer,
        start_mono_ns: u64,
    ) -> SlowCalls {
        let slowest = self
            .slowest
            .iter()
            .map(|call| SlowCallView {
                duration_ns: call.duration_ns,
                pid: call.tgid,
                tid: call.tid,
                at: Duration::from_nanos(call.end_ns.saturating_sub(start_mono_ns)),
                callers: callers(call, traces, symbolizer),
            })
            .collect();
        SlowCalls {
            threshold_ns: self.threshold_ns,
            total: self.total,
            total_ns: self.total_ns,
            slowest,
        }
    }

    /// The slow calls as a stack profile: process, callers root first, then the function;
    /// weighted by the calls' total time in microseconds.
    pub(super) fn profile(
        &self,
        traces: &HashMap<u32, Vec<u64>>,
        symbolizer: &mut Symbolizer,
        report: &LatencyReport,
        title: &str,
    ) -> crate::model::StackProfile {
        let entries = self
            .by_stack
            .iter()
            .map(|(&(tgid, stack_id), &(_, total_ns))| {
                let key = StackKey {
                    tgid,
                    tid: 0,
                    user_stack_id: stack_id,
                    kernel_stack_id: STACK_ID_NOT_COLLECTED,
                    comm: [0; 16],
                };
                (key, (total_ns / 1000).max(1))
            })
            .collect();
        // At the return probe the first address is a return address too: point it into the
        // call instruction, as build_profile does for the others.
        let traces = traces
            .iter()
            .map(|(&id, trace)| {
                let mut trace = trace.clone();
                if let Some(first) = trace.first_mut() {
                    *first = first.saturating_sub(1);
                }
                (id, trace)
            })
            .collect();
        let quality = DataQuality {
            duration: report.quality.duration,
            events: report.quality.slow_recorded + report.quality.slow_ring_full,
            recorded: report.quality.slow_recorded,
            notes: vec![
                format!(
                    "slow calls of {} (at or above {}), weighted by their total time in us",
                    report.function,
                    format_ns(self.threshold_ns)
                ),
                format!(
                    "{} slow calls lost to a full ring buffer",
                    report.quality.slow_ring_full
                ),
            ],
            ..DataQuality::default()
        };
        let mut profile = stacks::build_profile(
            &RawStacks {
                entries,
                traces,
                ..RawStacks::default()
            },
            symbolizer,
            &BuildOptions {
                title: format!("slow calls of {} in {title}", report.function),
                unit: WeightUnit::Microseconds,
                per_thread: false,
                stack_storage: DEFAULT_STACK_STORAGE,
                weight_divisor: 1,
                period_ns: None,
                dwarf_possible: true,
            },
            quality,
        );
        for stack in &mut profile.stacks {
            stack
                .frames
                .push(Frame::new(FrameKind::User, report.function.clone()));
        }
        profile.normalize();
        profile
    }
}

/// A slow call's callers, innermost first, symbolised.
fn callers(
    call: &SlowCall,
    traces: &HashMap<u32, Vec<u64>>,
    symbolizer: &mut Symbolizer,
) -> Vec<String> {
    let Some(trace) = u32::try_from(call.user_stack_id)
        .ok()
        .and_then(|id| traces.get(&id))
    else {
        let why = match -call.user_stack_id {
            17 => "hash collision in the stack map",
            12 => "stack map full",
            _ => "walk failed",
        };
        return vec![format!("[caller stack lost: {why}]")];
    };
    let addrs: Vec<u64> = trace.iter().map(|a| a.saturating_sub(1)).collect();
    let mut names = Vec::new();
    for resolved in symbolizer.user(call.tgid, &addrs) {
        match resolved {
            // Inlined callees come after their function; innermost first reverses them.
            Resolved::Frames(located) => {
                names.extend(located.symbols.into_iter().rev().map(|symbol| symbol.name));
            }
            Resolved::Unknown { name, .. } => names.push(name),
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use livetrace_common::uprobe_hist::SlowCall;

    /// The slowest list keeps the ten slowest, slowest first, and every call is aggregated.
    #[test]
    fn keeps_the_slowest_calls() {
        let mut slow = SlowCollector::new(1);
        for i in 0..100u64 {
            slow.add(SlowCall {
                end_ns: i,
                duration_ns: (i * 37) % 101,
                tgid: 1,
                tid: 2,
                user_stack_id: (i % 3) as i32,
                _pad: 0,
            });
        }
        assert_eq!(slow.total, 100);
        assert_eq!(slow.slowest.len(), SLOWEST);
        let durations: Vec<u64> = slow.slowest.iter().map(|c| c.duration_ns).collect();
        let mut all: Vec<u64> = (0..100u64).map(|i| (i * 37) % 101).collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(durations, all[..SLOWEST]);
        assert_eq!(slow.by_stack.values().map(|v| v.0).sum::<u64>(), 100);
    }
}
