//! Deterministic "fuzz smoke" tests: every parser of untrusted input is fed a few hundred
//! generated inputs (mutations of valid ones: flipped, dropped, duplicated and inserted bytes,
//! truncations, boundary numbers) and must answer each without panicking. CI runs these; the
//! libFuzzer targets in `fuzz/` (`cargo xtask fuzz`) search much further.

use std::time::Duration;

/// xorshift64*: a fixed sequence, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens that tend to break parsers: separators, boundary numbers, odd characters.
const TOKENS: &[&str] = &[
    ":",
    "::",
    "@",
    "@0x",
    "0x",
    ";",
    " ",
    "\t",
    "\n",
    "-",
    ".",
    "..",
    "_[k]",
    "/",
    "[",
    "]",
    "0",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "ffffffffffffffff",
    "1e400",
    "NaN",
    "inf",
    "-1",
    "µ",
    "é",
    "\u{0}",
    "\u{feff}",
    "offset:",
    "size:",
    "field:",
    "r-xp",
    "ms",
    "us",
    "ns",
    "s",
    "h",
];

/// `count` mutations of the seeds, each an arbitrary byte string.
fn mutations(seeds: &[&[u8]], count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed | 1);
    let mut out: Vec<Vec<u8>> = seeds.iter().map(|s| s.to_vec()).collect();
    out.push(Vec::new());
    while out.len() < count {
        let mut input = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(input.len() + 1);
            match rng.below(7) {
                0 if !input.is_empty() => {
                    let i = rng.below(input.len());
                    input[i] ^= 1 << rng.below(8);
                }
                1 if !input.is_empty() => {
                    input.remove(rng.below(input.len()));
                }
                2 => input.truncate(at),
                3 => {
                    let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                    input.splice(at..at, token.iter().copied());
                }
                4 => {
                    let slice = input[at..].to_vec();
                    input.extend(slice);
                }
                5 => input.insert(at, rng.next() as u8),
                _ => {
                    let i = rng.below(input.len().saturating_sub(3).max(1));
                    if let Some(word) = input.get_mut(i..i + 4) {
                        word.copy_from_slice(&(rng.next() as u32).to_le_bytes());
                    }
                }
            }
        }
        out.push(input);
    }
    out
}

fn texts(seeds: &[&str], count: usize, seed: u64) -> Vec<String> {
    let seeds: Vec<&[u8]> = seeds.iter().map(|s| s.as_bytes()).collect();
    mutations(&seeds, count, seed)
        .into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

/// `[TARGET:]SYMBOL[@0xADDR]`.
#[test]
fn target_specs_never_panic() {
    use crate::tools::uprobe_hist::target::SymbolSpec;
    for text in texts(
        &[
            "libc:malloc",
            "/usr/lib/libfoo.so:a::b::c@0x1139",
            "helper@0x401126",
            "x",
        ],
        400,
        1,
    ) {
        if let Ok(spec) = SymbolSpec::parse(&text) {
            assert!(!spec.symbol.is_empty(), "{text:?}");
        }
    }
}

/// `-d`, `-i`, `--min-block`, `--slow`.
#[test]
fn durations_never_panic() {
    use crate::duration::{parse_duration, parse_positive_duration};
    for text in texts(
        &["30", "1.5s", "250us", "10ms", "2m", "1h", "100ns"],
        400,
        2,
    ) {
        match parse_duration(&text) {
            Ok(d) => assert!(d <= Duration::MAX, "{text:?}"),
            Err(message) => assert!(message.contains(&text), "{message}"),
        }
        let _ = parse_positive_duration(&text);
    }
}

/// `/proc/PID/maps`, and the lookups made in what it gives.
#[test]
fn proc_maps_never_panic() {
    use crate::{proc::maps::Maps, symbolize::module_offset};
    let seed = "\
55d0c0a01000-55d0c0a05000 r-xp 00001000 fd:01 123 /usr/bin/app
7f1000000000-7f1000100000 r-xp 00028000 fd:01 456 /lib/x86_64-linux-gnu/libc.so.6
7ffd1000-7ffd3000 r-xp 00000000 00:00 0 [vdso]
ffffffffffffffff-0 r-xp ffffffffffffffff fd:01 1 /x y z
";
    for text in texts(&[seed], 400, 3) {
        let maps = Maps::parse(&text);
        let _ = (maps.code_paths(), maps.anonymous_code(), maps.code_ranges());
        for mapping in maps.code_files() {
            for addr in [mapping.start, mapping.end, u64::MAX, 0] {
                let _ = module_offset(&mapping, addr);
                let _ = maps.region_of(addr);
            }
        }
    }
}

/// Tracepoint `format` files.
#[test]
fn tracefs_formats_never_panic() {
    let seed = "name: sched_switch\nID: 321\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n";
    for text in texts(&[seed], 400, 4) {
        let _ = crate::tools::offcpu::tracefs::parse_format(&text);
    }
}

/// Kernel BTF blobs: mutations of a small valid one (every header field, type record and
/// member); what parses must also answer lookups.
#[test]
fn btf_blobs_never_panic() {
    use crate::kernel_btf::{KernelBtf, tests::synthetic_btf};
    let valid = synthetic_btf();
    let mut self_referencing = valid.clone();
    // The anonymous union member of `task` ({name 0, type 3, offset 64}) made to point at `task`
    // itself (id 4): a cycle that lookups must not follow forever.
    let member: Vec<u8> = [0u32, 3, 64].iter().flat_map(|v| v.to_le_bytes()).collect();
    let at = self_referencing
        .windows(member.len())
        .position(|w| w == member)
        .expect("the union member record")
        + 4;
    self_referencing[at..at + 4].copy_from_slice(&4u32.to_le_bytes());
    let cyclic = KernelBtf::parse(&self_referencing).unwrap();
    assert!(cyclic.member_offset("task", "nope").is_err());
    for blob in mutations(&[&valid, &self_referencing], 600, 5) {
        if let Ok(btf) = KernelBtf::parse(&blob) {
            for (name, member) in [("task", "pid"), ("task", "nope"), ("", "")] {
                let _ = btf.member_offset(name, member);
            }
        }
    }
}

/// Folded stacks as `livetrace diff` reads them, and the diff, table and SVG of what parses.
#[test]
fn folded_inputs_never_panic() {
    use crate::tools::diff::{Diff, parse_folded, write_svg, write_table};
    let seeds = [
        "proc;main;a;b;hot_60 600\nproc;main;a;c_[k] 30\n",
        "x 18446744073709551615\ny 18446744073709551615\n",
        "a;;b 1\n",
    ];
    for text in texts(&seeds, 400, 6) {
        if let Ok(profile) = parse_folded(&text) {
            let diff = Diff::new(&profile, &profile);
            let names = ("a".to_owned(), "b".to_owned());
            write_table(&diff, &names, 20, std::io::sink()).unwrap();
            write_svg(&diff, &names, &mut std::io::sink()).unwrap();
        }
    }
}

/// pprof files as `livetrace diff` reads them: mutations of one livetrace wrote, gzipped and raw.
#[test]
fn pprof_inputs_never_panic() {
    use crate::{
        model::{Frame, FrameKind, StackProfile, WeightUnit, WeightedStack},
        output::pprof,
    };
    let profile = StackProfile {
        title: "t".into(),
        unit: WeightUnit::Samples,
        period_ns: Some(10_101_010),
        stacks: vec![WeightedStack {
            frames: vec![
                Frame::new(FrameKind::Process, "proc"),
                Frame::new(FrameKind::User, "main"),
                Frame::new(FrameKind::Kernel, "do_syscall"),
            ],
            weight: 7,
        }],
        quality: Default::default(),
        build_ids: Default::default(),
    };
    let mut gz = Vec::new();
    pprof::write(&profile, &mut gz).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
    for bytes in mutations(&[&gz, &raw], 400, 7) {
        let _ = pprof::read(&bytes);
    }
}

/// /tmp/perf-PID.map files (written by the target's user) through livetrace's own reader: any
/// content parses without panicking, and every address looks up.
#[test]
fn perf_maps_never_panic() {
    let seed = b"7f0000001000 10 jitted_one\n0x7f0000002000 0x2a0 int A.b(byte[])\n\
                 7f0000003000 2a0 JS:*foo /srv/bar.js:1:2\n";
    for text in mutations(&[seed], 400, 8) {
        let map = crate::symbolize::perf_map::PerfMap::parse(&text);
        for addr in [0, 0x7f0000001008, 0x7f0000002100, u64::MAX] {
            let _ = map.find(addr);
        }
    }
}

#[test]
fn names_are_always_made_harmless() {
    let seeds: &[&[u8]] = &[
        b"\x1b]0;pwned\x07burn",
        "gpj.\u{202e}exe".as_bytes(),
        "py::serve_request\n\tat \u{9b}2J".as_bytes(),
        b"plain_name",
    ];
    for bytes in mutations(seeds, 400, 9) {
        let text = String::from_utf8_lossy(&bytes);
        crate::names::check(&text);
        let clean = crate::names::sanitize_text(&text);
        assert_eq!(clean.matches('\n').count(), text.matches('\n').count());
        crate::names::check(&clean.replace(['\n', '\t'], " "));
    }
}

/// USDT notes (mutations of the stripped fixture, whose notes survive `strip`) and argument
/// specs (mutations of every form): read or refused, never a panic.
#[test]
fn usdt_notes_and_specs_never_panic() {
    use crate::usdt::{args, notes};
    let fixture: &[u8] = include_bytes!("../../fuzz/seeds/usdt_notes/fixture-stripped");
    let found = notes::read(fixture).expect("the seed has notes");
    assert_eq!(found.sites.len(), 6, "{:?}", found.skipped);
    for file in mutations(&[fixture], 300, 11) {
        if let Ok(found) = notes::read(&file) {
            for site in found.sites {
                let _ = args::parse(&site.args);
            }
        }
    }
    let specs = include_str!("../../fuzz/seeds/usdt_notes/specs.txt");
    assert_eq!(args::parse(specs).map(|a| a.len()), Ok(8));
    for text in texts(&[specs], 2000, 12) {
        let _ = args::parse(&text);
    }
}
