//! `livetrace check`: what this host supports and lacks for each subcommand, on one screen,
//! with the fix for each missing piece in the same words as the tools' own errors (the texts
//! are shared with them). `bpftrace --info` lists features; this says what they mean for the
//! question the user has.
//!
//! [`host::Facts`] gathers (read-only, nothing is loaded); [`assess`] judges, as a pure
//! function of the facts, so that the layout is tested on facts made up for the test.

mod host;
mod items;
mod render;

use clap::Args as ClapArgs;
use serde::Serialize;

use self::items::{capability_items, kernel_items, runtime_items, setting_items};
pub use self::render::render;
pub use host::{Facts, Pmu, RuntimeProcess, TracefsState, VerifierVerdicts};

use crate::privileges::{self, Cap};

const EXAMPLES: &str = "\
Exit status: 0 when every subcommand can run here (some perhaps with less, as listed), 1 when
one cannot.

Examples:
  livetrace check                 # this host, as this user
  sudo livetrace check            # as root
  livetrace check --json | jq '.subcommands'";

#[derive(ClapArgs, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The same as data: facts, checks and verdicts, as JSON on standard output.
    #[arg(long = "json")]
    pub json: bool,
}

/// Tracing subcommands, in the order the report lists them; `diff` needs nothing.
const TOOLS: [&str; 3] = ["profile", "offcpu", "uprobe-hist"];

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Present, or fine as it is.
    Ok,
    /// Worth knowing; costs nothing.
    Note,
    /// The subcommands it affects run, with less (unnamed frames, a fallback).
    Limited,
    /// The subcommands it affects cannot run.
    Missing,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Note => "-",
            Self::Limited => "limited",
            Self::Missing => "MISSING",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub section: &'static str,
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// The subcommands that run with less, or not at all, because of it.
    pub affects: Vec<&'static str>,
    pub fix: Option<String>,
}

impl Item {
    fn new(section: &'static str, name: impl Into<String>, status: Status, detail: String) -> Self {
        Self {
            section,
            name: name.into(),
            status,
            detail,
            affects: Vec::new(),
            fix: None,
        }
    }

    fn affects(mut self, tools: &[&'static str]) -> Self {
        self.affects = tools.to_vec();
        self
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// What a subcommand can do here.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub subcommand: &'static str,
    pub status: Status,
    /// The items that limit or stop it.
    pub because: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub livetrace: String,
    pub subcommands: Vec<Verdict>,
    pub checks: Vec<Item>,
    pub facts: Facts,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let report = assess(
        Facts::gather(),
        crate::build_info::short_version(),
        &|caps| privileges::setcap_line(caps),
    );
    if args.json {
        crate::out!("{}\n", serde_json::to_string_pretty(&report)?);
    } else {
        crate::out!("{}", render(&report));
    }
    let cannot: Vec<&str> = report
        .subcommands
        .iter()
        .filter(|v| v.status == Status::Missing)
        .map(|v| v.subcommand)
        .collect();
    if !cannot.is_empty() {
        anyhow::bail!("{} cannot run on this host, as listed", cannot.join(", "));
    }
    Ok(())
}

/// Judges the facts: the items, then each subcommand's verdict from the items that affect it.
/// `setcap` spells the grant line for a set of capabilities (it names this binary's path).
pub fn assess(facts: Facts, version: String, setcap: &dyn Fn(Vec<Cap>) -> String) -> Report {
    let mut checks = Vec::new();
    kernel_items(&facts, &mut checks);
    setting_items(&facts, &mut checks);
    capability_items(&facts, setcap, &mut checks);
    runtime_items(&facts, &mut checks);
    let mut subcommands: Vec<Verdict> = TOOLS
        .iter()
        .map(|&tool| {
            let relevant: Vec<&Item> = checks
                .iter()
                .filter(|i| i.affects.contains(&tool) && i.status >= Status::Limited)
                .collect();
            let status = relevant
                .iter()
                .map(|i| i.status)
                .max()
                .unwrap_or(Status::Ok);
            Verdict {
                subcommand: tool,
                status,
                because: relevant
                    .iter()
                    .filter(|i| i.status == status)
                    .map(|i| i.name.clone())
                    .collect(),
            }
        })
        .collect();
    subcommands.push(Verdict {
        subcommand: "diff",
        status: Status::Ok,
        because: Vec::new(),
    });
    Report {
        livetrace: version,
        subcommands,
        checks,
        facts,
    }
}

#[cfg(test)]
mod tests {
    use super::render::WIDTH;
    use super::*;
    use crate::runtimes::Runtime;

    const ALL_CAPS: u64 = (1 << 2) | (1 << 19) | (1 << 21) | (1 << 34) | (1 << 38) | (1 << 39);

    /// A well-kept host, as root: everything there, two runtimes of which one is unnamed.
    fn healthy() -> Facts {
        Facts {
            release: "6.12.118+deb12-cloud-amd64".into(),
            machine: "x86_64".into(),
            version: Some((6, 12)),
            btf_path: "/sys/kernel/btf/vmlinux".into(),
            btf: true,
            tracefs: TracefsState::Readable("/sys/kernel/tracing".into()),
            kprobe_pmu: true,
            uprobe_pmu: true,
            hardware_pmu: Pmu::Present,
            perf_event_paranoid: Some(2),
            kptr_restrict: Some(0),
            unprivileged_bpf_disabled: Some(2),
            kallsyms_hidden: false,
            uid: 0,
            capabilities: Some(ALL_CAPS),
            host_pid_namespace: true,
            verifier: Some(VerifierVerdicts {
                frame_pointers: None,
                dwarf: None,
            }),
            processes: vec![
                RuntimeProcess {
                    pid: 4242,
                    comm: "java".into(),
                    runtime: Runtime::Jvm,
                    perf_map: true,
                },
                RuntimeProcess {
                    pid: 5151,
                    comm: "node".into(),
                    runtime: Runtime::Node,
                    perf_map: false,
                },
            ],
            unreadable_processes: 0,
        }
    }

    /// An LTS host without BTF, seen by a user with no capabilities.
    fn bare() -> Facts {
        Facts {
            release: "5.10.0-28-amd64".into(),
            version: Some((5, 10)),
            btf: false,
            tracefs: TracefsState::Unreadable("/sys/kernel/tracing".into()),
            kprobe_pmu: true,
            hardware_pmu: Pmu::Absent,
            kptr_restrict: Some(1),
            kallsyms_hidden: true,
            uid: 1000,
            capabilities: Some(0),
            verifier: None,
            processes: vec![RuntimeProcess {
                pid: 777,
                comm: "python3.11".into(),
                runtime: Runtime::Python(Some((3, 11))),
                perf_map: false,
            }],
            unreadable_processes: 12,
            ..healthy()
        }
    }

    fn report(facts: Facts) -> Report {
        assess(facts, "0.1.0 (0123456789ab 2026-12-07)".into(), &|caps| {
            crate::privileges::setcap_line_for("/usr/local/bin/livetrace", caps)
        })
    }

    /// The layout: verdicts first, the sections, and the fixes once each.
    #[test]
    fn layout_of_a_healthy_host() {
        insta::assert_snapshot!(render(&report(healthy())));
    }

    #[test]
    fn layout_of_a_bare_host() {
        insta::assert_snapshot!(render(&report(bare())));
    }

    /// One screen: no line wider than the wrap width (but commands), and at most 48 lines.
    #[test]
    fn fits_one_screen() {
        for facts in [healthy(), bare()] {
            let text = render(&report(facts));
            // Commands to copy are kept whole; everything else wraps.
            let prose = text.lines().filter(|l| !l.starts_with("    sudo "));
            assert!(prose.clone().all(|l| l.chars().count() <= WIDTH), "{text}");
            assert!(
                text.lines().count() <= 48,
                "{} lines:\n{text}",
                text.lines().count()
            );
        }
    }

    /// Verdicts follow from the items: missing capabilities stop the tools that need them,
    /// missing BTF stops uprobe-hist and limits offcpu; diff always runs.
    #[test]
    fn verdicts_follow_from_the_items() {
        let bare = report(bare());
        let verdict = |name: &str| {
            bare.subcommands
                .iter()
                .find(|v| v.subcommand == name)
                .unwrap()
                .clone()
        };
        assert_eq!(verdict("profile").status, Status::Missing);
        assert!(verdict("uprobe-hist").because.contains(&"BTF".to_owned()));
        assert_eq!(verdict("diff").status, Status::Ok);
        let healthy = report(healthy());
        assert_eq!(
            healthy
                .subcommands
                .iter()
                .map(|v| v.status)
                .collect::<Vec<_>>(),
            [Status::Limited, Status::Limited, Status::Ok, Status::Ok],
            "the unnamed node process limits profile and offcpu only"
        );
    }
}
