//! The checks: from the facts to one item per thing that matters, each with its status, what
//! it costs which subcommand, and the fix in the tools' own words.

use super::{Facts, Item, Pmu, Status, TracefsState, VerifierVerdicts};
use crate::{
    kernel_btf,
    privileges::{self, Cap},
    tools::offcpu::tracefs,
};

const STACK_TOOLS: &[&str] = &["profile", "offcpu"];
const ALL_TOOLS: &[&str] = &["profile", "offcpu", "uprobe-hist"];

/// The section of the kernel's items.
const SECTION: &str = "kernel";

/// The kernel: its version, BTF, tracefs, the probe PMUs, a hardware PMU, the verifier's answer
/// and the PID namespace.
pub(super) fn kernel_items(facts: &Facts, checks: &mut Vec<Item>) {
    version_item(facts, checks);
    btf_items(facts, checks);
    tracefs_item(facts, checks);
    probe_items(facts, checks);
    pmu_item(facts, checks);
    verifier_item(facts, checks);
    pid_namespace_item(facts, checks);
}

/// Every tool needs 5.8 (ring buffers); `--unwind dwarf` 5.15 (`bpf_task_pt_regs`).
fn version_item(facts: &Facts, checks: &mut Vec<Item>) {
    checks.push(match facts.version {
        Some(v) if v < (5, 8) => Item::new(
            SECTION,
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
            SECTION,
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
            SECTION,
            "version",
            Status::Ok,
            format!(
                "{} (5.8+ for every tool, 5.15+ for --unwind dwarf)",
                facts.release
            ),
        ),
        None => Item::new(
            SECTION,
            "version",
            Status::Note,
            format!("{}: not a version livetrace can read", facts.release),
        ),
    });
}

/// uprobe-hist needs BTF; offcpu falls back without it.
fn btf_items(facts: &Facts, checks: &mut Vec<Item>) {
    checks.push(if facts.btf {
        Item::new(SECTION, "BTF", Status::Ok, facts.btf_path.clone())
    } else {
        Item::new(
            SECTION,
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
                SECTION,
                "no BTF",
                Status::Limited,
                "offcpu falls back to the tracepoint (no --wakers)".into(),
            )
            .affects(&["offcpu", "profile"])
            .fix(kernel_btf::MISSING_BTF_FIX),
        );
    }
}

/// tracefs matters to offcpu only without BTF (or with --attach tracepoint).
fn tracefs_item(facts: &Facts, checks: &mut Vec<Item>) {
    let has = |cap| {
        facts
            .capabilities
            .is_none_or(|eff| privileges::has(eff, cap))
    };
    let tracefs_status = |bad: Status| if facts.btf { Status::Note } else { bad };
    checks.push(match &facts.tracefs {
        TracefsState::Readable(dir) => Item::new(SECTION, "tracefs", Status::Ok, dir.clone()),
        TracefsState::Unreadable(dir) if !has(Cap::DacReadSearch) => Item::new(
            SECTION,
            "tracefs",
            tracefs_status(Status::Missing),
            format!("{dir}: root's (mode 0700), offcpu's tracepoint mode cannot read it"),
        )
        .affects(&["offcpu"])
        .fix(tracefs::UNREADABLE_FIX),
        TracefsState::Unreadable(dir) => Item::new(
            SECTION,
            "tracefs",
            Status::Ok,
            format!("{dir} (root's, read with CAP_DAC_READ_SEARCH)"),
        ),
        TracefsState::NotMounted if has(Cap::SysAdmin) => Item::new(
            SECTION,
            "tracefs",
            Status::Ok,
            "not mounted; livetrace mounts it when it needs it".into(),
        ),
        TracefsState::NotMounted => {
            let dir = tracefs::mount_point();
            Item::new(
                SECTION,
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
}

/// The uprobe PMU (uprobe-hist), and the kprobe PMU (no tool uses kprobes: said anyway).
fn probe_items(facts: &Facts, checks: &mut Vec<Item>) {
    checks.push(if facts.uprobe_pmu {
        Item::new(
            SECTION,
            "uprobes",
            Status::Ok,
            "the uprobe PMU is there".into(),
        )
    } else {
        Item::new(
            SECTION,
            "uprobes",
            Status::Missing,
            "no uprobe PMU (/sys/bus/event_source/devices/uprobe): uprobe-hist cannot run".into(),
        )
        .affects(&["uprobe-hist"])
        .fix("boot a kernel built with CONFIG_UPROBE_EVENTS")
    });
    checks.push(if facts.kprobe_pmu {
        Item::new(
            SECTION,
            "kprobes",
            Status::Ok,
            "the kprobe PMU is there".into(),
        )
    } else {
        Item::new(
            SECTION,
            "kprobes",
            Status::Note,
            "no kprobe PMU; no livetrace tool uses kprobes".into(),
        )
    });
}

/// A hardware PMU: profile's default cpu-clock needs none.
fn pmu_item(facts: &Facts, checks: &mut Vec<Item>) {
    checks.push(match facts.hardware_pmu {
        Pmu::Present => Item::new(
            SECTION,
            "hardware PMU",
            Status::Ok,
            "present (profile --event cycles can use it)".into(),
        ),
        Pmu::Absent => Item::new(
            SECTION,
            "hardware PMU",
            Status::Note,
            "none (a VM?): profile's cpu-clock needs none".into(),
        ),
        Pmu::Unknown => Item::new(
            SECTION,
            "hardware PMU",
            Status::Note,
            "unknown (perf_event_open refused): profile's default cpu-clock needs none".into(),
        ),
    });
}

/// The verifier's own answer, for the program the default profile loads: where the kernel
/// version says "should", this says "does".
fn verifier_item(facts: &Facts, checks: &mut Vec<Item>) {
    checks.push(match &facts.verifier {
        None => Item::new(
            SECTION,
            "verifier",
            Status::Note,
            "not asked (loading a program needs CAP_BPF and CAP_PERFMON)".into(),
        ),
        Some(VerifierVerdicts {
            frame_pointers: Some(why),
            ..
        }) => Item::new(
            SECTION,
            "verifier",
            Status::Missing,
            format!("refuses the profile program: {why}"),
        )
        .affects(&["profile"]),
        Some(VerifierVerdicts {
            dwarf: Some(why), ..
        }) => Item::new(
            SECTION,
            "verifier",
            Status::Limited,
            format!(
                "refuses stack copies (--unwind dwarf), so stacks are walked with frame \
                 pointers: {why}"
            ),
        )
        .affects(STACK_TOOLS),
        Some(_) => Item::new(
            SECTION,
            "verifier",
            Status::Ok,
            "accepts the profile program, with frame pointers and stack copies".into(),
        ),
    });
}

/// Whether /proc shows the PIDs the kernel reports.
fn pid_namespace_item(facts: &Facts, checks: &mut Vec<Item>) {
    checks.push(if facts.host_pid_namespace {
        Item::new(SECTION, "PID namespace", Status::Ok, "the host's".into())
    } else {
        Item::new(
            SECTION,
            "PID namespace",
            Status::Missing,
            crate::session::targets::FOREIGN_PID_NAMESPACE.into(),
        )
        .affects(ALL_TOOLS)
        .fix(crate::session::targets::FOREIGN_PID_NAMESPACE_FIX)
    });
}

pub(super) fn setting_items(facts: &Facts, checks: &mut Vec<Item>) {
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
pub(super) fn capability_items(
    facts: &Facts,
    setcap: &dyn Fn(Vec<Cap>) -> String,
    checks: &mut Vec<Item>,
) {
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

pub(super) fn runtime_items(facts: &Facts, checks: &mut Vec<Item>) {
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
        } else if process.runtime.frames_read() {
            Item::new(
                section,
                name,
                Status::Ok,
                format!("{runtime}: functions named from the interpreter's frames (profile)"),
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
