//! USDT probes as a traced program's file declares them: the `.note.stapsdt` notes of any ELF
//! file, and any argument-spec string, read or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::usdt::{args, notes};

fuzz_target!(|data: &[u8]| {
    if let Ok(found) = notes::read(data) {
        for site in &found.sites {
            assert!(!site.provider.is_empty() && !site.name.is_empty());
            let _ = args::parse(&site.args);
        }
    }
    if let Ok(parsed) = args::parse(&String::from_utf8_lossy(data)) {
        assert!(parsed.len() <= args::MAX_ARGS);
    }
});
