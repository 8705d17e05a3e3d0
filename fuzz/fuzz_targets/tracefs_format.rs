//! A tracepoint's `format` file from tracefs (field offsets for the classic-tracepoint mode).
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::tools::offcpu::tracefs::parse_format;

fuzz_target!(|text: &str| {
    let _ = parse_format(text);
});
