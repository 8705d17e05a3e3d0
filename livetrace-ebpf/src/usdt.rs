//! Reading a USDT argument at a probe hit, as its `ArgSpec` says (see `livetrace_common::usdt`):
//! registers through `bpf_probe_read_kernel` (the offset into `pt_regs` is only known at run
//! time, and the verifier refuses variable offsets into the context), memory through
//! `bpf_probe_read_user`, exactly `size` bytes, then sign-extended if the argument is signed.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    programs::ProbeContext,
};
use livetrace_common::usdt::{
    ARG_CONSTANT, ARG_INDEXED, ARG_MEMORY, ARG_REGISTER, ArgSpec, MAX_REGISTER_OFFSET,
};

/// The argument's value, or `None` when it cannot be read (a fault, an unreadable spec).
#[inline(always)]
pub fn read(ctx: &ProbeContext, spec: &ArgSpec) -> Option<u64> {
    let raw = match spec.kind {
        ARG_CONSTANT => spec.displacement as u64,
        ARG_REGISTER => register(ctx, spec.register)?,
        ARG_MEMORY => {
            let at = register(ctx, spec.register)?.wrapping_add(spec.displacement as u64);
            memory(at, spec.size)?
        }
        ARG_INDEXED => {
            let index = register(ctx, spec.index_register)? << (spec.scale_shift & 3);
            let at = register(ctx, spec.register)?
                .wrapping_add(index)
                .wrapping_add(spec.displacement as u64);
            memory(at, spec.size)?
        }
        _ => return None,
    };
    // Keep the low `size` bytes, sign-extended if signed; the mask keeps the shift below 64.
    let shift = 64 - 8 * u32::from(spec.size & 0xf).clamp(1, 8);
    Some(if spec.signed != 0 {
        (((raw << shift) as i64) >> shift) as u64
    } else {
        (raw << shift) >> shift
    })
}

#[inline(always)]
fn register(ctx: &ProbeContext, offset: u8) -> Option<u64> {
    if offset > MAX_REGISTER_OFFSET {
        return None;
    }
    // SAFETY: a read of the saved registers the kernel handed the probe, checked by the helper.
    unsafe {
        bpf_probe_read_kernel(
            (ctx.regs as *const u8)
                .add(usize::from(offset))
                .cast::<u64>(),
        )
    }
    .ok()
}

#[inline(always)]
fn memory(at: u64, size: u8) -> Option<u64> {
    // SAFETY: reads of the traced process's memory, checked by the helper.
    unsafe {
        match size {
            1 => bpf_probe_read_user(at as *const u8).ok().map(u64::from),
            2 => bpf_probe_read_user(at as *const u16).ok().map(u64::from),
            4 => bpf_probe_read_user(at as *const u32).ok().map(u64::from),
            _ => bpf_probe_read_user(at as *const u64).ok(),
        }
    }
}
