//! The machine-readable summary (`.json`) of a stack profile: totals and their unit, duration,
//! what ended the capture, the top functions by self and by total weight, and every data-quality
//! counter. Its schema is `docs/profile-summary.schema.json` (documented in docs/outputs.md);
//! the document names its format and version, and fields are only ever added within a version.

use std::{
    collections::BTreeMap,
    io::{self, Write},
};

use serde::{Deserialize, Serialize};

use crate::model::{FrameKind, StackProfile, WeightUnit};

pub const FORMAT: &str = "livetrace-stack-summary";
pub const VERSION: u32 = 1;
/// How many functions each top list holds at most.
pub const TOP: usize = 50;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub format: String,
    pub version: u32,
    /// `on-cpu` or `off-cpu`.
    pub kind: String,
    pub title: String,
    /// What weights count: `samples` (on-CPU) or `microseconds` (off-CPU, blocked time).
    pub unit: String,
    /// Sum of all weights.
    pub total: u64,
    /// The total as time, where known: blocked time, or samples × sampling period.
    pub total_nanoseconds: Option<u64>,
    /// The time one sample stands for (1e9 / Hz), for on-CPU profiles.
    pub sample_period_nanoseconds: Option<u64>,
    pub duration_seconds: f64,
    pub started_unix_nanoseconds: Option<u64>,
    pub stop_reason: Option<String>,
    /// Whether stacks carry a thread frame (`--per-thread`).
    pub per_thread: bool,
    /// The processes (root frames) with their weight, heaviest first.
    pub processes: Vec<Share>,
    /// Functions by self weight (where they are the leaf), heaviest first.
    pub top_self: Vec<FunctionShare>,
    /// Functions by total weight (anywhere in the stack), heaviest first.
    pub top_total: Vec<FunctionShare>,
    pub data_quality: Quality,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    pub name: String,
    pub weight: u64,
    /// weight / total, 0 to 1.
    pub share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionShare {
    /// As folded stacks spell it: kernel functions end in `_[k]`.
    pub name: String,
    #[serde(rename = "self")]
    pub self_weight: u64,
    pub self_share: f64,
    pub total: u64,
    pub total_share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quality {
    pub events: u64,
    pub recorded: u64,
    pub idle: u64,
    pub not_target: u64,
    pub counts_map_full: u64,
    pub expected: Option<u64>,
    /// Weight whose stack is missing or cut short, by cause.
    pub stack_losses: BTreeMap<String, u64>,
    /// `--unwind dwarf`: weight whose user stack was unwound only part of the way, by cause.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stacks_cut_short: BTreeMap<String, u64>,
    /// `--unwind dwarf`: samples lost because the ring buffer to user space was full.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unwind_ring_full: u64,
    /// Weight with at least one unresolved frame, and that weight by reason.
    pub unknown_weight: u64,
    pub unknown_frames: BTreeMap<String, u64>,
    pub notes: Vec<String>,
    pub advice: Vec<String>,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub fn write<W: Write>(profile: &StackProfile, mut out: W) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut out, &summarize(profile)).map_err(io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

pub fn summarize(profile: &StackProfile) -> Summary {
    let total = profile.total_weight();
    let share = |w: u64| {
        if total == 0 {
            0.0
        } else {
            w as f64 / total as f64
        }
    };
    let functions = profile.function_weights();
    let top = |key: fn(&crate::model::FunctionWeight) -> u64| -> Vec<FunctionShare> {
        let mut list: Vec<_> = functions.iter().filter(|(_, w)| key(w) > 0).collect();
        list.sort_by(|a, b| key(b.1).cmp(&key(a.1)).then_with(|| a.0.cmp(b.0)));
        list.into_iter()
            .take(TOP)
            .map(|(name, w)| FunctionShare {
                name: name.clone(),
                self_weight: w.self_weight,
                self_share: share(w.self_weight),
                total: w.total,
                total_share: share(w.total),
            })
            .collect()
    };
    let mut processes: BTreeMap<&str, u64> = BTreeMap::new();
    for stack in &profile.stacks {
        if let Some(root) = stack
            .frames
            .first()
            .filter(|f| f.kind == FrameKind::Process)
        {
            *processes.entry(&root.name).or_default() += stack.weight;
        }
    }
    let mut processes: Vec<Share> = processes
        .into_iter()
        .map(|(name, weight)| Share {
            name: name.to_owned(),
            weight,
            share: share(weight),
        })
        .collect();
    processes.sort_by(|a, b| b.weight.cmp(&a.weight).then_with(|| a.name.cmp(&b.name)));
    let q = &profile.quality;
    Summary {
        format: FORMAT.into(),
        version: VERSION,
        kind: match profile.unit {
            WeightUnit::Samples => "on-cpu",
            WeightUnit::Microseconds => "off-cpu",
        }
        .into(),
        title: profile.title.clone(),
        unit: match profile.unit {
            WeightUnit::Samples => "samples",
            WeightUnit::Microseconds => "microseconds",
        }
        .into(),
        total,
        total_nanoseconds: profile.unit.nanoseconds(total, profile.period_ns),
        sample_period_nanoseconds: match profile.unit {
            WeightUnit::Samples => profile.period_ns,
            WeightUnit::Microseconds => None,
        },
        duration_seconds: q.duration.as_secs_f64(),
        started_unix_nanoseconds: q.started_unix_ns,
        stop_reason: q.stop_reason.clone(),
        per_thread: profile
            .stacks
            .iter()
            .any(|s| s.frames.iter().any(|f| f.kind == FrameKind::Thread)),
        processes,
        top_self: top(|w| w.self_weight),
        top_total: top(|w| w.total),
        data_quality: Quality {
            events: q.events,
            recorded: q.recorded,
            idle: q.idle,
            not_target: q.not_target,
            counts_map_full: q.counts_map_full,
            expected: q.expected,
            stack_losses: q.stack_losses.clone(),
            stacks_cut_short: q.stacks_cut_short.clone(),
            unwind_ring_full: q.unwind_ring_full,
            unknown_weight: q.unknown_weight,
            unknown_frames: q.unknown_frames.clone(),
            notes: q.notes.clone(),
            advice: q.advice.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataQuality, Frame, WeightedStack};

    fn profile() -> StackProfile {
        use FrameKind::*;
        let stack = |names: &[(FrameKind, &str)], weight| WeightedStack {
            frames: names.iter().map(|(k, n)| Frame::new(*k, *n)).collect(),
            weight,
        };
        let mut profile = StackProfile {
            title: "pid 42 (app)".into(),
            unit: WeightUnit::Samples,
            period_ns: Some(10_101_010),
            stacks: vec![
                stack(
                    &[(Process, "app"), (User, "main"), (User, "a"), (User, "hot")],
                    6,
                ),
                stack(
                    &[(Process, "app"), (User, "main"), (User, "b"), (User, "hot")],
                    1,
                ),
                stack(&[(Process, "app"), (User, "main"), (Kernel, "read")], 3),
            ],
            quality: DataQuality {
                duration: std::time::Duration::from_millis(2500),
                events: 11,
                recorded: 10,
                idle: 1,
                stop_reason: Some("the requested duration elapsed".into()),
                stack_losses: [("user stack: hash collision in the stack map".to_owned(), 1)]
                    .into(),
                ..DataQuality::default()
            },
            build_ids: Default::default(),
        };
        profile.normalize();
        profile
    }

    /// Shares, top lists (self and total, kernel suffix included), totals as time and the
    /// data-quality counters; golden file `tests/data/summary.json`, and it reads back into the
    /// documented structure without unknown fields.
    #[test]
    fn summarizes_with_shares_and_quality() {
        let profile = profile();
        let summary = summarize(&profile);
        assert_eq!(summary.total, 10);
        assert_eq!(summary.total_nanoseconds, Some(101_010_100));
        assert_eq!(summary.top_self[0].name, "hot");
        assert!((summary.top_self[0].self_share - 0.7).abs() < 1e-9);
        assert_eq!(summary.top_self[1].name, "read_[k]");
        assert_eq!(summary.top_total[0].name, "main");
        assert!((summary.top_total[0].total_share - 1.0).abs() < 1e-9);
        assert!(!summary.per_thread);
        assert_eq!(summary.processes[0].name, "app");

        let mut out = Vec::new();
        write(&profile, &mut out).unwrap();
        crate::output::golden::check("summary.json", &out);
        let back: Summary = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, summary);
    }

    /// Off-CPU weights are blocked microseconds: the total as time is µs × 1000, and there is
    /// no sampling period.
    #[test]
    fn off_cpu_totals_are_time() {
        let mut profile = profile();
        profile.unit = WeightUnit::Microseconds;
        let summary = summarize(&profile);
        assert_eq!(
            (summary.kind.as_str(), summary.unit.as_str()),
            ("off-cpu", "microseconds")
        );
        assert_eq!(summary.total_nanoseconds, Some(10_000));
        assert_eq!(summary.sample_period_nanoseconds, None);
    }
}
