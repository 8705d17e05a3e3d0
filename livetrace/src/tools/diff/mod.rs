//! `livetrace diff BEFORE AFTER`: what changed between two captures. Each input is folded
//! stacks or pprof (told apart by the gzip magic or a `.pb.gz`/`.pb`/`.pprof` extension), and
//! each is normalised by its own total, so captures of different lengths compare.
//!
//! Every frame of the flamegraph is a path from the root, and its change is the change of that
//! path's *inclusive* share (its weight with everything it calls), not only of the leaves: when
//! a leaf moves to another caller, both callers change colour. (inferno's differential mode
//! colours a frame by the delta of the stacks that end in it, which leaves callers grey, so the
//! SVG is drawn here.) Frame widths are the mean of the two shares, so frames that vanished and
//! frames that appeared are both visible. The terminal table lists the functions whose share
//! changed most, inclusive and self. Needs no privileges.

mod svg;

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::Args as ClapArgs;

pub use self::svg::write_svg;
use crate::{
    model::{Frame, FrameKind, StackProfile, WeightUnit, WeightedStack},
    output::{self, Format, OutputSpec, pprof},
};

const EXAMPLES: &str = "\
Examples:
  livetrace profile -p 1234 -d 30 -o before.pb.gz     # capture, change something, capture again
  livetrace profile -p 1234 -d 30 -o after.pb.gz
  livetrace diff before.pb.gz after.pb.gz -o diff.svg # red grew, blue shrank
  livetrace diff old.folded new.folded --top 30        # a longer table (and the SVG)";

#[derive(ClapArgs, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The earlier capture: folded stacks or pprof (.pb.gz). Both must be on-CPU (samples) or
    /// both off-CPU (blocked time).
    #[arg(value_name = "BEFORE")]
    pub before: PathBuf,
    /// The later capture: folded stacks or pprof (.pb.gz).
    #[arg(value_name = "AFTER")]
    pub after: PathBuf,
    /// Write the differential flamegraph (.svg); default: livetrace-diff-<time>.svg.
    #[arg(short = 'o', long = "output", value_name = "PATH", value_parser = parse_svg_output)]
    pub output: Option<OutputSpec>,
    /// How many functions each table lists.
    #[arg(long = "top", value_name = "N", default_value_t = 15)]
    pub top: usize,
}

fn parse_svg_output(text: &str) -> Result<OutputSpec, String> {
    match OutputSpec::parse(text) {
        Ok(spec) if spec.format == Format::Svg && spec.path.is_some() => Ok(spec),
        _ => Err(format!(
            "the differential flamegraph is an SVG: name a .svg file, not '{text}'"
        )),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let output = match args.output {
        Some(output) => output,
        None => OutputSpec::parse(&format!("livetrace-diff-{}.svg", crate::timestamp()))
            .map_err(anyhow::Error::msg)?,
    };
    output::preflight(std::slice::from_ref(&output))?;
    let before = read_capture(&args.before)?;
    let after = read_capture(&args.after)?;
    if let (Some(a), Some(b)) = (before.known_unit, after.known_unit)
        && a != b
    {
        bail!(
            "'{}' counts {} but '{}' counts {}: compare on-CPU with on-CPU and off-CPU with \
             off-CPU",
            args.before.display(),
            a.short_name(),
            args.after.display(),
            b.short_name()
        );
    }
    let diff = Diff::new(&before.profile, &after.profile);
    let names = (
        args.before.display().to_string(),
        args.after.display().to_string(),
    );
    let path = output.path.as_deref().expect("checked by the parser");
    output::write_atomically(path, |out| write_svg(&diff, &names, out))?;
    let mut table = Vec::new();
    write_table(&diff, &names, args.top, &mut table)?;
    crate::console::stdout(&table);
    crate::say!("livetrace: wrote {}", output.describe());
    Ok(())
}

/// Whether folded stacks are, by their look, an off-CPU profile: nearly all their weight ends
/// in the scheduler's switch (`__schedule`), where every blocked stack ends and few sampled
/// ones do. Folded stacks do not say their unit; this is how a mix-up is still caught.
fn blocked_time_profile(profile: &StackProfile) -> bool {
    let total = profile.total_weight();
    let blocked: u64 = profile
        .stacks
        .iter()
        .filter(|s| {
            s.frames
                .last()
                .is_some_and(|f| f.kind == FrameKind::Kernel && f.name.ends_with("schedule"))
        })
        .map(|s| s.weight)
        .sum();
    total > 0 && blocked * 10 >= total * 9
}

/// One input, and whether its unit is known (pprof says; folded stacks do not).
pub struct Capture {
    pub profile: StackProfile,
    pub known_unit: Option<WeightUnit>,
}

/// Reads folded stacks or pprof; errors name the file and what is wrong with it.
pub fn read_capture(path: &Path) -> anyhow::Result<Capture> {
    let bytes = fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let name = path.to_string_lossy().to_ascii_lowercase();
    let is_pprof = bytes.starts_with(&[0x1f, 0x8b])
        || [".pb.gz", ".pb", ".pprof"]
            .iter()
            .any(|e| name.ends_with(e));
    let mut capture = if is_pprof {
        let profile = pprof::read(&bytes)
            .with_context(|| format!("'{}' is not a usable pprof file", path.display()))?;
        Capture {
            known_unit: Some(profile.unit),
            profile,
        }
    } else {
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            anyhow::anyhow!(
                "'{}' is neither pprof (no gzip header) nor folded stacks (not UTF-8 text)",
                path.display()
            )
        })?;
        let profile = parse_folded(text)
            .with_context(|| format!("'{}' is not valid folded stacks", path.display()))?;
        Capture {
            // Folded stacks do not say their unit: judged by their look.
            known_unit: Some(if blocked_time_profile(&profile) {
                WeightUnit::Microseconds
            } else {
                WeightUnit::Samples
            }),
            profile,
        }
    };
    // Folded stacks do not say which frames are the process and thread; pprof does. Compare
    // them alike: as plain frames.
    for frame in capture
        .profile
        .stacks
        .iter_mut()
        .flat_map(|s| &mut s.frames)
    {
        if matches!(frame.kind, FrameKind::Process | FrameKind::Thread) {
            frame.kind = FrameKind::User;
        }
    }
    if capture.profile.total_weight() == 0 {
        bail!("'{}' has no samples to compare", path.display());
    }
    Ok(capture)
}

/// Parses `frame;frame;leaf COUNT` lines (blank lines skipped); `_[k]` marks kernel frames.
pub fn parse_folded(text: &str) -> anyhow::Result<StackProfile> {
    let mut stacks = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| anyhow::anyhow!("line {}: {why}: {line:?}", index + 1);
        let (stack, count) = line
            .rsplit_once(' ')
            .ok_or_else(|| bad("expected `frame;frame;... COUNT`"))?;
        let weight: u64 = count
            .parse()
            .map_err(|_| bad("the count after the last space is not a whole number"))?;
        let frames = stack
            .split(';')
            .map(|name| {
                if name.is_empty() {
                    return Err(bad("empty frame name"));
                }
                Ok(match name.strip_suffix("_[k]") {
                    Some(kernel) => Frame::new(FrameKind::Kernel, kernel),
                    None => Frame::new(FrameKind::User, name),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        stacks.push(WeightedStack { frames, weight });
    }
    let mut profile = StackProfile {
        title: String::new(),
        unit: WeightUnit::Samples,
        period_ns: None,
        stacks,
        quality: Default::default(),
        build_ids: Default::default(),
    };
    profile.normalize();
    Ok(profile)
}

/// Shares of one frame path or function in both captures, 0 to 1.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Change {
    pub before: f64,
    pub after: f64,
}

impl Change {
    pub fn delta(self) -> f64 {
        self.after - self.before
    }
}

/// A frame path in the differential tree.
#[derive(Debug, Default)]
pub struct Node {
    pub inclusive: Change,
    pub self_share: Change,
    pub children: BTreeMap<String, Node>,
}

/// Both captures as shares: the tree of frame paths, and each function's self and total share.
pub struct Diff {
    pub root: Node,
    pub totals: (u64, u64),
    pub units: (WeightUnit, WeightUnit),
    /// Function name -> (self, total) shares.
    pub functions: BTreeMap<String, (Change, Change)>,
}

impl Diff {
    pub fn new(before: &StackProfile, after: &StackProfile) -> Self {
        let totals = (before.total_weight(), after.total_weight());
        let mut root = Node::default();
        for (side, profile, total) in [(0, before, totals.0), (1, after, totals.1)] {
            let set = |c: &mut Change, v: f64| {
                if side == 0 {
                    c.before += v;
                } else {
                    c.after += v;
                }
            };
            for stack in profile.by_name() {
                let share = share_of(stack.weight, total);
                set(&mut root.inclusive, share);
                let mut node = &mut root;
                for frame in &stack.frames {
                    node = node.children.entry(frame.display_name()).or_default();
                    set(&mut node.inclusive, share);
                }
                set(&mut node.self_share, share);
            }
        }
        let mut functions: BTreeMap<String, (Change, Change)> = BTreeMap::new();
        for (side, profile, total) in [(0, before, totals.0), (1, after, totals.1)] {
            for (name, w) in profile.function_weights() {
                let entry = functions.entry(name).or_default();
                let (s, t) = (share_of(w.self_weight, total), share_of(w.total, total));
                if side == 0 {
                    entry.0.before = s;
                    entry.1.before = t;
                } else {
                    entry.0.after = s;
                    entry.1.after = t;
                }
            }
        }
        Self {
            root,
            totals,
            units: (before.unit, after.unit),
            functions,
        }
    }

    /// The node at a path of display names, if either capture has it.
    #[cfg(test)]
    pub fn node(&self, path: &[&str]) -> Option<&Node> {
        path.iter()
            .try_fold(&self.root, |node, name| node.children.get(*name))
    }
}

fn share_of(weight: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        weight as f64 / total as f64
    }
}

/// The functions whose inclusive and self shares changed most, largest change first.
pub fn write_table<W: Write>(
    diff: &Diff,
    names: &(String, String),
    top: usize,
    mut out: W,
) -> io::Result<()> {
    writeln!(
        out,
        "Largest changes in share, before -> after (each normalised by its total: {} {} in {}, \
         {} {} in {}):",
        diff.totals.0,
        diff.units.0.short_name(),
        names.0,
        diff.totals.1,
        diff.units.1.short_name(),
        names.1
    )?;
    let width = diff
        .functions
        .keys()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(20, 60);
    for (title, pick) in [
        (
            "inclusive (the function and everything it calls)",
            (|f: &(Change, Change)| f.1) as fn(&(Change, Change)) -> Change,
        ),
        ("self (the function itself, as the leaf)", |f| f.0),
    ] {
        writeln!(
            out,
            "  {title}\n    {:<width$}  {:>7}  {:>7}  {:>7}",
            "function", "before", "after", "delta"
        )?;
        let mut rows: Vec<(&String, Change)> = diff
            .functions
            .iter()
            .map(|(name, f)| (name, pick(f)))
            .filter(|(_, c)| c.delta().abs() >= 0.0005)
            .collect();
        rows.sort_by(|a, b| {
            b.1.delta()
                .abs()
                .total_cmp(&a.1.delta().abs())
                .then_with(|| a.0.cmp(b.0))
        });
        if rows.is_empty() {
            writeln!(out, "    (no change)")?;
        }
        for (name, change) in rows.into_iter().take(top) {
            writeln!(
                out,
                "    {:<width$}  {:>6.1}%  {:>6.1}%  {:>+6.1}%",
                elide(name, width),
                change.before * 100.0,
                change.after * 100.0,
                change.delta() * 100.0
            )?;
        }
    }
    out.flush()
}

fn elide(name: &str, width: usize) -> String {
    if name.chars().count() <= width {
        return name.to_owned();
    }
    let keep: String = name.chars().take(width.saturating_sub(1)).collect();
    format!("{keep}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(text: &str) -> StackProfile {
        parse_folded(text).unwrap()
    }

    /// Moving a leaf to another caller changes the inclusive share of both callers, not only
    /// of the leaf; shares are normalised by each capture's own total.
    #[test]
    fn non_leaf_frames_get_inclusive_deltas() {
        let before = folded("app;main;c;hot_60 60\napp;main;c;hot_30 30\napp;main;c;hot_10 10\n");
        let after = folded(
            "app;main;c;hot_60 40\napp;main;c;hot_30 60\napp;main;c;hot_10 20\n\
             app;main;d;hot_30 80\n",
        );
        let diff = Diff::new(&before, &after);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let c = diff.node(&["app", "main", "c"]).unwrap();
        assert!(near(c.inclusive.before, 1.0) && near(c.inclusive.after, 0.6));
        let d = diff.node(&["app", "main", "d"]).unwrap();
        assert!(near(d.inclusive.delta(), 0.4));
        let hot = diff.node(&["app", "main", "c", "hot_60"]).unwrap();
        assert!(near(hot.inclusive.delta(), -0.4) && near(hot.self_share.delta(), -0.4));
        let main = diff.node(&["app", "main"]).unwrap();
        assert!(near(main.inclusive.delta(), 0.0));
        // By function, hot_30 grew from 30% to 70% although its path under c did not change.
        let (self_share, total) = diff.functions["hot_30"];
        assert!(near(total.delta(), 0.4) && near(self_share.delta(), 0.4));
    }

    /// The table ranks by the size of the change and signs it; golden file
    /// `tests/data/diff-table.txt`. The SVG is complete and its tooltips carry the changes.
    #[test]
    fn table_and_svg_layout() {
        let before = folded("app;main;c;hot_60 60\napp;main;c;hot_30 30\napp;main;c;hot_10 10\n");
        let after = folded(
            "app;main;c;hot_60 20\napp;main;c;hot_30 30\napp;main;c;hot_10 10\n\
             app;main;d;hot_30 40\napp;main;read_[k] 0\n",
        );
        let diff = Diff::new(&before, &after);
        let names = ("before.folded".to_owned(), "after.folded".to_owned());
        let mut table = Vec::new();
        write_table(&diff, &names, 10, &mut table).unwrap();
        crate::output::golden::check("diff-table.txt", &table);
        let mut svg = Vec::new();
        write_svg(&diff, &names, &mut svg).unwrap();
        crate::output::golden::check("diff.svg", &svg);
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("<title>c — inclusive 100.0% -&gt; 60.0% (-40.0 points)"));
        assert!(svg.contains("<title>d — inclusive 0.0% -&gt; 40.0% (+40.0 points)"));
    }

    /// Folded input errors say which line and what is wrong with it.
    #[test]
    fn folded_errors_name_the_line() {
        let err = parse_folded("a;b 3\na;b three\n").unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("whole number"),
            "{err}"
        );
        let err = parse_folded("a;;b 3\n").unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("empty frame"),
            "{err}"
        );
    }
}
