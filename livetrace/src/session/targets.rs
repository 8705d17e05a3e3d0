//! What to observe: the whole system, given processes (`-p`) and threads (`-t`), or a command
//! that livetrace starts itself (`-- COMMAND`). Every id is checked before anything is loaded.

use std::{ffi::OsString, fs, path::Path};

use anyhow::bail;
use clap::Args;

use crate::{
    UsageError,
    proc::task::{is_zombie, name as process_name, thread_group_of},
};

/// Which processes to observe, for a tool that probes whole processes (uprobe-hist).
#[derive(Args, Debug, Clone, Default)]
pub struct ProcessArgs {
    /// Observe these processes (all their threads); comma-separated or repeated.
    #[arg(short = 'p', long = "pid", value_name = "PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Start this command and observe it and every process it forks, until it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
    /// Under sudo, run COMMAND as root instead of as the user who ran sudo (SUDO_UID).
    #[arg(long = "as-root")]
    pub as_root: bool,
}

/// What to observe, for a tool that can also watch single threads (profile, offcpu).
#[derive(Args, Debug, Clone, Default)]
pub struct TargetArgs {
    #[command(flatten)]
    pub processes: ProcessArgs,
    /// Observe these threads only; comma-separated or repeated.
    #[arg(short = 't', long = "tid", value_name = "TID", value_delimiter = ',')]
    pub tids: Vec<u32>,
}

impl ProcessArgs {
    /// [`TargetArgs::resolve`] for a tool without `-t`: its advice names only flags it has.
    pub fn resolve(&self) -> anyhow::Result<Target> {
        resolve(&self.pids, &[], &self.command, false)
    }
}

/// A checked target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    System,
    Threads { pids: Vec<u32>, tids: Vec<u32> },
    Command(Vec<OsString>),
}

impl TargetArgs {
    /// Checks that every PID and TID names a live process or thread, and that the command is
    /// not combined with ids.
    pub fn resolve(&self) -> anyhow::Result<Target> {
        let p = &self.processes;
        resolve(&p.pids, &self.tids, &p.command, true)
    }
}

/// Checks the ids and the command; `threads`: whether the tool takes `-t`, for the advice.
fn resolve(
    pids: &[u32],
    tids: &[u32],
    command: &[OsString],
    threads: bool,
) -> anyhow::Result<Target> {
    if !command.is_empty() {
        if !pids.is_empty() || !tids.is_empty() {
            return Err(UsageError::error(if threads {
                "give either -p/-t or a COMMAND after --, not both"
            } else {
                "give either -p or a COMMAND after --, not both"
            }));
        }
        return Ok(Target::Command(command.to_vec()));
    }
    if pids.is_empty() && tids.is_empty() {
        return Ok(Target::System);
    }
    for &pid in pids {
        match thread_group_of(pid) {
            Some(tgid) if tgid == pid => {}
            Some(tgid) if threads => {
                return Err(UsageError::error(format!(
                    "{pid} is a thread of process {tgid}, not a process: use -t {pid} for the \
                     thread alone, or -p {tgid} for the whole process"
                )));
            }
            Some(tgid) => {
                return Err(UsageError::error(format!(
                    "{pid} is a thread of process {tgid}, not a process: use -p {tgid} (the \
                     probe sees every thread of the process)"
                )));
            }
            None if is_zombie(pid) => bail!(
                "process {pid} has exited: it is a zombie, waiting for its parent to reap it, \
                 and runs no code to trace"
            ),
            None => bail!("no process with PID {pid} exists (is it still running?)"),
        }
    }
    for &tid in tids {
        if thread_group_of(tid).is_none() {
            bail!("no thread with TID {tid} exists (is it still running?)");
        }
    }
    Ok(Target::Threads {
        pids: dedup(pids),
        tids: dedup(tids),
    })
}

fn dedup(ids: &[u32]) -> Vec<u32> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`, include/linux/proc_ns.h).
const INIT_PID_NS_INODE: u64 = 0xEFFF_FFFC;

/// Why livetrace cannot trace from a PID namespace of its own (also said by `livetrace check`).
pub const FOREIGN_PID_NAMESPACE: &str = "livetrace runs in a PID namespace of its own (a \
    container's) and /proc is that namespace's: the kernel reports the host's PIDs, which it \
    does not show, so no process could be matched or named";
/// What to do about it.
pub const FOREIGN_PID_NAMESPACE_FIX: &str = "run livetrace in the host's PID namespace: \
    `hostPID: true` in a Kubernetes pod, `docker run --pid=host`, or `nsenter -t 1 -p -m` from \
    the host";

/// Whether the PIDs in /proc are the ones the kernel's tracing helpers report (the initial
/// namespace's): livetrace's own namespace is the host's, or /proc is the host's (its pid 1 is
/// in the initial namespace; reading that takes root).
pub fn sees_host_pids() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let initial = |path: &str| fs::metadata(path).is_ok_and(|m| m.ino() == INIT_PID_NS_INODE);
    initial("/proc/self/ns/pid") || initial("/proc/1/ns/pid")
}

/// Refuses, before anything is loaded, to trace from a PID namespace whose /proc cannot name
/// what the kernel reports.
pub fn require_host_pids() -> anyhow::Result<()> {
    if sees_host_pids() || !std::path::Path::new("/proc/self/ns/pid").exists() {
        return Ok(());
    }
    bail!("{FOREIGN_PID_NAMESPACE}; {FOREIGN_PID_NAMESPACE_FIX}")
}

impl Target {
    /// A short name for default output files: "system", the first id, or the command's name.
    pub fn file_stem(&self) -> String {
        match self {
            Self::System => "system".to_owned(),
            Self::Threads { pids, tids } => pids
                .first()
                .or(tids.first())
                .map_or_else(|| "targets".into(), |id| id.to_string()),
            Self::Command(argv) => argv
                .first()
                .and_then(|p| Path::new(p).file_name())
                .map_or_else(|| "command".into(), |n| n.to_string_lossy().into_owned()),
        }
    }

    /// For progress lines and titles: "pid 1234 (chain)", "the whole system".
    pub fn describe(&self) -> String {
        let name_ids = |kind: &str, ids: &[u32]| -> Vec<String> {
            ids.iter()
                .map(|&id| match process_name(id) {
                    Some(name) => format!("{kind} {id} ({name})"),
                    None => format!("{kind} {id}"),
                })
                .collect()
        };
        match self {
            Self::System => "the whole system".into(),
            Self::Threads { pids, tids } => {
                let mut parts = name_ids("pid", pids);
                parts.extend(name_ids("tid", tids));
                parts.join(", ")
            }
            Self::Command(argv) => {
                let words: Vec<String> = argv
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect();
                format!("`{}`", words.join(" "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own PID resolves, a thread id given as -p is refused with the right suggestion, and a
    /// PID that cannot exist is named in the error.
    #[test]
    fn checks_ids_before_anything_is_loaded() {
        let me = std::process::id();
        let args = TargetArgs {
            processes: ProcessArgs {
                pids: vec![me, me],
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            args.resolve().unwrap(),
            Target::Threads {
                pids: vec![me],
                tids: vec![]
            }
        );

        let missing = ProcessArgs {
            pids: vec![u32::MAX - 1],
            ..Default::default()
        };
        let err = missing.resolve().unwrap_err().to_string();
        assert!(err.contains(&(u32::MAX - 1).to_string()), "{err}");

        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let live_tid = rx.recv().unwrap();
        let as_pid = TargetArgs {
            processes: ProcessArgs {
                pids: vec![live_tid],
                ..Default::default()
            },
            ..Default::default()
        };
        let err = as_pid.resolve().unwrap_err().to_string();
        assert!(err.contains(&format!("-t {live_tid}")), "{err}");
        done_tx.send(()).unwrap();
        handle.join().unwrap();
    }

    /// A command cannot be combined with ids, and a missing program is reported by name.
    #[test]
    fn command_is_exclusive_and_must_exist() {
        let both = ProcessArgs {
            pids: vec![1],
            command: vec!["true".into()],
            as_root: false,
        };
        assert!(both.resolve().is_err());
        let err =
            super::super::command::HeldCommand::spawn(&["no-such-program-livetrace".into()], false)
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains("no-such-program-livetrace"), "{err}");
    }
}
