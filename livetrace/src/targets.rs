//! What to observe: the whole system, given processes (`-p`) and threads (`-t`), or a command
//! that livetrace starts itself (`-- COMMAND`). Every id is checked before anything is loaded.

use std::{
    ffi::{CString, OsString},
    fs,
    os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::UsageError;

#[derive(Args, Debug, Clone, Default)]
pub struct TargetArgs {
    /// Observe these processes (all their threads); comma-separated or repeated.
    #[arg(short = 'p', long = "pid", value_name = "PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Observe these threads only; comma-separated or repeated.
    #[arg(short = 't', long = "tid", value_name = "TID", value_delimiter = ',')]
    pub tids: Vec<u32>,
    /// Start this command and observe it and every process it forks, until it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
    /// Under sudo, run COMMAND as root instead of as the user who ran sudo (SUDO_UID).
    #[arg(long = "as-root")]
    pub as_root: bool,
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
        if !self.command.is_empty() {
            if !self.pids.is_empty() || !self.tids.is_empty() {
                return Err(UsageError::error(
                    "give either -p/-t or a COMMAND after --, not both",
                ));
            }
            return Ok(Target::Command(self.command.clone()));
        }
        if self.pids.is_empty() && self.tids.is_empty() {
            return Ok(Target::System);
        }
        for &pid in &self.pids {
            match thread_group_of(pid) {
                Some(tgid) if tgid == pid => {}
                Some(tgid) => {
                    return Err(UsageError::error(format!(
                        "{pid} is a thread of process {tgid}, not a process: use -t {pid} for \
                         the thread alone, or -p {tgid} for the whole process"
                    )));
                }
                None => bail!("no process with PID {pid} exists (is it still running?)"),
            }
        }
        for &tid in &self.tids {
            if thread_group_of(tid).is_none() {
                bail!("no thread with TID {tid} exists (is it still running?)");
            }
        }
        Ok(Target::Threads {
            pids: dedup(&self.pids),
            tids: dedup(&self.tids),
        })
    }
}

fn dedup(ids: &[u32]) -> Vec<u32> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The process (tgid) a task belongs to, if the task exists and is not a zombie.
pub fn thread_group_of(id: u32) -> Option<u32> {
    if id == 0 {
        return None;
    }
    let status = fs::read_to_string(format!("/proc/{id}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    if field("State:")?.starts_with('Z') {
        return None;
    }
    field("Tgid:")?.parse().ok()
}

pub fn is_alive(id: u32) -> bool {
    thread_group_of(id).is_some()
}

/// The process's `comm`, e.g. "nginx".
pub fn process_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
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

/// A command started by livetrace and held before it runs until [`HeldCommand::release`], so
/// that probes attached to its PID see it from its first instruction.
///
/// `std`'s spawn returns only once the child has exec'd, so the child cannot simply wait in a
/// `pre_exec` hook. Instead livetrace starts itself as a small shim ([`HOLD_SHIM`]) that waits
/// for a byte on fd 3 and then execs the command in place: same PID, probes already attached.
///
/// Under sudo the command runs as the invoking user (`SUDO_UID`, `SUDO_GID`, that user's
/// groups, `HOME`, `USER`, `LOGNAME`), as it would have without sudo: a tracer's privileges are
/// for tracing, not for the program being traced. `--as-root` keeps root.
pub struct HeldCommand {
    pub pid: u32,
    go: Option<std::fs::File>,
    /// Receives the exit status once the command has been reaped.
    pub exited: tokio::sync::oneshot::Receiver<std::io::Result<std::process::ExitStatus>>,
}

/// The hidden first argument that makes livetrace act as the hold shim.
pub const HOLD_SHIM: &str = "__livetrace-hold-exec";
/// The descriptor on which the shim waits for its go byte.
const HOLD_FD: i32 = 3;

impl HeldCommand {
    pub fn spawn(argv: &[OsString], as_root: bool) -> anyhow::Result<Self> {
        let program = argv.first().context("no command given after --")?;
        // Fail early and clearly if the program cannot be found, instead of after loading BPF.
        if program.as_bytes().contains(&b'/') {
            if !Path::new(program).exists() {
                bail!("command '{}' does not exist", program.to_string_lossy());
            }
        } else if which(program).is_none() {
            bail!("command '{}' not found in PATH", program.to_string_lossy());
        }
        let (go_read, go_write) = pipe()?;
        let mut command = std::process::Command::new("/proc/self/exe");
        command.arg(HOLD_SHIM);
        if let Some((uid, gid)) = sudo_user(as_root)? {
            log::info!("running the command as uid {uid}, gid {gid} (SUDO_UID, SUDO_GID)");
            command
                .arg(format!("--uid={uid}"))
                .arg(format!("--gid={gid}"));
        }
        command.arg("--").args(argv);
        // SAFETY: dup2 and fcntl are async-signal-safe. They hand the read end to the shim as
        // fd 3 without close-on-exec (dup2 clears it on the copy; if the pipe already is fd 3,
        // dup2 would do nothing, so clear the flag directly).
        unsafe {
            use std::os::unix::process::CommandExt as _;
            command.pre_exec(move || {
                let status = if go_read == HOLD_FD {
                    libc::fcntl(HOLD_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(go_read, HOLD_FD)
                };
                if status < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = command.spawn();
        // SAFETY: both ends are ours; the child has its own copy of the read end now.
        unsafe { libc::close(go_read) };
        let go = unsafe { std::fs::File::from_raw_fd(go_write) };
        let mut child = spawned.context("failed to start the command")?;
        let pid = child.id();
        let (exited_tx, exited) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("command-wait".into())
            .spawn(move || {
                let _ = exited_tx.send(child.wait());
            })
            .context("failed to start a thread to wait for the command")?;
        Ok(Self {
            pid,
            go: Some(go),
            exited,
        })
    }

    /// Lets the command run.
    pub fn release(&mut self) -> anyhow::Result<()> {
        use std::io::Write as _;
        if let Some(mut go) = self.go.take() {
            go.write_all(&[1])
                .context("failed to release the command")?;
        }
        Ok(())
    }
}

/// The user a command started under sudo runs as: `SUDO_UID` and `SUDO_GID` (or that user's
/// primary group), when livetrace runs as root and `--as-root` was not given.
fn sudo_user(as_root: bool) -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if as_root || unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let Some(uid) = std::env::var_os("SUDO_UID") else {
        return Ok(None);
    };
    let uid: u32 = uid.to_str().and_then(|s| s.parse().ok()).with_context(|| {
        format!(
            "SUDO_UID is '{}', not a user id; unset it, or pass --as-root to run the command \
             as root",
            uid.to_string_lossy()
        )
    })?;
    if uid == 0 {
        return Ok(None);
    }
    let gid = match std::env::var("SUDO_GID").ok().and_then(|s| s.parse().ok()) {
        Some(gid) => gid,
        None => Passwd::by_uid(uid).map(|p| p.gid).with_context(|| {
            format!("SUDO_GID is unset and user {uid} has no passwd entry to take a group from")
        })?,
    };
    Ok(Some((uid, gid)))
}

/// The fields of a passwd entry the shim needs.
struct Passwd {
    name: CString,
    gid: u32,
    home: OsString,
}

impl Passwd {
    fn by_uid(uid: u32) -> Option<Self> {
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the sizes given; getpwuid_r is thread-safe.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success the strings point into buf, NUL-terminated.
        let (name, home) = unsafe {
            (
                std::ffi::CStr::from_ptr(entry.pw_name).to_owned(),
                std::ffi::CStr::from_ptr(entry.pw_dir).to_owned(),
            )
        };
        Some(Self {
            name,
            gid: entry.pw_gid,
            home: OsString::from(std::ffi::OsStr::from_bytes(home.as_bytes())),
        })
    }
}

/// Becomes `uid`/`gid` for good (groups first, user last), for the shim before it execs.
fn drop_to(uid: u32, gid: u32, command: &mut std::process::Command) -> std::io::Result<()> {
    let passwd = Passwd::by_uid(uid);
    // SAFETY: plain credential syscalls on this single-threaded shim process.
    unsafe {
        let rc = match &passwd {
            Some(p) => libc::initgroups(p.name.as_ptr(), gid),
            None => libc::setgroups(1, &gid),
        };
        if rc != 0 || libc::setresgid(gid, gid, gid) != 0 || libc::setresuid(uid, uid, uid) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if let Some(p) = passwd {
        let name = std::ffi::OsStr::from_bytes(p.name.as_bytes());
        command
            .env("HOME", &p.home)
            .env("USER", name)
            .env("LOGNAME", name);
    }
    Ok(())
}

/// The shim's side: `[--uid=N --gid=N] -- COMMAND...`. Wait for the go byte (end-of-file means
/// livetrace gave up: do not run the command), become the given user if any, then exec the
/// command in place. Only returns on failure.
pub fn hold_shim_main(args: &[OsString]) -> std::process::ExitCode {
    use std::{io::Read as _, os::unix::process::CommandExt as _};
    let mut user: (Option<u32>, Option<u32>) = (None, None);
    let mut rest = args;
    while let Some((first, tail)) = rest.split_first() {
        rest = tail;
        let text = first.to_string_lossy();
        if text == "--" {
            break;
        } else if let Some(uid) = text.strip_prefix("--uid=") {
            user.0 = uid.parse().ok();
        } else if let Some(gid) = text.strip_prefix("--gid=") {
            user.1 = gid.parse().ok();
        }
    }
    let argv = rest;
    // SAFETY: fd 3 was set up by HeldCommand::spawn and nothing else owns it.
    let mut go = unsafe { std::fs::File::from_raw_fd(HOLD_FD) };
    let mut byte = [0u8];
    if go.read_exact(&mut byte).is_err() {
        return std::process::ExitCode::from(127);
    }
    drop(go);
    let Some(program) = argv.first() else {
        return std::process::ExitCode::from(127);
    };
    let mut command = std::process::Command::new(program);
    command.args(&argv[1..]);
    if let (Some(uid), Some(gid)) = user
        && let Err(err) = drop_to(uid, gid, &mut command)
    {
        eprintln!(
            "livetrace: cannot run '{}' as uid {uid}, gid {gid}: {err}; not running it \
             (pass --as-root to run it as root)",
            program.to_string_lossy()
        );
        return std::process::ExitCode::from(126);
    }
    let err = command.exec();
    eprintln!(
        "livetrace: cannot run '{}': {err}",
        program.to_string_lossy()
    );
    std::process::ExitCode::from(127)
}

fn pipe() -> anyhow::Result<(i32, i32)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    Ok((fds[0], fds[1]))
}

pub fn which(program: &std::ffi::OsStr) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            CString::new(candidate.as_os_str().as_bytes())
                .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0)
        })
}

/// Whether the task is a kernel thread (no user address space). Exited tasks count as user
/// processes: kernel threads rarely exit during a capture.
pub fn is_kernel_thread(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the parenthesised comm; `flags` is the 9th field overall.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return false;
    };
    const PF_KTHREAD: u64 = 0x0020_0000;
    rest.split_ascii_whitespace()
        .nth(6)
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
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
            pids: vec![me, me],
            ..Default::default()
        };
        assert_eq!(
            args.resolve().unwrap(),
            Target::Threads {
                pids: vec![me],
                tids: vec![]
            }
        );

        let missing = TargetArgs {
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
            pids: vec![live_tid],
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
        let both = TargetArgs {
            pids: vec![1],
            tids: vec![],
            command: vec!["true".into()],
            as_root: false,
        };
        assert!(both.resolve().is_err());
        let err = HeldCommand::spawn(&["no-such-program-livetrace".into()], false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no-such-program-livetrace"), "{err}");
    }
}
