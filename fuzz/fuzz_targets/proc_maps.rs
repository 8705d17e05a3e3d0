//! `/proc/PID/maps` text, parsed as every reader of it does, and the lookups made in the result.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::{proc::maps::Maps, symbolize::module_offset};

fuzz_target!(|text: &str| {
    let maps = Maps::parse(text);
    let _ = (maps.code_paths(), maps.anonymous_code(), maps.code_ranges());
    for mapping in maps.code_files() {
        for addr in [
            mapping.start,
            mapping.end,
            mapping.start.wrapping_add(1),
            u64::MAX,
            0,
        ] {
            let _ = module_offset(&mapping, addr);
            let _ = maps.region_of(addr);
        }
    }
});
