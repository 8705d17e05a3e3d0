//! The terminal side of livetrace: messages on standard error and results on standard output,
//! written so that a closed, full or vanished stream never panics (Rust's `print!` macros do),
//! and never costs the capture or its file outputs.
//!
//! - Standard error carries messages. They are best effort: where it cannot be written, there
//!   is nowhere left to say so.
//! - Standard output carries results. A reader that went away (`livetrace ... | head -1`) is
//!   normal: the rest of the output is dropped quietly and the run goes on to write its files.
//!   Any other failure (`>/dev/full`) is remembered, and the run exits 1 once its files are
//!   written ([`stdout_failure`]).
//!
//! [`guard_standard_streams`] runs first thing: a process started with a standard stream closed
//! would otherwise hand that descriptor number to the next file it opens (a BPF map, an output),
//! and a message meant for the terminal would land in it.

use std::{
    io::{self, Write as _},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

/// Standard output's reader went away.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// Why standard output could not be written, other than its reader going away.
static STDOUT_FAILED: Mutex<Option<String>> = Mutex::new(None);

/// Opens /dev/null on each of descriptors 0, 1 and 2 that is closed.
pub fn guard_standard_streams() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let flags = if fd == 0 {
            libc::O_RDONLY
        } else {
            libc::O_WRONLY
        };
        // SAFETY: a constant, NUL-terminated path; open returns the lowest free descriptor,
        // which is `fd` since the lower ones are open by now.
        let opened = unsafe { libc::open(c"/dev/null".as_ptr(), flags) };
        if opened >= 0 && opened != fd {
            // SAFETY: moving the descriptor we just opened onto the closed standard one.
            unsafe {
                libc::dup2(opened, fd);
                libc::close(opened);
            }
        }
    }
}

/// Writes a message to standard error, ignoring failure. Use [`say!`](crate::say). Control
/// characters are escaped ([`crate::names::sanitize_text`]): a name from a traced process that
/// reached a message (a path in an error) cannot drive the terminal.
pub fn stderr(args: std::fmt::Arguments<'_>) {
    let text = std::fmt::format(args);
    let mut stderr = io::stderr().lock();
    let _ = stderr.write_all(crate::names::sanitize_text(&text).as_bytes());
    let _ = stderr.flush();
}

/// Writes results (text) to standard output, control characters escaped as on standard error
/// (see the module's documentation for what a failure does).
pub fn stdout(bytes: &[u8]) {
    if STDOUT_GONE.load(Ordering::Relaxed) || bytes.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(bytes);
    let text = crate::names::sanitize_text(&text);
    let mut stdout = io::stdout().lock();
    let result = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    match result {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
            STDOUT_GONE.store(true, Ordering::Relaxed);
        }
        Err(err) => {
            STDOUT_GONE.store(true, Ordering::Relaxed);
            let mut failed = STDOUT_FAILED.lock().unwrap_or_else(PoisonError::into_inner);
            failed.get_or_insert_with(|| err.to_string());
        }
    }
}

/// [`stdout`] for formatted text.
pub fn stdout_fmt(args: std::fmt::Arguments<'_>) {
    stdout(std::fmt::format(args).as_bytes());
}

/// Why standard output could not be written, if it could not (its reader going away is not a
/// failure).
pub fn stdout_failure() -> Option<String> {
    STDOUT_FAILED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// `eprintln!` that never panics: a line on standard error, best effort.
#[macro_export]
macro_rules! say {
    () => {
        $crate::console::stderr(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::console::stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprint!` that never panics.
#[macro_export]
macro_rules! say_raw {
    ($($arg:tt)*) => {
        $crate::console::stderr(format_args!($($arg)*))
    };
}

/// `print!` that never panics (see [`stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::console::stdout_fmt(format_args!($($arg)*))
    };
}
