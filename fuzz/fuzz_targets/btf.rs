//! The kernel BTF reader (struct member offsets for offcpu): any blob parses or is refused,
//! and lookups in what parses end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::kernel_btf::KernelBtf;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = KernelBtf::parse(data) {
        for (name, member) in [
            ("task_struct", "pid"),
            ("task", "pid"),
            ("", ""),
            ("a", "b"),
        ] {
            let _ = btf.member_offset(name, member);
        }
    }
});
