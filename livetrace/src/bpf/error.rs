//! What can go wrong between livetrace and the kernel's BPF: an object that does not load, a
//! program that does not load or attach, a name that is not in the object. Each error says
//! what to do; a permission error is told by its errno (found in the error's sources), not by
//! the wording of a message, and a verifier rejection is summarised with its whole log saved.

/// An error of livetrace's BPF layer.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object (its maps, its BTF) could not be loaded.
    #[error("failed to load livetrace's {object} BPF object{}", permission_hint(.source, PermissionFor::Load))]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    /// One program could not be loaded or attached (`what`: "attach tp_btf/sched_switch").
    #[error("failed to {what}{}", permission_hint(.source, PermissionFor::program(.what)))]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The verifier refused a program: the message quotes why and names the saved log.
    #[error("{0}")]
    Rejected(String),
    /// A program or map that the object should hold is not in it.
    #[error("the BPF object has no {kind} named {name}; rebuild livetrace")]
    Missing { kind: &'static str, name: String },
    /// A map could not be read or written.
    #[error("failed to {what}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The errno at the bottom of an error, if the kernel gave one.
pub fn errno(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        current = err.source();
    }
    None
}

/// What a permission error was refusing, for the hint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PermissionFor {
    Load,
    Program,
    Uprobe,
}

impl PermissionFor {
    fn program(what: &str) -> Self {
        if what.contains("uprobe") {
            Self::Uprobe
        } else {
            Self::Program
        }
    }
}

/// What to do about a refusal by errno: EPERM is a missing capability, and EACCES from a uprobe
/// is the CAP_SYS_ADMIN kernels with the CVE-2025-38466 fix require.
fn permission_hint(err: &(dyn std::error::Error + 'static), what: PermissionFor) -> &'static str {
    match (errno(err), what) {
        (Some(libc::EPERM), PermissionFor::Load) => {
            "; loading BPF programs needs root, or the capabilities CAP_BPF and CAP_PERFMON \
             (try: sudo livetrace ..., and `livetrace check` for what this host lacks)"
        }
        (Some(libc::EPERM), _) => " (needs root, or CAP_BPF and CAP_PERFMON)",
        (Some(libc::EACCES), PermissionFor::Uprobe) => {
            " (uprobes need root, or CAP_SYS_ADMIN besides CAP_BPF and CAP_PERFMON)"
        }
        _ => "",
    }
}

/// A program's load or attach error, `what` saying which ("load tp_btf/sched_switch"): a
/// verifier rejection is summarised (the lines that say why) and its whole log saved to a file
/// whose path is given.
pub fn program_error(err: aya::programs::ProgramError, what: &str) -> BpfError {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &err
    {
        let log = verifier_log.to_string();
        if !log.trim().is_empty() {
            return BpfError::Rejected(verifier_rejection(
                what,
                io_error,
                &log,
                &program_name(what),
            ));
        }
    }
    BpfError::Program {
        what: what.to_owned(),
        source: err,
    }
}

/// A file-name-friendly name for the program an action is about ("load tp_btf/sched_switch"
/// gives "tp_btf-sched_switch").
fn program_name(what: &str) -> String {
    let word = what
        .split_whitespace()
        .find(|w| w.contains('/') || w.contains('_'))
        .unwrap_or("program");
    word.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// How many lines of a verifier log the error message quotes.
const VERIFIER_SUMMARY_LINES: usize = 4;

/// The message for a program the verifier rejected: the reason, the last lines of the log that
/// lead to it, and where the whole log was saved.
fn verifier_rejection(what: &str, io_error: &std::io::Error, log: &str, program: &str) -> String {
    let path = std::env::temp_dir().join(format!(
        "livetrace-verifier-{program}-{}.log",
        std::process::id()
    ));
    let saved = crate::output::write_atomically(&path, |out| out.write_all(log.as_bytes()));
    let mut message = format!(
        "failed to {what}: the kernel's verifier rejected it ({io_error}). The verifier says:"
    );
    for line in summarize_verifier_log(log, VERIFIER_SUMMARY_LINES) {
        message.push_str("\n  ");
        message.push_str(&line);
    }
    match saved {
        Ok(()) => message.push_str(&format!(
            "\nthe whole verifier log is in {}",
            path.display()
        )),
        Err(err) => message.push_str(&format!("\n(the whole log could not be saved: {err:#})")),
    }
    message.push_str(
        "\nthis is a bug in livetrace or an incompatibility with this kernel: please report it \
         with the log and `uname -r`",
    );
    message
}

/// The last `max` lines of a verifier log that say why it refused the program: the statistics
/// it prints after the verdict (instructions processed, time, stack depth) are left out, since
/// the reason is the last line before them and the instructions just above lead to it.
pub fn summarize_verifier_log(log: &str, max: usize) -> Vec<String> {
    const STATISTICS: [&str; 4] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
    ];
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut end = lines.len();
    while end > 0
        && STATISTICS
            .iter()
            .any(|s| lines[end - 1].trim_start().starts_with(s))
    {
        end -= 1;
    }
    if end == 0 {
        // Nothing but statistics: quote them rather than nothing.
        end = lines.len();
    }
    let start = end.saturating_sub(max);
    lines[start..end]
        .iter()
        .map(|l| {
            // Instruction lines carry the register state after a `;` column: keep it short.
            let l = l.split("   ; ").next().unwrap_or(l).trim_end();
            let mut shown: String = l.chars().take(160).collect();
            if shown.len() < l.len() {
                shown.push_str("...");
            }
            shown
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real verifier log (this kernel, a map value dereferenced without its null check): the
    /// summary ends with the reason, quotes the instruction that caused it, and leaves out the
    /// statistics after the verdict.
    #[test]
    fn summarises_a_real_verifier_log() {
        let log = include_str!("../../tests/data/verifier-null-map-value.log");
        let summary = summarize_verifier_log(log, 4);
        assert_eq!(summary.len(), 4, "{summary:#?}");
        assert_eq!(
            summary.last().unwrap(),
            "R0 invalid mem access 'map_value_or_null'"
        );
        assert_eq!(summary[2], "7: (79) r0 = *(u64 *)(r0 +0)");
        assert!(
            summary
                .iter()
                .all(|l| !l.contains("processed") && !l.contains("verification time")),
            "{summary:#?}"
        );
    }

    /// Degenerate logs give a short summary, never a panic.
    #[test]
    fn summarises_degenerate_logs() {
        assert!(summarize_verifier_log("", 4).is_empty());
        assert_eq!(
            summarize_verifier_log("processed 1 insns\n", 4),
            ["processed 1 insns"]
        );
        let long = "x".repeat(1000);
        assert!(summarize_verifier_log(&long, 4)[0].ends_with("..."));
    }

    /// A LoadError with a verifier log becomes a message with the reason and the path of the
    /// saved log, which holds the whole log.
    #[test]
    fn verifier_rejection_saves_the_log_and_names_it() {
        let log = include_str!("../../tests/data/verifier-null-map-value.log");
        let err = aya::programs::ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(libc::EACCES),
            verifier_log: aya_obj::VerifierLog::new(log.to_owned()),
        };
        let message = program_error(err, "load tp_btf/sched_switch").to_string();
        assert!(message.contains("map_value_or_null"), "{message}");
        let path = message
            .lines()
            .find_map(|l| l.strip_prefix("the whole verifier log is in "))
            .unwrap_or_else(|| panic!("no path in: {message}"));
        assert!(
            path.contains("livetrace-verifier-tp_btf-sched_switch-"),
            "{path}"
        );
        assert_eq!(std::fs::read_to_string(path).unwrap(), log);
        std::fs::remove_file(path).unwrap();
    }

    /// Permission errors are told by errno, wherever it sits in the sources.
    #[test]
    fn permission_hints_follow_the_errno() {
        let attach = |errno| {
            aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "perf_event_open",
                io_error: std::io::Error::from_raw_os_error(errno),
            })
        };
        let eperm = program_error(attach(libc::EPERM), "attach the profile program");
        assert!(
            eperm.to_string().contains("CAP_BPF and CAP_PERFMON"),
            "{eperm}"
        );
        let eacces = program_error(attach(libc::EACCES), "attach the uprobe");
        assert!(eacces.to_string().contains("CAP_SYS_ADMIN"), "{eacces}");
        let other = program_error(attach(libc::ENOENT), "attach the uprobe");
        assert_eq!(other.to_string(), "failed to attach the uprobe");
        assert_eq!(errno(&eperm), Some(libc::EPERM));
    }
}
