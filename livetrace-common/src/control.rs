//! The one stop protocol of every tool's programs: a one-slot `u32` array user space moves from
//! [`LOADED`] to [`RUNNING`] when the capture starts and to [`STOPPED`] when it ends. Programs
//! record nothing once it is stopped, however long detaching them takes; uprobe-hist also tells
//! the returns of calls that began outside [`RUNNING`] from lost ones.

/// The map (`Array<u32>` of one slot).
pub const CONTROL: &str = "CONTROL";
/// Loaded and being attached; the capture has not started.
pub const LOADED: u32 = 0;
pub const RUNNING: u32 = 1;
pub const STOPPED: u32 = 2;
