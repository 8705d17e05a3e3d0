//! `livetrace diff`'s pprof reader (gzip or raw protobuf): an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::output::pprof;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(profile) = pprof::read(bytes) {
        let _ = profile.total_weight();
    }
});
