//! The smoke test: every program of every tool's object passes this kernel's verifier, loaded
//! as a capture loads it (each object with the settings that leave the most code live) and not
//! attached, as `bpftrace --dry-run` checks a script. Seconds, where a capture per tool would
//! take minutes, and a rejection names the program and quotes the verifier.

mod common;

use livetrace::bpf::{Object, verify::Verdict};

#[test]
fn every_program_passes_the_verifier() {
    common::require_root();
    let verdicts: Vec<Verdict> =
        livetrace::tools::verify_every_program().expect("the objects load");
    let rejected: Vec<String> = verdicts
        .iter()
        .filter_map(|v| {
            let err = v.result.as_ref().err()?;
            Some(format!(
                "{} ({}): {}: {err}",
                v.object, v.variant, v.program
            ))
        })
        .collect();
    assert!(rejected.is_empty(), "rejected:\n{}", rejected.join("\n"));
    // Two settings per object, every program of each: none was skipped.
    for object in Object::ALL {
        for &program in object.programs() {
            let loaded = verdicts
                .iter()
                .filter(|v| v.object == object.name() && v.program == program)
                .count();
            assert_eq!(
                loaded,
                2,
                "{program} of {} was loaded {loaded} times",
                object.name()
            );
        }
    }
}
