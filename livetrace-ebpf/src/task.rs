//! Fields of a `task_struct` another task than the current one, at offsets user space read from
//! the kernel's BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;

/// The `u32` at `offset` in the task (`bpf_probe_read_kernel` checks the address: a bad one
/// fails the read).
#[inline(always)]
pub fn read_u32(task: *const u8, offset: u32) -> Option<u32> {
    unsafe { bpf_probe_read_kernel(task.wrapping_add(offset as usize).cast::<u32>()) }.ok()
}
