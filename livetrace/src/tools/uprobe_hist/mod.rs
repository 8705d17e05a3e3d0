//! `livetrace uprobe-hist`: what is the latency distribution, tail included, of one function?
//! A uprobe and a uretprobe on the function pair each call's entry and return in the kernel (per
//! thread, by stack pointer, so recursion pairs correctly) and add its duration to a log-linear
//! histogram there; the loader prints the histogram, percentiles with their bounds, and, with
//! `--slow`, the slowest calls with their callers. Needs kernel 5.8+, root or CAP_BPF +
//! CAP_PERFMON + CAP_SYS_ADMIN (uprobes through perf_event_open). Go programs are refused: uretprobes corrupt Go's moving stacks.
//!
//! The pieces: [`sites`] finds the function in each target, [`probes`] attaches and follows,
//! [`maps`] reads what the kernel counted, [`intervals`] prints `-i` histograms as they end, and
//! [`slow`] keeps `--slow` calls and their callers.

mod args;
mod bpf;
mod calibrate;
mod intervals;
mod maps;
mod probes;
mod report;
mod sites;
mod slow;
pub mod target;
pub mod usdt;

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use livetrace_common::uprobe_hist::{
    BY_INTEGER, BY_NONE, BY_STRING, Counter, DEFAULT_SLOW_BUFFER, DEFAULT_STACK_STORAGE,
};

pub use self::args::{Args, HistOutput};
pub use self::bpf::objects_for_verifier;
use crate::{
    UsageError,
    histogram::{ByKeys, Histogram, LatencyQuality, LatencyReport, Spans},
    kernel_btf::KernelBtf,
    output::{Format, OutputSpec, histogram_text},
    privileges,
    session::{
        self, Privileges, Running, Session, Tool,
        capture::{self, StopReason, monotonic_ns},
        targets::Target,
    },
    stacks,
};

use self::{
    calibrate::note_probe_overhead,
    intervals::IntervalClock,
    maps::Maps,
    probes::{Children, attach, detach, probe_cost},
    report::{latency_quality, write_files, write_report_to_stdout, write_snapshot},
    sites::{Probed, find_sites, wait_until_loaded},
    slow::SlowCollector,
    usdt::{By, Links, arg_specs, find_spans},
};

pub fn run(args: Args) -> anyhow::Result<()> {
    // Usage first, then targets and the function, then outputs: all before the kernel is touched.
    let wants_stacks = args
        .outputs
        .iter()
        .any(|o| matches!(o, HistOutput::Stacks(_)));
    if wants_stacks && args.slow.is_none() {
        return Err(UsageError::error(
            "-o .svg/.folded draws the stacks of slow calls: add --slow DUR (e.g. --slow 5ms)",
        ));
    }
    if args.json && args.outputs.contains(&HistOutput::Text(None)) {
        return Err(UsageError::error(
            "--json and -o - both write to stdout: pick one",
        ));
    }
    if args.from.is_some() && std::env::consts::ARCH != "x86_64" {
        bail!(
            "USDT argument specs are read for x86_64 only (this is {})",
            std::env::consts::ARCH
        );
    }
    if !matches!(std::env::consts::ARCH, "x86_64" | "aarch64") {
        bail!(
            "uprobe-hist pairs calls by stack pointer, which livetrace only knows how to read on \
             x86_64 and aarch64 (this is {})",
            std::env::consts::ARCH
        );
    }
    let target = args.processes.resolve()?;
    let (as_root, duration) = (args.processes.as_root, args.duration);
    session::run(
        UprobeHist {
            args,
            probed: None,
            outputs: Vec::new(),
        },
        target,
        as_root,
        duration,
    )
}

/// `livetrace uprobe-hist`, before anything is loaded.
struct UprobeHist {
    args: Args,
    /// Where the function (or the probes) are, found while planning (before the kernel is
    /// touched).
    probed: Option<Probed>,
    outputs: Vec<HistOutput>,
}

/// `livetrace uprobe-hist`, timing calls.
struct Timing {
    args: Args,
    ebpf: aya::Ebpf,
    probed: Probed,
    /// The USDT probes' links (spans), closed on stop.
    links: Option<Links>,
    function: String,
    outputs: Vec<HistOutput>,
    maps: Maps,
    children: Option<Children>,
    slow: SlowCollector,
    intervals: IntervalClock,
    /// The report so far, for SIGUSR1 snapshots.
    snapshot_base: LatencyReport,
    start: Instant,
    start_mono_ns: u64,
    cost_before: Option<(u64, u64)>,
    cost_after: Option<(u64, u64)>,
    /// The first failure to read an interval's histogram, reported at the end.
    tick_error: Option<anyhow::Error>,
}

impl Tool for UprobeHist {
    type Running = Timing;
    const NAME: &'static str = "uprobe-hist";

    fn privileges(&self, _target: &Target) -> Privileges {
        let mut needs = vec![
            privileges::BPF,
            privileges::PERFMON,
            privileges::UPROBE_ADMIN,
        ];
        needs.extend(privileges::ptrace_need(&self.args.processes.pids));
        Privileges {
            needs,
            wanted: Vec::new(),
        }
    }

    fn prepare(&mut self, target: &Target) -> anyhow::Result<Vec<OutputSpec>> {
        let probed = match (&self.args.symbol, &self.args.from, &self.args.to) {
            (Some(symbol), _, _) => Probed::Function(find_sites(symbol, target)?),
            (None, Some(from), Some(to)) => Probed::Spans(find_spans(from, to, target)?),
            _ => {
                return Err(UsageError::error(
                    "give a function to time, or --from and --to (two USDT probes)",
                ));
            }
        };
        self.outputs = self.args.outputs.clone();
        if self.outputs.is_empty() && !self.args.json {
            let name = match (&probed, &self.args.to) {
                (Probed::Spans(_), Some(to)) => to.name.clone(),
                _ => probed.name(),
            };
            self.outputs
                .push(HistOutput::Text(Some(default_output_path(&name))));
        }
        self.probed = Some(probed);
        // The preflight only looks at paths; the format tag is irrelevant there.
        Ok(self
            .outputs
            .iter()
            .filter_map(HistOutput::path)
            .map(|path| OutputSpec {
                path: Some(path.clone()),
                format: Format::Folded,
            })
            .collect())
    }

    fn start(self, session: &mut Session) -> anyhow::Result<Timing> {
        let args = self.args;
        let slow_ns = args
            .slow
            .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64);
        let command_pid = session.command_pid;
        let probed = self
            .probed
            .context("uprobe-hist started before it was planned")?;
        let (specs, spec_notes) = match &probed {
            Probed::Spans(spans) => arg_specs(spans, args.by)?,
            Probed::Function(_) => (Vec::new(), Vec::new()),
        };
        session.notes.extend(spec_notes);
        let spans = matches!(probed, Probed::Spans(_)).then(|| bpf::SpanSettings {
            by: match args.by {
                None => BY_NONE,
                Some(By::Integer(_)) => BY_INTEGER,
                Some(By::String(_)) => BY_STRING,
            },
            // The NUL needs a byte of its own.
            by_length: args.by_length + 1,
            max_keys: args.max_keys,
            from_sites: specs.len() as u32,
        });
        let mut ebpf = bpf::load(&bpf::UprobeHistSettings {
            slow_ns,
            max_threads: args.max_threads,
            stack_storage: if slow_ns > 0 {
                DEFAULT_STACK_STORAGE
            } else {
                1
            },
            slow_buffer: if slow_ns > 0 {
                DEFAULT_SLOW_BUFFER
            } else {
                4096
            },
            follow: match command_pid {
                Some(pid) => Some((
                    pid,
                    KernelBtf::from_sys_fs()?.member_offset("task_struct", "tgid")?,
                )),
                None => None,
            },
            spans,
        })?;
        if !specs.is_empty() {
            bpf::fill_arg_specs(&mut ebpf, &specs)?;
        }
        let links = attach(&mut ebpf, &probed, command_pid)?;
        // The command's children: announced by `follow_fork`, probed here as they appear.
        let children = match command_pid {
            Some(_) => Some(Children::new(stacks::new_processes(&mut ebpf)?)),
            None => None,
        };
        let maps = Maps::take(&mut ebpf)?;
        for pid in probed.pids() {
            session.symbolizer.note_process(pid);
        }
        let from_to = args.from.as_ref().zip(args.to.as_ref());
        let function = probed.name();
        let snapshot_base = LatencyReport {
            function: function.clone(),
            sites: probed.describe(command_pid),
            title: session.title(),
            total: Histogram::default(),
            intervals: Vec::new(),
            slow: None,
            quality: LatencyQuality::default(),
            max_threads: args.max_threads,
            spans: from_to.map(|(from, to)| Spans {
                from: from.full_name(),
                to: to.full_name(),
                guarded_sites: links.as_ref().map_or(0, |l| l.guarded),
                by: None,
            }),
        };
        Ok(Timing {
            cost_before: probe_cost(&ebpf, links.is_some()),
            slow: SlowCollector::new(slow_ns),
            intervals: IntervalClock::new(args.interval),
            args,
            ebpf,
            probed,
            links,
            function,
            outputs: self.outputs,
            maps,
            children,
            snapshot_base,
            start: Instant::now(),
            start_mono_ns: monotonic_ns(),
            cost_after: None,
            tick_error: None,
        })
    }
}

impl Running for Timing {
    fn ebpf(&mut self) -> &mut aya::Ebpf {
        &mut self.ebpf
    }

    fn start_line(&self, _session: &Session) -> String {
        format!(
            "timing {} in {}",
            self.function,
            self.snapshot_base.sites.join(", ")
        )
    }

    fn command_released(&mut self, pid: u32, session: &mut Session) {
        if self.slow.threshold_ns > 0 {
            // A short command may exit before the first tick: snapshot its memory map as soon
            // as the loader has mapped its libraries, for symbolising slow calls' callers.
            wait_until_loaded(pid, self.probed.first_file());
            session.symbolizer.note_process(pid);
        }
    }

    fn on_event(&mut self, event: capture::Event, session: &mut Session) {
        let symbolizer = &mut session.symbolizer;
        if let Some(children) = &mut self.children {
            let site = match &self.probed {
                Probed::Function(sites) => Some(&sites[0]),
                Probed::Spans(_) => None,
            };
            children.probe_new(&mut self.ebpf, site, symbolizer);
        }
        if event == capture::Event::FastTick {
            return; // nothing else here is that urgent
        }
        self.slow.drain(&mut self.maps.ring, symbolizer);
        if event == capture::Event::Snapshot {
            if let Err(err) = write_snapshot(
                &self.maps,
                &self.slow,
                symbolizer,
                &self.snapshot_base,
                &self.outputs,
                self.start.elapsed(),
                self.start_mono_ns,
                self.args.json,
            ) {
                crate::say!("livetrace: snapshot failed: {err:#}");
            }
            return;
        }
        if self.tick_error.is_none()
            && let Err(err) = self.intervals.tick(
                &mut self.maps,
                self.start.elapsed(),
                &self.function,
                self.args.json,
            )
        {
            self.tick_error = Some(err);
        }
    }

    fn stopped(&mut self, _session: &mut Session) -> anyhow::Result<()> {
        self.cost_after = probe_cost(&self.ebpf, self.links.is_some());
        // Entry probes first, so that no call is opened whose return could not be seen.
        detach(&mut self.ebpf, self.links.take())
    }

    fn finish(
        mut self,
        session: &mut Session,
        stop: &StopReason,
        elapsed: Duration,
    ) -> anyhow::Result<()> {
        if let Some(err) = self.tick_error.take() {
            return Err(err.context("reading the histogram during the capture failed"));
        }
        let symbolizer = &mut session.symbolizer;
        self.slow.drain(&mut self.maps.ring, symbolizer);
        let total = self.maps.histogram()?;
        self.intervals.finish(
            &mut self.maps,
            &total,
            elapsed,
            &self.function,
            self.args.json,
        )?;
        let mut quality = latency_quality(&self.maps, elapsed, &self.function)?;
        if let Some(children) = &self.children {
            quality.notes.extend(children.notes());
        }
        quality.notes.append(&mut session.notes);
        quality.probe_cost_ns =
            self.cost_before
                .zip(self.cost_after)
                .and_then(|(before, after)| {
                    let runs = after.1.saturating_sub(before.1);
                    // Each call runs two programs: entry and return.
                    (runs > 0).then(|| 2.0 * (after.0 - before.0) as f64 / runs as f64)
                });
        if !matches!(stop, StopReason::DurationElapsed) {
            quality
                .notes
                .push(format!("capture ended early: {}", stop.describe()));
        }
        if let Probed::Function(sites) = &self.probed {
            note_probe_overhead(&mut quality, &sites[0], &total, &self.function);
        }
        let spans = self.spans_report()?;
        if spans.is_some() {
            quality.notes.extend(usdt::rate_warning(
                quality.entries + quality.returns,
                elapsed,
            ));
        }
        let slow_ns = self.slow.threshold_ns;
        let traces = if slow_ns > 0 {
            self.maps.stack_traces(&self.slow)?
        } else {
            HashMap::new()
        };
        let slow_report =
            (slow_ns > 0).then(|| self.slow.report(&traces, symbolizer, self.start_mono_ns));
        if symbolizer.interrupted() {
            quality.notes.push(stacks::INTERRUPTED_NOTE.into());
        }
        let report = LatencyReport {
            total,
            intervals: std::mem::take(&mut self.intervals.done),
            slow: slow_report,
            quality,
            spans,
            ..self.snapshot_base.clone()
        };
        drop(self.ebpf);
        let title = report.title.clone();
        let stacks = self
            .outputs
            .iter()
            .any(|o| matches!(o, HistOutput::Stacks(_)))
            .then(|| self.slow.profile(&traces, symbolizer, &report, &title));
        let written = write_files(&self.outputs, &report, stacks.as_ref());
        write_report_to_stdout(&report, self.args.json)?;
        crate::say_raw!("{}", histogram_text::footer(&report));
        written.report();
        written.finish()
    }
}

impl Timing {
    /// The spans' part of the report, with the `--by` keys read from their map.
    fn spans_report(&self) -> anyhow::Result<Option<Spans>> {
        let Some(mut spans) = self.snapshot_base.spans.clone() else {
            return Ok(None);
        };
        if let (Some(by), Probed::Spans(sites)) = (self.args.by, &self.probed) {
            // Integer keys show signed when the first site's argument is.
            let signed = sites[0].from.sites[0]
                .args
                .split_ascii_whitespace()
                .nth(by.index())
                .is_some_and(|a| a.starts_with('-'));
            let counters = self.maps.counters()?;
            spans.by = Some(ByKeys {
                argument: by.to_string(),
                keys: self.maps.by_key(matches!(by, By::String(_)), signed)?,
                keys_map_full: counters[Counter::KeysMapFull as usize],
                unreadable: counters[Counter::ArgUnreadable as usize],
            });
        }
        Ok(Some(spans))
    }
}

/// `livetrace-uprobe-hist-<function>-<UTC time>.txt` in the current directory.
fn default_output_path(function: &str) -> PathBuf {
    let short: String = function
        .rsplit("::")
        .next()
        .unwrap_or(function)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    PathBuf::from(format!(
        "livetrace-uprobe-hist-{short}-{}.txt",
        crate::timestamp()
    ))
}
