//! The capture's run loop, shared by every tool: run until the duration ends, Ctrl-C, SIGTERM or
//! SIGHUP arrives, or the targets are gone; call the tool back meanwhile: often (to read the
//! processes the BPF programs announce while their memory maps can still be read, however short
//! their lives), every 250 ms (slower chores, such as re-reading the memory maps of processes
//! that are still settling), and on SIGUSR1 (to write a snapshot). The observed process never
//! waits on any of this: the BPF programs aggregate in the kernel.
//!
//! Once the loop has ended, a second SIGINT, SIGTERM or SIGHUP asks to hurry: symbolisation
//! checks between batches, and the outputs are then written with raw addresses, promptly,
//! instead of the user having to kill livetrace and lose the capture. The signals are caught
//! from the start of the process (`signals`), so one sent before the loop runs is not lost.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::{
    model::DataQuality,
    session::{command::HeldCommand, targets::Target},
    signals,
};

/// Why the capture ended; reported in the footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    DurationElapsed,
    Signal(&'static str),
    TargetsExited,
    CommandExited(String),
}

impl StopReason {
    pub fn describe(&self) -> String {
        match self {
            Self::DurationElapsed => "the requested duration elapsed".into(),
            Self::Signal(name) => format!("{name} received; the capture stopped early"),
            Self::TargetsExited => "every target exited before the end of the capture".into(),
            Self::CommandExited(status) => format!("the command exited ({status})"),
        }
    }
}

/// What the loop watches besides time and signals.
pub enum Watch<'a> {
    Nothing,
    Ids { pids: &'a [u32], tids: &'a [u32] },
    Command(&'a mut HeldCommand),
}

impl<'a> Watch<'a> {
    pub fn for_target(target: &'a Target, command: Option<&'a mut HeldCommand>) -> Self {
        match (target, command) {
            (_, Some(command)) => Self::Command(command),
            (Target::Threads { pids, tids }, None) => Self::Ids { pids, tids },
            _ => Self::Nothing,
        }
    }
}

/// Why the tool is called back during the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Every [`FAST_TICK`]: cheap work that cannot wait (a process seen for the first time may
    /// exit within a second).
    FastTick,
    /// Every [`TICK`]: slower chores.
    Tick,
    /// SIGUSR1: write a snapshot of every output, and go on.
    Snapshot,
}

/// How often the tool is called back during the capture.
// Often enough to snapshot a new process's memory map while it settles (and before a
// short-lived one exits).
const TICK: Duration = Duration::from_millis(250);
/// How often the tool is called back for its urgent, cheap chores.
const FAST_TICK: Duration = Duration::from_millis(50);
/// How often the liveness of `-p`/`-t` targets is checked.
const LIVENESS_POLL: Duration = Duration::from_millis(200);

/// Runs until a stop condition; returns why and how long it ran.
pub async fn run(
    duration: Option<Duration>,
    mut watch: Watch<'_>,
    mut on_event: impl FnMut(Event),
) -> anyhow::Result<(StopReason, Duration)> {
    let start = Instant::now();
    let signals = signals::Waiter::new().context("cannot watch for signals")?;
    let mut snapshots_taken = 0;
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(TICK);
    tick.tick().await;
    let mut fast_tick = tokio::time::interval(FAST_TICK);
    fast_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut liveness = tokio::time::interval(LIVENESS_POLL);
    let reason = loop {
        tokio::select! {
            () = &mut deadline => break StopReason::DurationElapsed,
            woken = signals.wait() => {
                woken.context("cannot watch for signals")?;
                if let Some(name) = signals::stop_requested() {
                    break StopReason::Signal(name);
                }
                // Several SIGUSR1s before the snapshot could be taken make one snapshot.
                let asked = signals::snapshots_requested();
                if asked != snapshots_taken {
                    snapshots_taken = asked;
                    on_event(Event::Snapshot);
                }
            }
            status = command_exit(&mut watch) => break StopReason::CommandExited(status),
            _ = tick.tick() => on_event(Event::Tick),
            _ = fast_tick.tick() => on_event(Event::FastTick),
            _ = liveness.tick() => {
                if let Watch::Ids { pids, tids } = &watch
                    && !pids.iter().chain(tids.iter()).any(|&id| crate::proc::task::is_alive(id))
                {
                    break StopReason::TargetsExited;
                }
            }
        }
    };
    signals::capture_ended();
    // A command that outlives the capture was started for it: stop it.
    if let Watch::Command(command) = &mut watch
        && !matches!(reason, StopReason::CommandExited(_))
    {
        command.stop().await;
    }
    if let StopReason::Signal(name) = reason {
        crate::say!(
            "livetrace: {name} received: writing the outputs (send it again to skip naming the \
             frames and write raw addresses)"
        );
    }
    Ok((reason, start.elapsed()))
}

async fn command_exit(watch: &mut Watch<'_>) -> String {
    match watch {
        Watch::Command(command) => match (&mut command.exited).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(err)) => format!("waiting for it failed: {err}"),
            Err(_) => "its waiter went away".into(),
        },
        _ => std::future::pending().await,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, so user space can compare
/// its own instants with the kernel's timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The end of every tool's start line: " for 5.0 s; Ctrl-C to stop early" or "; Ctrl-C to stop".
pub fn how_it_ends(duration: Option<Duration>) -> String {
    match duration {
        Some(d) => format!(" for {:.1} s; Ctrl-C to stop early", d.as_secs_f64()),
        None => "; Ctrl-C to stop".to_owned(),
    }
}

/// The single-threaded runtime [`run`] needs: the observed process is what matters, not us.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

/// The footer notes every stack tool adds about how its capture went: processes the BPF programs
/// could not announce (their frames may stay unnamed), and why it stopped, or that this is a
/// SIGUSR1 snapshot (`stop` is `None`).
pub fn note_capture_end(quality: &mut DataQuality, unannounced: u64, stop: Option<&StopReason>) {
    if unannounced > 0 {
        quality.notes.push(format!(
            "{unannounced} processes could not be announced when first seen (map or ring buffer \
             full); those that exited within a second may have unnamed frames"
        ));
    }
    match stop {
        Some(StopReason::DurationElapsed) => {}
        Some(stop) => quality
            .notes
            .push(format!("capture ended early: {}", stop.describe())),
        None => quality
            .notes
            .push("snapshot (SIGUSR1) taken while the capture goes on".into()),
    }
    quality.stop_reason = stop.map(StopReason::describe);
}
