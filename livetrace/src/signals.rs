//! The signals livetrace answers, caught from the first instant of the process: SIGINT, SIGTERM
//! and SIGHUP stop the capture (or, once it has stopped, skip naming the frames), SIGUSR1 asks
//! for a snapshot. One handler for the whole life of the process counts them; the capture loop
//! reads the counts when a byte on a self-pipe wakes it. So a signal sent as soon as livetrace
//! has started (a script that stops it right after its start line) is never lost, and never
//! kills it: it takes effect when the capture loop starts.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::atomic::{AtomicI32, AtomicU32, Ordering},
};

use tokio::io::unix::AsyncFd;

/// Stop signals received so far (SIGINT, SIGTERM, SIGHUP).
static STOPS: AtomicU32 = AtomicU32::new(0);
/// The last stop signal's number.
static LAST_STOP: AtomicI32 = AtomicI32::new(0);
/// [`STOPS`] when the capture loop ended: any stop signal after that asks to hurry.
static STOPS_AT_CAPTURE_END: AtomicU32 = AtomicU32::new(u32::MAX);
/// SIGUSR1s received so far.
static SNAPSHOTS: AtomicU32 = AtomicU32::new(0);
/// The self-pipe's write end (-1 until installed).
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// The self-pipe's read end (-1 until installed).
static WAKE_READ: AtomicI32 = AtomicI32::new(-1);

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(signal: libc::c_int) {
    // Only atomics and write(2): async-signal-safe.
    if signal == libc::SIGUSR1 {
        SNAPSHOTS.fetch_add(1, Ordering::SeqCst);
    } else {
        LAST_STOP.store(signal, Ordering::SeqCst);
        STOPS.fetch_add(1, Ordering::SeqCst);
    }
    let fd = WAKE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: writing one byte from a valid buffer; a full pipe (EAGAIN) already holds a
        // wake-up, so the result does not matter. errno is saved and restored around it.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, (&raw const byte).cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// The signals livetrace answers, held back on this thread while a [`Deferred`] lives.
///
/// The kernel's verifier gives up on a program with EAGAIN when a signal is pending for the
/// thread that loads it, and aya's feature probes, run on the first load, then conclude that the
/// kernel lacks what it has (global data, for one): a SIGUSR1 or SIGHUP sent while livetrace
/// loads its programs made the load fail. Held back, such a signal is delivered when the guard
/// drops, and takes effect in the capture loop as it would have anyway. Threads started
/// meanwhile inherit the mask and keep it, so the signals go to this thread.
pub struct Deferred {
    previous: libc::sigset_t,
}

/// Holds back the signals livetrace answers on this thread until the guard drops.
pub fn defer() -> Deferred {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; pthread_sigmask reads the
    // new set and writes the old one, both valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in STOP_SIGNALS.into_iter().chain([libc::SIGUSR1]) {
            libc::sigaddset(&mut set, signal);
        }
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous);
        Deferred { previous }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `defer`; pending signals are delivered now.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// Installs the handler for every signal livetrace answers. Call first thing in `main`.
pub fn install() -> io::Result<()> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    WAKE_READ.store(fds[0], Ordering::SeqCst);
    WAKE_WRITE.store(fds[1], Ordering::SeqCst);
    for signal in STOP_SIGNALS.into_iter().chain([libc::SIGUSR1]) {
        // SAFETY: a zeroed sigaction with a handler that is async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The name of the stop signal that arrived, if one did.
pub fn stop_requested() -> Option<&'static str> {
    if STOPS.load(Ordering::SeqCst) == 0 {
        return None;
    }
    Some(match LAST_STOP.load(Ordering::SeqCst) {
        libc::SIGINT => "SIGINT (Ctrl-C)",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    })
}

/// How many snapshots (SIGUSR1) have been asked for so far.
pub fn snapshots_requested() -> u32 {
    SNAPSHOTS.load(Ordering::SeqCst)
}

/// The capture loop has ended: a stop signal from now on asks to hurry (see [`aborted`]).
pub fn capture_ended() {
    STOPS_AT_CAPTURE_END.store(STOPS.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// Whether a stop signal arrived after the capture loop ended: the user wants the outputs now.
pub fn aborted() -> bool {
    STOPS.load(Ordering::SeqCst) > STOPS_AT_CAPTURE_END.load(Ordering::SeqCst)
}

/// Wakes when a signal has arrived since the last wake-up (or before the first).
pub struct Waiter {
    fd: AsyncFd<OwnedFd>,
}

impl Waiter {
    /// Needs [`install`] to have run, and a tokio runtime with IO enabled.
    pub fn new() -> io::Result<Self> {
        let read = WAKE_READ.load(Ordering::SeqCst);
        if read < 0 {
            return Err(io::Error::other("the signal handlers are not installed"));
        }
        // SAFETY: a descriptor of our own pipe, duplicated so the Waiter owns its copy.
        let fd = unsafe { libc::fcntl(read, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd is moved into the AsyncFd and stays open, the same descriptor,
        // for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Returns once a signal has arrived; the counts say which.
    pub async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 64];
            // SAFETY: reading into a valid buffer from our nonblocking pipe.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n > 0 {
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}
