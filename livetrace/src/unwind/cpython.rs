//! CPython's `-X perf` trampolines: anonymous code with a fixed unwind rule, given to framehop as
//! a synthesized `.eh_frame`.

use std::{fs, ops::Range, sync::Arc};

use framehop::{ExplicitModuleSectionInfo, Module};

use super::elf::Bytes;

/// CPython 3.12's `-X perf` trampoline on x86-64 (Python/asm_trampoline.S), copied once per
/// Python function into an anonymous mapping: `sub $8,%rsp; call *%rcx; add $8,%rsp; ret`.
/// It keeps no frame pointer, so the frame-pointer fallback cannot step over it; its unwind rule
/// is fixed, though (CFA = rsp + 16, return address at CFA - 8), and is given to framehop as a
/// synthesized `.eh_frame` covering the mapping.
const CPYTHON_TRAMPOLINE: [u8; 11] = [
    0x48, 0x83, 0xec, 0x08, 0xff, 0xd1, 0x48, 0x83, 0xc4, 0x08, 0xc3,
];

/// Section info for a module whose only unwind information is `eh_frame` (synthesized here, at
/// address 0 of the module).
fn eh_frame_only(eh_frame: Vec<u8>) -> ExplicitModuleSectionInfo<Bytes> {
    let len = eh_frame.len();
    ExplicitModuleSectionInfo::<Bytes> {
        eh_frame_svma: Some(0..len as u64),
        eh_frame: Some(Bytes {
            data: Arc::new(eh_frame),
            range: 0..len,
        }),
        ..ExplicitModuleSectionInfo::default()
    }
}

/// An `.eh_frame` with one CIE and one FDE covering `range` (module-relative) with the rule
/// CFA = rsp + `cfa_offset`, return address at CFA - 8.
fn synthetic_eh_frame(range: &Range<u64>, cfa_offset: u8) -> Vec<u8> {
    let mut cie = vec![
        0, 0, 0, 0, // CIE id
        1, // version
        b'z', b'R', 0,    // augmentation: has data, FDE pointer encoding
        1,    // code alignment
        0x78, // data alignment -8
        16,   // return address register (rip)
        1,    // augmentation data length
        0x04, // FDE pointers: DW_EH_PE_udata8, absolute
        0x0c, 7, cfa_offset, // DW_CFA_def_cfa rsp, cfa_offset
        0x90, 1, // DW_CFA_offset rip, CFA - 8
    ];
    cie.resize(cie.len().div_ceil(8) * 8 + 4, 0); // DW_CFA_nop; length field makes it 8n
    let mut out = Vec::new();
    out.extend((cie.len() as u32).to_le_bytes());
    out.extend(&cie);
    let fde_start = out.len();
    let mut fde = Vec::new();
    fde.extend(((fde_start + 4) as u32).to_le_bytes()); // back to the CIE
    fde.extend(range.start.to_le_bytes());
    fde.extend((range.end - range.start).to_le_bytes());
    fde.push(0); // augmentation data length
    fde.resize(fde.len().div_ceil(8) * 8 + 4, 0);
    out.extend((fde.len() as u32).to_le_bytes());
    out.extend(&fde);
    out.extend(0u32.to_le_bytes()); // terminator
    out
}

/// A framehop module for an anonymous mapping that holds only CPython trampolines.
pub(super) fn cpython_trampolines(pid: u32, range: &Range<u64>) -> Option<Module<Bytes>> {
    use std::os::unix::fs::FileExt as _;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut code = [0u8; CPYTHON_TRAMPOLINE.len()];
    if let Err(err) = mem.read_exact_at(&mut code, range.start) {
        log::debug!("pid {pid}: cannot read code at {:#x}: {err}", range.start);
        return None;
    }
    if code != CPYTHON_TRAMPOLINE {
        return None;
    }
    log::debug!("pid {pid}: CPython trampolines at {range:x?}");
    // framehop looks addresses up relative to the module's base, in 32 bits: the FDE covers
    // 0..size, and the module's base is the mapping's start.
    let eh_frame = synthetic_eh_frame(&(0..range.end - range.start), 16);
    let info = eh_frame_only(eh_frame);
    Some(Module::new(
        "[cpython perf trampolines]".into(),
        range.clone(),
        range.start,
        info,
    ))
}

#[cfg(test)]
mod tests {
    use framehop::{
        Module, Unwinder as _,
        x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
    };

    use super::*;

    /// The synthesized CFI steps over a CPython trampoline frame: CFA = rsp + 16.
    #[test]
    fn synthetic_cfi_steps_over_a_trampoline() {
        let range = 0x10_0000..0x10_1000;
        let eh_frame = synthetic_eh_frame(&range, 16);
        let info = eh_frame_only(eh_frame);
        let mut unwinder = UnwinderX86_64::new();
        unwinder.add_module(Module::new("t".into(), range.clone(), 0, info));
        let mut cache = CacheX86_64::new();
        // sp -> [padding][return address 0x2222][...]
        let stack = [0u64, 0x2222, 0, 0];
        let sp = 0x8000;
        let mut read = |addr: u64| -> Result<u64, ()> {
            stack.get(((addr - sp) / 8) as usize).copied().ok_or(())
        };
        let mut frames = unwinder.iter_frames(
            0x10_0006,
            UnwindRegsX86_64::new(0x10_0006, sp, 0),
            &mut cache,
            &mut read,
        );
        let mut addrs = Vec::new();
        let error = loop {
            match frames.next() {
                Ok(Some(f)) => addrs.push(f.address()),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        assert_eq!(addrs.get(..2), Some(&[0x10_0006, 0x2222][..]), "{error:?}");
    }
}
