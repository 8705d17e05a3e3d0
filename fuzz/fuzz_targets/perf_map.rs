//! /tmp/perf-PID.map files (JIT symbols), written by the target's user: livetrace hands them to
//! blazesym, which must not panic on any content. Each input is written as this process's own
//! perf map and a few addresses are symbolised through it.
#![no_main]

use blazesym::{
    Pid,
    symbolize::{Input, Symbolizer, source::Process, source::Source},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = format!("/tmp/perf-{}.map", std::process::id());
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let mut process = Process::new(Pid::Slf);
    process.perf_map = true;
    process.map_files = false;
    let source = Source::Process(process);
    // Addresses in anonymous memory (the heap) are looked up in the perf map.
    let heap = Box::new(0u64);
    let addrs = [&raw const *heap as u64, 0x1000, u64::MAX - 1];
    let _ = Symbolizer::new().symbolize(&source, Input::AbsAddr(&addrs));
    let _ = std::fs::remove_file(&path);
});
