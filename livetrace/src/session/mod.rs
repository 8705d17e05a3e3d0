//! One capture session, shared by every tracing subcommand. [`run`] does, in order, what every
//! tool needs: check the target, the privileges, the PID namespace and the outputs before the
//! kernel is touched; start a command held; let the tool load and attach its programs; release
//! the command and move the control slot to running; run the capture loop until the duration,
//! a signal or the targets end it; stop the programs recording at once; detach them; and let the
//! tool build and write what it recorded. A tool keeps only what is its own ([`Tool`] before
//! the kernel is touched, [`Running`] after).

pub mod capture;
pub mod command;
pub mod targets;

use std::time::Duration;

use aya::Ebpf;
use livetrace_common::control;

use self::{
    capture::{Event, StopReason, Watch},
    command::HeldCommand,
    targets::Target,
};
use crate::{
    bpf,
    output::OutputSpec,
    privileges::{self, Need},
    symbolize::Symbolizer,
};

/// The capabilities a run needs: those without which it cannot run, and those without which
/// it runs with less (a warning says what).
#[derive(Default)]
pub struct Privileges {
    pub needs: Vec<Need>,
    pub wanted: Vec<Need>,
}

/// A tracing subcommand, before anything is loaded.
pub trait Tool {
    type Running: Running;
    /// The subcommand, for messages ("profile").
    const NAME: &'static str;
    /// The capabilities this run needs; checked first.
    fn privileges(&self, target: &Target) -> Privileges;
    /// What else can be checked before the kernel is touched (a function to find, say), once
    /// the privileges are known to be there; returns every output the run will write, default
    /// names included (the tool keeps them: a default name has the time in it).
    fn prepare(&mut self, target: &Target) -> anyhow::Result<Vec<OutputSpec>>;
    /// Loads and attaches the BPF programs. A command to run is started and held: nothing of
    /// it has run yet.
    fn start(self, session: &mut Session) -> anyhow::Result<Self::Running>;
}

/// A tracing subcommand whose programs are attached.
pub trait Running {
    fn ebpf(&mut self) -> &mut Ebpf;
    /// What the start line says is being captured: "profiling pid 1234 (app) at 99 Hz".
    fn start_line(&self, session: &Session) -> String;
    /// The command livetrace started has just been released (it runs from now on).
    fn command_released(&mut self, pid: u32, session: &mut Session) {
        let _ = (pid, session);
    }
    /// Called during the capture: often, every 250 ms, and on SIGUSR1 (see [`Event`]).
    fn on_event(&mut self, event: Event, session: &mut Session);
    /// The programs have stopped recording and are still attached: read what must be read
    /// before they are detached.
    fn stopped(&mut self, session: &mut Session) -> anyhow::Result<()> {
        let _ = session;
        Ok(())
    }
    /// The programs are detached: build and write what was recorded.
    fn finish(
        self,
        session: &mut Session,
        stop: &StopReason,
        elapsed: Duration,
    ) -> anyhow::Result<()>;
}

/// What every tool shares during a capture.
pub struct Session {
    pub target: Target,
    /// The pid of the command livetrace started, if it did.
    pub command_pid: Option<u32>,
    pub duration: Option<Duration>,
    pub symbolizer: Symbolizer,
    /// Notes for the footer that are not the tool's own (how the command ended).
    pub notes: Vec<String>,
}

impl Session {
    /// For titles and start lines: "pid 1234 (app)", "`./server --port 80` (pid 4321)".
    pub fn title(&self) -> String {
        match (&self.target, self.command_pid) {
            (Target::Command(_), Some(pid)) => format!("{} (pid {pid})", self.target.describe()),
            _ => self.target.describe(),
        }
    }

    /// The processes to watch from the start: those given, and the command.
    fn note_targets(&mut self) {
        if let Target::Threads { pids, tids } = &self.target {
            for &id in pids.iter().chain(tids) {
                if let Some(tgid) = crate::proc::task::thread_group_of(id) {
                    self.symbolizer.note_process(tgid);
                }
            }
        }
    }
}

/// Runs one capture of `tool` on `target` (already resolved), for `duration` or until stopped.
pub fn run<T: Tool>(
    tool: T,
    target: Target,
    as_root: bool,
    duration: Option<Duration>,
) -> anyhow::Result<()> {
    let mut tool = tool;
    let privileges = tool.privileges(&target);
    privileges::require(T::NAME, &privileges.needs)?;
    targets::require_host_pids()?;
    privileges::warn_missing(&privileges.wanted);
    let outputs = tool.prepare(&target)?;
    crate::output::preflight(&outputs)?;
    let mut command = match &target {
        Target::Command(argv) => Some(HeldCommand::spawn(argv, as_root)?),
        _ => None,
    };
    let mut session = Session {
        target,
        command_pid: command.as_ref().map(|c| c.pid),
        duration,
        symbolizer: Symbolizer::new(),
        notes: Vec::new(),
    };
    // Loading and attaching with the signals held back: a pending signal makes the verifier
    // give up (see signals::defer). They take effect in the capture loop.
    let deferred = crate::signals::defer();
    let mut running = tool.start(&mut session)?;
    session.note_targets();
    bpf::set_control(running.ebpf(), control::RUNNING)?;
    if let Some(command) = &mut command {
        command.release()?;
        session.symbolizer.note_process(command.pid);
        running.command_released(command.pid, &mut session);
    }
    crate::say!(
        "livetrace: {}{}",
        running.start_line(&session),
        capture::how_it_ends(duration)
    );

    drop(deferred);
    let runtime = capture::runtime()?;
    let target = session.target.clone();
    let watch = Watch::for_target(&target, command.as_mut());
    let (stop, elapsed) = runtime.block_on(capture::run(duration, watch, |event| {
        running.on_event(event, &mut session);
    }))?;
    // Recording stops at once; detaching can take a while (an RCU grace period) and must not
    // count.
    bpf::set_control(running.ebpf(), control::STOPPED)?;
    session
        .notes
        .extend(command.as_ref().and_then(|c| c.stopped.clone()));
    running.stopped(&mut session)?;
    bpf::unload_all(running.ebpf());
    if stop != StopReason::DurationElapsed {
        crate::say!("livetrace: {}", stop.describe());
    }
    running.finish(&mut session, &stop, elapsed)
}
