//! `-d`, `-i`, `--min-block`, `--slow`: any string is a duration or an error quoting it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::duration::{parse_duration, parse_positive_duration};

fuzz_target!(|text: &str| {
    if let Err(message) = parse_duration(text) {
        assert!(message.contains(text), "{message}");
    }
    if let Ok(d) = parse_positive_duration(text) {
        assert!(!d.is_zero());
    }
});
