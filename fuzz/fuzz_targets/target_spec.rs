//! uprobe-hist's `[TARGET:]SYMBOL[@0xADDR]`: any string parses or is refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::tools::uprobe_hist::target::SymbolSpec;

fuzz_target!(|text: &str| {
    if let Ok(spec) = SymbolSpec::parse(text) {
        assert!(!spec.symbol.is_empty());
        assert!(spec.target.as_deref().is_none_or(|t| !t.is_empty()));
    }
});
