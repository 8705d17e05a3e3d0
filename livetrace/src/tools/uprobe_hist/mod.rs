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

mod bpf;
mod calibrate;
mod intervals;
mod maps;
mod probes;
mod report;
mod sites;
mod slow;
pub mod target;

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Args as ClapArgs;
use livetrace_common::uprobe_hist::{
    DEFAULT_MAX_THREADS, DEFAULT_SLOW_BUFFER, DEFAULT_STACK_STORAGE,
};

pub use self::bpf::objects_for_verifier;
use crate::{
    UsageError,
    duration::parse_positive_duration,
    histogram::{Histogram, LatencyQuality, LatencyReport},
    kernel_btf::KernelBtf,
    output::{Format, OutputSpec, histogram_text},
    privileges,
    session::{
        self, Privileges, Running, Session, Tool,
        capture::{self, StopReason, monotonic_ns},
        targets::{ProcessArgs, Target},
    },
    stacks,
    tools::uprobe_hist::target::SymbolSpec,
};

use self::{
    calibrate::note_probe_overhead,
    intervals::IntervalClock,
    maps::Maps,
    probes::{Children, attach, detach, probe_cost},
    report::{latency_quality, write_files, write_report_to_stdout, write_snapshot},
    sites::{find_sites, wait_until_loaded},
    slow::SlowCollector,
};

const EXAMPLES: &str = "\
Examples:
  livetrace uprobe-hist livetrace_demo::validate_subtitle_track -p 1234 -d 10
                                  # a Rust function of pid 1234, by its demangled path
  livetrace uprobe-hist libc:malloc -p 1234 -i 1   # malloc in pid 1234, a histogram a second
  livetrace uprobe-hist parse_request --slow 5ms -o slow.svg -- ./server
                                  # start ./server; calls over 5 ms with their callers
  livetrace uprobe-hist /usr/lib/libssl.so.3:SSL_read -d 30 --json   # every process, JSON
  livetrace uprobe-hist 'helper@0x1139' -p 1234    # one of several functions named helper

TARGET is a path or a library name (libc, libc.so.6); without it the executable of -p (or of
the command) is searched, then the libraries it has loaded (or links). SYMBOL is a C name, or
a Rust or C++ function by its demangled path (a Rust ::h<hash> suffix is optional), or a
mangled name. Go programs are refused: uretprobes corrupt Go stacks.";

#[derive(ClapArgs, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The function to time: [TARGET:]SYMBOL[@0xADDR].
    #[arg(value_name = "[TARGET:]SYMBOL", value_parser = SymbolSpec::parse)]
    pub symbol: SymbolSpec,
    #[command(flatten)]
    pub processes: ProcessArgs,
    /// How long to trace (30, 1.5s, 500ms); default: until Ctrl-C or the targets exit.
    #[arg(short = 'd', long = "duration", value_name = "SECS", value_parser = parse_positive_duration,
          allow_hyphen_values = true)]
    pub duration: Option<Duration>,
    /// Also print a histogram every SECS (at least 1 s), then the total.
    #[arg(short = 'i', long = "interval", value_name = "SECS", value_parser = parse_interval,
          allow_hyphen_values = true)]
    pub interval: Option<Duration>,
    /// Print one JSON object on stdout instead of the text report.
    #[arg(long = "json")]
    pub json: bool,
    /// Record calls at least this long (5ms, 250us) with their caller's stack; list the slowest.
    #[arg(long = "slow", value_name = "DUR", value_parser = parse_positive_duration,
          allow_hyphen_values = true)]
    pub slow: Option<Duration>,
    /// Write an output; the format follows the extension: .txt (the text report), .json, or
    /// with --slow the slow calls' callers, weighted by their total time in us: .svg, .folded,
    /// .pb.gz (pprof) or .speedscope.json; - is the text report on stdout. Repeatable.
    #[arg(short = 'o', long = "output", value_name = "PATH", value_parser = HistOutput::parse)]
    pub outputs: Vec<HistOutput>,
    /// Threads that can be inside the function at the same time.
    #[arg(long = "max-threads", value_name = "N", default_value_t = DEFAULT_MAX_THREADS,
          value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub max_threads: u32,
}

/// Where one `-o` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistOutput {
    /// The text report; `None` is stdout.
    Text(Option<PathBuf>),
    Json(PathBuf),
    /// A flamegraph or folded stacks of the slow calls.
    Stacks(OutputSpec),
}

impl HistOutput {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "-" {
            return Ok(Self::Text(None));
        }
        let lower = text.to_ascii_lowercase();
        if lower.ends_with(".txt") {
            return Ok(Self::Text(Some(PathBuf::from(text))));
        }
        if lower.ends_with(".json") {
            return Ok(Self::Json(PathBuf::from(text)));
        }
        OutputSpec::parse(text).map(Self::Stacks).map_err(|_| {
            format!(
                "cannot tell the format of '{text}' from its extension: use .txt (the \
                     histogram), .json, .svg, .folded, .pb.gz or .speedscope.json (slow calls' \
                     stacks, with --slow), or - (the histogram on stdout)"
            )
        })
    }

    fn path(&self) -> Option<&PathBuf> {
        match self {
            Self::Text(path) => path.as_ref(),
            Self::Json(path) => Some(path),
            Self::Stacks(spec) => spec.path.as_ref(),
        }
    }
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_positive_duration(text)?;
    if interval < Duration::from_secs(1) {
        return Err(format!(
            "'{text}' is shorter than a second: -i takes 1 s or more"
        ));
    }
    Ok(interval)
}

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
            sites: Vec::new(),
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
    /// Where the function is, found while planning (before the kernel is touched).
    sites: Vec<sites::Site>,
    outputs: Vec<HistOutput>,
}

/// `livetrace uprobe-hist`, timing calls.
struct Timing {
    args: Args,
    ebpf: aya::Ebpf,
    sites: Vec<sites::Site>,
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
        self.sites = find_sites(&self.args.symbol, target)?;
        self.outputs = self.args.outputs.clone();
        if self.outputs.is_empty() && !self.args.json {
            let function = &self.sites[0].symbol.demangled;
            self.outputs
                .push(HistOutput::Text(Some(default_output_path(function))));
        }
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
        })?;
        let sites = self.sites;
        attach(&mut ebpf, &sites, command_pid)?;
        // The command's children: announced by `follow_fork`, probed here as they appear.
        let children = match command_pid {
            Some(_) => Some(Children::new(stacks::new_processes(&mut ebpf)?)),
            None => None,
        };
        let maps = Maps::take(&mut ebpf)?;
        for site in &sites {
            if let Some(pid) = site.pid {
                session.symbolizer.note_process(pid);
            }
        }
        let function = sites[0].symbol.demangled.clone();
        let snapshot_base = LatencyReport {
            function: function.clone(),
            sites: sites.iter().map(|s| s.describe(command_pid)).collect(),
            title: session.title(),
            total: Histogram::default(),
            intervals: Vec::new(),
            slow: None,
            quality: LatencyQuality::default(),
            max_threads: args.max_threads,
        };
        Ok(Timing {
            cost_before: probe_cost(&ebpf),
            slow: SlowCollector::new(slow_ns),
            intervals: IntervalClock::new(args.interval),
            args,
            ebpf,
            sites,
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
            wait_until_loaded(pid, &self.sites[0].file.path);
            session.symbolizer.note_process(pid);
        }
    }

    fn on_event(&mut self, event: capture::Event, session: &mut Session) {
        let symbolizer = &mut session.symbolizer;
        if let Some(children) = &mut self.children {
            children.probe_new(&mut self.ebpf, &self.sites[0], symbolizer);
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
        self.cost_after = probe_cost(&self.ebpf);
        // Entry probes first, so that no call is opened whose return could not be seen.
        detach(&mut self.ebpf)
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
        note_probe_overhead(&mut quality, &self.sites[0], &total, &self.function);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Output formats come from extensions; stack formats need --slow (checked in run), and an
    /// unknown extension names the supported ones.
    #[test]
    fn picks_output_format_from_extension() {
        assert_eq!(HistOutput::parse("-").unwrap(), HistOutput::Text(None));
        assert!(matches!(
            HistOutput::parse("h.TXT").unwrap(),
            HistOutput::Text(Some(_))
        ));
        assert!(matches!(
            HistOutput::parse("h.json").unwrap(),
            HistOutput::Json(_)
        ));
        assert!(matches!(
            HistOutput::parse("s.svg").unwrap(),
            HistOutput::Stacks(_)
        ));
        assert!(matches!(
            HistOutput::parse("s.folded").unwrap(),
            HistOutput::Stacks(_)
        ));
        let err = HistOutput::parse("h.png").unwrap_err();
        assert!(err.contains("'h.png'") && err.contains(".txt"), "{err}");
    }

    /// -i below a second is refused with a message naming the value.
    #[test]
    fn interval_must_be_at_least_a_second() {
        assert!(parse_interval("1").is_ok());
        assert!(parse_interval("2.5s").is_ok());
        assert!(parse_interval("500ms").unwrap_err().contains("'500ms'"));
    }
}
