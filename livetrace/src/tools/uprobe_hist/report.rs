//! The latency report: its data-quality record from the counters, and where it is written (every
//! file output, standard output, and mid-capture snapshots on SIGUSR1).

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use livetrace_common::uprobe_hist::Counter;

use super::{HistOutput, maps::Maps, slow::SlowCollector};
use crate::{
    histogram::{LatencyQuality, LatencyReport},
    output::{self, histogram_json, histogram_text},
    symbolize::Symbolizer,
};

/// Writes every file output of a report, each whatever happened to the others; `stacks`: the
/// slow calls' profile, if a stack output asks for it. Standard output is written apart.
pub(super) fn write_files(
    outputs: &[HistOutput],
    report: &LatencyReport,
    stacks: Option<&crate::model::StackProfile>,
) -> output::Written {
    let mut written = output::Written::default();
    for output in outputs {
        match (output, stacks) {
            (HistOutput::Text(Some(path)), _) => written.attempt(
                path.display().to_string(),
                output::write_atomically(path, |out| histogram_text::write(report, out)),
            ),
            (HistOutput::Json(path), _) => written.attempt(
                path.display().to_string(),
                output::write_atomically(path, |out| histogram_json::write(report, out)),
            ),
            (HistOutput::Stacks(spec), Some(profile)) => {
                let one = output::write_stack_profile(profile, std::slice::from_ref(spec));
                written.attempt(spec.describe(), one.finish());
            }
            // Standard output gets the text report anyway.
            (HistOutput::Text(None) | HistOutput::Stacks(_), _) => {}
        }
    }
    written
}

/// The data-quality record from the counters, read in place (also mid-capture).
pub(super) fn latency_quality(
    maps: &Maps,
    elapsed: Duration,
    function: &str,
) -> anyhow::Result<LatencyQuality> {
    let counters = maps.counters()?;
    let counter = |c: Counter| counters[c as usize];
    let mut quality = LatencyQuality {
        duration: elapsed,
        entries: counter(Counter::Entries),
        returns: counter(Counter::Returns),
        recorded: counter(Counter::Recorded),
        thread_map_full: counter(Counter::ThreadMapFull),
        too_deep: counter(Counter::TooDeep),
        abandoned: counter(Counter::Abandoned),
        exited_inside: counter(Counter::ExitedInside),
        still_open: maps.still_open()?,
        return_without_entry: counter(Counter::ReturnWithoutEntry),
        return_unmatched: counter(Counter::ReturnUnmatched),
        slow_recorded: counter(Counter::SlowRecorded),
        slow_ring_full: counter(Counter::SlowRingFull),
        slow_stack_lost: counter(Counter::SlowStackLost),
        helper_failed: counter(Counter::HelperFailed),
        returns_outside: counter(Counter::ReturnOutsideCapture),
        probe_cost_ns: None,
        probe_overhead: None,
        notes: Vec::new(),
    };
    if quality.entries == 0 {
        quality
            .notes
            .push(if crate::histogram::is_span_name(function) {
                format!(
                    "{function}: the first probe never fired: check that the target reaches it now \
                 (`livetrace probes` lists where it is), and that the process probed is the one \
                 that runs it (a server that forks per connection: name the binary in --from \
                 instead of -p, to probe every process that runs it)"
                )
            } else {
                format!(
                    "{function} was not called during the capture: check that the target calls it \
                 (it may be inlined at its call sites, and then never runs as its own function)"
                )
            });
    }

    Ok(quality)
}

#[expect(
    clippy::too_many_arguments,
    reason = "the run loop's state, borrowed piece by piece inside its callback"
)]
/// SIGUSR1: the report so far, written to every file output and printed on stdout (as JSON
/// with --json); the maps are read, not cleared, and the capture goes on.
pub(super) fn write_snapshot(
    maps: &Maps,
    slow: &SlowCollector,
    symbolizer: &mut Symbolizer,
    base: &LatencyReport,
    outputs: &[HistOutput],
    elapsed: Duration,
    start_mono_ns: u64,
    json: bool,
) -> anyhow::Result<()> {
    let mut quality = latency_quality(maps, elapsed, &base.function)?;
    quality
        .notes
        .push("snapshot (SIGUSR1) taken while the capture goes on".into());
    let traces = if slow.threshold_ns > 0 {
        maps.stack_traces(slow)?
    } else {
        HashMap::new()
    };
    let report = LatencyReport {
        function: base.function.clone(),
        sites: base.sites.clone(),
        title: base.title.clone(),
        total: maps.histogram()?,
        intervals: Vec::new(),
        slow: (slow.threshold_ns > 0).then(|| slow.report(&traces, symbolizer, start_mono_ns)),
        quality,
        max_threads: base.max_threads,
        spans: base.spans.clone(),
    };
    let stacks = outputs
        .iter()
        .any(|o| matches!(o, HistOutput::Stacks(_)))
        .then(|| slow.profile(&traces, symbolizer, &report, &report.title));
    let written = write_files(outputs, &report, stacks.as_ref());
    write_report_to_stdout(&report, json)?;
    crate::say!(
        "livetrace: snapshot (SIGUSR1): {} calls so far{}; the capture goes on",
        report.total.count(),
        if written.paths().is_empty() {
            String::new()
        } else {
            format!(", written to {}", written.paths().join(", "))
        }
    );
    written.finish()
}

/// The histogram (or, with --json, the JSON object) on standard output.
pub(super) fn write_report_to_stdout(report: &LatencyReport, json: bool) -> anyhow::Result<()> {
    if json {
        let mut buf = Vec::new();
        histogram_json::write(report, &mut buf).context("failed to render the JSON report")?;
        crate::console::stdout(&buf);
    } else {
        crate::console::stdout(histogram_text::report_text(report).as_bytes());
    }
    Ok(())
}
