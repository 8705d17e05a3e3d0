//! `livetrace uprobe-hist`: what is the latency distribution, tail included, of one function?
//! A uprobe and a uretprobe on the function pair each call's entry and return in the kernel (per
//! thread, by stack pointer, so recursion pairs correctly) and add its duration to a log-linear
//! histogram there; the loader prints the histogram, percentiles with their bounds, and, with
//! `--slow`, the slowest calls with their callers. Needs kernel 5.8+, root or CAP_BPF +
//! CAP_PERFMON + CAP_SYS_ADMIN (uprobes through perf_event_open). Go programs are refused: uretprobes corrupt Go's moving stacks.

use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsString,
    io::Write as _,
    num::NonZeroU32,
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, RingBuf, StackTraceMap,
    },
    programs::{BtfTracePoint, UProbe, uprobe::UProbeScope},
};
use clap::Args as ClapArgs;
use livetrace_common::{
    stacks::{STACK_ID_NOT_COLLECTED, StackKey},
    uprobe_hist::{
        COUNTER_SLOTS, COUNTERS, Counter, DEFAULT_MAX_THREADS, DEFAULT_SLOW_BUFFER,
        DEFAULT_STACK_STORAGE, HISTOGRAM, LatencyHistogram, PHASE, PHASE_RUNNING, PHASE_STOPPING,
        SLOW_CALLS, STACKS, SlowCall, THREADS, ThreadCalls, WINDOW, Window,
    },
};

use crate::{
    bpf::{self, UprobeHistSettings},
    capture::{self, StopReason, Watch, monotonic_ns},
    duration::parse_positive_duration,
    histogram::{
        Histogram, Interval, LatencyQuality, LatencyReport, SlowCallView, SlowCalls, format_ns,
    },
    kernel_btf::KernelBtf,
    model::{DataQuality, Frame, FrameKind, WeightUnit},
    output::{self, Format, OutputSpec, histogram_json, histogram_text},
    privileges,
    stacks::{self, BuildOptions, RawStacks},
    symbolize::{Resolved, Symbolizer},
    targets::{self, HeldCommand, Target, TargetArgs},
    uprobe_target::{
        self, Candidate, ElfInfo, FunctionSymbol, Lookup, Scope, SymbolSpec, close_names,
        describe_ambiguity, find_symbol, function_symbols,
    },
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
    /// Time the calls of these processes (all their threads); comma-separated or repeated.
    #[arg(short = 'p', long = "pid", value_name = "PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// How long to trace (30, 1.5s, 500ms); default: until Ctrl-C or the targets exit.
    #[arg(short = 'd', long = "duration", value_name = "SECS", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Also print a histogram every SECS (at least 1 s), then the total.
    #[arg(short = 'i', long = "interval", value_name = "SECS", value_parser = parse_interval)]
    pub interval: Option<Duration>,
    /// Print one JSON object on stdout instead of the text report.
    #[arg(long = "json")]
    pub json: bool,
    /// Record calls at least this long (5ms, 250us) with their caller's stack; list the slowest.
    #[arg(long = "slow", value_name = "DUR", value_parser = parse_positive_duration)]
    pub slow: Option<Duration>,
    /// Write an output; the format follows the extension: .txt (the text report), .json, or
    /// with --slow .svg / .folded (the slow calls' callers, weighted by their total time in us);
    /// - is the text report on stdout. Repeatable.
    #[arg(short = 'o', long = "output", value_name = "PATH", value_parser = HistOutput::parse)]
    pub outputs: Vec<HistOutput>,
    /// Threads that can be inside the function at the same time.
    #[arg(long = "max-threads", value_name = "N", default_value_t = DEFAULT_MAX_THREADS,
          value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub max_threads: u32,
    /// Start this command and time the function in it until it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
    /// Under sudo, run COMMAND as root instead of as the user who ran sudo (SUDO_UID).
    #[arg(long = "as-root")]
    pub as_root: bool,
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
                     histogram), .json, .svg or .folded (slow calls' stacks, with --slow), or - \
                     (the histogram on stdout)"
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

/// Reports a usage error the way clap does (exit status 2) before anything has started.
fn usage_error(message: &str) -> ! {
    clap::Error::raw(
        clap::error::ErrorKind::ArgumentConflict,
        format!("{message}\n"),
    )
    .exit()
}

/// One place the probes go: a function in a file, for one process (or every process).
struct Site {
    pid: Option<u32>,
    file: Candidate,
    symbol: FunctionSymbol,
}

impl Site {
    fn describe(&self, command_pid: Option<u32>) -> String {
        match self.pid.or(command_pid) {
            Some(pid) => format!("{} (pid {pid})", self.file.shown),
            None => format!("{} (every process)", self.file.shown),
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Usage first, then targets and the function, then outputs: all before the kernel is touched.
    if !args.pids.is_empty() && !args.command.is_empty() {
        usage_error("give either -p or a COMMAND after --, not both");
    }
    let wants_stacks = args
        .outputs
        .iter()
        .any(|o| matches!(o, HistOutput::Stacks(_)));
    if wants_stacks && args.slow.is_none() {
        usage_error(
            "-o .svg/.folded draws the stacks of slow calls: add --slow DUR (e.g. --slow 5ms)",
        );
    }
    if args.json && args.outputs.contains(&HistOutput::Text(None)) {
        usage_error("--json and -o - both write to stdout: pick one");
    }
    if !matches!(std::env::consts::ARCH, "x86_64" | "aarch64") {
        bail!(
            "uprobe-hist pairs calls by stack pointer, which livetrace only knows how to read on \
             x86_64 and aarch64 (this is {})",
            std::env::consts::ARCH
        );
    }
    let target = TargetArgs {
        pids: args.pids.clone(),
        tids: vec![],
        command: args.command.clone(),
        as_root: args.as_root,
    }
    .resolve()?;
    let mut needs = vec![
        privileges::BPF,
        privileges::PERFMON,
        privileges::UPROBE_ADMIN,
    ];
    needs.extend(privileges::ptrace_need(&args.pids));
    privileges::require("uprobe-hist", &needs)?;
    let sites = find_sites(&args.symbol, &target)?;
    let function = sites[0].symbol.demangled.clone();

    let mut outputs = args.outputs.clone();
    if outputs.is_empty() && !args.json {
        outputs.push(HistOutput::Text(Some(default_output_path(&function))));
    }
    // The preflight only looks at paths; the format tag is irrelevant there.
    let paths: Vec<OutputSpec> = outputs
        .iter()
        .filter_map(HistOutput::path)
        .map(|path| OutputSpec {
            path: Some(path.clone()),
            format: Format::Folded,
        })
        .collect();
    output::preflight(&paths)?;

    let mut command = match &target {
        Target::Command(argv) => Some(HeldCommand::spawn(argv, args.as_root)?),
        _ => None,
    };
    let slow_ns = args
        .slow
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64);
    let mut ebpf = bpf::load_uprobe_hist(&UprobeHistSettings {
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
        follow: match &command {
            Some(command) => Some((
                command.pid,
                KernelBtf::from_sys_fs()?.member_offset("task_struct", "tgid")?,
            )),
            None => None,
        },
    })?;
    let command_pid = command.as_ref().map(|c| c.pid);
    attach(&mut ebpf, &sites, command_pid)?;
    // The command's children: announced by `follow_fork`, probed here as they appear.
    let mut children = match command_pid {
        Some(_) => Some(Children {
            ring: stacks::new_processes(&mut ebpf)?,
            probed: Vec::new(),
            failed: Vec::new(),
        }),
        None => None,
    };
    let mut maps = Maps::take(&mut ebpf)?;
    maps.phase
        .set(0, PHASE_RUNNING, 0)
        .context("failed to tell the BPF programs that the capture runs")?;

    let mut symbolizer = Symbolizer::new();
    for site in &sites {
        if let Some(pid) = site.pid {
            symbolizer.note_process(pid);
        }
    }
    if let Some(command) = &mut command {
        command.release()?;
        if slow_ns > 0 {
            // A short command may exit before the first tick: snapshot its memory map as soon
            // as the loader has mapped its libraries, for symbolising slow calls' callers.
            wait_until_loaded(command.pid, &sites[0].file.path);
            symbolizer.note_process(command.pid);
        }
    }
    let title = match (&target, command_pid) {
        (Target::Command(_), Some(pid)) => format!("{} (pid {pid})", target.describe()),
        _ => target.describe(),
    };
    let site_names: Vec<String> = sites.iter().map(|s| s.describe(command_pid)).collect();
    eprintln!(
        "livetrace: timing {function} in {}{}",
        site_names.join(", "),
        capture::how_it_ends(args.duration)
    );

    let snapshot_base = LatencyReport {
        function: function.clone(),
        sites: site_names.clone(),
        title: title.clone(),
        total: Histogram::default(),
        intervals: Vec::new(),
        slow: None,
        quality: LatencyQuality::default(),
        max_threads: args.max_threads,
    };
    let start = Instant::now();
    let start_mono_ns = monotonic_ns();
    let cost_before = probe_cost(&ebpf);
    let mut slow = SlowCollector::new(slow_ns);
    let mut intervals = IntervalClock::new(args.interval);
    let mut tick_error: Option<anyhow::Error> = None;
    let runtime = capture::runtime()?;
    let (stop, elapsed) = runtime.block_on(capture::run(
        args.duration,
        Watch::for_target(&target, command.as_mut()),
        |event| {
            if let Some(children) = &mut children {
                children.probe_new(&mut ebpf, &sites[0], &mut symbolizer);
            }
            if event == capture::Event::FastTick {
                return; // nothing else here is that urgent
            }
            slow.drain(&mut maps.ring, &mut symbolizer);
            if event == capture::Event::Snapshot {
                if let Err(err) = write_snapshot(
                    &maps,
                    &slow,
                    &mut symbolizer,
                    &snapshot_base,
                    &outputs,
                    start.elapsed(),
                    start_mono_ns,
                    args.json,
                ) {
                    eprintln!("livetrace: snapshot failed: {err:#}");
                }
                return;
            }
            if tick_error.is_none()
                && let Err(err) = intervals.tick(&mut maps, start.elapsed(), &function, args.json)
            {
                tick_error = Some(err);
            }
        },
    ))?;
    if let Some(err) = tick_error {
        return Err(err.context("reading the histogram during the capture failed"));
    }
    let cost_after = probe_cost(&ebpf);
    maps.phase
        .set(0, PHASE_STOPPING, 0)
        .context("failed to tell the BPF programs that the capture is stopping")?;
    detach(&mut ebpf)?;
    if stop != StopReason::DurationElapsed {
        eprintln!("livetrace: {}", stop.describe());
    }

    slow.drain(&mut maps.ring, &mut symbolizer);
    let total = maps.histogram()?;
    intervals.finish(&mut maps, &total, elapsed, &function, args.json)?;
    let mut quality = latency_quality(&maps, elapsed, &function)?;
    if let Some(children) = &children {
        quality.notes.extend(children.notes());
    }
    quality.probe_cost_ns = cost_before.zip(cost_after).and_then(|(before, after)| {
        let runs = after.1.saturating_sub(before.1);
        // Each call runs two programs: entry and return.
        (runs > 0).then(|| 2.0 * (after.0 - before.0) as f64 / runs as f64)
    });
    if !matches!(stop, StopReason::DurationElapsed) {
        quality
            .notes
            .push(format!("capture ended early: {}", stop.describe()));
    }

    let traces = if slow_ns > 0 {
        maps.stack_traces(&slow)?
    } else {
        HashMap::new()
    };
    let slow_report = (slow_ns > 0).then(|| slow.report(&traces, &mut symbolizer, start_mono_ns));
    if symbolizer.interrupted() {
        quality.notes.push(stacks::INTERRUPTED_NOTE.into());
    }
    let report = LatencyReport {
        function: function.clone(),
        sites: site_names,
        title: title.clone(),
        total,
        intervals: intervals.done,
        slow: slow_report,
        quality,
        max_threads: args.max_threads,
    };
    drop(ebpf);

    let stack_outputs: Vec<OutputSpec> = outputs
        .iter()
        .filter_map(|o| match o {
            HistOutput::Stacks(spec) => Some(spec.clone()),
            _ => None,
        })
        .collect();
    if !stack_outputs.is_empty() {
        let profile = slow.profile(&traces, &mut symbolizer, &report, &title);
        output::write_stack_profile(&profile, &stack_outputs)?;
    }
    for output in &outputs {
        match output {
            HistOutput::Text(Some(path)) => {
                output::write_atomically(path, |out| histogram_text::write(&report, out))?;
            }
            // Stdout gets the text report anyway (below).
            HistOutput::Text(None) => {}
            HistOutput::Json(path) => {
                output::write_atomically(path, |out| histogram_json::write(&report, out))?;
            }
            HistOutput::Stacks(_) => {}
        }
    }
    let mut stdout = std::io::stdout().lock();
    if args.json {
        histogram_json::write(&report, &mut stdout).context("failed to write to stdout")?;
    } else {
        stdout
            .write_all(histogram_text::report_text(&report).as_bytes())
            .and_then(|()| stdout.flush())
            .context("failed to write to stdout")?;
    }
    drop(stdout);
    eprint!("{}", histogram_text::footer(&report));
    for output in &outputs {
        if let Some(path) = output.path() {
            eprintln!("livetrace: wrote {}", path.display());
        }
    }
    Ok(())
}

/// The data-quality record from the counters, read in place (also mid-capture).
fn latency_quality(
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
        notes: Vec::new(),
    };
    if quality.entries == 0 {
        quality.notes.push(format!(
            "{function} was not called during the capture: check that the target calls it \
             (it may be inlined at its call sites, and then never runs as its own function)"
        ));
    }

    Ok(quality)
}

#[expect(
    clippy::too_many_arguments,
    reason = "the run loop's state, borrowed piece by piece inside its callback"
)]
/// SIGUSR1: the report so far, written to every file output and printed on stdout (as JSON
/// with --json); the maps are read, not cleared, and the capture goes on.
fn write_snapshot(
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
    };
    let mut written = Vec::new();
    for output in outputs {
        match output {
            HistOutput::Text(Some(path)) => {
                output::write_atomically(path, |out| histogram_text::write(&report, out))?;
            }
            HistOutput::Json(path) => {
                output::write_atomically(path, |out| histogram_json::write(&report, out))?;
            }
            HistOutput::Stacks(spec) => {
                let profile = slow.profile(&traces, symbolizer, &report, &report.title);
                output::write_stack_profile(&profile, std::slice::from_ref(spec))?;
            }
            HistOutput::Text(None) => continue,
        }
        if let Some(path) = output.path() {
            written.push(path.display().to_string());
        }
    }
    let mut stdout = std::io::stdout().lock();
    if json {
        histogram_json::write(&report, &mut stdout).context("failed to write to stdout")?;
    } else {
        stdout
            .write_all(histogram_text::report_text(&report).as_bytes())
            .context("failed to write to stdout")?;
    }
    stdout.flush().context("failed to write to stdout")?;
    drop(stdout);
    eprintln!(
        "livetrace: snapshot (SIGUSR1): {} calls so far{}; the capture goes on",
        report.total.count(),
        if written.is_empty() {
            String::new()
        } else {
            format!(", written to {}", written.join(", "))
        }
    );
    Ok(())
}

/// Finds the function once per process (or once for the command or the whole system).
fn find_sites(spec: &SymbolSpec, target: &Target) -> anyhow::Result<Vec<Site>> {
    match target {
        Target::Threads { pids, .. } => pids
            .iter()
            .map(|&pid| find_site(spec, &Scope::Pid(pid), Some(pid)))
            .collect(),
        Target::Command(argv) => Ok(vec![find_site(spec, &Scope::Command(argv), None)?]),
        Target::System => Ok(vec![find_site(spec, &Scope::System, None)?]),
    }
}

fn find_site(spec: &SymbolSpec, scope: &Scope<'_>, pid: Option<u32>) -> anyhow::Result<Site> {
    let place = match scope {
        Scope::Pid(pid) => match targets::process_name(*pid) {
            Some(name) => format!("pid {pid} ({name})"),
            None => format!("pid {pid}"),
        },
        Scope::Command(argv) => format!("`{}`", argv[0].to_string_lossy()),
        Scope::System => "the system's library directories".into(),
    };
    let search = uprobe_target::files_to_search(scope, spec.target.as_deref())?;
    if search.files.is_empty() {
        let what = spec.target.as_deref().unwrap_or("the executable");
        let mut message = format!("cannot find {what} for {place}; tried:");
        for tried in &search.tried {
            message.push_str("\n  ");
            message.push_str(tried);
        }
        if search.tried.is_empty() {
            message.push_str(" nothing");
        }
        message.push_str(
            "\ngive the library's full path (TARGET:SYMBOL), or check that the process has \
             loaded it",
        );
        bail!(message);
    }
    if let (Scope::Pid(pid), Some(t)) = (scope, &spec.target)
        && t.contains('/')
        && !maps_file(*pid, &search.files[0])
    {
        eprintln!(
            "livetrace: warning: pid {pid} does not map {} now: the probe fires only once it \
             loads that file",
            search.files[0].shown
        );
    }

    // The first file that has the function wins; with no TARGET the executable comes first.
    let mut found: Vec<(Candidate, FunctionSymbol, ElfInfo)> = Vec::new();
    let mut all_symbols: Vec<FunctionSymbol> = Vec::new();
    let mut stripped: Vec<(String, usize)> = Vec::new();
    for (index, file) in search.files.iter().enumerate() {
        let primary = index == 0;
        let info = match ElfInfo::read(&file.path) {
            Ok(info) => info,
            Err(err) if primary => return Err(err),
            Err(err) => {
                log::debug!("skipping {}: {err:#}", file.shown);
                continue;
            }
        };
        let symbols = match function_symbols(&file.path) {
            Ok(symbols) => symbols,
            Err(err) if primary => return Err(err),
            Err(err) => {
                log::debug!("skipping {}: {err:#}", file.shown);
                continue;
            }
        };
        match find_symbol(&symbols, spec) {
            Lookup::Found(symbol) => {
                found.push((file.clone(), symbol, info));
                // The executable (or the named file) wins outright.
                if primary {
                    break;
                }
            }
            Lookup::Ambiguous(candidates) => {
                return Err(crate::UsageError::error(describe_ambiguity(
                    spec,
                    &file.shown,
                    &candidates,
                )));
            }
            Lookup::Missing => {
                if primary && !info.has_symtab {
                    stripped.push((file.shown.clone(), symbols.len()));
                }
                all_symbols.extend(symbols);
            }
        }
    }
    if found.len() > 1 {
        let mut message = format!(
            "'{}' is defined in {} libraries of {place}:",
            spec.symbol,
            found.len()
        );
        for (file, symbol, _) in &found {
            message.push_str(&format!("\n  {}  at {:#x}", file.shown, symbol.addr));
        }
        message.push_str(&format!(
            "\nname the library: e.g. {}:{}",
            found[0].0.shown, spec.symbol
        ));
        return Err(crate::UsageError::error(message));
    }
    let Some((file, symbol, info)) = found.pop() else {
        let searched = if search.files.len() == 1 {
            search.files[0].shown.clone()
        } else {
            format!(
                "{} or the {} libraries it {}",
                search.files[0].shown,
                search.files.len() - 1,
                if matches!(scope, Scope::Pid(_)) {
                    "has loaded"
                } else {
                    "links"
                }
            )
        };
        let mut message = format!(
            "function '{}' not found in {searched} ({place})",
            spec.symbol
        );
        let close = close_names(&all_symbols, &spec.symbol, 8);
        if close.is_empty() {
            message.push_str("\n  no function has a similar name");
        } else {
            message.push_str(&format!("\n  closest names: {}", close.join(", ")));
        }
        for (file, count) in stripped {
            let exported = match count {
                0 => "it exports no functions either".to_owned(),
                n => format!("only its {n} exported functions could be searched"),
            };
            message.push_str(&format!(
                "\n  {file} is stripped (it has no .symtab): {exported}; use a build with \
                 symbols, or install its debug symbols"
            ));
        }
        if !search.explicit {
            message.push_str(
                "\n  if the function is in a library the program loads later, name it: \
                 LIBRARY:SYMBOL",
            );
        }
        bail!(message);
    };
    if let Some(evidence) = info.go_evidence {
        bail!(
            "{} is a Go program ({evidence}): uretprobes replace return addresses on the stack, \
             which Go's runtime copies and checks when stacks grow, and the program crashes. \
             livetrace refuses to risk that; for Go, use Go's own tools (pprof, runtime/trace) \
             or a uprobe on entry only",
            file.shown
        );
    }
    if symbol.size == 0 {
        log::info!("{} has size 0 in the symbol table", symbol.demangled);
    }
    Ok(Site { pid, file, symbol })
}

/// Whether `pid` currently maps `file`.
fn maps_file(pid: u32, file: &Candidate) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| {
        maps.lines()
            .filter_map(|line| line.split_ascii_whitespace().nth(5))
            .any(|path| {
                uprobe_target::same_file(
                    &PathBuf::from(format!("/proc/{pid}/root{path}")),
                    &file.path,
                )
            })
    })
}

const ENTRY: &str = "uprobe_hist_entry";
const RETURN: &str = "uprobe_hist_return";
const THREAD_EXIT: &str = "uprobe_hist_thread_exit";
const FOLLOW_FORK: &str = "follow_fork";

/// Loads the three programs and attaches them: the thread-exit tracepoint first, so no exit is
/// missed, then the return probes, then the entry probes, so that no entry is recorded whose
/// return could not be seen.
fn attach(ebpf: &mut Ebpf, sites: &[Site], command_pid: Option<u32>) -> anyhow::Result<()> {
    let btf = crate::kernel_btf::aya_btf().context(
        "uprobe-hist needs the kernel's BTF to notice threads that exit inside the function",
    )?;
    let exit: &mut BtfTracePoint = ebpf
        .program_mut(THREAD_EXIT)
        .context("the BPF object has no uprobe_hist_thread_exit program; rebuild livetrace")?
        .try_into()?;
    exit.load("sched_process_exit", &btf)
        .map_err(|e| bpf::explain_program_error(e, "load the thread-exit BPF program"))?;
    exit.attach().map_err(|e| {
        bpf::explain_program_error(e, "attach to the sched_process_exit tracepoint")
    })?;
    for name in [RETURN, ENTRY] {
        let program: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("the BPF object has no {name} program; rebuild livetrace"))?
            .try_into()?;
        program
            .load()
            .map_err(|e| bpf::explain_program_error(e, &format!("load the {name} BPF program")))?;
    }
    if command_pid.is_some() {
        let fork: &mut BtfTracePoint = ebpf
            .program_mut(FOLLOW_FORK)
            .context("the BPF object has no follow_fork program; rebuild livetrace")?
            .try_into()?;
        fork.load("sched_process_fork", &btf)
            .map_err(|e| bpf::explain_program_error(e, "load the fork-following BPF program"))?;
        fork.attach().map_err(|e| {
            bpf::explain_program_error(e, "attach to the sched_process_fork tracepoint")
        })?;
    }
    for site in sites {
        probe_site(ebpf, site, site.pid.or(command_pid))?;
    }
    Ok(())
}

/// Attaches the return probe, then the entry probe, to `site` in process `pid` (or in every
/// process that runs its file).
fn probe_site(ebpf: &mut Ebpf, site: &Site, pid: Option<u32>) -> anyhow::Result<()> {
    let scope = match pid {
        Some(pid) => UProbeScope::OneProcess(
            NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0 cannot be probed"))?,
        ),
        None => UProbeScope::AllProcesses,
    };
    for name in [RETURN, ENTRY] {
        let program: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("the BPF object has no {name} program; rebuild livetrace"))?
            .try_into()?;
        program
            .attach(site.symbol.file_offset, &site.file.path, scope)
            .map_err(|e| {
                bpf::explain_program_error(
                    e,
                    &format!(
                        "attach a {} to {} at file offset {:#x} in {}",
                        if name == ENTRY { "uprobe" } else { "uretprobe" },
                        site.symbol.demangled,
                        site.symbol.file_offset,
                        site.file.shown
                    ),
                )
            })?;
    }
    Ok(())
}

/// `-- COMMAND`'s child processes, probed as `follow_fork` announces them.
struct Children {
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    probed: Vec<u32>,
    /// Children that could not be probed, and why.
    failed: Vec<(u32, String)>,
}

impl Children {
    /// Probes the children announced since the last call (each within a tick of its fork).
    fn probe_new(&mut self, ebpf: &mut Ebpf, site: &Site, symbolizer: &mut Symbolizer) {
        while let Some(item) = self.ring.next() {
            let Some(&[a, b, c, d]) = item.get(..4) else {
                continue;
            };
            let pid = u32::from_ne_bytes([a, b, c, d]);
            drop(item);
            match probe_site(ebpf, site, Some(pid)) {
                Ok(()) => self.probed.push(pid),
                Err(err) => self.failed.push((pid, format!("{err:#}"))),
            }
            symbolizer.note_process(pid);
        }
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.probed.is_empty() {
            notes.push(format!(
                "followed {} child processes of the command; each was probed from when its \
                 fork was seen (within ~50 ms): calls in that first moment are not counted",
                self.probed.len()
            ));
        }
        for (pid, why) in &self.failed {
            notes.push(format!("child process {pid} could not be probed: {why}"));
        }
        notes
    }
}

/// Stops new calls from being timed first, gives calls in flight a moment to return, then
/// detaches the rest; what is still open after that is counted from the thread map.
fn detach(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for name in [ENTRY, RETURN] {
        let program: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} vanished"))?
            .try_into()?;
        program
            .unload()
            .with_context(|| format!("failed to detach the {name} probes"))?;
        if name == ENTRY {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let exit: &mut BtfTracePoint = ebpf
        .program_mut(THREAD_EXIT)
        .context("uprobe_hist_thread_exit vanished")?
        .try_into()?;
    exit.unload()
        .context("failed to detach the thread-exit tracepoint")?;
    Ok(())
}

/// The kernel's own accounting of the probes' run time (`kernel.bpf_stats_enabled=1`):
/// (run_time_ns, run_cnt) summed over the entry and return programs.
fn probe_cost(ebpf: &Ebpf) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    for name in [ENTRY, RETURN] {
        let program: &UProbe = ebpf.program(name)?.try_into().ok()?;
        let fd = program.fd().ok()?.as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let field = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        total.0 += field("run_time_ns:")?;
        total.1 += field("run_cnt:")?;
    }
    // Both zero: the statistics are off.
    (total.1 > 0 || total.0 > 0).then_some(total)
}

/// The maps, taken out of the object so the run loop can read them while the programs run.
struct Maps {
    histogram: PerCpuArray<MapData, LatencyHistogram>,
    window: PerCpuArray<MapData, Window>,
    counters: PerCpuArray<MapData, u64>,
    threads: BpfHashMap<MapData, u32, ThreadCalls>,
    ring: RingBuf<MapData>,
    stacks: StackTraceMap<MapData>,
    phase: Array<MapData, u32>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            histogram: PerCpuArray::try_from(bpf::take_map(ebpf, HISTOGRAM)?)?,
            window: PerCpuArray::try_from(bpf::take_map(ebpf, WINDOW)?)?,
            counters: PerCpuArray::try_from(bpf::take_map(ebpf, COUNTERS)?)?,
            threads: BpfHashMap::try_from(bpf::take_map(ebpf, THREADS)?)?,
            ring: RingBuf::try_from(bpf::take_map(ebpf, SLOW_CALLS)?)?,
            stacks: StackTraceMap::try_from(bpf::take_map(ebpf, STACKS)?)?,
            phase: Array::try_from(bpf::take_map(ebpf, PHASE)?)?,
        })
    }

    fn histogram(&self) -> anyhow::Result<Histogram> {
        let per_cpu = self
            .histogram
            .get(&0, 0)
            .context("failed to read the latency histogram map")?;
        Ok(Histogram::from_per_cpu(per_cpu.iter()))
    }

    /// Min and max since the last call, and a reset for the next interval.
    fn take_window(&mut self) -> anyhow::Result<(Option<u64>, Option<u64>)> {
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

    fn counters(&self) -> anyhow::Result<[u64; COUNTER_SLOTS as usize]> {
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

    /// Calls still open on threads that have not exited.
    fn still_open(&self) -> anyhow::Result<u64> {
        let mut open = 0;
        for entry in self.threads.iter() {
            let (_, calls) = entry.context("failed to read the thread map")?;
            open += u64::from(calls.depth);
        }
        Ok(open)
    }

    /// The slow calls' stacks, leaf (the caller) first.
    fn stack_traces(&self, slow: &SlowCollector) -> anyhow::Result<HashMap<u32, Vec<u64>>> {
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

/// Prints (or keeps, for JSON) a histogram of every `-i` interval as it ends.
struct IntervalClock {
    every: Option<Duration>,
    last_end: Duration,
    last: Histogram,
    done: Vec<Interval>,
}

impl IntervalClock {
    fn new(every: Option<Duration>) -> Self {
        Self {
            every,
            last_end: Duration::ZERO,
            last: Histogram::default(),
            done: Vec::new(),
        }
    }

    fn tick(
        &mut self,
        maps: &mut Maps,
        now: Duration,
        function: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        let Some(every) = self.every else {
            return Ok(());
        };
        // The run loop ticks every second; an interval ends on the first tick at or after it.
        if now + Duration::from_millis(100) < self.last_end + every {
            return Ok(());
        }
        let total = maps.histogram()?;
        self.close(maps, &total, now, function, json)
    }

    /// The last, possibly shorter, interval.
    fn finish(
        &mut self,
        maps: &mut Maps,
        total: &Histogram,
        now: Duration,
        function: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        if self.every.is_none()
            || (total.count() == self.last.count()
                && now < self.last_end + Duration::from_millis(200))
        {
            return Ok(());
        }
        self.close(maps, total, now, function, json)
    }

    fn close(
        &mut self,
        maps: &mut Maps,
        total: &Histogram,
        now: Duration,
        function: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        let (min, max) = maps.take_window()?;
        let interval = Interval {
            start: self.last_end,
            end: now,
            histogram: total.since(&self.last, min, max),
        };
        if !json {
            let mut stdout = std::io::stdout().lock();
            writeln!(
                stdout,
                "{}",
                histogram_text::interval_text(function, &interval)
            )
            .and_then(|()| stdout.flush())
            .context("failed to write to stdout")?;
        }
        self.last = total.clone();
        self.last_end = now;
        self.done.push(interval);
        Ok(())
    }
}

/// Keeps what `--slow` needs from the ring buffer: per (process, stack) counts and time, and the
/// slowest calls.
struct SlowCollector {
    threshold_ns: u64,
    total: u64,
    total_ns: u64,
    by_stack: HashMap<(u32, i32), (u64, u64)>,
    slowest: Vec<SlowCall>,
    processes: BTreeSet<u32>,
}

/// How many of the slowest calls are listed.
const SLOWEST: usize = 10;

impl SlowCollector {
    fn new(threshold_ns: u64) -> Self {
        Self {
            threshold_ns,
            total: 0,
            total_ns: 0,
            by_stack: HashMap::new(),
            slowest: Vec::new(),
            processes: BTreeSet::new(),
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>, symbolizer: &mut Symbolizer) {
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

    fn add(&mut self, call: SlowCall) {
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

    fn report(
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
    fn profile(
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

/// Waits (at most 200 ms) until `pid` has exec'd and mapped `file` and the libraries its
/// executable links.
fn wait_until_loaded(pid: u32, file: &std::path::Path) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let needed = exe
        .as_deref()
        .and_then(|_| ElfInfo::read(file).ok())
        .map(|info| info.needed)
        .unwrap_or_default();
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return;
        };
        let mapped = |lib: &str| maps.lines().any(|line| line.ends_with(&format!("/{lib}")));
        if name.as_deref().is_some_and(mapped) && needed.iter().all(|lib| mapped(lib)) {
            return;
        }
        std::thread::sleep(Duration::from_micros(500));
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

    /// -i below a second is refused with a message naming the value.
    #[test]
    fn interval_must_be_at_least_a_second() {
        assert!(parse_interval("1").is_ok());
        assert!(parse_interval("2.5s").is_ok());
        assert!(parse_interval("500ms").unwrap_err().contains("'500ms'"));
    }
}
