//! One module per subcommand: each parses its own arguments, drives its BPF programs through a
//! capture, and hands a model to the renderers.

pub mod check;
pub mod diff;
pub mod offcpu;
pub mod probes;
pub mod profile;
pub mod record;
pub mod uprobe_hist;

use crate::bpf::{
    Object,
    verify::{self, Verdict},
};

/// Loads every program of every tool's object through this kernel's verifier, without attaching
/// any, each object with the settings that leave the most code live: the suite's smoke test.
pub fn verify_every_program() -> anyhow::Result<Vec<Verdict>> {
    let btf = crate::kernel_btf::aya_btf()?;
    let mut verdicts = Vec::new();
    for (object, loads) in [
        (Object::Profile, profile::objects_for_verifier()),
        (Object::Offcpu, offcpu::objects_for_verifier()),
        (Object::UprobeHist, uprobe_hist::objects_for_verifier()),
    ] {
        for (variant, ebpf) in loads {
            let mut ebpf =
                ebpf.map_err(|err| err.context(format!("loading the {} object", object.name())))?;
            verdicts.extend(verify::load_every_program(&mut ebpf, object, variant, &btf));
        }
    }
    Ok(verdicts)
}
