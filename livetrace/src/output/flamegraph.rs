//! Interactive SVG flamegraphs, drawn by inferno from the folded lines. Kernel frames (`_[k]`)
//! get their own colour (inferno's "java" palette colours by frame kind); off-CPU profiles use
//! the blue I/O palette and count microseconds, as Brendan Gregg's off-CPU flamegraphs do.

use std::io::{self, Write};

use inferno::flamegraph::{
    self, Options,
    color::{BasicPalette, MultiPalette, Palette},
};

use crate::{
    model::{StackProfile, WeightUnit},
    output::{folded, footer},
};

pub fn write<W: Write>(profile: &StackProfile, out: W) -> io::Result<()> {
    let mut options = Options::default();
    match profile.unit {
        WeightUnit::Samples => {
            options.title = format!("On-CPU: {}", profile.title);
            options.colors = Palette::Multi(MultiPalette::Java);
            options.count_name = "samples".into();
        }
        WeightUnit::Microseconds => {
            options.title = format!("Off-CPU (blocked time): {}", profile.title);
            options.colors = Palette::Basic(BasicPalette::Io);
            options.count_name = "us".into();
        }
    }
    options.subtitle = Some(footer::one_line(profile));
    options.deterministic = true;
    let lines: Vec<String> = folded::lines(profile).collect();
    if lines.is_empty() {
        // inferno refuses empty input; an explicit "no data" graph is clearer than no file.
        return write_empty(&options.title, &footer::one_line(profile), out);
    }
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
        .map_err(io::Error::other)
}

fn write_empty<W: Write>(title: &str, subtitle: &str, mut out: W) -> io::Result<()> {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    write!(
        out,
        r#"<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="1200" height="90" xmlns="http://www.w3.org/2000/svg">
<text x="600" y="24" text-anchor="middle" font-size="17" font-family="Verdana">{}</text>
<text x="600" y="48" text-anchor="middle" font-size="12" font-family="Verdana">{}</text>
<text x="600" y="72" text-anchor="middle" font-size="12" font-family="Verdana">No stacks were recorded.</text>
</svg>
"#,
        escape(title),
        escape(subtitle)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataQuality, Frame, FrameKind, WeightedStack};

    /// The SVG is a complete document that names the hot frame and carries the footer subtitle;
    /// an empty profile still yields a valid SVG saying so.
    #[test]
    fn draws_complete_svg() {
        let mut profile = StackProfile {
            title: "pid 1 (app)".into(),
            unit: WeightUnit::Samples,
            period_ns: None,
            stacks: vec![WeightedStack {
                frames: vec![
                    Frame::new(FrameKind::Process, "app"),
                    Frame::new(FrameKind::User, "hot_function"),
                ],
                weight: 5,
            }],
            quality: DataQuality::default(),
            build_ids: Default::default(),
        };
        let mut out = Vec::new();
        write(&profile, &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("hot_function"));
        assert!(svg.contains("5 samples"));

        profile.stacks.clear();
        let mut out = Vec::new();
        write(&profile, &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.contains("No stacks were recorded."));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
