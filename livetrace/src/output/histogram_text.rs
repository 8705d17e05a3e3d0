//! The latency histogram for people: the familiar power-of-two layout (`[1.02us, 2.05us)  4395
//! |@@@@...|`, the fine log-linear buckets summed into rows), then count, min, mean, max and the
//! percentiles, each with the bucket bounds that contain it; the slowest calls with their
//! callers; and the data-quality footer.

use std::{
    fmt::Write as _,
    io::{self, Write},
};

use crate::histogram::{
    ByKeys, Histogram, Interval, LatencyQuality, LatencyReport, SlowCalls, format_ns, format_ns_f64,
};

/// Width of the bar column.
const BAR_WIDTH: u64 = 40;
/// Caller frames shown per slow call.
const CALLER_FRAMES: usize = 4;

/// The whole report: header, histogram, percentiles, slowest calls, footer.
pub fn write<W: Write>(report: &LatencyReport, mut out: W) -> io::Result<()> {
    out.write_all(report_text(report).as_bytes())?;
    out.write_all(footer(report).as_bytes())?;
    out.flush()
}

/// Everything but the footer.
pub fn report_text(report: &LatencyReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "latency of {} in {}, {:.2} s",
        report.function,
        report.sites.join(", "),
        report.quality.duration.as_secs_f64()
    );
    if !report.intervals.is_empty() {
        let _ = writeln!(out, "total over the whole capture:");
    }
    out.push_str(&histogram_text(&report.total, noun(&report.function)));
    if let Some(by) = report.spans.as_ref().and_then(|s| s.by.as_ref()) {
        out.push_str(&by_keys_text(
            by,
            report.spans.as_ref().map_or("", |s| &s.from),
        ));
    }
    if let Some(slow) = &report.slow {
        out.push_str(&slow_text(slow));
    }
    out
}

/// How many keys each `--by` table lists.
const TOP_KEYS: usize = 10;
/// How much of a key a table shows (the JSON report has it whole).
const KEY_WIDTH: usize = 48;

/// `--by`: the keys with the most spans, then those with the most time.
pub fn by_keys_text(by: &ByKeys, from: &str) -> String {
    let mut out = format!(
        "\nby {} of {from}: {} distinct\n",
        by.argument,
        by.keys.len()
    );
    if by.keys.is_empty() {
        return out;
    }
    let mut by_count: Vec<&(String, Histogram)> = by.keys.iter().collect();
    by_count.sort_by(|a, b| b.1.count().cmp(&a.1.count()).then(a.0.cmp(&b.0)));
    let mut by_time = by_count.clone();
    by_time.sort_by(|a, b| b.1.sum_ns.cmp(&a.1.sum_ns).then(a.0.cmp(&b.0)));
    for (title, rows) in [("most spans", by_count), ("most time", by_time)] {
        let _ = writeln!(
            out,
            "  {:<KEY_WIDTH$}  {:>8} {:>10} {:>10} {:>10} {:>10}",
            format!("by {title}"),
            "count",
            "total",
            "p50",
            "p99",
            "max"
        );
        for (key, histogram) in rows.into_iter().take(TOP_KEYS) {
            let percentile = |p: f64, label| {
                histogram
                    .percentile(p, label)
                    .map_or("-".to_owned(), |p| format_ns(p.estimate_ns))
            };
            let shown: String = if key.chars().count() > KEY_WIDTH {
                key.chars()
                    .take(KEY_WIDTH - 3)
                    .chain("...".chars())
                    .collect()
            } else {
                key.clone()
            };
            let _ = writeln!(
                out,
                "  {shown:<KEY_WIDTH$}  {:>8} {:>10} {:>10} {:>10} {:>10}",
                histogram.count(),
                format_ns(histogram.sum_ns),
                percentile(50.0, "p50"),
                percentile(99.0, "p99"),
                percentile(100.0, "max"),
            );
        }
    }
    out
}

/// One interval of `-i`, printed as it ends.
pub fn interval_text(function: &str, interval: &Interval) -> String {
    let mut out = format!(
        "[{:.1} s - {:.1} s] {function}\n",
        interval.start.as_secs_f64(),
        interval.end.as_secs_f64()
    );
    out.push_str(&histogram_text(&interval.histogram, noun(function)));
    out
}

/// What is measured: a function's calls, or the spans between two probes.
fn noun(function: &str) -> &'static str {
    if crate::histogram::is_span_name(function) {
        "spans"
    } else {
        "calls"
    }
}

/// The rows, then the summary and percentiles.
pub fn histogram_text(histogram: &Histogram, noun: &str) -> String {
    let mut out = String::new();
    let count = histogram.count();
    if count == 0 {
        let _ = writeln!(out, "  no {noun} completed");
        return out;
    }
    let rows = histogram.power_of_two_rows();
    let labels: Vec<String> = rows
        .iter()
        .map(|row| {
            if row.high_ns == u64::MAX {
                format!("[{}, ...)", format_ns(row.low_ns))
            } else {
                format!("[{}, {})", format_ns(row.low_ns), format_ns(row.high_ns))
            }
        })
        .collect();
    let label_width = labels.iter().map(String::len).max().unwrap_or(0);
    let count_width = rows
        .iter()
        .map(|r| r.count.to_string().len())
        .max()
        .unwrap_or(1)
        .max(5);
    let peak = rows.iter().map(|r| r.count).max().unwrap_or(1).max(1);
    for (row, label) in rows.iter().zip(&labels) {
        // Every non-empty row gets at least one mark: the tail is the point.
        let bar = if row.count == 0 {
            0
        } else {
            (row.count * BAR_WIDTH / peak).max(1)
        };
        let _ = writeln!(
            out,
            "  {label:>label_width$} {:>count_width$} |{}{}|",
            row.count,
            "@".repeat(bar as usize),
            " ".repeat((BAR_WIDTH - bar) as usize)
        );
    }
    let _ = writeln!(
        out,
        "\n  {noun} {count}   min {}   mean {}   max {}",
        histogram.min_ns.map_or("-".into(), format_ns),
        histogram.mean_ns().map_or("-".into(), format_ns_f64),
        histogram.max_ns.map_or("-".into(), format_ns),
    );
    let percentiles = histogram.standard_percentiles();
    let estimates: Vec<String> = percentiles
        .iter()
        .map(|p| format_ns(p.estimate_ns))
        .collect();
    let estimate_width = estimates.iter().map(String::len).max().unwrap_or(0);
    for (p, estimate) in percentiles.iter().zip(&estimates) {
        let _ = writeln!(
            out,
            "  {:<6} {estimate:>estimate_width$}   in [{}, {})",
            p.label,
            format_ns(p.low_ns),
            format_ns(p.high_ns)
        );
    }
    out
}

fn slow_text(slow: &SlowCalls) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ncalls at or above {}: {} ({} in total)",
        format_ns(slow.threshold_ns),
        slow.total,
        format_ns(slow.total_ns)
    );
    if slow.slowest.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "slowest {} (callers innermost first):",
        slow.slowest.len()
    );
    for call in &slow.slowest {
        let mut callers: Vec<&str> = call
            .callers
            .iter()
            .take(CALLER_FRAMES)
            .map(String::as_str)
            .collect();
        if call.callers.len() > CALLER_FRAMES {
            callers.push("...");
        }
        let _ = writeln!(
            out,
            "  {:>8}  pid {} tid {}  at +{:.3} s  called from {}",
            format_ns(call.duration_ns),
            call.pid,
            call.tid,
            call.at.as_secs_f64(),
            callers.join(" <- ")
        );
    }
    out
}

/// The data-quality footer: what was seen, every call that is not in the histogram by cause,
/// and what to do about it.
pub fn footer(report: &LatencyReport) -> String {
    let q = &report.quality;
    let mut out = String::new();
    match &report.spans {
        // Every probe's hit count: a guarded probe that never fired shows 0 here.
        Some(spans) => {
            let _ = writeln!(
                out,
                "data quality: {:.2} s, {} spans measured ({} fired {} times, {} fired {} times)",
                q.duration.as_secs_f64(),
                q.recorded,
                spans.from,
                q.entries,
                spans.to,
                q.returns
            );
            if let Some(by) = &spans.by
                && (by.keys_map_full > 0 || by.unreadable > 0)
            {
                let _ = writeln!(
                    out,
                    "  not broken down by {}: {} spans with no room for their key (raise \
                     --max-keys), {} whose argument could not be read",
                    by.argument, by.keys_map_full, by.unreadable
                );
            }
        }
        None => {
            let _ = writeln!(
                out,
                "data quality: {:.2} s, {} calls measured ({} entries, {} returns seen)",
                q.duration.as_secs_f64(),
                q.recorded,
                q.entries,
                q.returns
            );
        }
    }
    let losses = if report.spans.is_some() {
        span_losses(q)
    } else {
        losses(q)
    };
    if losses.is_empty() {
        let _ = writeln!(out, "  not measured: nothing");
    } else {
        for (count, what) in losses {
            let _ = writeln!(out, "  not measured: {count} {what}");
        }
    }
    if q.slow_recorded > 0 || q.slow_ring_full > 0 || q.slow_stack_lost > 0 {
        let _ = writeln!(
            out,
            "  slow calls: {} recorded, {} lost to a full ring buffer, {} without caller stack",
            q.slow_recorded, q.slow_ring_full, q.slow_stack_lost
        );
    }
    if q.returns_outside > 0 {
        let _ = writeln!(
            out,
            "  not counted: {} calls that began while the probes were being attached or detached",
            q.returns_outside
        );
    }
    if let Some((overhead, first)) = q.probe_overhead {
        let _ = writeln!(
            out,
            "  probe overhead: about {} of each measured call (the function begins with {first}; \
             measured on a function of livetrace's that does the same and nothing else)",
            format_ns(overhead)
        );
    }
    if let Some(cost) = q.probe_cost_ns {
        let _ = writeln!(
            out,
            "  probe cost: {} of BPF per call (both probes, measured by the kernel)",
            format_ns_f64(cost)
        );
    }
    for note in &q.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    for advice in q.advice(report.max_threads) {
        let _ = writeln!(out, "  hint: {advice}");
    }
    out
}

/// Every cause of an unmeasured call with its count, in the order a reader asks about them.
pub fn losses(q: &LatencyQuality) -> Vec<(u64, &'static str)> {
    [
        (
            q.too_deep,
            "calls nested more than 64 deep on one thread (the kernel probes no return there)",
        ),
        (
            q.abandoned,
            "calls that left without returning (longjmp, exception, tail call)",
        ),
        (
            q.exited_inside,
            "calls still in the function when their thread exited",
        ),
        (
            q.still_open,
            "calls still in the function when the capture ended",
        ),
        (
            q.thread_map_full,
            "calls on threads the thread map had no room for",
        ),
        (
            q.return_without_entry,
            "calls already running when the probes were attached (or whose entry had no room)",
        ),
        (
            q.return_unmatched,
            "returns that matched no open call of their thread",
        ),
        (q.helper_failed, "calls lost to failed BPF map operations"),
    ]
    .into_iter()
    .filter(|(count, _)| *count > 0)
    .collect()
}

/// The same for spans between two probes, in their words.
pub fn span_losses(q: &LatencyQuality) -> Vec<(u64, &'static str)> {
    [
        (
            q.abandoned,
            "spans whose end never came (their thread began another first)",
        ),
        (q.exited_inside, "spans still open when their thread exited"),
        (q.still_open, "spans still open when the capture ended"),
        (
            q.thread_map_full,
            "spans on threads the span map had no room for (raise --max-threads)",
        ),
        (
            q.return_without_entry,
            "ends without a begin on their thread (begun before the probes were attached)",
        ),
        (q.helper_failed, "spans lost to failed BPF map operations"),
    ]
    .into_iter()
    .filter(|(count, _)| *count > 0)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::{LatencyQuality, SlowCallView};
    use std::time::Duration;

    fn report() -> LatencyReport {
        let mut total = Histogram::default();
        for (value, times) in [(50_000, 900), (500_000, 90), (5_000_000, 10)] {
            for _ in 0..times {
                total.record(value);
            }
        }
        LatencyReport {
            function: "timed_work".into(),
            sites: vec!["/tmp/latency (pid 42)".into()],
            title: "pid 42 (latency)".into(),
            total,
            intervals: vec![],
            slow: Some(SlowCalls {
                threshold_ns: 1_000_000,
                total: 10,
                total_ns: 50_000_000,
                slowest: vec![SlowCallView {
                    duration_ns: 5_000_000,
                    pid: 42,
                    tid: 43,
                    at: Duration::from_millis(1234),
                    callers: vec!["slow_caller".into(), "main".into()],
                }],
            }),
            quality: LatencyQuality {
                duration: Duration::from_secs(2),
                entries: 1001,
                returns: 1000,
                recorded: 1000,
                still_open: 1,
                ..LatencyQuality::default()
            },
            max_threads: 8192,
            spans: None,
        }
    }

    /// The layout: power-of-two rows with bars, the summary line, percentiles with bounds, the
    /// slowest calls with their callers, and a footer that names the unmeasured call.
    #[test]
    fn renders_the_familiar_layout() {
        let mut out = Vec::new();
        write(&report(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let expected = "\
latency of timed_work in /tmp/latency (pid 42), 2.00 s
  [32.8us, 65.5us)   900 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|
   [65.5us, 131us)     0 |                                        |
    [131us, 262us)     0 |                                        |
    [262us, 524us)    90 |@@@@                                    |
   [524us, 1.05ms)     0 |                                        |
  [1.05ms, 2.10ms)     0 |                                        |
  [2.10ms, 4.19ms)     0 |                                        |
  [4.19ms, 8.39ms)    10 |@                                       |

  calls 1000   min 50.0us   mean 140us   max 5.00ms
  p50    50.1us   in [50.0us, 50.2us)
  p90    50.2us   in [50.0us, 50.2us)
  p99     508us   in [500us, 508us)
  p99.9  5.00ms   in [4.98ms, 5.00ms)

calls at or above 1.00ms: 10 (50.0ms in total)
slowest 1 (callers innermost first):
    5.00ms  pid 42 tid 43  at +1.234 s  called from slow_caller <- main
data quality: 2.00 s, 1000 calls measured (1001 entries, 1000 returns seen)
  not measured: 1 calls still in the function when the capture ended
  hint: calls still running when the capture ended are not in the histogram: capture for \
longer if the function is slow
";
        assert_eq!(text, expected, "got:\n{text}");
    }

    /// An empty histogram says so instead of printing an empty table.
    #[test]
    fn empty_histogram_says_so() {
        assert_eq!(
            histogram_text(&Histogram::default(), "calls"),
            "  no calls completed\n"
        );
    }
}
