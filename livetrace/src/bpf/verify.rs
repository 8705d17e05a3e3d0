//! Every program of an object through the kernel's verifier, loaded and not attached, as
//! `bpftrace --dry-run` does: a quick proof that this kernel accepts what a capture would load.
//! Each program is loaded as the kind its ELF section names (`tp_btf/HOOK`, `tracepoint/...`,
//! `perf_event`, `uprobe`, `uretprobe`), so a program added to an object is verified without
//! being listed here.

use aya::{Btf, Ebpf, programs::Program};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::{BpfError, Object, program_error};

/// What the verifier said of one program.
#[derive(Debug)]
pub struct Verdict {
    pub object: &'static str,
    /// The settings the object was loaded with (their globals decide which code is live).
    pub variant: &'static str,
    pub program: String,
    pub result: Result<(), BpfError>,
}

/// Loads every program of `ebpf` (an `object` loaded with `variant`'s settings), one verdict
/// each.
pub fn load_every_program(
    ebpf: &mut Ebpf,
    object: Object,
    variant: &'static str,
    btf: &Btf,
) -> Vec<Verdict> {
    object
        .programs()
        .iter()
        .map(|&name| Verdict {
            object: object.name(),
            variant,
            program: name.to_owned(),
            result: load_one(ebpf, object, name, btf),
        })
        .collect()
}

fn load_one(ebpf: &mut Ebpf, object: Object, name: &str, btf: &Btf) -> Result<(), BpfError> {
    let section = section_of(object, name).ok_or_else(|| BpfError::Missing {
        kind: "program section",
        name: name.to_owned(),
    })?;
    let what = format!("load the {name} BPF program ({section})");
    let loaded = match super::program_mut(ebpf, name)? {
        Program::BtfTracePoint(p) => {
            let hook = section.strip_prefix("tp_btf/").unwrap_or(&section);
            p.load(hook, btf)
        }
        Program::TracePoint(p) => p.load(),
        Program::PerfEvent(p) => p.load(),
        Program::UProbe(p) => p.load(),
        other => {
            return Err(BpfError::Rejected(format!(
                "{name} is a {:?} program, which livetrace does not load",
                other.prog_type()
            )));
        }
    };
    loaded.map_err(|err| program_error(err, &what))
}

/// The ELF section that holds the program `name` (its kind and hook).
fn section_of(object: Object, name: &str) -> Option<String> {
    let elf = object::File::parse(object.bytes()).ok()?;
    let symbol = elf.symbols().find(|s| s.name() == Ok(name))?;
    let section = elf.section_by_index(symbol.section_index()?).ok()?;
    section.name().ok().map(str::to_owned)
}
