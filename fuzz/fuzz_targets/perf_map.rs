//! /tmp/perf-PID.map files (JIT symbols), written by the target's user: livetrace's own reader
//! must not panic on any content, and lookups in what it read must not either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livetrace::perf_map::PerfMap;

fuzz_target!(|data: &[u8]| {
    let map = PerfMap::parse(data);
    for addr in [0, 0x1000, 0x7f00_0000_1000, u64::MAX - 1, u64::MAX] {
        let _ = map.find(addr);
    }
});
