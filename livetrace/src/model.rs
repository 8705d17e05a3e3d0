//! The stack-profile model that every stack tool produces and every renderer reads: weighted
//! stacks (root first) plus the data-quality record of how they were obtained. It knows nothing
//! about BPF or file formats.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

/// The module kernel frames are in: the name perf and pprof tools give the kernel's
/// pseudo-module.
pub const KERNEL_MODULE: &str = "[kernel.kallsyms]";
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

    /// The weight in nanoseconds of what was measured, where that is known: blocked time
    /// always, CPU time given the sampling period.
    pub fn nanoseconds(self, weight: u64, period_ns: Option<u64>) -> Option<u64> {
        match self {
            Self::Samples => period_ns.map(|p| weight.saturating_mul(p)),
            Self::Microseconds => Some(weight.saturating_mul(1000)),
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

/// One frame of a stack. Besides its name and kind, a frame may say where it came from, for
/// formats that carry locations (pprof, speedscope); folded stacks, flamegraphs and the summary
/// read only the name and kind (see [`StackProfile::by_name`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame {
    pub name: String,
    pub kind: FrameKind,
    /// The executable or library (path as the process mapped it), `[kernel.kallsyms]` for kernel
    /// frames, or `None` where unknown.
    pub module: Option<Arc<str>>,
    /// The instruction address the frame was symbolised from: for user frames the address in the
    /// module's own ELF address space (as `readelf` shows it), for kernel frames the kernel
    /// address. A call site's address points into the call instruction.
    pub address: Option<u64>,
    /// This frame was inlined into the frame before it: both come from the same address.
    pub inlined: bool,
    /// Source file and line of the address within this function, when debug info has them.
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
}

impl Frame {
    /// A frame named `name`, sanitised (see [`crate::names`]): frames are read from processes
    /// and from files of other tools.
    pub fn new(kind: FrameKind, name: impl Into<String>) -> Self {
        let name = name.into();
        let name = match crate::names::sanitize(&name) {
            std::borrow::Cow::Borrowed(_) => name,
            std::borrow::Cow::Owned(clean) => clean,
        };
        Self {
            name,
            kind,
            module: None,
            address: None,
            inlined: false,
            file: None,
            line: None,
        }
    }

    /// The frame with only its name and kind, as name-based renderers see it.
    pub fn name_only(&self) -> Self {
        Self::new(self.kind, self.name.clone())
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
    /// When it started, in nanoseconds since the Unix epoch, where known.
    pub started_unix_ns: Option<u64>,
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
    /// `--unwind dwarf`: weight whose user stack was unwound only part of the way, by cause.
    pub stacks_cut_short: BTreeMap<String, u64>,
    /// `--unwind dwarf`: samples lost because the ring buffer to user space was full.
    pub unwind_ring_full: u64,
    /// How user stacks were walked ("frame pointers", "DWARF CFI ..."), where it applies.
    pub unwind_mode: Option<String>,
    /// Weight with at least one unresolved frame, and the frames by reason.
    pub unknown_weight: u64,
    pub unknown_frames: BTreeMap<String, u64>,
    /// Free-form notes (target exited, rate clamped, in-kernel cost...).
    pub notes: Vec<String>,
    /// Remedies for the losses seen, e.g. "raise --stack-storage-size".
    pub advice: Vec<String>,
    /// What ended the capture ("the requested duration elapsed", "SIGINT received ..."), for
    /// machine-readable outputs; `None` where not recorded (e.g. a profile read from a file).
    pub stop_reason: Option<String>,
}

/// A function's weight in a profile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FunctionWeight {
    /// Where it is the leaf.
    pub self_weight: u64,
    /// Where it is anywhere in the stack.
    pub total: u64,
}

/// A complete profile: stacks, their unit, and their data quality.
#[derive(Clone, Debug, PartialEq)]
pub struct StackProfile {
    /// What was profiled, for titles ("pid 1234 (chain)", "the whole system").
    pub title: String,
    pub unit: WeightUnit,
    /// For sampled profiles, the time one sample stands for (1e9 / Hz), so that formats that
    /// count time (pprof's cpu/nanoseconds) can; `None` where unknown.
    pub period_ns: Option<u64>,
    pub stacks: Vec<WeightedStack>,
    pub quality: DataQuality,
    /// GNU build IDs (hex) of the frames' modules, where known.
    pub build_ids: BTreeMap<Arc<str>, String>,
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

    /// The stacks with frames reduced to name and kind, merged and ordered: what folded stacks,
    /// flamegraphs and the summary show. Stacks that differ only by address become one.
    pub fn by_name(&self) -> Vec<WeightedStack> {
        let mut merged: HashMap<Vec<Frame>, u64> = HashMap::with_capacity(self.stacks.len());
        for stack in &self.stacks {
            let frames = stack.frames.iter().map(Frame::name_only).collect();
            *merged.entry(frames).or_default() += stack.weight;
        }
        sorted_stacks(merged)
    }

    /// Self and total weight of every frame name (display name) but the process and thread
    /// frames: self where it is the leaf, total where it is anywhere in the stack (counted once
    /// per stack, so recursion does not inflate it).
    pub fn function_weights(&self) -> BTreeMap<String, FunctionWeight> {
        let mut weights: BTreeMap<String, FunctionWeight> = BTreeMap::new();
        for stack in &self.stacks {
            let mut seen = std::collections::HashSet::new();
            for frame in &stack.frames {
                if matches!(frame.kind, FrameKind::Process | FrameKind::Thread) {
                    continue;
                }
                let name = frame.display_name();
                if seen.insert(name.clone()) {
                    weights.entry(name).or_default().total += stack.weight;
                }
            }
            if let Some(leaf) = stack
                .frames
                .last()
                .filter(|f| !matches!(f.kind, FrameKind::Process | FrameKind::Thread))
            {
                weights.entry(leaf.display_name()).or_default().self_weight += stack.weight;
            }
        }
        weights
    }

    /// Merges stacks with identical frames and orders them by frames, so output is deterministic.
    pub fn normalize(&mut self) {
        let mut merged: HashMap<Vec<Frame>, u64> = HashMap::with_capacity(self.stacks.len());
        for stack in self.stacks.drain(..) {
            *merged.entry(stack.frames).or_default() += stack.weight;
        }
        merged.retain(|_, weight| *weight > 0);
        self.stacks = sorted_stacks(merged);
    }
}

/// Merged stacks in frame order. Merged in a hash map and sorted once: a sorted map compares
/// whole stacks (string by string) at every insertion, which cost the static (musl) build,
/// whose memcmp is a byte loop, 14% of a capture's CPU time.
fn sorted_stacks(merged: HashMap<Vec<Frame>, u64>) -> Vec<WeightedStack> {
    let mut stacks: Vec<WeightedStack> = merged
        .into_iter()
        .map(|(frames, weight)| WeightedStack { frames, weight })
        .collect();
    stacks.sort_unstable_by(|a, b| a.frames.cmp(&b.frames));
    stacks
}
