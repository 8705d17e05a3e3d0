//! `livetrace diff`'s folded-stack reader, and the diff and table built from what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::tools::diff::{Diff, parse_folded, write_svg, write_table};

fuzz_target!(|text: &str| {
    let Ok(profile) = parse_folded(text) else {
        return;
    };
    let diff = Diff::new(&profile, &profile);
    let names = ("a".to_owned(), "b".to_owned());
    write_table(&diff, &names, 20, std::io::sink()).unwrap();
    write_svg(&diff, &names, &mut std::io::sink()).unwrap();
});
