//! `livetrace profile`: where is the CPU time going? Samples stacks on a perf event (software
//! cpu-clock by default, at 99 Hz so as not to beat in step with 100 Hz timers) and aggregates
//! them in the kernel; prints the hottest leaf functions and writes a flamegraph.
//! Needs kernel 4.9+ (BPF perf_event programs), root or CAP_BPF + CAP_PERFMON (+ CAP_SYSLOG for
//! kernel frame names where /proc/kallsyms hides them).

mod attach;
pub mod cpu_times;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::{maps::RingBuf, programs::PerfEvent};
use clap::{Args as ClapArgs, ValueEnum};
use livetrace_common::{
    follow::FOLLOW_FORK,
    stacks::{Counter, DEFAULT_STACK_STORAGE, STACK_KIND_KERNEL, STACK_KIND_USER},
};

pub use self::attach::objects_for_verifier;
pub use self::attach::verifier_accepts;
use self::attach::{attach, load};
use crate::{
    bpf::{self, stacks::StackSettings},
    duration::parse_positive_duration,
    model::{DataQuality, WeightUnit},
    output::{self, OutputSpec, profile_summary},
    privileges,
    proc::task,
    runtimes::Runtime,
    session::{
        self, Privileges, Running, Session, Tool,
        capture::{self, StopReason},
        targets::{Target, TargetArgs},
    },
    stacks::{self, BuildOptions},
    symbolize::Symbolizer,
    unwind::{self, UnwindArgs},
};

const EXAMPLES: &str = "\
Examples:
  livetrace profile -p 1234 -d 30            # 30 s of pid 1234: summary + flamegraph SVG
  livetrace profile -p 1234 -o cpu.svg -o cpu.folded
  livetrace profile -d 10                    # the whole system, idle CPUs excluded
  livetrace profile -F 999 -U -- ./server    # start ./server, user stacks only, 999 Hz
  livetrace profile -t 1240 -o - | grep parse  # one thread, folded stacks on stdout
  livetrace profile --unwind fp -d 10        # the whole system, frame pointers (the default there)
  livetrace profile -p 1234 --unwind dwarf --stack-copy-size 4k   # shallow stacks: cheaper copies";

#[derive(ClapArgs, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Samples per second on each CPU (or thread of a spawned command).
    #[arg(short = 'F', long = "frequency", value_name = "HZ", default_value_t = 99,
          value_parser = parse_frequency, allow_negative_numbers = true)]
    pub frequency: u64,
    /// How long to sample (30, 1.5s, 500ms); default: until Ctrl-C or the target exits.
    #[arg(short = 'd', long = "duration", value_name = "SECS", value_parser = parse_positive_duration,
          allow_hyphen_values = true)]
    pub duration: Option<Duration>,
    /// User stacks only.
    #[arg(short = 'U', long = "user-only", conflicts_with = "kernel_only")]
    pub user_only: bool,
    /// Kernel stacks only.
    #[arg(short = 'K', long = "kernel-only")]
    pub kernel_only: bool,
    /// Write an output; the format follows the extension: .svg (flamegraph), .folded, .pb.gz
    /// (pprof), .speedscope.json, .json (summary), or - (folded stacks on stdout).
    /// Repeat for several formats from the same samples.
    #[arg(short = 'o', long = "output", value_name = "PATH", value_parser = OutputSpec::parse)]
    pub outputs: Vec<OutputSpec>,
    /// Put the thread (name-tid) under the process in every stack.
    #[arg(long = "per-thread")]
    pub per_thread: bool,
    /// Distinct stacks the kernel maps can hold; raise it if the footer reports losses.
    #[arg(long = "stack-storage-size", value_name = "N", default_value_t = DEFAULT_STACK_STORAGE,
          value_parser = clap::value_parser!(u32).range(64..=4_194_304))]
    pub stack_storage: u32,
    /// The event to sample on; `cycles` needs a hardware PMU and falls back to cpu-clock.
    #[arg(long = "event", value_enum, default_value_t = Event::CpuClock)]
    pub event: Event,
    #[command(flatten)]
    pub unwind: UnwindArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Event {
    CpuClock,
    Cycles,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let target = args.target.resolve()?;
    let (as_root, duration) = (args.target.processes.as_root, args.duration);
    session::run(
        Profile {
            args,
            outputs: Vec::new(),
        },
        target,
        as_root,
        duration,
    )
}

/// `livetrace profile`, before anything is loaded.
pub(crate) struct Profile {
    args: Args,
    /// The outputs, default one included (decided once: its name has the time in it).
    outputs: Vec<OutputSpec>,
}

impl Profile {
    /// The tool, for `record` to run inside its own session.
    pub(crate) fn new(args: Args) -> Self {
        Self {
            args,
            outputs: Vec::new(),
        }
    }
}

/// `livetrace profile`, sampling.
pub(crate) struct Sampling {
    ebpf: aya::Ebpf,
    /// The count map the program adds to.
    counts: bpf::counts::CountSlot,
    collector: Option<unwind::Collector>,
    /// The targets' CPython interpreters, whose frames the program reads (`--unwind dwarf`).
    python: crate::python::Watch,
    /// The processes to look for CPython in: those given (or whose threads are), and the command.
    python_pids: Vec<u32>,
    /// Whether every CPython that the capture meets is read too: the whole system, or a
    /// command's children.
    python_anywhere: bool,
    new_processes: RingBuf<aya::maps::MapData>,
    context: BuildContext,
    outputs: Vec<OutputSpec>,
    event_name: &'static str,
    started: std::time::Instant,
}

impl Tool for Profile {
    type Running = Sampling;
    const NAME: &'static str = "profile";

    fn privileges(&self, _target: &Target) -> Privileges {
        let mut needs = vec![privileges::BPF, privileges::PERFMON];
        if !self.args.user_only && privileges::kernel_symbols_hidden() {
            needs.push(privileges::KALLSYMS);
        }
        Privileges {
            needs,
            wanted: Vec::new(),
        }
    }

    fn prepare(&mut self, target: &Target) -> anyhow::Result<Vec<OutputSpec>> {
        self.outputs = self.args.outputs.clone();
        if self.outputs.is_empty() {
            let path = default_output_path(target);
            self.outputs.push(
                OutputSpec::parse(path.to_str().context("non-UTF-8 path")?)
                    .map_err(anyhow::Error::msg)?,
            );
        }
        Ok(self.outputs.clone())
    }

    fn start(self, session: &mut Session) -> anyhow::Result<Sampling> {
        let args = &self.args;
        let mut notes = Vec::new();
        let frequency = clamp_frequency(args.frequency, &mut notes);
        let command = session.command_pid;
        let follow = command.and_then(|_| follow_forks(&mut notes));
        let (tgids, tids) = match (&session.target, command) {
            (Target::Threads { pids, tids }, _) => (pids.clone(), tids.clone()),
            (Target::Command(_), Some(pid)) if follow.is_some() => (vec![pid], Vec::new()),
            _ => (Vec::new(), Vec::new()),
        };
        let stack_kinds = match (args.user_only, args.kernel_only) {
            (true, _) => STACK_KIND_USER,
            (_, true) => STACK_KIND_KERNEL,
            _ => STACK_KIND_USER | STACK_KIND_KERNEL,
        };
        let dwarf = args.unwind.dwarf(&session.target, stack_kinds);
        let settings = StackSettings {
            filter: matches!(session.target, Target::Threads { .. }) || follow.is_some(),
            tgids,
            tids,
            stack_kinds,
            per_thread: args.per_thread,
            stack_storage: args.stack_storage,
            stack_copy_bytes: if dwarf {
                args.unwind.stack_copy_size
            } else {
                0
            },
            unwind_buffer: args.unwind.unwind_buffer_size,
            held_command: command,
            fork_tgid_offset: follow.as_ref().map(|(_, offset)| *offset),
        };
        let python_pids: Vec<u32> = (settings.tgids.iter().copied())
            .chain(
                settings
                    .tids
                    .iter()
                    .filter_map(|&t| task::thread_group_of(t)),
            )
            .chain(command)
            .collect();
        let python_anywhere = session.target == Target::System || follow.is_some();
        // Read Python frames where a target runs CPython, or may (the whole system, a command).
        let mut python = crate::python::Watch::default();
        python.look(python_pids.iter().copied());
        let python_frames = python_anywhere || command.is_some() || python.found_any();
        let (mut ebpf, collector, sampler) = load(
            settings,
            args.per_thread,
            (&python.interpreters, python_frames),
            &mut notes,
        )?;
        if collector.is_some() {
            python.refresh(&mut ebpf, python_pids.iter().copied());
        }
        let counts = bpf::counts::CountSlot::fill(&mut ebpf, args.stack_storage)?;
        let program: &mut PerfEvent = bpf::program_mut(&mut ebpf, sampler)?.try_into()?;
        // Without BTF a command's processes are sampled each on its own clock.
        let per_task = command.filter(|_| follow.is_none());
        let (event_name, cpus) = attach(program, args.event, frequency, per_task, &mut notes)?;
        // The held command is sampled from its exec on, not while it is livetrace's shim.
        if command.is_some()
            && let Some(note) = bpf::follow_exec(&mut ebpf, follow.as_ref().map(|(btf, _)| btf))?
        {
            crate::say!("livetrace: {note}");
            notes.push(note);
        }
        if let Some((btf, _)) = &follow {
            bpf::attach_btf_tracepoint(&mut ebpf, FOLLOW_FORK, "sched_process_fork", btf)?;
        }
        let whole_system = session.target == Target::System;
        let context = BuildContext {
            unwind_mode: args
                .unwind
                .describe(collector.is_some(), stack_kinds, None, true),
            title: session.title(),
            frequency,
            per_thread: args.per_thread,
            stack_storage: args.stack_storage,
            // The whole system's expected count is checked per CPU against what each CPU did.
            cpu_times_at_start: whole_system.then(cpu_times::read),
            cpus,
            whole_system,
            notes,
        };
        Ok(Sampling {
            new_processes: stacks::new_processes(&mut ebpf)?,
            ebpf,
            counts,
            collector,
            python,
            python_pids,
            python_anywhere,
            context,
            outputs: self.outputs,
            event_name,
            started: std::time::Instant::now(),
        })
    }
}

/// A command's forks followed in the kernel (`follow_fork`, BTF): a child that lives less than
/// a sample period is then sampled as often as its time on a CPU says, where per-task events
/// wait for a whole period of its own and a 5 ms child never gets one. Without BTF, per-task
/// events it is, and a note says so.
fn follow_forks(notes: &mut Vec<String>) -> Option<(aya::Btf, u32)> {
    let follow = crate::kernel_btf::aya_btf().and_then(|btf| {
        let kernel = crate::kernel_btf::KernelBtf::from_sys_fs()?;
        Ok((btf, kernel.member_offset("task_struct", "tgid")?))
    });
    match follow {
        Ok(follow) => Some(follow),
        Err(err) => {
            notes.push(format!(
                "the command's processes are sampled each on its own clock ({err:#}): one that \
                 lives less than a sample period may get no sample"
            ));
            None
        }
    }
}

impl Running for Sampling {
    fn ebpf(&mut self) -> &mut aya::Ebpf {
        &mut self.ebpf
    }

    fn start_line(&self, session: &Session) -> String {
        format!(
            "profiling {} at {} Hz on {}",
            session.title(),
            self.context.frequency,
            self.event_name
        )
    }

    fn on_event(&mut self, event: capture::Event, session: &mut Session) {
        let symbolizer = &mut session.symbolizer;
        if event == capture::Event::FastTick {
            // Cheap and urgent: processes the BPF program just announced.
            stacks::note_new_processes(&mut self.new_processes, symbolizer);
            return;
        }
        // A process the BPF program could not announce (counted) is still noted here.
        for pid in stacks::processes_seen(self.counts.current()) {
            symbolizer.note_process(pid);
        }
        if let Some(collector) = &self.collector {
            collector.tell(symbolizer);
            let mut pids = self.python_pids.clone();
            if self.python_anywhere {
                // The processes met so far that run CPython, by their files.
                pids.extend(
                    symbolizer.processes().filter(|&pid| {
                        matches!(symbolizer.runtime_of(pid), Some(Runtime::Python(_)))
                    }),
                );
            }
            self.python.refresh(&mut self.ebpf, pids);
        }
        if event == capture::Event::Snapshot {
            let unwound = self.collector.as_ref().map(unwind::Collector::snapshot);
            let elapsed = self.started.elapsed();
            let result = build(
                &self.ebpf,
                symbolizer,
                &self.context,
                elapsed,
                None,
                unwound,
                self.counts.current(),
            )
            .and_then(|profile| output::write_snapshot(&profile, &self.outputs));
            if let Err(err) = result {
                crate::say!("livetrace: snapshot failed: {err:#}");
            }
        }
    }

    fn stopped(&mut self, session: &mut Session) -> anyhow::Result<()> {
        let symbolizer = &mut session.symbolizer;
        stacks::note_new_processes(&mut self.new_processes, symbolizer);
        for pid in stacks::processes_seen(self.counts.current()) {
            symbolizer.note_process(pid);
        }
        if let Some(collector) = &self.collector {
            collector.tell(symbolizer);
        }
        self.context.notes.push(bpf::in_kernel_cost(&self.ebpf));
        Ok(())
    }

    fn finish(
        mut self,
        session: &mut Session,
        stop: &StopReason,
        elapsed: Duration,
    ) -> anyhow::Result<()> {
        self.context.notes.append(&mut session.notes);
        let symbolizer = &mut session.symbolizer;
        // The program is detached: what is in the ring buffer now is all there will be.
        let unwound = self.collector.map(|c| c.finish(symbolizer)).transpose()?;
        if let Some(unwound) = &unwound
            && unwound.malformed > 0
        {
            self.context.notes.push(format!(
                "{} stack samples were malformed and skipped (a livetrace bug: please report it)",
                unwound.malformed
            ));
        }
        let profile = build(
            &self.ebpf,
            symbolizer,
            &self.context,
            elapsed,
            Some(stop),
            unwound,
            self.counts.current(),
        )?;
        drop(self.ebpf);
        report(&profile, &self.outputs)
    }
}

impl Sampling {
    /// Takes what was sampled since the last take out of the maps (and out of the unwinding
    /// thread), as a profile of the `elapsed` it covers: `record`'s time buckets. Its counters
    /// are the capture's so far (the caller keeps the differences).
    pub(crate) fn take_bucket(
        &mut self,
        symbolizer: &mut Symbolizer,
        elapsed: Duration,
    ) -> anyhow::Result<crate::model::StackProfile> {
        stacks::note_new_processes(&mut self.new_processes, symbolizer);
        if let Some(collector) = &self.collector {
            collector.tell(symbolizer);
        }
        // Per-CPU shortfalls are judged over a whole capture, not a bucket.
        self.context.cpu_times_at_start = None;
        let unwound = self.collector.as_ref().map(unwind::Collector::take);
        let taken = self.counts.swap(&mut self.ebpf)?;
        build(
            &self.ebpf,
            symbolizer,
            &self.context,
            elapsed,
            None,
            unwound,
            &taken,
        )
    }
}

/// Writes every output, prints the summary (on standard error when the profile itself goes to
/// standard output) and the footer.
fn report(profile: &crate::model::StackProfile, outputs: &[OutputSpec]) -> anyhow::Result<()> {
    let written = output::write_stack_profile(profile, outputs);
    let mut summary_text = Vec::new();
    profile_summary::write(profile, &mut summary_text)?;
    if outputs.iter().any(|o| o.path.is_none()) {
        crate::say_raw!("{}", String::from_utf8_lossy(&summary_text));
    } else {
        crate::console::stdout(&summary_text);
    }
    if profile.total_weight() == 0 {
        crate::say!(
            "livetrace: no samples were recorded: the target did not run on a CPU during the \
             capture. If it is slow while idle, it is waiting: try `livetrace offcpu` with the \
             same target."
        );
    }
    output::report_footer_and_files(profile, &written);
    written.finish()
}

/// What [`build`] needs besides the maps.
struct BuildContext {
    /// How user stacks were walked, for the footer.
    unwind_mode: String,
    title: String,
    frequency: u64,
    per_thread: bool,
    stack_storage: u32,
    /// The online CPUs sampled.
    cpus: Vec<u32>,
    whole_system: bool,
    cpu_times_at_start:
        Option<std::collections::BTreeMap<usize, crate::tools::profile::cpu_times::CpuTime>>,
    notes: Vec<String>,
}

/// Reads the maps in place and builds the symbolised profile: at the end (with why the capture
/// stopped), or mid-capture for a SIGUSR1 snapshot.
fn build(
    ebpf: &aya::Ebpf,
    symbolizer: &mut Symbolizer,
    context: &BuildContext,
    elapsed: Duration,
    stop: Option<&StopReason>,
    unwound: Option<unwind::Unwound>,
    counts: &bpf::counts::Counts,
) -> anyhow::Result<crate::model::StackProfile> {
    let counters = bpf::read_counters_in(ebpf)?;
    let raw = stacks::drain(ebpf, (false, counts), unwound, Vec::new())?;
    let started = std::time::SystemTime::now()
        .checked_sub(elapsed)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let frequency = context.frequency;
    let mut quality = DataQuality {
        duration: elapsed,
        started_unix_ns: started.map(|d| d.as_nanos() as u64),
        events: bpf::counter(&counters, Counter::Events),
        recorded: bpf::counter(&counters, Counter::Recorded),
        idle: bpf::counter(&counters, Counter::Idle),
        not_target: bpf::counter(&counters, Counter::NotTarget),
        counts_map_full: bpf::counter(&counters, Counter::CountsMapFull),
        // Records lost whole; a sample whose stack copy was lost is kept (a stack loss).
        unwind_ring_full: bpf::counter(&counters, Counter::UnwindRingFull),
        unwind_mode: Some(context.unwind_mode.clone()),
        // Only the whole system has a known expectation: every CPU, every tick.
        expected: context.whole_system.then(|| {
            (context.cpus.len() as f64 * frequency as f64 * elapsed.as_secs_f64()).round() as u64
        }),
        notes: context.notes.clone(),
        ..DataQuality::default()
    };
    // Not lost: those samples are kept, with fewer Python frames.
    for (cause, samples) in &raw.python_losses {
        *quality.stacks_cut_short.entry(cause.clone()).or_default() += samples;
    }
    if let Some(start) = &context.cpu_times_at_start {
        quality
            .notes
            .extend(shortfall_by_cpu(ebpf, context, start, frequency, elapsed)?);
    }
    capture::note_capture_end(
        &mut quality,
        bpf::counter(&counters, Counter::NewProcessNotAnnounced),
        stop,
    );
    Ok(stacks::build_profile(
        &raw,
        symbolizer,
        &BuildOptions {
            title: context.title.clone(),
            unit: WeightUnit::Samples,
            // Sampling is by frequency, so a sample stands for 1/Hz of CPU time on average.
            period_ns: Some(1_000_000_000 / frequency),
            dwarf_possible: true,
            per_thread: context.per_thread,
            stack_storage: context.stack_storage,
            weight_divisor: 1,
        },
        quality,
    ))
}

/// Whole system: a line for each CPU that took far fewer samples than its share of the
/// expected count, and why (`cpu_times`).
fn shortfall_by_cpu(
    ebpf: &aya::Ebpf,
    context: &BuildContext,
    start: &std::collections::BTreeMap<usize, crate::tools::profile::cpu_times::CpuTime>,
    frequency: u64,
    elapsed: Duration,
) -> anyhow::Result<Vec<String>> {
    let events = bpf::per_cpu_counter(ebpf, Counter::Events)?;
    let times =
        crate::tools::profile::cpu_times::delta(start, &crate::tools::profile::cpu_times::read());
    let windows: Vec<_> = context
        .cpus
        .iter()
        .map(|&cpu| crate::tools::profile::cpu_times::CpuWindow {
            cpu: cpu as usize,
            samples: events.get(cpu as usize).copied().unwrap_or(0),
            time: times.get(&(cpu as usize)).copied(),
        })
        .collect();
    let seconds = elapsed.as_secs_f64();
    Ok(crate::tools::profile::cpu_times::shortfall_notes(
        &windows,
        frequency as f64 * seconds,
        seconds,
    ))
}

/// `-F`: samples per second, 1 or more.
fn parse_frequency(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(hz) if hz >= 1 => Ok(hz),
        _ => Err(format!(
            "'{text}' is not a sampling rate: give samples per second, 1 or more (99 is the \
             default; 999 for a finer profile)"
        )),
    }
}

/// The kernel refuses rates above `perf_event_max_sample_rate`; clamp with a warning instead.
fn clamp_frequency(requested: u64, notes: &mut Vec<String>) -> u64 {
    let max = std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match max {
        Some(max) if requested > max => {
            let note = format!(
                "-F {requested} is above the kernel's limit (kernel.perf_event_max_sample_rate = \
                 {max}); sampling at {max} Hz"
            );
            crate::say!("livetrace: warning: {note}");
            notes.push(note);
            max
        }
        _ => requested,
    }
}

/// `livetrace-profile-<what>-<UTC time>.svg` in the current directory.
fn default_output_path(target: &Target) -> PathBuf {
    PathBuf::from(format!(
        "livetrace-profile-{}-{}.svg",
        target.file_stem(),
        crate::timestamp()
    ))
}
