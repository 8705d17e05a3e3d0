//! `livetrace check`: what this host supports and lacks for each subcommand, on one screen,
//! with the fix for each missing piece in the same words as the tools' own errors (the texts
//! are shared with them). `bpftrace --info` lists features; this says what they mean for the
//! question the user has.
//!
//! [`host::Facts`] gathers (read-only, nothing is loaded); [`assess`] judges, as a pure
//! function of the facts, so that the layout is tested on facts made up for the test.

mod host;

use std::fmt::Write as _;

use clap::Args as ClapArgs;
use serde::Serialize;

pub use host::{Facts, Pmu, RuntimeProcess, TracefsState, VerifierVerdicts};

use crate::{
    kernel_btf,
    privileges::{self, Cap},
    tools::offcpu::tracefs,
};

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

const STACK_TOOLS: &[&str] = &["profile", "offcpu"];
const ALL_TOOLS: &[&str] = &["profile", "offcpu", "uprobe-hist"];

fn kernel_items(facts: &Facts, checks: &mut Vec<Item>) {
    let section = "kernel";
    checks.push(match facts.version {
        Some(v) if v < (5, 8) => Item::new(
            section,
            "version",
            Status::Missing,
            format!(
                "{}: older than 5.8, which every tool needs (ring buffers)",
                facts.release
            ),
        )
        .affects(ALL_TOOLS)
        .fix("boot a kernel of 5.8 or newer (5.15 or newer for --unwind dwarf)"),
        Some(v) if v < (5, 15) => Item::new(
            section,
            "version",
            Status::Limited,
            format!(
                "{}: --unwind dwarf needs 5.15 (frame pointers instead)",
                facts.release
            ),
        )
        .affects(STACK_TOOLS)
        .fix("boot 5.15 or newer for --unwind dwarf"),
        Some(_) => Item::new(
            section,
            "version",
            Status::Ok,
            format!(
                "{} (5.8+ for every tool, 5.15+ for --unwind dwarf)",
                facts.release
            ),
        ),
        None => Item::new(
            section,
            "version",
            Status::Note,
            format!("{}: not a version livetrace can read", facts.release),
        ),
    });
    checks.push(if facts.btf {
        Item::new(section, "BTF", Status::Ok, facts.btf_path.clone())
    } else {
        Item::new(
            section,
            "BTF",
            Status::Missing,
            format!("cannot read {}: uprobe-hist cannot run", facts.btf_path),
        )
        .affects(&["uprobe-hist"])
        .fix(kernel_btf::MISSING_BTF_FIX)
    });
    if !facts.btf {
        // The other tools' share of missing BTF, as a line of its own.
        checks.push(
            Item::new(
                section,
                "no BTF",
                Status::Limited,
                "offcpu falls back to the tracepoint (no --wakers)".into(),
            )
            .affects(&["offcpu", "profile"])
            .fix(kernel_btf::MISSING_BTF_FIX),
        );
    }
    let has = |cap| {
        facts
            .capabilities
            .is_none_or(|eff| privileges::has(eff, cap))
    };
    // tracefs matters to offcpu only without BTF (or with --attach tracepoint).
    let tracefs_status = |bad: Status| if facts.btf { Status::Note } else { bad };
    checks.push(match &facts.tracefs {
        TracefsState::Readable(dir) => Item::new(section, "tracefs", Status::Ok, dir.clone()),
        TracefsState::Unreadable(dir) if !has(Cap::DacReadSearch) => Item::new(
            section,
            "tracefs",
            tracefs_status(Status::Missing),
            format!("{dir}: root's (mode 0700), offcpu's tracepoint mode cannot read it"),
        )
        .affects(&["offcpu"])
        .fix(tracefs::UNREADABLE_FIX),
        TracefsState::Unreadable(dir) => Item::new(
            section,
            "tracefs",
            Status::Ok,
            format!("{dir} (root's, read with CAP_DAC_READ_SEARCH)"),
        ),
        TracefsState::NotMounted if has(Cap::SysAdmin) => Item::new(
            section,
            "tracefs",
            Status::Ok,
            "not mounted; livetrace mounts it when it needs it".into(),
        ),
        TracefsState::NotMounted => {
            let dir = tracefs::mount_point();
            Item::new(
                section,
                "tracefs",
                tracefs_status(Status::Missing),
                "not mounted, and mounting it needs CAP_SYS_ADMIN: offcpu's tracepoint mode \
                 cannot run"
                    .into(),
            )
            .affects(&["offcpu"])
            .fix(tracefs::mount_fix(&dir))
        }
    });
    checks.push(if facts.uprobe_pmu {
        Item::new(
            section,
            "uprobes",
            Status::Ok,
            "the uprobe PMU is there".into(),
        )
    } else {
        Item::new(
            section,
            "uprobes",
            Status::Missing,
            "no uprobe PMU (/sys/bus/event_source/devices/uprobe): uprobe-hist cannot run".into(),
        )
        .affects(&["uprobe-hist"])
        .fix("boot a kernel built with CONFIG_UPROBE_EVENTS")
    });
    checks.push(if facts.kprobe_pmu {
        Item::new(
            section,
            "kprobes",
            Status::Ok,
            "the kprobe PMU is there".into(),
        )
    } else {
        Item::new(
            section,
            "kprobes",
            Status::Note,
            "no kprobe PMU; no livetrace tool uses kprobes".into(),
        )
    });
    checks.push(match facts.hardware_pmu {
        Pmu::Present => Item::new(
            section,
            "hardware PMU",
            Status::Ok,
            "present (profile --event cycles can use it)".into(),
        ),
        Pmu::Absent => Item::new(
            section,
            "hardware PMU",
            Status::Note,
            "none (a VM?): profile's cpu-clock needs none".into(),
        ),
        Pmu::Unknown => Item::new(
            section,
            "hardware PMU",
            Status::Note,
            "unknown (perf_event_open refused): profile's default cpu-clock needs none".into(),
        ),
    });
    // The verifier's own answer, for the program the default profile loads: where the
    // kernel version says "should", this says "does".
    checks.push(match &facts.verifier {
        None => Item::new(
            section,
            "verifier",
            Status::Note,
            "not asked (loading a program needs CAP_BPF and CAP_PERFMON)".into(),
        ),
        Some(VerifierVerdicts {
            frame_pointers: Some(why),
            ..
        }) => Item::new(
            section,
            "verifier",
            Status::Missing,
            format!("refuses the profile program: {why}"),
        )
        .affects(&["profile"]),
        Some(VerifierVerdicts {
            dwarf: Some(why), ..
        }) => Item::new(
            section,
            "verifier",
            Status::Limited,
            format!(
                "refuses stack copies (--unwind dwarf), so stacks are walked with frame \
                 pointers: {why}"
            ),
        )
        .affects(STACK_TOOLS),
        Some(_) => Item::new(
            section,
            "verifier",
            Status::Ok,
            "accepts the profile program, with frame pointers and stack copies".into(),
        ),
    });
    checks.push(if facts.host_pid_namespace {
        Item::new(section, "PID namespace", Status::Ok, "the host's".into())
    } else {
        Item::new(
            section,
            "PID namespace",
            Status::Missing,
            crate::session::targets::FOREIGN_PID_NAMESPACE.into(),
        )
        .affects(ALL_TOOLS)
        .fix(crate::session::targets::FOREIGN_PID_NAMESPACE_FIX)
    });
}

fn setting_items(facts: &Facts, checks: &mut Vec<Item>) {
    let section = "sysctl kernel.*";
    let value = |v: Option<i64>| v.map_or_else(|| "unreadable".to_owned(), |v| v.to_string());
    let paranoid = facts.perf_event_paranoid;
    checks.push(Item::new(
        section,
        "perf_event_paranoid",
        Status::Ok,
        match paranoid {
            Some(p) if p >= 2 => format!(
                "{}: tracing needs CAP_PERFMON, kernel symbols CAP_SYSLOG",
                value(paranoid)
            ),
            _ => format!("{}: tracing needs CAP_PERFMON", value(paranoid)),
        },
    ));
    let kptr = facts.kptr_restrict;
    checks.push(if kptr >= Some(2) {
        Item::new(
            section,
            "kptr_restrict",
            Status::Limited,
            "2: kernel symbols are hidden from everyone, so kernel frames come out [unknown]"
                .into(),
        )
        .affects(STACK_TOOLS)
        .fix("`sysctl kernel.kptr_restrict=1` (CAP_SYSLOG then reads them), or -U for user stacks only")
    } else {
        Item::new(
            section,
            "kptr_restrict",
            Status::Ok,
            if kptr == Some(1) {
                "1: kernel symbols need CAP_SYSLOG".into()
            } else {
                format!(
                    "{}: kernel symbols readable as perf_event_paranoid allows",
                    value(kptr)
                )
            },
        )
    });
    checks.push(Item::new(
        section,
        "unprivileged_bpf_disabled",
        Status::Ok,
        format!(
            "{}: tracing programs need CAP_BPF whatever its value",
            value(facts.unprivileged_bpf_disabled)
        ),
    ));
}

/// Each capability a tool uses that this process lacks, with what it costs: required ones stop
/// the tools that need them; the others take something away.
fn capability_items(facts: &Facts, setcap: &dyn Fn(Vec<Cap>) -> String, checks: &mut Vec<Item>) {
    let section = "capabilities";
    let Some(eff) = facts.capabilities else {
        checks.push(Item::new(
            section,
            "capabilities",
            Status::Note,
            "/proc/self/status does not say; the kernel will".into(),
        ));
        return;
    };
    // (capability, the tools it stops, the tools it limits, what is lost without it)
    let mut rows: Vec<(Cap, &[&'static str], &[&'static str], &str)> = vec![
        (
            Cap::Bpf,
            ALL_TOOLS,
            &[],
            "needed to create BPF maps and load programs",
        ),
        (
            Cap::Perfmon,
            ALL_TOOLS,
            &[],
            "needed to load tracing programs and open perf events",
        ),
        (
            Cap::SysAdmin,
            &["uprobe-hist"],
            &[],
            "needed for uprobes (offcpu: stacks of threads blocked earlier)",
        ),
        (
            Cap::SysPtrace,
            &[],
            &["uprobe-hist", "offcpu"],
            "other users' processes: uprobe-hist -p, offcpu's recovered stacks",
        ),
        (
            Cap::DacReadSearch,
            &[],
            &["offcpu"],
            "other users' threads blocked earlier: offcpu cannot recover them",
        ),
    ];
    if facts.kallsyms_hidden && facts.kptr_restrict < Some(2) {
        rows.insert(
            2,
            (
                Cap::Syslog,
                &[],
                STACK_TOOLS,
                "kernel frames unnamed: profile and offcpu need it, or -U",
            ),
        );
    }
    let missing: Vec<_> = rows
        .iter()
        .filter(|(cap, ..)| !privileges::has(eff, *cap))
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = rows.iter().map(|(cap, ..)| cap.name()).collect();
        checks.push(Item::new(
            section,
            "capabilities",
            Status::Ok,
            format!("all that livetrace needs here: {}", names.join(" ")),
        ));
        return;
    }
    // One grant line for every capability livetrace uses, as the tools' errors spell it.
    let grant = format!(
        "run livetrace as root, or grant the binary these capabilities once (then any user who \
         may run it can trace):\n{}",
        setcap(rows.iter().map(|(cap, ..)| *cap).collect())
    );
    for (cap, stops, limits, lost) in missing {
        let (status, affects) = if stops.is_empty() {
            (Status::Limited, *limits)
        } else {
            (Status::Missing, *stops)
        };
        checks.push(
            Item::new(section, cap.name(), status, (*lost).to_owned())
                .affects(affects)
                .fix(grant.clone()),
        );
    }
}

fn runtime_items(facts: &Facts, checks: &mut Vec<Item>) {
    let section = "runtimes";
    for process in &facts.processes {
        let name = format!("{} {}", process.pid, process.comm);
        let runtime = process.runtime.name();
        checks.push(if process.perf_map {
            Item::new(
                section,
                name,
                Status::Ok,
                format!("{runtime}: functions named from its perf map"),
            )
        } else {
            Item::new(
                section,
                name,
                Status::Limited,
                format!("{runtime}: functions unnamed (no perf map)"),
            )
            .affects(STACK_TOOLS)
            .fix(process.runtime.advice(process.pid))
        });
    }
    if facts.unreadable_processes > 0 {
        let ptrace = facts
            .capabilities
            .is_some_and(|eff| privileges::has(eff, Cap::SysPtrace));
        checks.push(Item::new(
            section,
            "unreadable",
            Status::Note,
            format!(
                "{} processes' executables unreadable{}",
                facts.unreadable_processes,
                if ptrace {
                    ""
                } else {
                    " (others' need CAP_SYS_PTRACE)"
                }
            ),
        ));
    }
}

/// Runtime lines shown before the rest are summed up (the JSON has them all).
const RUNTIMES_SHOWN: usize = 6;
/// Where text is wrapped.
const WIDTH: usize = 100;
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

#[cfg(test)]
mod tests {
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
