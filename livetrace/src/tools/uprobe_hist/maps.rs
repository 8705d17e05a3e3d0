//! The BPF maps uprobe-hist reads while the probes run.

use std::collections::HashMap;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, RingBuf, StackTraceMap},
};
use livetrace_common::uprobe_hist::{
    BY_KEY, COUNTER_SLOTS, COUNTERS, HISTOGRAM, LatencyHistogram, OpenSpan, SLOW_CALLS, SPANS,
    STACKS, SpanKey, THREADS, ThreadCalls, WINDOW, Window,
};

use crate::{bpf, histogram::Histogram};

use super::slow::SlowCollector;

/// The maps, taken out of the object so the run loop can read them while the programs run.
pub(super) struct Maps {
    pub(super) histogram: PerCpuArray<MapData, LatencyHistogram>,
    window: PerCpuArray<MapData, Window>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    threads: BpfHashMap<MapData, u32, ThreadCalls>,
    spans: BpfHashMap<MapData, u32, OpenSpan>,
    by_key: BpfHashMap<MapData, SpanKey, LatencyHistogram>,
    pub(super) ring: RingBuf<MapData>,
    pub(super) stacks: StackTraceMap<MapData>,
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            histogram: PerCpuArray::try_from(bpf::take_map(ebpf, HISTOGRAM)?)?,
            window: PerCpuArray::try_from(bpf::take_map(ebpf, WINDOW)?)?,
            counters: PerCpuArray::try_from(bpf::take_map(ebpf, COUNTERS)?)?,
            threads: BpfHashMap::try_from(bpf::take_map(ebpf, THREADS)?)?,
            spans: BpfHashMap::try_from(bpf::take_map(ebpf, SPANS)?)?,
            by_key: BpfHashMap::try_from(bpf::take_map(ebpf, BY_KEY)?)?,
            ring: RingBuf::try_from(bpf::take_map(ebpf, SLOW_CALLS)?)?,
            stacks: StackTraceMap::try_from(bpf::take_map(ebpf, STACKS)?)?,
        })
    }

    pub(super) fn histogram(&self) -> anyhow::Result<Histogram> {
        let per_cpu = self
            .histogram
            .get(&0, 0)
            .context("failed to read the latency histogram map")?;
        Ok(Histogram::from_per_cpu(per_cpu.iter()))
    }

    /// Min and max since the last call, and a reset for the next interval.
    pub(super) fn take_window(&mut self) -> anyhow::Result<(Option<u64>, Option<u64>)> {
        let per_cpu = self
            .window
            .get(&0, 0)
            .context("failed to read the interval window map")?;
        let min = per_cpu
            .iter()
            .filter(|w| w.min_ns > 0)
            .map(|w| w.min_ns)
            .min();
        let max = per_cpu.iter().map(|w| w.max_ns).max().filter(|&m| m > 0);
        let cpus = aya::util::nr_cpus().map_err(|(path, err)| anyhow!("{path}: {err}"))?;
        self.window
            .set(0, PerCpuValues::try_from(vec![Window::default(); cpus])?, 0)
            .context("failed to reset the interval window map")?;
        Ok((min, max))
    }

    pub(super) fn counters(&self) -> anyhow::Result<[u64; COUNTER_SLOTS as usize]> {
        let mut totals = [0u64; COUNTER_SLOTS as usize];
        for (slot, total) in totals.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(slot as u32), 0)
                .context("failed to read the uprobe-hist counters")?;
            *total = values.iter().sum();
        }
        Ok(totals)
    }

    /// Calls (or spans) still open on threads that have not exited.
    pub(super) fn still_open(&self) -> anyhow::Result<u64> {
        let mut open = 0;
        for entry in self.threads.iter() {
            let (_, calls) = entry.context("failed to read the thread map")?;
            open += u64::from(calls.depth);
        }
        for entry in self.spans.iter() {
            let (_, span) = entry.context("failed to read the span map")?;
            open += u64::from(span.start_ns != 0);
        }
        Ok(open)
    }

    /// Every `--by` key with its spans; `signed`: show integer keys as signed.
    pub(super) fn by_key(
        &self,
        string: bool,
        signed: bool,
    ) -> anyhow::Result<Vec<(String, Histogram)>> {
        let mut keys = Vec::new();
        for entry in self.by_key.iter() {
            let (key, histogram) = entry.context("failed to read the --by map")?;
            keys.push((
                key_text(&key, string, signed),
                Histogram::from_per_cpu([&histogram]),
            ));
        }
        Ok(keys)
    }

    /// The slow calls' stacks, leaf (the caller) first.
    pub(super) fn stack_traces(
        &self,
        slow: &SlowCollector,
    ) -> anyhow::Result<HashMap<u32, Vec<u64>>> {
        let mut traces = HashMap::new();
        for &(_, id) in slow.by_stack.keys() {
            let Ok(id) = u32::try_from(id) else { continue };
            if let Ok(trace) = self.stacks.get(&id, 0) {
                traces.insert(id, trace.frames().iter().map(|f| f.ip).collect());
            }
        }
        Ok(traces)
    }
}

/// A key as the report shows it: the string up to its NUL (sanitised: it is the traced
/// program's), or the integer.
fn key_text(key: &SpanKey, string: bool, signed: bool) -> String {
    if key.unreadable != 0 {
        return "(unreadable)".to_owned();
    }
    if string {
        let end = key
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(key.bytes.len());
        return crate::names::sanitized(&String::from_utf8_lossy(&key.bytes[..end]));
    }
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&key.bytes[..8]);
    let value = u64::from_le_bytes(bytes);
    if signed {
        (value as i64).to_string()
    } else {
        value.to_string()
    }
}
