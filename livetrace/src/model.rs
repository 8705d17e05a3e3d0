//! The stack-profile model that every stack tool produces and every renderer reads: weighted
//! stacks (root first) plus the data-quality record of how they were obtained. It knows nothing
//! about BPF or file formats.

use std::{collections::BTreeMap, time::Duration};

/// What a stack's weight counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightUnit {
    /// On-CPU samples.
    Samples,
    /// Off-CPU (blocked) time in microseconds.
    Microseconds,
}

impl WeightUnit {
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Samples => "samples",
            Self::Microseconds => "us",
        }
    }
}

/// The role of a frame, which decides how renderers decorate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameKind {
    /// The process name at the root.
    Process,
    /// `name-tid` under the process, with `--per-thread`.
    Thread,
    /// A user-space function (or `[module+0xoff]` / `[unknown]`).
    User,
    /// A kernel function; folded output suffixes it with `_[k]`.
    Kernel,
    /// A placeholder standing for a stack that could not be collected, named by cause.
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame {
    pub name: String,
    pub kind: FrameKind,
}

impl Frame {
    pub fn new(kind: FrameKind, name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind,
        }
    }

    /// The frame as folded stacks and flamegraphs spell it.
    pub fn display_name(&self) -> String {
        let clean = self.name.replace([';', '\n', '\r'], ":");
        match self.kind {
            FrameKind::Kernel => format!("{clean}_[k]"),
            _ => clean,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedStack {
    /// Root first: process, optional thread, user frames outermost first, then kernel frames.
    pub frames: Vec<Frame>,
    pub weight: u64,
}

/// Everything needed to judge how far to trust a profile: what was asked for, what was seen, and
/// every loss by cause. Renderers print it; nothing here is optional to report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataQuality {
    /// How long the capture ran.
    pub duration: Duration,
    /// Times the BPF program ran.
    pub events: u64,
    /// Events recorded into the profile.
    pub recorded: u64,
    /// Events on idle CPUs (not recorded).
    pub idle: u64,
    /// Events for threads that were not targets (not recorded).
    pub not_target: u64,
    /// Events lost because the counts map was full.
    pub counts_map_full: u64,
    /// Samples expected for a whole-system capture (CPUs x Hz x seconds), when meaningful.
    pub expected: Option<u64>,
    /// Weight whose stack is missing or cut short, by cause (e.g. "user stack: hash collision").
    pub stack_losses: BTreeMap<String, u64>,
    /// Weight with at least one unresolved frame, and the frames by reason.
    pub unknown_weight: u64,
    pub unknown_frames: BTreeMap<String, u64>,
    /// Free-form notes (target exited, rate clamped, in-kernel cost...).
    pub notes: Vec<String>,
    /// Remedies for the losses seen, e.g. "raise --stack-storage-size".
    pub advice: Vec<String>,
}

/// A complete profile: stacks, their unit, and their data quality.
#[derive(Clone, Debug, PartialEq)]
pub struct StackProfile {
    /// What was profiled, for titles ("pid 1234 (chain)", "the whole system").
    pub title: String,
    pub unit: WeightUnit,
    pub stacks: Vec<WeightedStack>,
    pub quality: DataQuality,
}

impl StackProfile {
    pub fn total_weight(&self) -> u64 {
        self.stacks.iter().map(|s| s.weight).sum()
    }

    /// The same profile with the per-thread frames taken out (and stacks merged again).
    pub fn without_threads(&self) -> Self {
        let mut profile = self.clone();
        for stack in &mut profile.stacks {
            stack.frames.retain(|f| f.kind != FrameKind::Thread);
        }
        profile.normalize();
        profile
    }

    /// Merges stacks with identical frames and orders them by frames, so output is deterministic.
    pub fn normalize(&mut self) {
        let mut merged: BTreeMap<Vec<Frame>, u64> = BTreeMap::new();
        for stack in self.stacks.drain(..) {
            *merged.entry(stack.frames).or_default() += stack.weight;
        }
        self.stacks = merged
            .into_iter()
            .filter(|(_, weight)| *weight > 0)
            .map(|(frames, weight)| WeightedStack { frames, weight })
            .collect();
    }
}
