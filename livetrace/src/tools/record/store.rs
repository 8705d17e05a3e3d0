//! The recorder's memory: the last `--keep` of on-CPU and off-CPU stacks, in time buckets,
//! symbolised when each bucket was cut (a process that exits later is still named). Frames and
//! whole stacks are shared between buckets, so a stack seen in every bucket is stored once. When
//! the estimate of what is held passes `--max-memory`, the oldest buckets go first, counted.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::model::{DataQuality, Frame, StackProfile, WeightUnit, WeightedStack};

type Stack = Arc<[Arc<Frame>]>;

/// One part (on-CPU or off-CPU) of a bucket: its stacks and how they were obtained.
struct Part {
    stacks: Vec<(Stack, u64)>,
    quality: DataQuality,
}

/// What was recorded between two cuts.
struct Bucket {
    start: SystemTime,
    end: SystemTime,
    parts: [Option<Part>; 2],
}

/// Which profile of a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    OnCpu = 0,
    OffCpu = 1,
}

/// What every profile of one kind shares, taken from the first bucket.
#[derive(Clone)]
struct Header {
    title: String,
    unit: WeightUnit,
    period_ns: Option<u64>,
}

pub struct Store {
    buckets: VecDeque<Bucket>,
    headers: [Option<Header>; 2],
    frames: HashSet<Arc<Frame>>,
    stacks: HashSet<Stack>,
    keep: Duration,
    max_bytes: u64,
    /// The estimate of what the buckets hold, updated at each cut.
    bytes: u64,
    /// Buckets older than `keep`, dropped.
    pub expired: u64,
    /// Buckets dropped to stay under `max_bytes`, and the time they covered.
    pub evicted: u64,
    pub evicted_time: Duration,
}

/// The estimated cost of one entry of a hash set or vector beside its payload.
const ENTRY_OVERHEAD: u64 = 48;

impl Store {
    pub fn new(keep: Duration, max_bytes: u64) -> Self {
        Self {
            buckets: VecDeque::new(),
            headers: [None, None],
            frames: HashSet::new(),
            stacks: HashSet::new(),
            keep,
            max_bytes,
            bytes: 0,
            expired: 0,
            evicted: 0,
            evicted_time: Duration::ZERO,
        }
    }

    /// Adds the bucket `start..end`, then forgets what is older than `--keep` and, oldest first,
    /// what does not fit in `--max-memory`.
    pub fn add(&mut self, start: SystemTime, end: SystemTime, parts: [Option<StackProfile>; 2]) {
        let parts = parts.map(|part| {
            part.map(|profile| {
                let kind = usize::from(profile.unit == WeightUnit::Microseconds);
                self.headers[kind].get_or_insert_with(|| Header {
                    title: profile.title.clone(),
                    unit: profile.unit,
                    period_ns: profile.period_ns,
                });
                let stacks = profile
                    .stacks
                    .into_iter()
                    .filter(|s| s.weight > 0)
                    .map(|s| (self.intern(s.frames), s.weight))
                    .collect();
                Part {
                    stacks,
                    quality: profile.quality,
                }
            })
        });
        self.buckets.push_back(Bucket { start, end, parts });
        let oldest_kept = end.checked_sub(self.keep).unwrap_or(SystemTime::UNIX_EPOCH);
        while self.buckets.front().is_some_and(|b| b.end <= oldest_kept) {
            self.buckets.pop_front();
            self.expired += 1;
        }
        self.collect_garbage();
        while self.bytes > self.max_bytes && self.buckets.len() > 1 {
            if let Some(bucket) = self.buckets.pop_front() {
                self.evicted += 1;
                self.evicted_time += bucket.end.duration_since(bucket.start).unwrap_or_default();
            }
            self.collect_garbage();
        }
    }

    fn intern(&mut self, frames: Vec<Frame>) -> Stack {
        let frames: Vec<Arc<Frame>> = frames
            .into_iter()
            .map(|frame| match self.frames.get(&frame) {
                Some(shared) => shared.clone(),
                None => {
                    let shared = Arc::new(frame);
                    self.frames.insert(shared.clone());
                    shared
                }
            })
            .collect();
        let stack: Stack = frames.into();
        match self.stacks.get(&stack) {
            Some(shared) => shared.clone(),
            None => {
                self.stacks.insert(stack.clone());
                stack
            }
        }
    }

    /// Forgets the stacks and frames no bucket holds, and estimates what is held now.
    fn collect_garbage(&mut self) {
        self.stacks.retain(|s| Arc::strong_count(s) > 1);
        self.frames.retain(|f| Arc::strong_count(f) > 1);
        let frames: u64 = self
            .frames
            .iter()
            .map(|f| {
                let text = f.name.len() + f.file.as_ref().map_or(0, |s| s.len());
                (std::mem::size_of::<Frame>() + text) as u64 + ENTRY_OVERHEAD
            })
            .sum();
        let stacks: u64 = self
            .stacks
            .iter()
            .map(|s| (s.len() * 8) as u64 + 2 * ENTRY_OVERHEAD)
            .sum();
        let entries: u64 = self
            .buckets
            .iter()
            .flat_map(|b| b.parts.iter().flatten())
            .map(|p| (p.stacks.len() * 24) as u64 + ENTRY_OVERHEAD)
            .sum();
        self.bytes = frames + stacks + entries;
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// When the oldest bucket kept starts.
    pub fn oldest(&self) -> Option<SystemTime> {
        self.buckets.front().map(|b| b.start)
    }

    /// Where the last bucket that lies wholly within `from..=to` ends, if one does.
    pub fn last_end_within(&self, from: SystemTime, to: SystemTime) -> Option<SystemTime> {
        self.buckets
            .iter()
            .rev()
            .find(|b| b.start >= from && b.end <= to)
            .map(|b| b.end)
    }

    /// The profile of one kind over the buckets that lie wholly within `from..=to`, and the
    /// span they cover (`None` if no bucket does).
    pub fn window(
        &self,
        kind: Kind,
        from: SystemTime,
        to: SystemTime,
    ) -> Option<(StackProfile, SystemTime, SystemTime)> {
        let header = self.headers[kind as usize].as_ref()?;
        let chosen: Vec<&Bucket> = self
            .buckets
            .iter()
            .filter(|b| b.start >= from && b.end <= to)
            .collect();
        let (first, last) = (chosen.first()?, chosen.last()?);
        let mut profile = StackProfile {
            title: header.title.clone(),
            unit: header.unit,
            period_ns: header.period_ns,
            stacks: Vec::new(),
            quality: DataQuality::default(),
            build_ids: Default::default(),
        };
        for part in chosen
            .iter()
            .filter_map(|b| b.parts[kind as usize].as_ref())
        {
            profile
                .stacks
                .extend(part.stacks.iter().map(|(stack, weight)| WeightedStack {
                    frames: stack.iter().map(|f| Frame::clone(f)).collect(),
                    weight: *weight,
                }));
            add_quality(&mut profile.quality, &part.quality);
        }
        profile.normalize();
        Some((profile, first.start, last.end))
    }
}

/// Adds one bucket's data-quality record to a window's.
fn add_quality(sum: &mut DataQuality, part: &DataQuality) {
    let first = sum.duration.is_zero() && sum.started_unix_ns.is_none();
    if first {
        sum.started_unix_ns = part.started_unix_ns;
        sum.unwind_mode.clone_from(&part.unwind_mode);
    }
    sum.duration += part.duration;
    sum.events += part.events;
    sum.recorded += part.recorded;
    sum.idle += part.idle;
    sum.not_target += part.not_target;
    sum.counts_map_full += part.counts_map_full;
    sum.unwind_ring_full += part.unwind_ring_full;
    sum.unknown_weight += part.unknown_weight;
    sum.expected = match (sum.expected, part.expected) {
        (Some(a), Some(b)) => Some(a + b),
        (None, b) if first => b,
        _ => None,
    };
    for (into, from) in [
        (&mut sum.stack_losses, &part.stack_losses),
        (&mut sum.stacks_cut_short, &part.stacks_cut_short),
        (&mut sum.unknown_frames, &part.unknown_frames),
    ] {
        for (cause, weight) in from {
            *into.entry(cause.clone()).or_default() += weight;
        }
    }
    for (into, from) in [
        (&mut sum.notes, &part.notes),
        (&mut sum.advice, &part.advice),
    ] {
        for line in from {
            if !into.contains(line) {
                into.push(line.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FrameKind;

    fn profile(unit: WeightUnit, leaf: &str, weight: u64) -> StackProfile {
        StackProfile {
            title: "t".into(),
            unit,
            period_ns: None,
            stacks: vec![WeightedStack {
                frames: vec![
                    Frame::new(FrameKind::Process, "p"),
                    Frame::new(FrameKind::User, leaf),
                ],
                weight,
            }],
            quality: DataQuality {
                duration: Duration::from_secs(1),
                events: weight,
                ..DataQuality::default()
            },
            build_ids: Default::default(),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + seconds)
    }

    #[test]
    fn a_window_holds_the_buckets_wholly_inside_it() {
        let mut store = Store::new(Duration::from_secs(60), u64::MAX);
        for (i, leaf) in ["old", "old", "new", "new"].iter().enumerate() {
            let i = i as u64;
            let on = profile(WeightUnit::Samples, leaf, 10 + i);
            store.add(at(i), at(i + 1), [Some(on), None]);
        }
        let leaves = |from, to| {
            let (p, start, end) = store.window(Kind::OnCpu, at(from), at(to)).unwrap();
            let names: Vec<(String, u64)> = p
                .stacks
                .iter()
                .map(|s| (s.frames[1].name.clone(), s.weight))
                .collect();
            (names, start, end, p.quality.events)
        };
        assert_eq!(leaves(0, 2), (vec![("old".into(), 21)], at(0), at(2), 21));
        // 1.5..4: the bucket 1..2 is only half inside, so it is left out.
        let (names, start, ..) = {
            let (p, start, end) = store
                .window(Kind::OnCpu, at(1) + Duration::from_millis(500), at(4))
                .unwrap();
            (p.stacks.len(), start, end)
        };
        assert_eq!((names, start), (1, at(2)));
        assert!(store.window(Kind::OffCpu, at(0), at(4)).is_none());
        // Where the whole buckets of a window end, without merging them.
        assert_eq!(store.last_end_within(at(0), at(2)), Some(at(2)));
        assert_eq!(
            store.last_end_within(at(3), at(4) - Duration::from_millis(1)),
            None
        );
    }

    #[test]
    fn old_buckets_expire_and_memory_evicts_the_oldest_counted() {
        let mut store = Store::new(Duration::from_secs(3), u64::MAX);
        for i in 0..10 {
            store.add(
                at(i),
                at(i + 1),
                [Some(profile(WeightUnit::Samples, "f", 1)), None],
            );
        }
        assert_eq!(store.oldest(), Some(at(7)));
        assert_eq!(store.evicted, 0);
        // A stack shared by every bucket is held once.
        assert_eq!(store.stacks.len(), 1);
        let one_bucket = store.bytes();
        let mut small = Store::new(Duration::from_secs(600), one_bucket);
        for i in 0..10 {
            let leaf = format!("f{i}");
            small.add(
                at(i),
                at(i + 1),
                [Some(profile(WeightUnit::Samples, &leaf, 1)), None],
            );
            assert!(small.bytes() <= one_bucket || small.buckets.len() == 1);
        }
        assert!(small.evicted >= 5, "evicted {}", small.evicted);
        assert_eq!(small.evicted_time, Duration::from_secs(small.evicted));
        assert_eq!(small.frames.len() as u64, 1 + small.buckets.len() as u64);
    }
}
