//! The data-quality footer that every output carries: how long, how much was seen, and every
//! loss by cause with what to do about it. Nothing that was dropped goes unmentioned.

use std::fmt::Write as _;

use crate::model::{StackProfile, WeightUnit};

/// A few lines for the terminal (stderr) and for text outputs.
pub fn text(profile: &StackProfile) -> String {
    let q = &profile.quality;
    let unit = profile.unit.short_name();
    let total = profile.total_weight();
    let mut out = String::new();
    let _ = write!(
        out,
        "data quality: {:.2} s, {} events seen, {} recorded",
        q.duration.as_secs_f64(),
        q.events,
        q.recorded
    );
    if profile.unit == WeightUnit::Microseconds {
        let _ = write!(out, " ({} us blocked in total)", total);
    }
    if let Some(expected) = q.expected {
        let _ = write!(out, "; {expected} expected for the whole system");
    }
    out.push('\n');
    if q.idle > 0 || q.not_target > 0 {
        let _ = writeln!(
            out,
            "  not recorded: {} on idle CPUs, {} from threads that are not targets",
            q.idle, q.not_target
        );
    }
    if let Some(mode) = &q.unwind_mode {
        let _ = writeln!(out, "  user stacks: {mode}");
    }
    let lost_events = q.counts_map_full + q.unwind_ring_full;
    let lost_stacks: u64 = q.stack_losses.values().sum();
    if lost_events == 0 && lost_stacks == 0 {
        let _ = writeln!(out, "  lost: nothing");
    } else {
        if q.counts_map_full > 0 {
            let _ = writeln!(
                out,
                "  lost: {} events because the counts map was full",
                q.counts_map_full
            );
        }
        if q.unwind_ring_full > 0 {
            let _ = writeln!(
                out,
                "  lost: {} stack records because the unwind ring buffer was full (raise \
                 --unwind-buffer-size, or lower --stack-copy-size or the sampling rate)",
                q.unwind_ring_full
            );
        }
        for (cause, weight) in &q.stack_losses {
            let _ = writeln!(
                out,
                "  stack missing ({cause}): {weight} {unit} ({:.1}%)",
                percent(*weight, total)
            );
        }
    }
    for (cause, weight) in &q.stacks_cut_short {
        let _ = writeln!(
            out,
            "  stack cut short ({cause}): {weight} {unit} ({:.1}%)",
            percent(*weight, total)
        );
    }
    if q.unknown_weight > 0 {
        let reasons: Vec<String> = q
            .unknown_frames
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  unresolved frames: {:.1}% of {unit} have at least one ({})",
            percent(q.unknown_weight, total),
            reasons.join(", ")
        );
    } else {
        let _ = writeln!(out, "  unresolved frames: none");
    }
    for note in &q.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    for advice in &q.advice {
        let _ = writeln!(out, "  hint: {advice}");
    }
    out
}

/// One line for places with little room (the flamegraph's subtitle).
pub fn one_line(profile: &StackProfile) -> String {
    let q = &profile.quality;
    let total = profile.total_weight();
    let lost = q.counts_map_full + q.unwind_ring_full + q.stack_losses.values().sum::<u64>();
    format!(
        "{:.2} s, {} {} recorded, {} lost, {:.1}% with unresolved frames",
        q.duration.as_secs_f64(),
        total,
        profile.unit.short_name(),
        lost,
        percent(q.unknown_weight, total)
    )
}

pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}
