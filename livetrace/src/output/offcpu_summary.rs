//! The terminal summary of an off-CPU profile: per thread, the share of the window it spent
//! blocked, and its top blocked stacks with their time, each shortened to the user frames that
//! led there and the kernel function it waited in.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    time::Duration,
};

use crate::model::{Frame, FrameKind, StackProfile};

const MAX_THREADS: usize = 12;
const STACKS_PER_THREAD: usize = 3;
const USER_TAIL: usize = 5;

/// A thread's total blocked time and its stacks with their weights.
type ThreadStacks<'a> = (u64, Vec<(u64, &'a [Frame])>);

/// `profile` must have been built with per-thread frames (weights in microseconds).
pub fn write<W: Write>(profile: &StackProfile, window: Duration, mut out: W) -> io::Result<()> {
    let window_us = window.as_secs_f64() * 1e6;
    let mut threads: BTreeMap<String, ThreadStacks<'_>> = BTreeMap::new();
    for stack in &profile.stacks {
        let thread = stack
            .frames
            .iter()
            .find(|f| f.kind == FrameKind::Thread)
            .map_or_else(|| "(all threads)".to_owned(), |f| f.name.clone());
        let entry = threads.entry(thread).or_default();
        entry.0 += stack.weight;
        entry.1.push((stack.weight, &stack.frames));
    }
    let mut threads: Vec<_> = threads.into_iter().collect();
    threads.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
    writeln!(
        out,
        "Blocked time by thread in {} over {:.2} s (off-CPU; share of the window):",
        profile.title,
        window.as_secs_f64()
    )?;
    if threads.is_empty() {
        writeln!(out, "  (nothing recorded)")?;
    }
    for (thread, (total, mut stacks)) in threads.into_iter().take(MAX_THREADS) {
        let share = if window_us > 0.0 {
            total as f64 * 100.0 / window_us
        } else {
            0.0
        };
        writeln!(out, "  {share:5.1}%  {thread}  {} blocked", human_us(total))?;
        stacks.sort_by_key(|&(weight, _)| std::cmp::Reverse(weight));
        for (weight, frames) in stacks.into_iter().take(STACKS_PER_THREAD) {
            writeln!(
                out,
                "          {:>9}  {}",
                human_us(weight),
                short_path(frames)
            )?;
        }
    }
    Ok(())
}

/// The user frames nearest the block, then the kernel function it waited in (the innermost one
/// that is not scheduler machinery).
fn short_path(frames: &[Frame]) -> String {
    let mut parts: Vec<String> = frames
        .iter()
        .filter(|f| f.kind == FrameKind::Lost)
        .map(Frame::display_name)
        .collect();
    let user: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.kind == FrameKind::User)
        .collect();
    if user.len() > USER_TAIL {
        parts.push("…".into());
    }
    parts.extend(
        user[user.len().saturating_sub(USER_TAIL)..]
            .iter()
            .map(|f| f.display_name()),
    );
    let scheduler = ["schedule", "finish_task_switch", "context_switch"];
    if let Some(wait) = frames
        .iter()
        .rev()
        .filter(|f| f.kind == FrameKind::Kernel)
        .find(|f| !scheduler.iter().any(|s| f.name.contains(s)))
    {
        parts.push(wait.display_name());
    }
    parts.join(" > ")
}

/// 1234567 us as "1.23 s", 4200 as "4.2 ms", 12 as "12 us".
pub fn human_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} us"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataQuality, WeightUnit, WeightedStack};

    fn stack(names: &[(FrameKind, &str)], weight: u64) -> WeightedStack {
        WeightedStack {
            frames: names.iter().map(|(k, n)| Frame::new(*k, *n)).collect(),
            weight,
        }
    }

    /// Threads are ranked by blocked time with their share of the window, and each stack is
    /// shortened to its user tail and the kernel function it waited in.
    #[test]
    fn ranks_threads_and_shortens_stacks() {
        use FrameKind::*;
        let profile = StackProfile {
            title: "pid 7 (app)".into(),
            unit: WeightUnit::Microseconds,
            stacks: vec![
                stack(
                    &[
                        (Process, "app"),
                        (Thread, "reader-8"),
                        (User, "main"),
                        (User, "read_loop"),
                        (User, "read"),
                        (Kernel, "ksys_read"),
                        (Kernel, "pipe_read"),
                        (Kernel, "schedule"),
                        (Kernel, "__schedule"),
                    ],
                    2_000_000,
                ),
                stack(
                    &[(Process, "app"), (Thread, "napper-9"), (User, "nap")],
                    500_000,
                ),
            ],
            quality: DataQuality::default(),
            period_ns: None,
            build_ids: Default::default(),
        };
        let mut out = Vec::new();
        write(&profile, Duration::from_secs(2), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Blocked time by thread in pid 7 (app) over 2.00 s (off-CPU; share of the window):\n\
             \x20 100.0%  reader-8  2.00 s blocked\n\
             \x20            2.00 s  main > read_loop > read > pipe_read_[k]\n\
             \x20  25.0%  napper-9  500.0 ms blocked\n\
             \x20          500.0 ms  nap\n"
        );
    }
}
