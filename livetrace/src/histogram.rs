//! The latency-histogram model that `uprobe-hist` produces and its renderers read: log-linear
//! bucket counts (the bucket function is `livetrace_common::histogram`, shared with the BPF
//! program), exact count, sum, min and max, and percentiles estimated from the buckets together
//! with the bucket bounds that contain them: the resolution is part of the answer. It knows
//! nothing about BPF or file formats.

use std::time::Duration;

use livetrace_common::histogram::{BUCKETS, OVERFLOW_BUCKET, bucket_high, bucket_low};

/// The percentiles every output reports, with their labels.
pub const PERCENTILES: [(f64, &str); 4] =
    [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")];

/// Durations of calls, in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// One count per bucket of `livetrace_common::histogram`.
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
    /// Exact extremes; `None` without calls.
    pub min_ns: Option<u64>,
    pub max_ns: Option<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; BUCKETS],
            sum_ns: 0,
            min_ns: None,
            max_ns: None,
        }
    }
}

/// A percentile estimate and the bounds that certainly contain the true value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percentile {
    pub label: &'static str,
    /// Interpolated within the bucket by rank.
    pub estimate_ns: u64,
    /// The true value is in `[low_ns, high_ns)`: the bucket's bounds, narrowed by the exact min
    /// and max.
    pub low_ns: u64,
    pub high_ns: u64,
}

/// One row of the power-of-two view: `[low, high)` and the calls in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub low_ns: u64,
    /// `u64::MAX` for the open-ended overflow row.
    pub high_ns: u64,
    pub count: u64,
}

impl Histogram {
    /// Adds one call, as the kernel would.
    #[cfg(test)]
    pub fn record(&mut self, duration_ns: u64) {
        let index = livetrace_common::histogram::bucket_index(duration_ns) as usize;
        self.buckets[index] += 1;
        self.sum_ns = self.sum_ns.saturating_add(duration_ns);
        self.min_ns = Some(self.min_ns.map_or(duration_ns, |m| m.min(duration_ns)));
        self.max_ns = Some(self.max_ns.map_or(duration_ns, |m| m.max(duration_ns)));
    }

    /// Merges the per-CPU histograms the kernel keeps.
    pub fn from_per_cpu<'a>(
        cpus: impl IntoIterator<Item = &'a livetrace_common::uprobe_hist::LatencyHistogram>,
    ) -> Self {
        let mut total = Self::default();
        for cpu in cpus {
            for (sum, count) in total.buckets.iter_mut().zip(cpu.buckets.iter()) {
                *sum += count;
            }
            total.sum_ns = total.sum_ns.saturating_add(cpu.sum_ns);
            if cpu.count > 0 {
                total.min_ns = Some(total.min_ns.map_or(cpu.min_ns, |m| m.min(cpu.min_ns)));
                total.max_ns = Some(total.max_ns.map_or(cpu.max_ns, |m| m.max(cpu.max_ns)));
            }
        }
        total
    }

    /// The calls in `self` that are not in `earlier` (a snapshot of the same counters), with
    /// the window's extremes, which user space reset at the start of the interval.
    pub fn since(&self, earlier: &Self, min_ns: Option<u64>, max_ns: Option<u64>) -> Self {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(now, then)| now.saturating_sub(*then))
            .collect();
        let any = buckets.iter().any(|&c| c > 0);
        Self {
            buckets,
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            min_ns: min_ns.filter(|_| any),
            max_ns: max_ns.filter(|_| any),
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    pub fn mean_ns(&self) -> Option<f64> {
        let count = self.count();
        (count > 0).then(|| self.sum_ns as f64 / count as f64)
    }

    /// The smallest value that at least `p`% of calls do not exceed (nearest rank), estimated
    /// by linear interpolation inside its bucket.
    pub fn percentile(&self, p: f64, label: &'static str) -> Option<Percentile> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((p / 100.0 * count as f64).ceil() as u64).clamp(1, count);
        let mut below = 0;
        for (index, &in_bucket) in self.buckets.iter().enumerate() {
            if in_bucket == 0 || below + in_bucket < rank {
                below += in_bucket;
                continue;
            }
            let index = index as u32;
            let (min, max) = (
                self.min_ns.unwrap_or(0),
                self.max_ns.unwrap_or(u64::MAX - 1),
            );
            let low = bucket_low(index).max(min);
            let high = if index == OVERFLOW_BUCKET {
                max + 1
            } else {
                bucket_high(index).min(max + 1)
            };
            let high = high.max(low + 1);
            // The extreme ranks are known exactly; inside, spread the bucket's calls evenly over
            // it, each at the middle of its share.
            let position = ((rank - below) as f64 - 0.5) / in_bucket as f64;
            let estimate = if rank == count {
                max
            } else if rank == 1 {
                min
            } else {
                (low as f64 + position * (high - low) as f64).floor() as u64
            };
            return Some(Percentile {
                label,
                estimate_ns: estimate.clamp(low, high - 1),
                low_ns: low,
                high_ns: high,
            });
        }
        None
    }

    /// p50, p90, p99 and p99.9 (empty without calls).
    pub fn standard_percentiles(&self) -> Vec<Percentile> {
        PERCENTILES
            .iter()
            .filter_map(|&(p, label)| self.percentile(p, label))
            .collect()
    }

    /// The non-empty buckets, with their bounds.
    pub fn nonempty_buckets(&self) -> Vec<Row> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(index, &count)| Row {
                low_ns: bucket_low(index as u32),
                high_ns: bucket_high(index as u32),
                count,
            })
            .collect()
    }

    /// The fine buckets summed into power-of-two rows (`[0, 1)`, `[1, 2)`, `[2, 4)`, ...), from
    /// the first non-empty row to the last, empty rows between included.
    pub fn power_of_two_rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = Vec::new();
        for (index, &count) in self.buckets.iter().enumerate() {
            let low = bucket_low(index as u32);
            let (row_low, row_high) = if index as u32 == OVERFLOW_BUCKET {
                (low, u64::MAX)
            } else if low == 0 {
                (0, 1)
            } else {
                let exponent = 63 - low.leading_zeros();
                (1u64 << exponent, 2u64 << exponent)
            };
            match rows.last_mut() {
                Some(row) if row.low_ns == row_low => row.count += count,
                _ => rows.push(Row {
                    low_ns: row_low,
                    high_ns: row_high,
                    count,
                }),
            }
        }
        let first = rows.iter().position(|r| r.count > 0);
        let last = rows.iter().rposition(|r| r.count > 0);
        match (first, last) {
            (Some(first), Some(last)) => rows[first..=last].to_vec(),
            _ => Vec::new(),
        }
    }
}

/// `950ns`, `1.02us`, `32.8us`, `655us`, `1.05ms`, `2.50s`: three significant digits in the
/// largest unit that keeps the number at least 1.
pub fn format_ns(ns: u64) -> String {
    format_ns_f64(ns as f64)
}

pub fn format_ns_f64(ns: f64) -> String {
    // Thresholds just below the next unit, so 999.7 us reads "1.00ms", not "1000us".
    let (value, unit) = if ns < 999.5 {
        return format!("{}ns", ns.round() as u64);
    } else if ns < 999.5e3 {
        (ns / 1e3, "us")
    } else if ns < 999.5e6 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    // Round to three significant digits first, so 999.96 becomes "1000" rather than "1e3".
    let text = if value < 9.995 {
        format!("{value:.2}")
    } else if value < 99.95 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    };
    format!("{text}{unit}")
}

/// One interval of an `-i` capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    /// From the start of the capture.
    pub start: Duration,
    pub end: Duration,
    pub histogram: Histogram,
}

/// One call slower than `--slow`, with its caller's stack (innermost first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlowCallView {
    pub duration_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// When it returned, from the start of the capture.
    pub at: Duration,
    /// Caller first, then its callers; or one placeholder naming why the stack is missing.
    pub callers: Vec<String>,
}

/// What `--slow` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlowCalls {
    pub threshold_ns: u64,
    /// Slow calls received (the ones lost to a full buffer are in the data quality).
    pub total: u64,
    pub total_ns: u64,
    /// The slowest ones, slowest first.
    pub slowest: Vec<SlowCallView>,
}

/// Everything the kernel counted about pairing and losses; see
/// `livetrace_common::uprobe_hist::Counter` for each field's meaning.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencyQuality {
    pub duration: Duration,
    pub entries: u64,
    pub returns: u64,
    pub recorded: u64,
    pub thread_map_full: u64,
    pub too_deep: u64,
    pub abandoned: u64,
    pub exited_inside: u64,
    /// Calls still open when the capture ended.
    pub still_open: u64,
    pub return_without_entry: u64,
    pub return_unmatched: u64,
    pub slow_recorded: u64,
    pub slow_ring_full: u64,
    pub slow_stack_lost: u64,
    pub helper_failed: u64,
    /// Returns of calls that began while the entry probe was being attached or detached (not a
    /// loss: those calls are outside the capture).
    pub returns_outside: u64,
    /// The probe's own cost per call measured by the kernel (`kernel.bpf_stats_enabled`).
    pub probe_cost_ns: Option<f64>,
    /// How much of each measured call is the probes' own doing, for a function that begins
    /// like the probed one (`uprobe_hist::calibrate`), and that beginning.
    pub probe_overhead: Option<(u64, &'static str)>,
    pub notes: Vec<String>,
}

impl LatencyQuality {
    /// Calls that happened but are not in the histogram.
    pub fn unmeasured(&self) -> u64 {
        self.thread_map_full
            + self.too_deep
            + self.abandoned
            + self.exited_inside
            + self.still_open
            + self.return_without_entry
            + self.return_unmatched
            + self.helper_failed
    }

    /// What to do about each kind of loss seen.
    pub fn advice(&self, max_threads: u32) -> Vec<String> {
        let mut advice = Vec::new();
        if self.thread_map_full > 0 {
            advice.push(format!(
                "more threads called the function than the thread map holds: raise \
                 --max-threads (now {max_threads})"
            ));
        }
        if self.too_deep > 0 {
            advice.push(
                "calls nested deeper than 64 (recursion) are not measured: the kernel stops \
                 probing returns past 64 open uretprobes per thread; probe a function that is \
                 called less deeply"
                    .into(),
            );
        }
        if self.abandoned > 0 || self.return_unmatched > 0 {
            advice.push(
                "some calls left without returning (longjmp, C++ exceptions, a tail call into \
                 the function) or returned without a matching entry; their durations are \
                 unknown and left out"
                    .into(),
            );
        }
        if self.still_open > 0 {
            advice.push(
                "calls still running when the capture ended are not in the histogram: \
                 capture for longer if the function is slow"
                    .into(),
            );
        }
        if self.slow_ring_full > 0 {
            advice.push(
                "slow calls were dropped because the ring buffer was full: raise --slow so \
                 fewer calls qualify"
                    .into(),
            );
        }
        if self.slow_stack_lost > 0 {
            advice.push(
                "some slow calls have no caller stack: the stack map was full or colliding, or \
                 the code lacks frame pointers"
                    .into(),
            );
        }
        if self.helper_failed > 0 {
            advice.push(
                "BPF map operations that should not fail did: please report this with the \
                 kernel version"
                    .into(),
            );
        }
        advice
    }
}

/// A complete `uprobe-hist` result.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyReport {
    /// The function as the user named it, resolved: e.g. `livetrace_demo::validate_subtitle_track`.
    pub function: String,
    /// Where it was probed: `path (pid N)` for each probe site.
    pub sites: Vec<String>,
    /// What was traced, for titles: "pid 1234 (catalogue-api)".
    pub title: String,
    pub total: Histogram,
    pub intervals: Vec<Interval>,
    pub slow: Option<SlowCalls>,
    pub quality: LatencyQuality,
    pub max_threads: u32,
    /// Spans between two USDT probes (`--from`, `--to`), and their breakdown (`--by`).
    pub spans: Option<Spans>,
}

/// How a report names spans between two probes: `from → to`.
pub fn span_name(from: &str, to: &str) -> String {
    format!("{from} → {to}")
}

/// Whether a report's name is that of spans ([`span_name`]) rather than of a function.
pub fn is_span_name(name: &str) -> bool {
    name.contains(" → ")
}

/// What `uprobe-hist --from --to` adds to the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Spans {
    /// The probes, `provider:name`.
    pub from: String,
    pub to: String,
    /// Probe sites whose semaphore the kernel raised while attached.
    pub guarded_sites: usize,
    pub by: Option<ByKeys>,
}

/// Spans broken down by an argument of the `--from` probe.
#[derive(Clone, Debug, PartialEq)]
pub struct ByKeys {
    /// `str(arg0)`.
    pub argument: String,
    /// Every key seen, with its spans.
    pub keys: Vec<(String, Histogram)>,
    /// Spans timed but not broken down: no room for another key (`--max-keys`).
    pub keys_map_full: u64,
    /// Spans whose argument could not be read (under the key "(unreadable)").
    pub unreadable: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values: &[(u64, u64)]) -> Histogram {
        let mut h = Histogram::default();
        for &(value, times) in values {
            for _ in 0..times {
                h.record(value);
            }
        }
        h
    }

    /// Percentiles of a known mixture land in the right bucket, within 1/32 of the truth, and
    /// their bounds contain the true value.
    #[test]
    fn percentiles_of_a_known_mixture() {
        let h = histogram(&[(50_000, 900), (500_000, 90), (5_000_000, 10)]);
        assert_eq!(h.count(), 1000);
        let p = h.standard_percentiles();
        let truth = [50_000, 50_000, 500_000, 5_000_000];
        for (percentile, truth) in p.iter().zip(truth) {
            assert!(
                percentile.low_ns <= truth && truth < percentile.high_ns,
                "{percentile:?} vs {truth}"
            );
            let error = percentile.estimate_ns.abs_diff(truth);
            assert!(error * 32 <= truth, "{percentile:?} vs {truth}");
        }
        assert_eq!(h.min_ns, Some(50_000));
        assert_eq!(h.max_ns, Some(5_000_000));
        assert_eq!(
            h.mean_ns(),
            Some((900.0 * 50e3 + 90.0 * 500e3 + 10.0 * 5e6) / 1000.0)
        );
    }

    /// A spread of values: every percentile's bounds contain the exact nearest-rank value, and
    /// the estimate is within the bucket's resolution of it.
    #[test]
    fn percentile_bounds_contain_the_exact_value() {
        let mut values: Vec<u64> = (0..5000u64).map(|i| 1000 + i * i % 977 * 131).collect();
        let mut h = Histogram::default();
        for &v in &values {
            h.record(v);
        }
        values.sort_unstable();
        for (p, label) in PERCENTILES
            .iter()
            .copied()
            .chain([(1.0, "p1"), (100.0, "max")])
        {
            let rank = ((p / 100.0 * values.len() as f64).ceil() as usize).max(1);
            let exact = values[rank - 1];
            let got = h.percentile(p, label).unwrap();
            assert!(
                got.low_ns <= exact && exact < got.high_ns,
                "{got:?} vs {exact}"
            );
            let error = got.estimate_ns.abs_diff(exact);
            assert!(error * 32 <= exact, "{got:?} vs {exact}");
        }
        assert_eq!(
            h.percentile(100.0, "max").unwrap().estimate_ns,
            values[4999]
        );
    }

    /// Fine buckets add up into power-of-two rows, trimmed to the non-empty range.
    #[test]
    fn power_of_two_rows_sum_fine_buckets() {
        let h = histogram(&[(0, 1), (3, 2), (1000, 5), (1500, 1), (4096, 7)]);
        let rows = h.power_of_two_rows();
        let as_tuples: Vec<(u64, u64, u64)> = rows
            .iter()
            .map(|r| (r.low_ns, r.high_ns, r.count))
            .collect();
        assert_eq!(as_tuples[0], (0, 1, 1));
        assert_eq!(as_tuples[1], (1, 2, 0));
        assert_eq!(as_tuples[2], (2, 4, 2));
        assert!(as_tuples.contains(&(512, 1024, 5)));
        assert!(as_tuples.contains(&(1024, 2048, 1)));
        assert_eq!(*as_tuples.last().unwrap(), (4096, 8192, 7));
        assert_eq!(rows.iter().map(|r| r.count).sum::<u64>(), h.count());
        assert!(Histogram::default().power_of_two_rows().is_empty());
    }

    /// An interval is the difference of two snapshots, with the window's extremes.
    #[test]
    fn interval_is_a_difference() {
        let before = histogram(&[(100, 3)]);
        let after = histogram(&[(100, 3), (2000, 2)]);
        let interval = after.since(&before, Some(2000), Some(2000));
        assert_eq!(interval.count(), 2);
        assert_eq!(interval.sum_ns, 4000);
        assert_eq!(interval.percentile(50.0, "p50").unwrap().estimate_ns, 2000);
        let empty = after.since(&after, Some(1), Some(1));
        assert_eq!(empty.count(), 0);
        assert_eq!(empty.min_ns, None);
    }

    /// Durations print with three significant digits in a readable unit.
    #[test]
    fn formats_durations_for_reading() {
        assert_eq!(format_ns(950), "950ns");
        assert_eq!(format_ns(1024), "1.02us");
        assert_eq!(format_ns(32_768), "32.8us");
        assert_eq!(format_ns(655_360), "655us");
        assert_eq!(format_ns(999_999), "1.00ms");
        assert_eq!(format_ns(999_400), "999us");
        assert_eq!(format_ns(1_048_576), "1.05ms");
        assert_eq!(format_ns(2_500_000_000), "2.50s");
    }
}
