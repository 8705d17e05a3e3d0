//! The one stop protocol every program honours: user space moves the `CONTROL` slot from
//! loaded to running when the capture starts and to stopped when it ends, and programs record
//! nothing once it is stopped, however long detaching them takes.

use aya_ebpf::maps::Array;
use livetrace_common::control::{RUNNING, STOPPED};

// Defined by each tool's binary ([`control_map!`](crate::control_map)).
unsafe extern "Rust" {
    static CONTROL: Array<u32>;
}

/// Defines the control map.
#[macro_export]
macro_rules! control_map {
    () => {
        #[aya_ebpf::macros::map]
        static CONTROL: aya_ebpf::maps::Array<u32> = aya_ebpf::maps::Array::with_max_entries(1, 0);
    };
}

#[inline(always)]
fn state() -> u32 {
    unsafe { &CONTROL }.get(0).copied().unwrap_or(0)
}

/// Whether user space has ended the capture (the programs may still be attached a while).
#[inline(always)]
pub fn stopped() -> bool {
    state() == STOPPED
}

/// Whether the capture is running: started, and not yet stopped.
#[inline(always)]
pub fn running() -> bool {
    state() == RUNNING
}
