//! speedscope output (`.speedscope.json`), in speedscope's own file format
//! (<https://www.speedscope.app/file-format-schema.json>): one `sampled` profile per process (per
//! thread with `--per-thread`), all sharing one frames table. A sample is a stack of frame
//! indices (root first, without the process and thread frames, which name the profile) with its
//! weight: a sample count for on-CPU profiles (unit `none`), blocked microseconds for off-CPU
//! ones (unit `microseconds`). Identical stacks are merged, so weights are not all 1.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Write},
};

use serde::{Deserialize, Serialize};

use crate::model::{FrameKind, StackProfile, WeightUnit};

pub const SCHEMA: &str = "https://www.speedscope.app/file-format-schema.json";

#[derive(Debug, Serialize, Deserialize)]
pub struct File {
    #[serde(rename = "$schema")]
    pub schema: String,
    pub shared: Shared,
    pub profiles: Vec<Profile>,
    pub name: String,
    #[serde(rename = "activeProfileIndex")]
    pub active_profile_index: usize,
    pub exporter: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Shared {
    pub frames: Vec<Frame>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Frame {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Profile {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub unit: String,
    #[serde(rename = "startValue")]
    pub start_value: u64,
    #[serde(rename = "endValue")]
    pub end_value: u64,
    pub samples: Vec<Vec<usize>>,
    pub weights: Vec<u64>,
}

pub fn write<W: Write>(profile: &StackProfile, mut out: W) -> io::Result<()> {
    serde_json::to_writer(&mut out, &build(profile)).map_err(io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

pub fn build(profile: &StackProfile) -> File {
    let unit = match profile.unit {
        WeightUnit::Samples => "none",
        WeightUnit::Microseconds => "microseconds",
    };
    let mut frames: Vec<Frame> = Vec::new();
    let mut frame_ids: HashMap<Frame, usize> = HashMap::new();
    // Profile name -> merged stacks of frame indices.
    let mut groups: BTreeMap<String, BTreeMap<Vec<usize>, u64>> = BTreeMap::new();
    for stack in &profile.stacks {
        let mut owner: Vec<&str> = Vec::new();
        let mut indices = Vec::with_capacity(stack.frames.len());
        for frame in &stack.frames {
            if matches!(frame.kind, FrameKind::Process | FrameKind::Thread) {
                owner.push(&frame.name);
                continue;
            }
            let key = Frame {
                name: frame.display_name(),
                file: frame.file.as_deref().map(str::to_owned),
            };
            let next = frames.len();
            let id = *frame_ids.entry(key.clone()).or_insert_with(|| {
                frames.push(key);
                next
            });
            indices.push(id);
        }
        let name = if owner.is_empty() {
            profile.title.clone()
        } else {
            owner.join(" / ")
        };
        *groups.entry(name).or_default().entry(indices).or_default() += stack.weight;
    }
    let profiles: Vec<Profile> = groups
        .into_iter()
        .map(|(name, stacks)| {
            let (samples, weights): (Vec<_>, Vec<_>) = stacks.into_iter().unzip();
            Profile {
                kind: "sampled".into(),
                name,
                unit: unit.into(),
                start_value: 0,
                end_value: weights.iter().sum(),
                samples,
                weights,
            }
        })
        .collect();
    let active_profile_index = profiles
        .iter()
        .enumerate()
        .max_by_key(|(i, p)| (p.end_value, std::cmp::Reverse(*i)))
        .map_or(0, |(i, _)| i);
    let kind = match profile.unit {
        WeightUnit::Samples => "On-CPU",
        WeightUnit::Microseconds => "Off-CPU",
    };
    File {
        schema: SCHEMA.into(),
        shared: Shared { frames },
        profiles,
        name: format!("{kind}: {}", profile.title),
        active_profile_index,
        exporter: concat!("livetrace ", env!("CARGO_PKG_VERSION")).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataQuality, Frame as ModelFrame, WeightedStack};

    fn stack(frames: &[(FrameKind, &str)], weight: u64) -> WeightedStack {
        WeightedStack {
            frames: frames
                .iter()
                .map(|(k, n)| ModelFrame::new(*k, *n))
                .collect(),
            weight,
        }
    }

    /// One profile per thread, a shared frames table, kernel frames suffixed, and the unit that
    /// matches the weights; golden file `tests/data/speedscope-per-thread.json`.
    #[test]
    fn per_thread_profiles_share_frames() {
        use FrameKind::*;
        let mut profile = StackProfile {
            title: "pid 9 (app)".into(),
            unit: WeightUnit::Samples,
            period_ns: Some(10_101_010),
            stacks: vec![
                stack(
                    &[
                        (Process, "app"),
                        (Thread, "app-9"),
                        (User, "main"),
                        (User, "hot"),
                    ],
                    6,
                ),
                stack(
                    &[
                        (Process, "app"),
                        (Thread, "app-10"),
                        (User, "main"),
                        (Kernel, "read"),
                    ],
                    3,
                ),
                stack(&[(Process, "app"), (Thread, "app-10"), (User, "main")], 1),
            ],
            quality: DataQuality::default(),
            build_ids: Default::default(),
        };
        profile.normalize();
        let mut out = Vec::new();
        write(&profile, &mut out).unwrap();
        crate::output::golden::check("speedscope-per-thread.json", &out);

        profile.unit = WeightUnit::Microseconds;
        let file = build(&profile);
        assert!(file.profiles.iter().all(|p| p.unit == "microseconds"));
    }
}
