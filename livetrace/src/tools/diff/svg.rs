//! The differential flamegraph: both captures' inclusive shares, drawn as one SVG.

use std::{
    fmt::Write as _,
    io::{self, Write},
};

use super::{Diff, Node};

const IMAGE_WIDTH: f64 = 1200.0;
const FRAME_HEIGHT: f64 = 16.0;
const FONT_SIZE: f64 = 12.0;
/// Average glyph width of Verdana at FONT_SIZE, for deciding how much of a name fits.
const CHAR_WIDTH: f64 = FONT_SIZE * 0.59;
const MARGIN: f64 = 10.0;
const HEADER: f64 = 60.0;
const FOOTER: f64 = 30.0;
/// Frames narrower than this are not drawn.
const MIN_WIDTH: f64 = 0.1;

/// Draws the differential flamegraph: root at the bottom, each frame as wide as the mean of its
/// two inclusive shares, red where its inclusive share grew and blue where it shrank, with
/// intensity relative to the largest change. Each frame's tooltip gives both shares and the
/// change, inclusive and self.
pub fn write_svg<W: Write + ?Sized>(
    diff: &Diff,
    names: &(String, String),
    out: &mut W,
) -> io::Result<()> {
    let mut max_delta: f64 = 0.0;
    let mut depth = 0;
    visit(&diff.root, 0, &mut |node, d| {
        max_delta = max_delta.max(node.inclusive.delta().abs());
        depth = depth.max(d);
    });
    let height = HEADER + FOOTER + (depth as f64 + 1.0) * FRAME_HEIGHT;
    let usable = IMAGE_WIDTH - 2.0 * MARGIN;
    let mut body = String::new();
    draw(
        &diff.root,
        "all",
        MARGIN,
        0,
        height - FOOTER,
        usable,
        max_delta.max(1e-9),
        &mut body,
    );
    let title = format!(
        "Differential flamegraph: {} -> {}",
        escape(&names.0),
        escape(&names.1)
    );
    write!(
        out,
        r##"<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="{IMAGE_WIDTH}" height="{height}" viewBox="0 0 {IMAGE_WIDTH} {height}" xmlns="http://www.w3.org/2000/svg">
<style>text {{ font-family: Verdana, sans-serif; font-size: {FONT_SIZE}px; fill: #000; }} .frame:hover rect {{ stroke: #000; stroke-width: 0.5; }}</style>
<rect x="0" y="0" width="{IMAGE_WIDTH}" height="{height}" fill="#f8f8f8"/>
<text x="{cx}" y="24" text-anchor="middle" style="font-size: 17px">{title}</text>
<text x="{cx}" y="44" text-anchor="middle">width: mean of the two shares; colour: change in inclusive share (red grew, blue shrank; strongest = {max:+.1} points); {b} {bu} before, {a} {au} after</text>
{body}</svg>
"##,
        cx = IMAGE_WIDTH / 2.0,
        max = max_delta * 100.0,
        b = diff.totals.0,
        bu = diff.units.0.short_name(),
        a = diff.totals.1,
        au = diff.units.1.short_name(),
    )?;
    out.flush()
}

fn visit(node: &Node, depth: usize, f: &mut impl FnMut(&Node, usize)) {
    f(node, depth);
    for child in node.children.values() {
        visit(child, depth + 1, f);
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "a recursive layout step; a struct would only rename these"
)]
fn draw(
    node: &Node,
    name: &str,
    x: f64,
    depth: usize,
    bottom: f64,
    usable: f64,
    max_delta: f64,
    svg: &mut String,
) {
    let width = (node.inclusive.before + node.inclusive.after) / 2.0 * usable;
    if width < MIN_WIDTH {
        return;
    }
    let y = bottom - (depth as f64 + 1.0) * FRAME_HEIGHT;
    let delta = node.inclusive.delta();
    let intensity = (delta.abs() / max_delta).clamp(0.0, 1.0);
    let fade = (255.0 - 190.0 * intensity).round() as u8;
    let (r, g, b) = if delta > 0.0 {
        (255, fade, fade)
    } else if delta < 0.0 {
        (fade, fade, 255)
    } else {
        (230, 230, 230)
    };
    let tooltip = format!(
        "{name} — inclusive {:.1}% -> {:.1}% ({:+.1} points); self {:.1}% -> {:.1}% ({:+.1} points)",
        node.inclusive.before * 100.0,
        node.inclusive.after * 100.0,
        delta * 100.0,
        node.self_share.before * 100.0,
        node.self_share.after * 100.0,
        node.self_share.delta() * 100.0
    );
    let fits = ((width - 6.0) / CHAR_WIDTH).floor().max(0.0) as usize;
    let label = if fits >= 3 {
        elide_dots(name, fits)
    } else {
        String::new()
    };
    let _ = writeln!(
        svg,
        r#"<g class="frame"><title>{}</title><rect x="{x:.2}" y="{y:.1}" width="{width:.2}" height="{h:.1}" rx="2" fill="rgb({r},{g},{b})"/><text x="{tx:.2}" y="{ty:.1}">{}</text></g>"#,
        escape(&tooltip),
        escape(&label),
        h = FRAME_HEIGHT - 1.0,
        tx = x + 3.0,
        ty = y + FRAME_HEIGHT - 4.5,
    );
    let mut child_x = x;
    for (child_name, child) in &node.children {
        draw(
            child,
            child_name,
            child_x,
            depth + 1,
            bottom,
            usable,
            max_delta,
            svg,
        );
        child_x += (child.inclusive.before + child.inclusive.after) / 2.0 * usable;
    }
}

fn elide_dots(name: &str, fits: usize) -> String {
    if name.chars().count() <= fits {
        return name.to_owned();
    }
    let keep: String = name.chars().take(fits.saturating_sub(2)).collect();
    format!("{keep}..")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
