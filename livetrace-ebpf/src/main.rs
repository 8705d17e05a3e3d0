//! livetrace's BPF programs, one module per tool. Settings arrive as load-time globals; map
//! names come from `livetrace-common` (the statics below are named after those constants).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd: core's atomics lack fetch_add on BPF"
)]

mod exec;
mod offcpu;
mod profile;
mod stacks;
mod unwind;
mod uprobe_hist;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
