//! The report as text: the verdicts first, then each section's items, then the fixes, wrapped
//! to one screen's width.

use std::fmt::Write as _;

use super::{Report, Status};

/// Runtime lines shown before the rest are summed up (the JSON has them all).
const RUNTIMES_SHOWN: usize = 6;
/// Where text is wrapped.
pub(super) const WIDTH: usize = 100;
/// The name column: as wide as the longest capability's name (CAP_DAC_READ_SEARCH).
const NAME_WIDTH: usize = 19;

/// The report as text: verdicts first, then each section's items, then the fixes.
pub fn render(report: &Report) -> String {
    let facts = &report.facts;
    let mut text = format!(
        "livetrace {} on Linux {} {}, uid {}\n\n",
        report.livetrace, facts.release, facts.machine, facts.uid
    );
    for verdict in &report.subcommands {
        let said = match verdict.status {
            Status::Ok | Status::Note => "ready".to_owned(),
            Status::Limited => format!("ready, with less: {}", verdict.because.join(", ")),
            Status::Missing => format!("cannot run: {}", verdict.because.join(", ")),
        };
        let _ = writeln!(text, "  {:<12} {said}", verdict.subcommand);
    }
    let mut section = "";
    let mut runtimes_shown = 0;
    for item in &report.checks {
        if item.section != section {
            section = item.section;
            let _ = writeln!(text, "\n{section}");
        }
        if section == "runtimes" && item.name != "unreadable" {
            runtimes_shown += 1;
            if runtimes_shown > RUNTIMES_SHOWN {
                continue;
            }
        }
        // A name longer than its column (unprivileged_bpf_disabled) pushes its detail along.
        let line = format!(
            "  {:<7} {:<NAME_WIDTH$}  {}",
            item.status.label(),
            item.name,
            item.detail
        );
        text.push_str(&wrap(&line, 12 + NAME_WIDTH));
    }
    let runtimes = facts.processes.len();
    if runtimes > RUNTIMES_SHOWN {
        let named = facts.processes.iter().filter(|p| p.perf_map).count();
        let _ = writeln!(
            text,
            "  ... {} more ({named} of all {runtimes} named); --json lists them all",
            runtimes - RUNTIMES_SHOWN
        );
    }
    // Each fix once (the capabilities share theirs), under the first item that needs it.
    let mut fixes: Vec<(&str, &str)> = Vec::new();
    for item in report.checks.iter().filter(|i| i.status >= Status::Limited) {
        if let Some(fix) = &item.fix
            && !fixes.iter().any(|(_, f)| f == fix)
        {
            let name = if item.section == "capabilities" {
                "capabilities"
            } else {
                &item.name
            };
            fixes.push((name, fix));
        }
    }
    if !fixes.is_empty() {
        text.push_str("\nto fix\n");
        for (name, fix) in fixes {
            // The first line is prose, wrapped; the lines after it are commands, kept whole
            // so that they can be copied.
            let mut lines = fix.lines();
            text.push_str(&wrap(
                &format!("  {name}: {}", lines.next().unwrap_or("")),
                4,
            ));
            for command in lines {
                let _ = writeln!(text, "    {command}");
            }
        }
    }
    text
}

/// `line` wrapped at [`WIDTH`] columns, continuation lines indented by `indent`; runs of
/// spaces inside the first line (its columns) are kept.
fn wrap(line: &str, indent: usize) -> String {
    let body = line.trim_start();
    let mut current = line[..line.len() - body.len()].to_owned();
    let mut out = String::new();
    let mut first_word = true;
    for word in body.split(' ') {
        let width = current.chars().count() + 1 + word.chars().count();
        if !first_word && !word.is_empty() && width > WIDTH {
            out.push_str(current.trim_end());
            out.push('\n');
            current = " ".repeat(indent);
        } else if !first_word {
            current.push(' ');
        }
        current.push_str(word);
        first_word = false;
    }
    out.push_str(current.trim_end());
    out.push('\n');
    out
}
