//! What `livetrace check` finds out about this host, read-only: the kernel and its features,
//! the sysctls that gate tracing, this process's capabilities, and the language runtimes it can
//! see. Nothing here judges; `super` turns these facts into verdicts.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{
    kernel_btf, privileges,
    proc::{maps::Maps, task},
    runtimes::Runtime,
    symbolize::perf_map::PerfMap,
    tools::offcpu::tracefs,
};

#[derive(Clone, Debug, Serialize)]
pub struct Facts {
    pub release: String,
    pub machine: String,
    /// `(major, minor)` of the running kernel, where its release string tells.
    pub version: Option<(u32, u32)>,
    /// Where the kernel's BTF is read from, and whether it could be.
    pub btf_path: String,
    pub btf: bool,
    pub tracefs: TracefsState,
    pub kprobe_pmu: bool,
    pub uprobe_pmu: bool,
    pub hardware_pmu: Pmu,
    pub perf_event_paranoid: Option<i64>,
    pub kptr_restrict: Option<i64>,
    pub unprivileged_bpf_disabled: Option<i64>,
    /// Whether /proc/kallsyms shows this process zeros.
    pub kallsyms_hidden: bool,
    pub uid: u32,
    /// The effective capability set; `None` where /proc does not say.
    pub capabilities: Option<u64>,
    /// Whether /proc shows the PIDs the kernel reports (the host's PID namespace).
    pub host_pid_namespace: bool,
    /// What the kernel's verifier said of the profile program; `None` when it could not be
    /// asked (no CAP_BPF and CAP_PERFMON).
    pub verifier: Option<VerifierVerdicts>,
    pub processes: Vec<RuntimeProcess>,
    /// Processes whose executable could not be read (another user's, without CAP_SYS_PTRACE).
    pub unreadable_processes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TracefsState {
    Readable(String),
    Unreadable(String),
    NotMounted,
}

/// The verifier's answer for each way of walking user stacks: `None` accepted, or why not.
#[derive(Clone, Debug, Serialize)]
pub struct VerifierVerdicts {
    pub frame_pointers: Option<String>,
    pub dwarf: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pmu {
    Present,
    Absent,
    /// perf_event_open was refused before it could tell (perf_event_paranoid 3).
    Unknown,
}

/// A process of a runtime whose functions need a perf map to be named.
#[derive(Clone, Debug, Serialize)]
pub struct RuntimeProcess {
    pub pid: u32,
    pub comm: String,
    #[serde(serialize_with = "runtime_name")]
    pub runtime: Runtime,
    pub perf_map: bool,
}

fn runtime_name<S: serde::Serializer>(runtime: &Runtime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&runtime.name())
}

impl Facts {
    pub fn gather() -> Self {
        let (release, machine) = uname();
        let btf_path = kernel_btf::vmlinux_path();
        let (processes, unreadable_processes) = runtime_processes();
        let capabilities = privileges::effective();
        let may_load = capabilities.is_some_and(|eff| {
            privileges::has(eff, privileges::Cap::Bpf)
                && privileges::has(eff, privileges::Cap::Perfmon)
        });
        let refusal = |dwarf| {
            // A signal pending while the verifier runs would read as a refusal.
            let _deferred = crate::signals::defer();
            crate::tools::profile::verifier_accepts(dwarf)
                .err()
                .map(|err| format!("{err:#}"))
        };
        Self {
            version: kernel_version(&release),
            release,
            machine,
            btf: std::fs::File::open(&btf_path).is_ok(),
            btf_path: btf_path.display().to_string(),
            tracefs: match tracefs::status() {
                tracefs::Status::Readable(dir) => TracefsState::Readable(dir.display().to_string()),
                tracefs::Status::Unreadable(dir) => {
                    TracefsState::Unreadable(dir.display().to_string())
                }
                tracefs::Status::NotMounted => TracefsState::NotMounted,
            },
            kprobe_pmu: Path::new("/sys/bus/event_source/devices/kprobe/type").exists(),
            uprobe_pmu: Path::new("/sys/bus/event_source/devices/uprobe/type").exists(),
            hardware_pmu: hardware_pmu(),
            perf_event_paranoid: sysctl("perf_event_paranoid"),
            kptr_restrict: sysctl("kptr_restrict"),
            unprivileged_bpf_disabled: sysctl("unprivileged_bpf_disabled"),
            kallsyms_hidden: privileges::kernel_symbols_hidden(),
            // SAFETY: geteuid has no preconditions.
            uid: unsafe { libc::geteuid() },
            capabilities,
            verifier: may_load.then(|| VerifierVerdicts {
                frame_pointers: refusal(false),
                dwarf: refusal(true),
            }),
            host_pid_namespace: crate::session::targets::sees_host_pids(),
            processes,
            unreadable_processes,
        }
    }
}

fn uname() -> (String, String) {
    // SAFETY: utsname is plain data, filled in by uname(2).
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return (String::new(), String::new());
    }
    let field = |chars: &[libc::c_char]| {
        let bytes: Vec<u8> = chars
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&uts.release), field(&uts.machine))
}

/// `6.1.0-57-cloud-amd64` gives (6, 1).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn sysctl(name: &str) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the CPU's performance counters can be opened: a cycles counter on this process,
/// user space only (allowed up to perf_event_paranoid 2). ENOENT or EOPNOTSUPP means there is
/// no hardware PMU (most VMs without PMU passthrough).
fn hardware_pmu() -> Pmu {
    /// The first 64 bytes of `struct perf_event_attr` (PERF_ATTR_SIZE_VER0), all this needs.
    #[repr(C)]
    struct Attr {
        kind: u32,
        size: u32,
        config: u64,
        sample_period: u64,
        sample_type: u64,
        read_format: u64,
        flags: u64,
        wakeup_events: u32,
        bp_type: u32,
        config1: u64,
    }
    const PERF_TYPE_HARDWARE: u32 = 0;
    const PERF_COUNT_HW_CPU_CYCLES: u64 = 0;
    const DISABLED: u64 = 1;
    const EXCLUDE_KERNEL: u64 = 1 << 5;
    const EXCLUDE_HV: u64 = 1 << 6;
    const PERF_FLAG_FD_CLOEXEC: u64 = 1 << 3;
    let attr = Attr {
        kind: PERF_TYPE_HARDWARE,
        size: std::mem::size_of::<Attr>() as u32,
        config: PERF_COUNT_HW_CPU_CYCLES,
        sample_period: 0,
        sample_type: 0,
        read_format: 0,
        flags: DISABLED | EXCLUDE_KERNEL | EXCLUDE_HV,
        wakeup_events: 0,
        bp_type: 0,
        config1: 0,
    };
    // SAFETY: perf_event_open on this process (pid 0, any CPU) with a valid attr of the size
    // it states; the descriptor, if any, is closed right away.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const Attr,
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor we own.
        unsafe { libc::close(fd as i32) };
        return Pmu::Present;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV) => Pmu::Absent,
        _ if Path::new("/sys/bus/event_source/devices/cpu").exists() => Pmu::Present,
        _ => Pmu::Unknown,
    }
}

/// The JVM, Node.js and CPython processes visible here, and how many processes could not be
/// looked into.
fn runtime_processes() -> (Vec<RuntimeProcess>, usize) {
    let mut found = Vec::new();
    let mut unreadable = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (found, unreadable);
    };
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u32;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some(exe) = task::executable(pid) else {
            // Kernel threads have no executable; other users' processes need CAP_SYS_PTRACE.
            if std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
            {
                unreadable += 1;
            }
            continue;
        };
        let exe_name = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let paths = Maps::of(pid).map(|m| m.code_paths()).unwrap_or_default();
        let Some(runtime) = Runtime::detect(&exe_name, paths.iter().map(PathBuf::as_path)) else {
            continue;
        };
        found.push(RuntimeProcess {
            pid,
            comm: task::name(pid).unwrap_or_default(),
            runtime,
            perf_map: PerfMap::exists(pid),
        });
    }
    found.sort_by_key(|p| p.pid);
    (found, unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kernel_versions() {
        assert_eq!(kernel_version("6.1.0-57-cloud-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.18.0"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-1034-aws"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }
}
