//! The probes' own share of what they measure. A uprobe replaces a function's first instruction
//! with a trap; after the entry program has taken its timestamp, the kernel emulates the
//! displaced instruction or, for most kinds, copies it out of line and single-steps it, which
//! takes one more trap. Here a single-step costs ~10 µs (a trap in a VM) against ~0.7 µs for an
//! emulated `nop`: a 20 µs function measured 21.6 µs behind a `nop` and 35.5 µs behind a `lea`.
//!
//! So after the capture, livetrace measures that cost on this machine and kernel: it probes, in
//! its own binary, a function that does nothing and begins with an instruction of the same kind
//! as the probed function's first one, calls it a few hundred times, and reads the median its
//! own programs record. Which kinds the kernel emulates changes between versions (push since
//! 6.10, nops since 6.11): measuring each kind, rather than knowing, keeps that right.

use std::{hint::black_box, path::PathBuf};

use anyhow::Context as _;
use livetrace_common::control::RUNNING;

use super::{
    maps::Maps,
    probes::{attach, detach},
    sites::{Probed, Site},
};
use crate::{
    histogram::{Histogram, LatencyQuality},
    tools::uprobe_hist::target::{Candidate, FunctionSymbol},
};

/// The kinds of first instruction the kernel treats differently, each with a function of
/// livetrace's that begins with one and returns at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstInstruction {
    Nop,
    Endbr,
    Push,
    Branch,
    /// Anything else: copied out of line and single-stepped.
    Other,
}

impl FirstInstruction {
    /// The kind of the instruction `code` begins with (x86-64 encodings).
    pub fn of(code: &[u8]) -> Self {
        let rex = usize::from(code.first().is_some_and(|b| (0x40..=0x4f).contains(b)));
        match code {
            [0x90, ..] | [0x66, 0x90, ..] | [0x0f, 0x1f, ..] | [0x66, 0x0f, 0x1f, ..] => Self::Nop,
            [0xf3, 0x0f, 0x1e, 0xfa, ..] => Self::Endbr,
            _ if code.get(rex).is_some_and(|b| (0x50..=0x57).contains(b)) => Self::Push,
            [0xe8 | 0xe9 | 0xeb | 0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..] => Self::Branch,
            _ => Self::Other,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Nop => "a nop",
            Self::Endbr => "an endbr64",
            Self::Push => "a push",
            Self::Branch => "a jump or call",
            Self::Other => "an instruction that is single-stepped out of line",
        }
    }

    fn function(self) -> extern "C" fn() {
        match self {
            Self::Nop => starts_with_nop,
            Self::Endbr => starts_with_endbr,
            Self::Push => starts_with_push,
            Self::Branch => starts_with_jump,
            Self::Other => starts_with_lea,
        }
    }
}

#[unsafe(naked)]
extern "C" fn starts_with_nop() {
    core::arch::naked_asm!("nop", "ret");
}

#[unsafe(naked)]
extern "C" fn starts_with_endbr() {
    core::arch::naked_asm!("endbr64", "ret");
}

#[unsafe(naked)]
extern "C" fn starts_with_push() {
    core::arch::naked_asm!("push rbp", "pop rbp", "ret");
}

#[unsafe(naked)]
extern "C" fn starts_with_jump() {
    core::arch::naked_asm!("jmp 2f", "2:", "ret");
}

#[unsafe(naked)]
extern "C" fn starts_with_lea() {
    core::arch::naked_asm!("lea rax, [rsp]", "ret");
}

/// Calls of the calibration function: enough for a stable median, a few ms even when each
/// single-steps.
const CALLS: usize = 400;

/// The median time the probes add to one call whose function begins like `first`, in ns, as
/// livetrace's own programs measure it.
pub fn probe_cost(first: FirstInstruction) -> anyhow::Result<u64> {
    let function = first.function();
    let (path, file_offset) = own_file_offset(function as usize as u64)?;
    let site = Site {
        pid: Some(std::process::id()),
        file: Candidate {
            shown: "livetrace".into(),
            path,
        },
        symbol: FunctionSymbol {
            name: "calibration".into(),
            demangled: "calibration".into(),
            addr: 0,
            size: 0,
            file_offset,
        },
        in_command_executable: false,
    };
    let mut ebpf = super::bpf::load(&super::bpf::UprobeHistSettings {
        slow_ns: 0,
        max_threads: 64,
        stack_storage: 1,
        slow_buffer: 4096,
        follow: None,
        spans: None,
    })?;
    let probed = Probed::Function(vec![site]);
    attach(&mut ebpf, &probed, None)?;
    crate::bpf::set_control(&mut ebpf, RUNNING)?;
    let maps = Maps::take(&mut ebpf)?;
    for _ in 0..CALLS {
        black_box(function)();
    }
    let median = maps.histogram()?.percentile(50.0, "p50");
    detach(&mut ebpf, None)?;
    median
        .map(|p| p.estimate_ns)
        .context("the calibration probes measured no call")
}

/// The file that holds `address` of livetrace's own code, and the address's offset in it.
fn own_file_offset(address: u64) -> anyhow::Result<(PathBuf, u64)> {
    let maps = crate::proc::maps::Maps::of_self().context("reading /proc/self/maps")?;
    maps.code_ranges()
        .into_iter()
        .find(|range| range.contains(&address))
        .and_then(|range| {
            let region = maps.region_of(range.start)?;
            Some((
                PathBuf::from("/proc/self/exe"),
                address - region.range.start + region.offset,
            ))
        })
        .context("livetrace's own code is not in its memory map")
}

/// Measures what the probes add to each call of a function that begins like the probed one
/// (`calibrate`), and warns when that is a large share of the median measured.
pub(super) fn note_probe_overhead(
    quality: &mut LatencyQuality,
    site: &Site,
    total: &Histogram,
    function: &str,
) {
    let Some(first) = first_instruction(site) else {
        return;
    };
    let kind = FirstInstruction::of(&first);
    let overhead = match probe_cost(kind) {
        Ok(ns) => ns,
        Err(err) => {
            quality.notes.push(format!(
                "the probes' own share of each call was not measured: {err:#}"
            ));
            return;
        }
    };
    quality.probe_overhead = Some((overhead, kind.describe()));
    let Some(p50) = total.percentile(50.0, "p50").map(|p| p.estimate_ns) else {
        return;
    };
    if overhead * 10 >= p50 {
        quality.notes.push(format!(
            "times are inflated: about {} of each measured call of {function} is the probes' \
             own doing ({}% of its p50 of {}): it begins with {}, which the probe executes in \
             its place; read the times as that much too long, or time a caller",
            crate::histogram::format_ns(overhead),
            overhead * 100 / p50.max(1),
            crate::histogram::format_ns(p50),
            kind.describe()
        ));
    }
}

/// The first bytes of the probed function, from its file.
fn first_instruction(site: &Site) -> Option<Vec<u8>> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::File::open(&site.file.path).ok()?;
    file.seek(std::io::SeekFrom::Start(site.symbol.file_offset))
        .ok()?;
    let mut code = vec![0u8; 16];
    let read = file.read(&mut code).ok()?;
    code.truncate(read);
    Some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instructions are sorted into the kinds the kernel treats differently.
    #[test]
    fn classifies_first_instructions() {
        assert_eq!(FirstInstruction::of(&[0x90]), FirstInstruction::Nop);
        assert_eq!(
            FirstInstruction::of(&[0x0f, 0x1f, 0x44, 0, 0]),
            FirstInstruction::Nop
        );
        assert_eq!(
            FirstInstruction::of(&[0xf3, 0x0f, 0x1e, 0xfa]),
            FirstInstruction::Endbr
        );
        assert_eq!(FirstInstruction::of(&[0x55]), FirstInstruction::Push);
        assert_eq!(FirstInstruction::of(&[0x41, 0x57]), FirstInstruction::Push);
        assert_eq!(
            FirstInstruction::of(&[0xe9, 0, 0, 0, 0]),
            FirstInstruction::Branch
        );
        assert_eq!(
            FirstInstruction::of(&[0x48, 0x8d, 0x04, 0x24]),
            FirstInstruction::Other
        );
        assert_eq!(
            FirstInstruction::of(&[0x48, 0x83, 0xec, 0x18]),
            FirstInstruction::Other
        );
    }
}
