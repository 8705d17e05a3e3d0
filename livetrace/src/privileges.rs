//! Capabilities: which ones each subcommand needs, checked from `CapEff` in /proc/self/status
//! before the kernel is touched, so that a missing one is named with what it is for and how to
//! grant it, instead of surfacing later as a bare EPERM from a syscall.
//!
//! Measured on kernel 6.18 with `kernel.perf_event_paranoid=2` and
//! `kernel.unprivileged_bpf_disabled=2` (see the README's Privileges section for the commands).
//! CAP_SYS_ADMIN implies CAP_BPF and CAP_PERFMON, as in the kernel's own checks, so root on
//! kernels older than 5.8 (which have neither) passes too.

use std::fmt::Write as _;

/// A capability livetrace may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    DacReadSearch,
    Syslog,
    SysPtrace,
    SysAdmin,
    Perfmon,
    Bpf,
}

impl Cap {
    /// The bit in the capability sets (linux/capability.h).
    fn bit(self) -> u32 {
        match self {
            Self::DacReadSearch => 2,
            Self::Syslog => 34,
            Self::SysPtrace => 19,
            Self::SysAdmin => 21,
            Self::Perfmon => 38,
            Self::Bpf => 39,
        }
    }

    /// `CAP_BPF`, as in the man pages.
    pub fn name(self) -> &'static str {
        match self {
            Self::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Self::Syslog => "CAP_SYSLOG",
            Self::SysPtrace => "CAP_SYS_PTRACE",
            Self::SysAdmin => "CAP_SYS_ADMIN",
            Self::Perfmon => "CAP_PERFMON",
            Self::Bpf => "CAP_BPF",
        }
    }

    /// `cap_bpf`, as setcap spells it.
    fn setcap_name(self) -> String {
        self.name().to_ascii_lowercase()
    }
}

/// One capability and what this run needs it for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub cap: Cap,
    pub why: &'static str,
}

impl Need {
    pub const fn new(cap: Cap, why: &'static str) -> Self {
        Self { cap, why }
    }
}

pub const BPF: Need = Need::new(
    Cap::Bpf,
    "create BPF maps and load the BPF programs (kernel.unprivileged_bpf_disabled forbids it \
     without)",
);
pub const PERFMON: Need = Need::new(
    Cap::Perfmon,
    "load tracing programs, open perf events and read kernel stacks \
     (kernel.perf_event_paranoid > 1 forbids it without)",
);
pub const UPROBE_ADMIN: Need = Need::new(
    Cap::SysAdmin,
    "create uprobes through perf_event_open (kernels with the CVE-2025-38466 fix require it)",
);
pub const PTRACE_OTHERS: Need = Need::new(
    Cap::SysPtrace,
    "read the executable and /proc/PID/root of processes of other users, to find the function \
     in them",
);
pub const TRACEFS_READ: Need = Need::new(
    Cap::DacReadSearch,
    "read the tracepoint's id and format in tracefs (root-only directory)",
);
pub const KALLSYMS: Need = Need::new(
    Cap::Syslog,
    "read kernel symbol addresses in /proc/kallsyms, to name kernel frames (or leave kernel \
     stacks out with -U)",
);
pub const RECOVER_KERNEL_STACKS: Need = Need::new(
    Cap::SysAdmin,
    "read /proc/PID/task/TID/stack, the kernel stacks of threads blocked since before the \
     capture (they will have user frames only)",
);
pub const RECOVER_USER_STACKS: [Need; 2] = [
    Need::new(
        Cap::SysPtrace,
        "read the stack memory of other users' threads blocked since before the capture",
    ),
    Need::new(
        Cap::DacReadSearch,
        "open /proc/PID/task/TID/syscall (mode 0400) of other users' threads blocked since \
         before the capture",
    ),
];
pub const TRACEFS_MOUNT: Need = Need::new(Cap::SysAdmin, "mount tracefs, which is not mounted");

/// The effective capability set, or `None` where /proc cannot tell (then nothing is checked:
/// the kernel will say).
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Whether the effective set `eff` grants `cap` (CAP_SYS_ADMIN stands in for CAP_BPF and
/// CAP_PERFMON, as it does in the kernel).
pub fn has(eff: u64, cap: Cap) -> bool {
    let bit = |c: Cap| eff & (1u64 << c.bit()) != 0;
    bit(cap) || (matches!(cap, Cap::Bpf | Cap::Perfmon) && bit(Cap::SysAdmin))
}

/// Fails, before anything is loaded, when the effective set lacks a capability in `needs`; the
/// message names each missing one, what it is for, and the `sudo` and `setcap` lines to run.
pub fn require(subcommand: &str, needs: &[Need]) -> anyhow::Result<()> {
    let Some(eff) = effective() else {
        return Ok(());
    };
    let missing: Vec<&Need> = needs.iter().filter(|n| !has(eff, n.cap)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(missing_message(subcommand, needs, &missing))
}

/// Prints a warning for each capability in `wanted` that is missing; the run goes on without
/// what it gives.
pub fn warn_missing(wanted: &[Need]) {
    let Some(eff) = effective() else { return };
    for need in wanted.iter().filter(|n| !has(eff, n.cap)) {
        crate::say!(
            "livetrace: warning: without {}, livetrace cannot {}",
            need.cap.name(),
            need.why
        );
    }
}

fn missing_message(subcommand: &str, needs: &[Need], missing: &[&Need]) -> String {
    let mut message = format!(
        "livetrace {subcommand} needs {} that this process does not have:",
        if missing.len() == 1 {
            "a capability"
        } else {
            "capabilities"
        }
    );
    let width = missing
        .iter()
        .map(|n| n.cap.name().len())
        .max()
        .unwrap_or(0);
    for need in missing {
        let _ = write!(message, "\n  {:width$}  to {}", need.cap.name(), need.why);
    }
    let exe = own_path();
    let argv: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    let _ = write!(
        message,
        "\nrun it as root:\n  sudo {} {}\nor grant the binary these capabilities once (then \
         any user who may run it can trace):\n  {}",
        shell_quote(&exe),
        argv.join(" "),
        setcap_line(needs.iter().map(|n| n.cap)),
    );
    message
}

/// This binary's path, quoted for a shell.
fn own_path() -> String {
    let exe = std::env::current_exe().map_or_else(
        |_| "/path/to/livetrace".to_owned(),
        |p| p.display().to_string(),
    );
    shell_quote(&exe)
}

/// `sudo setcap cap_bpf,cap_perfmon+ep /usr/local/bin/livetrace`: the line that grants this
/// binary `caps` (each once, in the order given).
pub fn setcap_line(caps: impl IntoIterator<Item = Cap>) -> String {
    setcap_line_for(&own_path(), caps)
}

/// [`setcap_line`] for the binary at `path` (quoted already).
pub fn setcap_line_for(path: &str, caps: impl IntoIterator<Item = Cap>) -> String {
    let mut names: Vec<String> = Vec::new();
    for cap in caps {
        let name = cap.setcap_name();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    format!("sudo setcap {}+ep {path}", names.join(","))
}

/// Quotes a word for a POSIX shell when it needs it.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@+%".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Whether /proc/kallsyms shows this process zeros instead of addresses (it does without
/// CAP_SYSLOG when kernel.kptr_restrict >= 1, or kernel.perf_event_paranoid >= 2).
pub fn kernel_symbols_hidden() -> bool {
    use std::io::BufRead as _;
    let Ok(file) = std::fs::File::open("/proc/kallsyms") else {
        return true;
    };
    let mut first = String::new();
    if std::io::BufReader::new(file).read_line(&mut first).is_err() {
        return true;
    }
    first
        .split_ascii_whitespace()
        .next()
        .is_none_or(|addr| addr.bytes().all(|b| b == b'0'))
}

/// Whether `pid` runs as another user than this process (its /proc directory is owned by its
/// effective user). Reading its executable, its /proc/PID/root, its registers and its memory then
/// takes CAP_SYS_PTRACE; /proc/PID/maps alone is also open to CAP_PERFMON. A process that is gone
/// counts as ours: that error is reported elsewhere.
pub fn belongs_to_another_user(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() != me)
}

/// CAP_SYS_PTRACE when some of `pids` belongs to another user.
pub fn ptrace_need(pids: &[u32]) -> Option<Need> {
    pids.iter()
        .any(|&pid| belongs_to_another_user(pid))
        .then_some(PTRACE_OTHERS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, and for nothing else.
    #[test]
    fn sys_admin_implies_bpf_and_perfmon_only() {
        let admin = 1u64 << 21;
        assert!(has(admin, Cap::Bpf) && has(admin, Cap::Perfmon) && has(admin, Cap::SysAdmin));
        assert!(!has(admin, Cap::SysPtrace));
        let bpf_perfmon = (1u64 << 38) | (1u64 << 39);
        assert!(has(bpf_perfmon, Cap::Bpf) && has(bpf_perfmon, Cap::Perfmon));
        assert!(!has(bpf_perfmon, Cap::SysAdmin));
        assert!(!has(0, Cap::Bpf));
    }

    /// The message names each missing capability with its purpose, and the setcap line lists
    /// every capability the subcommand needs, not only the missing ones.
    #[test]
    fn message_names_missing_caps_and_the_fix() {
        let needs = [BPF, PERFMON, UPROBE_ADMIN];
        let missing: Vec<&Need> = needs[..2].iter().collect();
        let text = missing_message("uprobe-hist", &needs, &missing);
        assert!(
            text.contains("CAP_BPF") && text.contains("CAP_PERFMON"),
            "{text}"
        );
        assert!(
            text.contains("setcap cap_bpf,cap_perfmon,cap_sys_admin+ep"),
            "{text}"
        );
        assert!(text.contains("sudo "), "{text}");
        assert!(!text.contains("  CAP_SYS_ADMIN"), "{text}");
    }

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(shell_quote("-p"), "-p");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    /// CapEff parses on this machine.
    #[test]
    fn reads_the_effective_set() {
        assert!(effective().is_some());
    }
}
