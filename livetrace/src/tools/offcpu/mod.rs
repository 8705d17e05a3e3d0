//! `livetrace offcpu`: where are the threads blocked, and for how long? Times every switch-out to
//! the next switch-in on `sched_switch` (no kprobes needed) and weights the switch-out stacks by
//! the time spent off the CPU. Threads already blocked when the capture starts are found by a
//! scan of /proc and their stacks recovered without pausing them.
//! Needs kernel BTF for `tp_btf` (5.5+), or tracefs for the classic-tracepoint fallback.

pub mod already_blocked;
mod attach;
mod build;
pub mod frame_pointers;
pub mod tracefs;

use std::{path::PathBuf, time::Duration};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use clap::{Args as ClapArgs, ValueEnum};
use livetrace_common::{
    offcpu::{
        MAX_THREADS, START_FILTERED, STATE_INTERRUPTIBLE, STATE_PREEMPTED, STATE_UNINTERRUPTIBLE,
    },
    stacks::{DEFAULT_STACK_STORAGE, STACK_KIND_KERNEL, STACK_KIND_USER},
};

pub use self::attach::objects_for_verifier;
use self::{
    attach::OffcpuSettings,
    build::{BuildContext, build, why_nothing},
};
use crate::{
    UsageError,
    bpf::{self, stacks::StackSettings},
    duration::{parse_duration, parse_positive_duration},
    output::{self, OutputSpec, offcpu_summary},
    privileges::{self, Need},
    session::{
        self, Privileges, Running, Session, Tool,
        capture::{self, StopReason, monotonic_ns},
        targets::{Target, TargetArgs},
    },
    stacks::{self},
    unwind::{self, UnwindArgs, UnwindMode},
};

const EXAMPLES: &str = "\
Examples:
  livetrace offcpu -p 1234 -d 10             # where pid 1234's threads block: summary + SVG
  livetrace offcpu -p 1234 --state D         # uninterruptible sleep only (disk, kernel locks)
  livetrace offcpu -p 1234 --min-block 1ms -o blocked.svg -o blocked.folded
  livetrace offcpu -p 1234 --wakers -d 5     # who woke each blocked stack (blocked;--;waker)
  livetrace offcpu -- ./server               # start ./server, follow its children
  livetrace offcpu -p 1234 --unwind fp       # frame-pointer stacks: the cheapest per switch";

#[derive(ClapArgs, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    #[command(flatten)]
    pub target: TargetArgs,
    /// How long to watch (10, 1.5s, 500ms); default: until Ctrl-C or the target exits.
    #[arg(short = 'd', long = "duration", value_name = "SECS", value_parser = parse_positive_duration,
          allow_hyphen_values = true)]
    pub duration: Option<Duration>,
    /// User stacks only (cheaper: no kernel stack walk per switch).
    #[arg(short = 'U', long = "user-only", conflicts_with = "kernel_only")]
    pub user_only: bool,
    /// Kernel stacks only.
    #[arg(short = 'K', long = "kernel-only")]
    pub kernel_only: bool,
    /// Which switch-outs to count: any (including preemption), D (uninterruptible sleep),
    /// S (interruptible sleep).
    #[arg(long = "state", value_enum, default_value_t = State::Any)]
    pub state: State,
    /// Leave out blocks shorter than this (250us, 10ms).
    #[arg(long = "min-block", value_name = "DUR", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub min_block: Option<Duration>,
    /// Leave out blocks longer than this.
    #[arg(long = "max-block", value_name = "DUR", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub max_block: Option<Duration>,
    /// Write an output; the format follows the extension: .svg (flamegraph), .folded, .pb.gz
    /// (pprof), .speedscope.json, .json (summary), or - (folded stacks on stdout).
    #[arg(short = 'o', long = "output", value_name = "PATH", value_parser = OutputSpec::parse)]
    pub outputs: Vec<OutputSpec>,
    /// Put the thread (name-tid) under the process in every stack.
    #[arg(long = "per-thread")]
    pub per_thread: bool,
    /// Join each blocked stack with the stack of the thread that woke it (blocked;--;waker).
    #[arg(long = "wakers")]
    pub wakers: bool,
    /// Include kernel threads in the whole-system view.
    #[arg(long = "include-kernel-threads")]
    pub include_kernel_threads: bool,
    /// Distinct stacks the kernel maps can hold; raise it if the footer reports losses.
    #[arg(long = "stack-storage-size", value_name = "N", default_value_t = DEFAULT_STACK_STORAGE,
          value_parser = clap::value_parser!(u32).range(64..=4_194_304))]
    pub stack_storage: u32,
    /// How to hook sched_switch: tp_btf (no tracefs needed), the classic tracepoint (mounts
    /// tracefs if needed), or auto (tp_btf, falling back to the tracepoint).
    #[arg(long = "attach", value_enum, default_value_t = Attach::Auto)]
    pub attach: Attach,
    #[command(flatten)]
    pub unwind: UnwindArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum State {
    Any,
    #[value(name = "D")]
    Uninterruptible,
    #[value(name = "S")]
    Interruptible,
}

impl State {
    fn mask(self) -> u32 {
        match self {
            Self::Any => STATE_PREEMPTED | STATE_INTERRUPTIBLE | STATE_UNINTERRUPTIBLE,
            Self::Uninterruptible => STATE_UNINTERRUPTIBLE,
            Self::Interruptible => STATE_INTERRUPTIBLE,
        }
    }

    /// Whether a thread found sleeping in /proc state `c` ('S' or 'D') is selected.
    fn selects(self, c: char) -> bool {
        match self {
            Self::Any => true,
            Self::Uninterruptible => c == 'D',
            Self::Interruptible => c == 'S',
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Attach {
    Auto,
    #[value(name = "tp-btf")]
    TpBtf,
    Tracepoint,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let target = args.target.resolve()?;
    if args.min_block.unwrap_or(Duration::ZERO) > args.max_block.unwrap_or(Duration::MAX) {
        return Err(UsageError::error(format!(
            "--min-block ({:?}) is longer than --max-block ({:?})",
            args.min_block.unwrap_or_default(),
            args.max_block.unwrap_or(Duration::MAX)
        )));
    }
    if args.wakers && args.unwind.unwind == UnwindMode::Dwarf {
        return Err(UsageError::error(
            "--wakers records stacks with frame pointers only; drop --unwind dwarf (or --wakers)",
        ));
    }
    let (as_root, duration) = (args.target.processes.as_root, args.duration);
    session::run(
        Offcpu {
            args,
            outputs: Vec::new(),
        },
        target,
        as_root,
        duration,
    )
}

/// `livetrace offcpu`, before anything is loaded.
pub(crate) struct Offcpu {
    args: Args,
    /// The outputs, default one included.
    outputs: Vec<OutputSpec>,
}

impl Offcpu {
    /// The tool, for `record` to run inside its own session.
    pub(crate) fn new(args: Args) -> Self {
        Self {
            args,
            outputs: Vec::new(),
        }
    }
}

/// `livetrace offcpu`, recording switches.
pub(crate) struct Tracing {
    args: Args,
    ebpf: Ebpf,
    /// The count map the programs add to.
    counts: bpf::counts::CountSlot,
    hook: &'static str,
    collector: Option<unwind::Collector>,
    /// The targets' CPython interpreters, whose frames the program reads (`--unwind dwarf`).
    python: crate::python::Watch,
    /// The processes to look for CPython in: those given, and the command.
    python_pids: Vec<u32>,
    new_processes: RingBuf<MapData>,
    context: BuildContext,
    outputs: Vec<OutputSpec>,
    /// When the programs stopped recording (CLOCK_MONOTONIC ns).
    end_ns: u64,
}

impl Tool for Offcpu {
    type Running = Tracing;
    const NAME: &'static str = "offcpu";

    fn privileges(&self, target: &Target) -> Privileges {
        let (needs, wanted) = privileges_for(&self.args, target);
        Privileges { needs, wanted }
    }

    fn prepare(&mut self, target: &Target) -> anyhow::Result<Vec<OutputSpec>> {
        self.outputs = self.args.outputs.clone();
        if self.outputs.is_empty() {
            let path = default_output_path(target);
            self.outputs
                .push(OutputSpec::parse(&path.to_string_lossy()).map_err(anyhow::Error::msg)?);
        }
        Ok(self.outputs.clone())
    }

    fn start(self, session: &mut Session) -> anyhow::Result<Tracing> {
        let args = self.args;
        let target = &session.target;
        let (tgids, tids) = match (target, session.command_pid) {
            (Target::Threads { pids, tids }, _) => (pids.clone(), tids.clone()),
            (Target::Command(_), Some(pid)) => (vec![pid], Vec::new()),
            _ => (Vec::new(), Vec::new()),
        };
        let mut notes = Vec::new();
        let stack_kinds = match (args.user_only, args.kernel_only) {
            (true, _) => STACK_KIND_USER,
            (_, true) => STACK_KIND_KERNEL,
            _ => STACK_KIND_USER | STACK_KIND_KERNEL,
        };
        let (dwarf, why) = choose_unwinding(&args, target, stack_kinds);
        let (min_block, max_block) = (
            args.min_block.unwrap_or(Duration::ZERO),
            args.max_block.unwrap_or(Duration::MAX),
        );
        let settings = StackSettings {
            filter: *target != Target::System,
            tgids,
            tids,
            stack_kinds,
            // Always per thread in the kernel: the summary reports by thread; outputs merge
            // threads unless --per-thread.
            per_thread: true,
            stack_storage: args.stack_storage,
            // With dwarf, the user stack is copied at each switch-out and unwound here.
            stack_copy_bytes: if dwarf {
                args.unwind.stack_copy_size
            } else {
                0
            },
            unwind_buffer: args.unwind.unwind_buffer_size,
            held_command: session.command_pid,
            fork_tgid_offset: None,
        };
        let offcpu = OffcpuSettings {
            state_mask: args.state.mask(),
            min_block_ns: u64::try_from(min_block.as_nanos()).unwrap_or(u64::MAX),
            max_block_ns: u64::try_from(max_block.as_nanos()).unwrap_or(u64::MAX),
            include_kernel_threads: args.include_kernel_threads,
            wakers: args.wakers,
            ..OffcpuSettings::default()
        };
        let python_pids: Vec<u32> = settings
            .tgids
            .iter()
            .copied()
            .chain(session.command_pid)
            .collect();
        let mut python = crate::python::Watch::default();
        // The window starts when the programs start recording (as the switch program is
        // attached): every block they time starts in it, and those found blocked start with it.
        let attach::Attached {
            mut ebpf,
            counts,
            hook,
            collector,
            since_ns: start_ns,
        } = attach::load_and_attach(
            args.attach,
            settings,
            offcpu,
            target,
            (&mut python, &python_pids),
            &mut notes,
        )?;
        // --wakers walks frame pointers only: no advice to try what it refuses.
        let unwind_mode = args.unwind.describe(
            collector.is_some(),
            stack_kinds,
            why.as_deref().filter(|_| collector.is_some() == dwarf),
            !args.wakers,
        );
        let blocked_at_start =
            seed_already_blocked(&mut ebpf, &args, target, start_ns, &mut notes)?;
        let context = BuildContext {
            title: session.title(),
            unwind_mode,
            notes,
            blocked_at_start,
            min_block,
            max_block,
            start_ns,
        };
        Ok(Tracing {
            new_processes: stacks::new_processes(&mut ebpf)?,
            args,
            ebpf,
            counts,
            hook,
            collector,
            python,
            python_pids,
            context,
            outputs: self.outputs,
            end_ns: 0,
        })
    }
}

/// Threads asleep now will not pass through sched_switch until they wake: finds them, recovers
/// their stacks, and starts their clocks at the window's start. One the programs have no entry
/// for was asleep since before they were attached (one that blocked since has one). Those in a
/// state --state leaves out are marked so, as if their switch-out had been seen.
fn seed_already_blocked(
    ebpf: &mut Ebpf,
    args: &Args,
    target: &Target,
    start_ns: u64,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<already_blocked::BlockedThread>> {
    let (blocked_at_start, left_out): (Vec<_>, Vec<_>) = match target {
        Target::Threads { pids, tids } => already_blocked::scan(pids, tids)
            .into_iter()
            .partition(|t| args.state.selects(t.state)),
        _ => Default::default(),
    };
    let unseeded = attach::seed_blocked(ebpf, &blocked_at_start, start_ns)?
        + attach::seed_blocked(ebpf, &left_out, START_FILTERED)?;
    if unseeded > 0 {
        notes.push(format!(
            "{unseeded} threads found blocked at the start could not be timed: the off-CPU \
             start map is full (it holds {MAX_THREADS} threads)"
        ));
    }
    Ok(blocked_at_start)
}

impl Running for Tracing {
    fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn start_line(&self, session: &Session) -> String {
        format!(
            "tracing off-CPU time of {} on {}",
            session.title(),
            self.hook
        )
    }

    fn on_event(&mut self, event: capture::Event, session: &mut Session) {
        let symbolizer = &mut session.symbolizer;
        if event == capture::Event::FastTick {
            // Cheap and urgent: processes the BPF programs just announced.
            stacks::note_new_processes(&mut self.new_processes, symbolizer);
            if let Some(collector) = &self.collector {
                collector.tell(symbolizer);
            }
            return;
        }
        // A process the BPF programs could not announce (counted) is still noted here.
        for pid in stacks::processes_seen(self.counts.current()) {
            symbolizer.note_process(pid);
        }
        if self.collector.is_some() {
            self.python
                .refresh(&mut self.ebpf, self.python_pids.iter().copied());
        }
        if event == capture::Event::Snapshot {
            let result = build(
                &self.ebpf,
                symbolizer,
                &self.args,
                &self.context,
                (monotonic_ns(), None),
                self.collector.as_ref().map(unwind::Collector::snapshot),
                (self.counts.current(), false),
            )
            .and_then(|(_, profile)| output::write_snapshot(&profile, &self.outputs));
            if let Err(err) = result {
                crate::say!("livetrace: snapshot failed: {err:#}");
            }
        }
    }

    fn stopped(&mut self, session: &mut Session) -> anyhow::Result<()> {
        self.end_ns = monotonic_ns();
        let symbolizer = &mut session.symbolizer;
        stacks::note_new_processes(&mut self.new_processes, symbolizer);
        self.context.notes.push(bpf::in_kernel_cost(&self.ebpf));
        for pid in stacks::processes_seen(self.counts.current()) {
            symbolizer.note_process(pid);
        }
        if let Some(collector) = &self.collector {
            collector.tell(symbolizer);
        }
        Ok(())
    }

    fn finish(
        mut self,
        session: &mut Session,
        stop: &StopReason,
        _elapsed: Duration,
    ) -> anyhow::Result<()> {
        self.context.notes.append(&mut session.notes);
        let symbolizer = &mut session.symbolizer;
        let unwound = self.collector.map(|c| c.finish(symbolizer)).transpose()?;
        // The window is what blocks were measured against: from seeding the clocks to the end.
        let elapsed = Duration::from_nanos(self.end_ns.saturating_sub(self.context.start_ns));
        let (by_thread, profile) = build(
            &self.ebpf,
            symbolizer,
            &self.args,
            &self.context,
            (self.end_ns, Some(stop)),
            unwound,
            (self.counts.current(), false),
        )?;
        let counters = bpf::read_counters_in(&self.ebpf)?;
        drop(self.ebpf);
        let written = output::write_stack_profile(&profile, &self.outputs);
        let mut summary = Vec::new();
        offcpu_summary::write(&by_thread, elapsed, &mut summary)?;
        if self.outputs.iter().any(|o| o.path.is_none()) {
            crate::say_raw!("{}", String::from_utf8_lossy(&summary));
        } else {
            crate::console::stdout(&summary);
        }
        if profile.total_weight() == 0 {
            crate::say!("livetrace: {}", why_nothing(&self.args, &counters));
        }
        output::report_footer_and_files(&profile, &written);
        written.finish()
    }
}

impl Tracing {
    /// Takes the blocks that ended since the last take out of the maps (and out of the
    /// unwinding thread), as a profile: `record`'s time buckets. A block counts whole in the
    /// bucket where it ends. Its counters are the capture's so far.
    pub(crate) fn take_bucket(
        &mut self,
        symbolizer: &mut crate::symbolize::Symbolizer,
    ) -> anyhow::Result<crate::model::StackProfile> {
        stacks::note_new_processes(&mut self.new_processes, symbolizer);
        if let Some(collector) = &self.collector {
            collector.tell(symbolizer);
        }
        let unwound = self.collector.as_ref().map(unwind::Collector::take);
        // The waker pairs are read in place, never taken: every bucket would count them all.
        anyhow::ensure!(!self.args.wakers, "--wakers cannot be recorded in buckets");
        let taken = self.counts.swap(&mut self.ebpf)?;
        let (_, profile) = build(
            &self.ebpf,
            symbolizer,
            &self.args,
            &self.context,
            (monotonic_ns(), None),
            unwound,
            (&taken, true),
        )?;
        Ok(profile)
    }

    /// Sets its control slot (`record` runs offcpu beside profile, whose object the session
    /// starts and stops).
    pub(crate) fn set_control(&mut self, value: u32) -> anyhow::Result<()> {
        bpf::set_control(&mut self.ebpf, value)
    }
}

/// Fails, naming them, without the capabilities the run needs; warns about the ones that only
/// the recovery of threads already blocked at the start uses.
/// Whether user stacks are copied and unwound here, and why when `auto` chose. Copying costs
/// about twice as much per context switch as walking frame pointers, so `auto` copies only for
/// targets whose code (the program, or a library it maps, libc included) lacks them; the whole
/// system is walked with frame pointers.
fn choose_unwinding(args: &Args, target: &Target, stack_kinds: u8) -> (bool, Option<String>) {
    if stack_kinds & STACK_KIND_USER == 0 {
        return (false, None);
    }
    match args.unwind.unwind {
        UnwindMode::Fp => (false, None),
        UnwindMode::Dwarf => (true, None),
        UnwindMode::Auto if args.wakers => {
            (false, Some("--wakers records frame-pointer stacks".into()))
        }
        UnwindMode::Auto => {
            let missing = match target {
                Target::System => return (false, Some("the whole system".into())),
                Target::Threads { pids, tids } => pids
                    .iter()
                    .chain(tids)
                    .filter_map(|&id| crate::proc::task::thread_group_of(id))
                    .find_map(|pid| {
                        frame_pointers::missing_in_process(pid)
                            .map(|why| format!("pid {pid}: {why}"))
                    }),
                Target::Command(argv) => {
                    let program = argv.first().map(std::path::PathBuf::from);
                    let program = program.and_then(|p| {
                        if p.components().count() > 1 {
                            Some(p)
                        } else {
                            crate::session::command::which(p.as_os_str())
                        }
                    });
                    program.and_then(|p| frame_pointers::missing_in_command(&p))
                }
            };
            match missing {
                Some(why) => (true, Some(why)),
                None => (false, Some("the target's code has frame pointers".into())),
            }
        }
    }
}

/// The capabilities the run needs, and those only the recovery of threads already blocked at
/// the start uses (warned about when missing).
fn privileges_for(args: &Args, target: &Target) -> (Vec<Need>, Vec<Need>) {
    let mut needs = vec![privileges::BPF, privileges::PERFMON];
    let kernel_stacks = !args.user_only;
    if kernel_stacks && privileges::kernel_symbols_hidden() {
        needs.push(privileges::KALLSYMS);
    }
    if args.attach == Attach::Tracepoint {
        match tracefs::status() {
            tracefs::Status::Readable(_) => {}
            tracefs::Status::Unreadable(_) => needs.push(privileges::TRACEFS_READ),
            tracefs::Status::NotMounted => {
                needs.push(privileges::TRACEFS_MOUNT);
                needs.push(privileges::TRACEFS_READ);
            }
        }
    }
    let mut wanted = Vec::new();
    if let Target::Threads { pids, tids } = target {
        if kernel_stacks {
            wanted.push(privileges::RECOVER_KERNEL_STACKS);
        }
        let ids: Vec<u32> = pids.iter().chain(tids).copied().collect();
        if !args.kernel_only && privileges::ptrace_need(&ids).is_some() {
            wanted.extend(privileges::RECOVER_USER_STACKS);
        }
    }
    (needs, wanted)
}

fn default_output_path(target: &Target) -> PathBuf {
    PathBuf::from(format!(
        "livetrace-offcpu-{}-{}.svg",
        target.file_stem(),
        crate::timestamp()
    ))
}
