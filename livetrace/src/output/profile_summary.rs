//! The terminal summary of a stack profile, read the way an expert reads a flamegraph: the widest
//! leaf functions (self weight) with their share, and the path that leads to each.

use std::{
    collections::HashMap,
    io::{self, Write},
};

use crate::{
    model::{Frame, FrameKind, StackProfile},
    output::footer::percent,
};

/// How many leaves to list at most, and the cumulative share after which to stop.
const MAX_LEAVES: usize = 10;
const ENOUGH_SHARE: f64 = 95.0;
/// Frames of a path shown before eliding its middle.
const PATH_HEAD: usize = 2;
const PATH_TAIL: usize = 7;

pub struct HotLeaf {
    pub name: String,
    pub weight: u64,
    /// The heaviest root-to-leaf path ending in this leaf, and its weight.
    pub path: Vec<Frame>,
    pub path_weight: u64,
}

/// The leaves, widest first.
pub fn hot_leaves(profile: &StackProfile) -> Vec<HotLeaf> {
    let mut by_leaf: HashMap<String, HotLeaf> = HashMap::new();
    for stack in &profile.by_name() {
        let Some(leaf) = stack.frames.last() else {
            continue;
        };
        let name = leaf.display_name();
        let entry = by_leaf.entry(name.clone()).or_insert_with(|| HotLeaf {
            name,
            weight: 0,
            path: Vec::new(),
            path_weight: 0,
        });
        entry.weight += stack.weight;
        if stack.weight > entry.path_weight {
            entry.path_weight = stack.weight;
            entry.path = stack.frames.clone();
        }
    }
    let mut leaves: Vec<HotLeaf> = by_leaf.into_values().collect();
    leaves.sort_by(|a, b| b.weight.cmp(&a.weight).then_with(|| a.name.cmp(&b.name)));
    leaves
}

pub fn write<W: Write>(profile: &StackProfile, mut out: W) -> io::Result<()> {
    let total = profile.total_weight();
    let unit = profile.unit.short_name();
    writeln!(
        out,
        "Hottest leaf functions in {} ({total} {unit} over {:.2} s):",
        profile.title,
        profile.quality.duration.as_secs_f64()
    )?;
    if total == 0 {
        writeln!(out, "  (nothing recorded)")?;
        return Ok(());
    }
    let mut shown = 0.0;
    for leaf in hot_leaves(profile).into_iter().take(MAX_LEAVES) {
        let share = percent(leaf.weight, total);
        writeln!(out, "  {share:5.1}%  {}", leaf.name)?;
        let via = percent(leaf.path_weight, leaf.weight);
        let qualifier = if via < 99.95 {
            format!("  ({via:.0}% of it via this path)")
        } else {
            String::new()
        };
        writeln!(out, "          {}{qualifier}", render_path(&leaf.path))?;
        shown += share;
        if shown >= ENOUGH_SHARE {
            break;
        }
    }
    Ok(())
}

/// `root > a > b > … > y > leaf`, keeping the root and the frames nearest the leaf.
fn render_path(frames: &[Frame]) -> String {
    let names: Vec<String> = frames
        .iter()
        .filter(|f| f.kind != FrameKind::Thread || frames.len() <= PATH_HEAD + PATH_TAIL)
        .map(Frame::display_name)
        .collect();
    if names.len() <= PATH_HEAD + PATH_TAIL {
        return names.join(" > ");
    }
    let head = &names[..PATH_HEAD];
    let tail = &names[names.len() - PATH_TAIL..];
    format!("{} > … > {}", head.join(" > "), tail.join(" > "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataQuality, WeightUnit, WeightedStack};

    fn profile(stacks: &[(&[&str], u64)]) -> StackProfile {
        StackProfile {
            title: "pid 42 (app)".into(),
            unit: WeightUnit::Samples,
            period_ns: None,
            stacks: stacks
                .iter()
                .map(|(names, weight)| WeightedStack {
                    frames: names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            let kind = if i == 0 {
                                FrameKind::Process
                            } else {
                                FrameKind::User
                            };
                            Frame::new(kind, *n)
                        })
                        .collect(),
                    weight: *weight,
                })
                .collect(),
            quality: DataQuality {
                duration: std::time::Duration::from_secs(2),
                ..DataQuality::default()
            },
            build_ids: Default::default(),
        }
    }

    /// Leaves are ranked by self weight across all paths, and each shows its heaviest path
    /// with the share of the leaf that path carries.
    #[test]
    fn ranks_leaves_and_shows_their_heaviest_path() {
        let p = profile(&[
            (&["app", "main", "a", "hot"], 50),
            (&["app", "main", "b", "hot"], 10),
            (&["app", "main", "cold"], 40),
        ]);
        let mut out = Vec::new();
        write(&p, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "Hottest leaf functions in pid 42 (app) (100 samples over 2.00 s):\n\
             \x20  60.0%  hot\n\
             \x20         app > main > a > hot  (83% of it via this path)\n\
             \x20  40.0%  cold\n\
             \x20         app > main > cold\n"
        );
    }

    /// Long paths keep the root and the frames nearest the leaf.
    #[test]
    fn elides_the_middle_of_long_paths() {
        let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
        let frames: Vec<Frame> = names
            .iter()
            .map(|n| Frame::new(FrameKind::User, n))
            .collect();
        assert_eq!(
            render_path(&frames),
            "f0 > f1 > … > f13 > f14 > f15 > f16 > f17 > f18 > f19"
        );
    }
}
