//! Names that come from a traced process (its comm and thread names, symbols, perf-map entries,
//! file paths) are written by whoever runs that process, and livetrace prints them on root's
//! terminal and writes them into files that other programs parse. Each such name passes through
//! [`sanitize`] where it enters livetrace: control characters (C0, DEL, C1) and Unicode's
//! bidirectional controls become a visible escape (`\x1b`, `\u{202e}`), so that no name can move
//! a terminal's cursor, set its title or reorder what a reader sees, and every output stays
//! well-formed (an SVG holding an ESC is not XML). The escape is visible on purpose: a name that
//! needed one is worth noticing.

use std::{borrow::Cow, fmt::Write as _};

/// Whether `c` must not reach a terminal or a file raw.
fn is_hazard(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `name` with every hazardous character written as an escape (`\x1b`, `\u{202e}`); borrowed
/// when there is none, as for nearly every name.
pub fn sanitize(name: &str) -> Cow<'_, str> {
    if !name.chars().any(is_hazard) {
        return Cow::Borrowed(name);
    }
    let mut clean = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            c if !is_hazard(c) => clean.push(c),
            c if (c as u32) < 0x80 => {
                let _ = write!(clean, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(clean, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    Cow::Owned(clean)
}

/// [`sanitize`] for text of several lines (messages, reports): newlines and tabs are kept, as
/// its layout; everything else hazardous is escaped. The terminal's last line of defence, for
/// whatever a name reached it through (a path in an error message).
pub fn sanitize_text(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| is_hazard(c) && c != '\n' && c != '\t') {
        return Cow::Borrowed(text);
    }
    let mut clean = String::with_capacity(text.len() + 8);
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            clean.push('\n');
        }
        for (j, field) in line.split('\t').enumerate() {
            if j > 0 {
                clean.push('\t');
            }
            clean.push_str(&sanitize(field));
        }
    }
    Cow::Owned(clean)
}

/// [`sanitize`] into an owned string.
pub fn sanitized(name: &str) -> String {
    sanitize(name).into_owned()
}

/// Checks the property the fuzz target checks: nothing hazardous survives, and a name without
/// anything hazardous is left as it was.
pub fn check(name: &str) {
    let clean = sanitize(name);
    assert!(!clean.chars().any(is_hazard), "{name:?} -> {clean:?}");
    if !name.chars().any(is_hazard) {
        assert_eq!(clean, name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Escape sequences, bell, newline, C1 controls and bidi overrides become visible text;
    /// ordinary names, Unicode included, are untouched.
    #[test]
    fn hazards_become_visible_escapes() {
        assert_eq!(sanitize("\x1b]0;pwned\x07"), "\\x1b]0;pwned\\x07");
        assert_eq!(sanitize("a\nb\x7f"), "a\\x0ab\\x7f");
        assert_eq!(sanitize("csi\u{9b}2J"), "csi\\u{9b}2J");
        assert_eq!(sanitize("gpj.\u{202e}exe"), "gpj.\\u{202e}exe");
        for name in [
            "main",
            "std::vec::Vec<T>::push",
            "数据库",
            "py::serve_request",
        ] {
            assert!(matches!(sanitize(name), Cow::Borrowed(_)), "{name}");
        }
        check("\x1b[2J\u{2067}x");
    }
}
