//! A command livetrace starts itself (`-- COMMAND`), held before its first instruction until
//! the probes are attached, then released, watched, and stopped if it outlives the capture.

use std::{
    ffi::{CString, OsString},
    os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};

/// A command started by livetrace and held before it runs until [`HeldCommand::release`], so
/// that probes attached to its PID see it from its first instruction.
///
/// `std`'s spawn returns only once the child has exec'd, so the child cannot simply wait in a
/// `pre_exec` hook. Instead livetrace starts itself as a small shim ([`HOLD_SHIM`]) that waits
/// for a byte on fd 3 and then execs the command in place: same PID, probes already attached.
/// If that exec fails (a file that is not a program, a permission), the shim says why on fd 4,
/// a close-on-exec pipe that a successful exec closes silently, and [`HeldCommand::release`]
/// fails with that reason.
///
/// Under sudo the command runs as the invoking user (`SUDO_UID`, `SUDO_GID`, that user's
/// groups, `HOME`, `USER`, `LOGNAME`), as it would have without sudo: a tracer's privileges are
/// for tracing, not for the program being traced. `--as-root` keeps root.
pub struct HeldCommand {
    pub pid: u32,
    go: Option<std::fs::File>,
    /// End-of-file once the command has exec'd; the reason it could not, otherwise.
    status: Option<std::fs::File>,
    /// A pidfd of the command (kernel 5.3+): signals through it can never reach another
    /// process that reused the pid.
    pidfd: Option<std::os::fd::OwnedFd>,
    /// How livetrace ended the command, if it did (for the footer).
    pub stopped: Option<String>,
    /// Receives the exit status once the command has been reaped.
    pub exited: tokio::sync::oneshot::Receiver<std::io::Result<std::process::ExitStatus>>,
}

/// The hidden first argument that makes livetrace act as the hold shim.
pub const HOLD_SHIM: &str = "__livetrace-hold-exec";
/// The descriptor on which the shim waits for its go byte.
const HOLD_FD: i32 = 3;
/// The descriptor on which the shim reports a failed exec.
const STATUS_FD: i32 = 4;
/// How long a command has to end after SIGTERM (and after SIGKILL) when livetrace stops it.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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
        let (status_read, status_write) = pipe()?;
        let mut command = std::process::Command::new("/proc/self/exe");
        command.arg(HOLD_SHIM);
        if let Some((uid, gid)) = sudo_user(as_root)? {
            log::info!("running the command as uid {uid}, gid {gid} (SUDO_UID, SUDO_GID)");
            command
                .arg(format!("--uid={uid}"))
                .arg(format!("--gid={gid}"));
        }
        command.arg("--").args(argv);
        // SAFETY: fcntl, dup2 and close are async-signal-safe. They hand the go pipe's read end
        // to the shim as fd 3 and the status pipe's write end as fd 4, both without
        // close-on-exec: first copied above fd 10 (so that neither dup2 overwrites the other
        // end), then into place, and the copies closed.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            command.pre_exec(move || {
                let go = libc::fcntl(go_read, libc::F_DUPFD, 10);
                let status = libc::fcntl(status_write, libc::F_DUPFD, 10);
                if go < 0
                    || status < 0
                    || libc::dup2(go, HOLD_FD) < 0
                    || libc::dup2(status, STATUS_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(go);
                libc::close(status);
                Ok(())
            });
        }
        let spawned = command.spawn();
        // SAFETY: all four ends are ours; the child has its own copies of the ends it needs.
        unsafe {
            libc::close(go_read);
            libc::close(status_write);
        }
        let go = unsafe { std::fs::File::from_raw_fd(go_write) };
        let status = unsafe { std::fs::File::from_raw_fd(status_read) };
        let mut child = spawned.context("failed to start the command")?;
        let pid = child.id();
        let (exited_tx, exited) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("command-wait".into())
            .spawn(move || {
                let _ = exited_tx.send(child.wait());
            })
            .context("failed to start a thread to wait for the command")?;
        // SAFETY: pidfd_open on our own child, which cannot have exited (it is held).
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = (pidfd >= 0).then(|| {
            // SAFETY: a new descriptor that nothing else owns.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) }
        });
        Ok(Self {
            pid,
            go: Some(go),
            status: Some(status),
            pidfd,
            stopped: None,
            exited,
        })
    }

    /// The capture is over and the command still runs: it was started for the capture, so it
    /// is stopped, as `timeout` would: SIGTERM, then SIGKILL after [`STOP_GRACE`]. Says so on
    /// stderr and in [`Self::stopped`]. Nothing happens if it has exited already.
    pub async fn stop(&mut self) {
        use tokio::sync::oneshot::error::TryRecvError;
        match self.exited.try_recv() {
            Err(TryRecvError::Empty) => {}
            _ => return,
        }
        let mut how = "SIGTERM";
        self.signal(libc::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, &mut self.exited)
            .await
            .is_err()
        {
            how = "SIGTERM, then SIGKILL";
            self.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(STOP_GRACE, &mut self.exited).await;
        }
        let note = format!(
            "the command (pid {}) was still running when the capture ended; livetrace, which \
             started it, stopped it ({how})",
            self.pid
        );
        crate::say!("livetrace: {note}");
        self.stopped = Some(note);
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child, by pidfd where there is one; before it is reaped
        // (the waiter thread reaps it only once it has exited), its pid is still its own.
        unsafe {
            match &self.pidfd {
                Some(fd) => {
                    use std::os::fd::AsRawFd as _;
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        signal,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
                None => {
                    libc::kill(self.pid as libc::pid_t, signal);
                }
            }
        }
    }

    /// Lets the command run, and waits until it has (its exec succeeded); fails with the
    /// reason if it could not be started.
    pub fn release(&mut self) -> anyhow::Result<()> {
        use std::io::{Read as _, Write as _};
        if let Some(mut go) = self.go.take() {
            go.write_all(&[1])
                .context("failed to release the command")?;
        }
        if let Some(mut status) = self.status.take() {
            let mut why = String::new();
            status
                .read_to_string(&mut why)
                .context("failed to hear whether the command started")?;
            if !why.is_empty() {
                bail!("{why}");
            }
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
    // SAFETY: fds 3 and 4 were set up by HeldCommand::spawn and nothing else owns them. The
    // status pipe closes by itself when the exec succeeds.
    let mut go = unsafe { std::fs::File::from_raw_fd(HOLD_FD) };
    let mut status = unsafe { std::fs::File::from_raw_fd(STATUS_FD) };
    unsafe { libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut fail = |why: String, code: u8| {
        use std::io::Write as _;
        let _ = status.write_all(why.as_bytes());
        std::process::ExitCode::from(code)
    };
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
        return fail(
            format!(
                "cannot run '{}' as uid {uid}, gid {gid}: {err}; not running it (pass \
                 --as-root to run it as root)",
                program.to_string_lossy()
            ),
            126,
        );
    }
    let err = command.exec();
    fail(
        format!("cannot run '{}': {err}", program.to_string_lossy()),
        127,
    )
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
