//! `/proc/PID/maps` text as the symbolizer snapshots it, and the lookups made in the result.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::symbolize::{module_offset, parse_maps};

fuzz_target!(|text: &str| {
    for mapping in parse_maps(text) {
        for addr in [
            mapping.start,
            mapping.end,
            mapping.start.wrapping_add(1),
            u64::MAX,
            0,
        ] {
            let _ = module_offset(&mapping, addr);
        }
    }
});
