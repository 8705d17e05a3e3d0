//! The capture's run loop, shared by every tool: run until the duration ends, Ctrl-C, SIGTERM or
//! SIGHUP arrives, or the targets are gone; call the tool back meanwhile, often (to read the
//! processes the BPF programs announce while their memory maps can still be read, however short
//! their lives) and once a second (slower chores). The observed process never waits
//! on any of this: the BPF programs aggregate in the kernel.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::targets::{self, HeldCommand, Target};

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

/// Which of the tool's periodic chores is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tick {
    /// Every [`FAST_TICK`]: cheap work that cannot wait (a process seen for the first time
    /// may exit within a second).
    Fast,
    /// Every [`TICK`].
    Second,
}

/// How often the tool is called back for its slower chores.
const TICK: Duration = Duration::from_secs(1);
/// How often the tool is called back for its urgent, cheap chores.
const FAST_TICK: Duration = Duration::from_millis(50);
/// How often the liveness of `-p`/`-t` targets is checked.
const LIVENESS_POLL: Duration = Duration::from_millis(200);

/// Runs until a stop condition; returns why and how long it ran.
pub async fn run(
    duration: Option<Duration>,
    mut watch: Watch<'_>,
    mut on_tick: impl FnMut(Tick),
) -> anyhow::Result<(StopReason, Duration)> {
    let start = Instant::now();
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
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
            _ = interrupt.recv() => break StopReason::Signal("SIGINT (Ctrl-C)"),
            _ = terminate.recv() => break StopReason::Signal("SIGTERM"),
            _ = hangup.recv() => break StopReason::Signal("SIGHUP"),
            status = command_exit(&mut watch) => break StopReason::CommandExited(status),
            _ = tick.tick() => on_tick(Tick::Second),
            _ = fast_tick.tick() => on_tick(Tick::Fast),
            _ = liveness.tick() => {
                if let Watch::Ids { pids, tids } = &watch
                    && !pids.iter().chain(tids.iter()).any(|&id| targets::is_alive(id))
                {
                    break StopReason::TargetsExited;
                }
            }
        }
    };
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
