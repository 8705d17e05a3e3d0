//! The latency histogram for programs: one JSON object with the counts, exact min/mean/max,
//! percentiles (with the bounds that contain each), the non-empty buckets, the slowest calls,
//! the per-interval histograms of `-i`, and every data-quality counter. All times are integer
//! nanoseconds (`*_ns`), except `duration_s` and interval bounds (`*_s`), in seconds.

use std::{
    collections::BTreeMap,
    io::{self, Write},
};

use serde::Serialize;

use crate::histogram::{Histogram, LatencyQuality, LatencyReport, PERCENTILES};

#[derive(Serialize)]
struct Report<'a> {
    function: &'a str,
    sites: &'a [String],
    duration_s: f64,
    #[serde(flatten)]
    histogram: HistogramJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_calls: Option<SlowJson<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    intervals: Vec<IntervalJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spans: Option<SpansJson<'a>>,
    data_quality: QualityJson<'a>,
}

#[derive(Serialize)]
struct SpansJson<'a> {
    from: &'a str,
    to: &'a str,
    guarded_sites: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<ByJson<'a>>,
}

#[derive(Serialize)]
struct ByJson<'a> {
    argument: &'a str,
    /// Every key, most total time first.
    keys: Vec<KeyJson<'a>>,
    keys_map_full: u64,
    unreadable: u64,
}

#[derive(Serialize)]
struct KeyJson<'a> {
    key: &'a str,
    count: u64,
    total_ns: u64,
    p50_ns: Option<u64>,
    p99_ns: Option<u64>,
    max_ns: Option<u64>,
}

fn spans_json(spans: &crate::histogram::Spans) -> SpansJson<'_> {
    SpansJson {
        from: &spans.from,
        to: &spans.to,
        guarded_sites: spans.guarded_sites,
        by: spans.by.as_ref().map(|by| {
            let mut keys: Vec<KeyJson<'_>> = by
                .keys
                .iter()
                .map(|(key, h)| KeyJson {
                    key,
                    count: h.count(),
                    total_ns: h.sum_ns,
                    p50_ns: h.percentile(50.0, "p50").map(|p| p.estimate_ns),
                    p99_ns: h.percentile(99.0, "p99").map(|p| p.estimate_ns),
                    max_ns: h.percentile(100.0, "max").map(|p| p.estimate_ns),
                })
                .collect();
            keys.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.key.cmp(b.key)));
            ByJson {
                argument: &by.argument,
                keys,
                keys_map_full: by.keys_map_full,
                unreadable: by.unreadable,
            }
        }),
    }
}

#[derive(Serialize)]
struct HistogramJson {
    count: u64,
    min_ns: Option<u64>,
    mean_ns: Option<f64>,
    max_ns: Option<u64>,
    /// `p50`, `p90`, `p99`, `p99.9` (estimates) and `max` (exact).
    percentiles_ns: BTreeMap<&'static str, Option<u64>>,
    /// `[low, high)` that certainly contains each percentile.
    percentile_bounds_ns: BTreeMap<&'static str, Option<[u64; 2]>>,
    buckets: Vec<BucketJson>,
}

#[derive(Serialize)]
struct BucketJson {
    low_ns: u64,
    /// `null` for the open-ended overflow bucket.
    high_ns: Option<u64>,
    count: u64,
}

#[derive(Serialize)]
struct IntervalJson {
    start_s: f64,
    end_s: f64,
    #[serde(flatten)]
    histogram: HistogramJson,
}

#[derive(Serialize)]
struct SlowJson<'a> {
    threshold_ns: u64,
    count: u64,
    total_ns: u64,
    slowest: Vec<SlowCallJson<'a>>,
}

#[derive(Serialize)]
struct SlowCallJson<'a> {
    duration_ns: u64,
    pid: u32,
    tid: u32,
    at_s: f64,
    /// Caller first.
    callers: &'a [String],
}

#[derive(Serialize)]
struct QualityJson<'a> {
    entries: u64,
    returns: u64,
    recorded: u64,
    not_measured: u64,
    too_deep: u64,
    abandoned: u64,
    exited_inside: u64,
    still_open: u64,
    thread_map_full: u64,
    return_without_entry: u64,
    return_unmatched: u64,
    slow_recorded: u64,
    slow_ring_full: u64,
    slow_stack_lost: u64,
    helper_failed: u64,
    returns_outside_capture: u64,
    probe_cost_ns: Option<f64>,
    /// What the probes add to each measured call, for a function that begins like this one.
    probe_overhead_ns: Option<u64>,
    notes: &'a [String],
    hints: Vec<String>,
}

fn histogram_json(histogram: &Histogram) -> HistogramJson {
    let mut percentiles_ns = BTreeMap::new();
    let mut percentile_bounds_ns = BTreeMap::new();
    for (p, label) in PERCENTILES {
        let estimate = histogram.percentile(p, label);
        percentiles_ns.insert(label, estimate.map(|e| e.estimate_ns));
        percentile_bounds_ns.insert(label, estimate.map(|e| [e.low_ns, e.high_ns]));
    }
    percentiles_ns.insert("max", histogram.max_ns);
    percentile_bounds_ns.insert("max", histogram.max_ns.map(|m| [m, m + 1]));
    HistogramJson {
        count: histogram.count(),
        min_ns: histogram.min_ns,
        mean_ns: histogram.mean_ns(),
        max_ns: histogram.max_ns,
        percentiles_ns,
        percentile_bounds_ns,
        buckets: histogram
            .nonempty_buckets()
            .into_iter()
            .map(|row| BucketJson {
                low_ns: row.low_ns,
                high_ns: (row.high_ns != u64::MAX).then_some(row.high_ns),
                count: row.count,
            })
            .collect(),
    }
}

fn quality_json(q: &LatencyQuality, max_threads: u32) -> QualityJson<'_> {
    QualityJson {
        entries: q.entries,
        returns: q.returns,
        recorded: q.recorded,
        not_measured: q.unmeasured(),
        too_deep: q.too_deep,
        abandoned: q.abandoned,
        exited_inside: q.exited_inside,
        still_open: q.still_open,
        thread_map_full: q.thread_map_full,
        return_without_entry: q.return_without_entry,
        return_unmatched: q.return_unmatched,
        slow_recorded: q.slow_recorded,
        slow_ring_full: q.slow_ring_full,
        slow_stack_lost: q.slow_stack_lost,
        helper_failed: q.helper_failed,
        returns_outside_capture: q.returns_outside,
        probe_cost_ns: q.probe_cost_ns,
        probe_overhead_ns: q.probe_overhead.map(|(ns, _)| ns),
        notes: &q.notes,
        hints: q.advice(max_threads),
    }
}

/// Writes the report as one JSON object and a newline.
pub fn write<W: Write>(report: &LatencyReport, mut out: W) -> io::Result<()> {
    let json = Report {
        function: &report.function,
        sites: &report.sites,
        duration_s: report.quality.duration.as_secs_f64(),
        histogram: histogram_json(&report.total),
        slow_calls: report.slow.as_ref().map(|slow| SlowJson {
            threshold_ns: slow.threshold_ns,
            count: slow.total,
            total_ns: slow.total_ns,
            slowest: slow
                .slowest
                .iter()
                .map(|call| SlowCallJson {
                    duration_ns: call.duration_ns,
                    pid: call.pid,
                    tid: call.tid,
                    at_s: call.at.as_secs_f64(),
                    callers: &call.callers,
                })
                .collect(),
        }),
        intervals: report
            .intervals
            .iter()
            .map(|interval| IntervalJson {
                start_s: interval.start.as_secs_f64(),
                end_s: interval.end.as_secs_f64(),
                histogram: histogram_json(&interval.histogram),
            })
            .collect(),
        spans: report.spans.as_ref().map(spans_json),
        data_quality: quality_json(&report.quality, report.max_threads),
    };
    serde_json::to_writer_pretty(&mut out, &json).map_err(io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The documented fields are present with the right values, buckets are only the non-empty
    /// ones, and an empty histogram gives nulls rather than made-up numbers.
    #[test]
    fn writes_the_documented_schema() {
        let mut total = Histogram::default();
        for _ in 0..9 {
            total.record(1000);
        }
        total.record(90_000);
        let report = LatencyReport {
            function: "f".into(),
            sites: vec!["/bin/x (pid 1)".into()],
            title: "pid 1".into(),
            total,
            intervals: vec![crate::histogram::Interval {
                start: Duration::ZERO,
                end: Duration::from_secs(1),
                histogram: Histogram::default(),
            }],
            slow: None,
            quality: LatencyQuality {
                duration: Duration::from_secs(1),
                recorded: 10,
                too_deep: 2,
                ..LatencyQuality::default()
            },
            max_threads: 8192,
            spans: None,
        };
        let mut out = Vec::new();
        write(&report, &mut out).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["count"], 10);
        assert_eq!(value["min_ns"], 1000);
        assert_eq!(value["max_ns"], 90_000);
        assert_eq!(value["mean_ns"], 9900.0);
        // Interpolated inside the bucket [1000, 1008): within 1/32 of the truth.
        let p50 = value["percentiles_ns"]["p50"].as_u64().unwrap();
        assert!((1000..1032).contains(&p50), "{p50}");
        assert_eq!(value["percentiles_ns"]["p99.9"], 90_000);
        assert_eq!(value["percentiles_ns"]["max"], 90_000);
        assert_eq!(value["percentile_bounds_ns"]["p50"][0], 1000);
        assert_eq!(value["buckets"].as_array().unwrap().len(), 2);
        assert_eq!(value["buckets"][0]["count"], 9);
        assert_eq!(value["data_quality"]["too_deep"], 2);
        assert_eq!(value["data_quality"]["not_measured"], 2);
        assert!(value.get("slow_calls").is_none());
        let interval = &value["intervals"][0];
        assert_eq!(interval["count"], 0);
        assert!(interval["percentiles_ns"]["p50"].is_null());
        assert!(interval["min_ns"].is_null());
    }
}
