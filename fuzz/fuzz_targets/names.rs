//! Names from traced processes (comm, thread names, symbols, perf-map entries, paths) are made
//! harmless by `names::sanitize` before they reach a terminal or a file: for any bytes, nothing a
//! terminal obeys survives (no control character, no bidi override), a harmless name is left as
//! it was, and text of several lines keeps its layout but nothing else.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::names;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    names::check(&text);
    let clean = names::sanitize_text(&text);
    assert_eq!(clean.matches('\n').count(), text.matches('\n').count());
    names::check(&clean.replace(['\n', '\t'], " "));
});
