//! What livetrace's BPF programs share: the capture's control ([`control`]), target filtering
//! and stack aggregation ([`stacks`]), stack copies for user-space unwinding ([`unwind`]), and
//! following a command through its execs and forks ([`follow`]). Each tool's programs are a
//! binary of their own (`src/bin/`), built into an object of their own with only the maps they
//! use; settings arrive as load-time globals, and every name user space looks up comes from
//! `livetrace-common` (the statics are named after those constants; a test checks each object).
//!
//! Built for the host (livetrace lists this crate as a build-dependency, so that cargo rebuilds
//! the objects when these sources change), the library is empty.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        internal_features,
        reason = "atomic_xadd: core's atomics lack fetch_add on BPF"
    )
)]

#[cfg(target_arch = "bpf")]
pub mod control;
#[cfg(target_arch = "bpf")]
pub mod follow;
#[cfg(target_arch = "bpf")]
pub mod python;
#[cfg(target_arch = "bpf")]
pub mod stacks;
#[cfg(target_arch = "bpf")]
pub mod task;
#[cfg(target_arch = "bpf")]
pub mod unwind;
#[cfg(target_arch = "bpf")]
pub mod usdt;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

/// The license every object declares (the helpers livetrace calls are GPL-only).
#[macro_export]
macro_rules! license {
    () => {
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 4] = *b"GPL\0";
    };
}
