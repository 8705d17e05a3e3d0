//! `livetrace-demo`: a small catalogue API with a real incident built in.
//!
//! During a final, a streaming platform's catalogue API missed its p99 SLO while CPU graphs
//! looked fine. A sampling profile showed `validate_subtitle_track` walking every byte of every
//! caption track on every request: 37 tracks per title in production, one in the unit test
//! (`--tracks 1` reproduces the test's view, where nothing looks wrong).
//! Meanwhile an event consumer sat blocked on the network, which only an off-CPU view shows.
//!
//! The code is shaped for profilers rather than throughput. Request-path functions are
//! `#[inline(never)]` with normal Rust mangling, so frame-pointer stacks show the whole chain
//! `serve_connection -> handle_request -> build_title_response -> validate_subtitle_tracks ->
//! validate_subtitle_track` and uprobes can attach to `livetrace_demo::validate_subtitle_track`;
//! `black_box` stops the optimiser from skipping work or turning calls into tail jumps. A
//! built-in closed-loop client keeps one core busy per worker, threads are named for per-thread
//! views, and a watchdog ends the process after `--seconds` whatever else is going on.

use std::fmt::Write as _;
use std::hint::black_box;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

const USAGE: &str = "usage: livetrace-demo [--seconds N] [--tracks N] [--workers N]";
const TITLE_COUNT: u64 = 48;
// Sized so render_json takes 10-15% of the CPU: sibling work, so a flamegraph is not one column.
const SYNOPSIS_REPEATS: usize = 190;
const LANGUAGES: [&str; 8] = ["en", "fr", "de", "es", "pt", "pl", "ja", "ar"];
// Mixed scripts so the UTF-8 walk meets multi-byte sequences, as with real captions.
const LINES: [&str; 6] = [
    "Pass it wide, he's through on goal!",
    "¡Qué golazo en el último minuto!",
    "Schiedsrichter pfeift – \"Elfmeter\".",
    "Le gardien plonge… et arrête !",
    "ゴール！信じられない。",
    "Extra time: two minutes added.",
];

pub struct SubtitleTrack {
    language: &'static str,
    srt: Vec<u8>,
}

struct Title {
    id: u64,
    name: String,
    synopsis: String,
    tracks: Vec<SubtitleTrack>,
}

#[derive(Debug)]
pub enum ValidationError {
    InvalidUtf8 { offset: usize },
    CueOutOfOrder { cue: u32 },
}

/// The incident's hot spot: runs on every request, for every track, over every byte.
#[inline(never)]
pub fn validate_subtitle_track(track: &SubtitleTrack) -> Result<(), ValidationError> {
    let bytes = black_box(track.srt.as_slice());
    let (mut i, mut cues, mut last_end, mut line_start) = (0, 0, 0, true);
    while i < bytes.len() {
        // A cue timing line, `00:00:01,000 --> 00:00:03,500`: cues must not go back in time.
        if line_start && let Some(start) = timestamp_ms(&bytes[i..]) {
            cues += 1;
            let arrow = bytes.get(i + 12..i + 17) == Some(b" --> ");
            match arrow.then(|| timestamp_ms(&bytes[i + 17..])).flatten() {
                Some(end) if start >= last_end && end >= start => last_end = end,
                _ => return Err(ValidationError::CueOutOfOrder { cue: cues }),
            }
        }
        // UTF-8 checked by hand, a byte at a time, as the original did (minus the overlong and
        // surrogate checks: the cost, not the rigour, is what is being reproduced).
        let width = match bytes[i].leading_ones() {
            0 => 1,
            n @ 2..=4 => n as usize,
            _ => 0,
        };
        let tail = bytes.get(i + 1..i + width);
        if width == 0 || !tail.is_some_and(|t| t.iter().all(|&c| c & 0xC0 == 0x80)) {
            return Err(ValidationError::InvalidUtf8 { offset: i });
        }
        line_start = bytes[i] == b'\n';
        i += width;
    }
    Ok(())
}

/// Parses `HH:MM:SS,mmm` at the start of `b`. Inlined so that, as in the incident's profile,
/// the leaf frame is `validate_subtitle_track` itself.
#[inline(always)]
fn timestamp_ms(b: &[u8]) -> Option<u64> {
    let b = b.get(..12)?;
    if b[2] != b':' || b[5] != b':' || b[8] != b',' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        let digit = |n: u64, &c: &u8| c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'));
        b[r].iter().try_fold(0, digit)
    };
    Some(((num(0..2)? * 60 + num(3..5)?) * 60 + num(6..8)?) * 1000 + num(9..12)?)
}

/// The bug: this belongs at ingest, but runs per request, so cost grows with the track count.
#[inline(never)]
fn validate_subtitle_tracks(tracks: &[SubtitleTrack]) -> Result<(), ValidationError> {
    tracks.iter().try_for_each(validate_subtitle_track)
}

#[inline(never)]
fn lookup_title(catalogue: &[Title], id: u64) -> Option<&Title> {
    catalogue.iter().find(|title| title.id == id)
}

#[inline(never)]
fn render_json(title: &Title) -> String {
    let mut out = String::with_capacity(2 * title.synopsis.len() + 32 * title.tracks.len());
    let _ = write!(out, r#"{{"id":{},"name":"#, title.id);
    push_json_str(&mut out, &title.name);
    out.push_str(r#","synopsis":"#);
    push_json_str(&mut out, &title.synopsis);
    out.push_str(r#","subtitles":["#);
    for (n, t) in title.tracks.iter().enumerate() {
        let sep = if n == 0 { "" } else { "," };
        let (lang, len) = (t.language, t.srt.len());
        let _ = write!(out, r#"{sep}{{"lang":"{lang}","bytes":{len}}}"#);
    }
    out.push_str("]}");
    out
}

/// ASCII-only JSON with `\uXXXX` escapes; escaping `\n` keeps each reply on one line.
#[inline(always)]
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => out.extend(['\\', c]),
            '\n' => out.push_str("\\n"),
            ' '..='~' => out.push(c),
            _ => c.encode_utf16(&mut [0; 2]).iter().for_each(|unit| {
                let _ = write!(out, "\\u{unit:04x}");
            }),
        }
    }
    out.push('"');
}

#[inline(never)]
fn build_title_response(title: &Title) -> String {
    match validate_subtitle_tracks(&title.tracks) {
        // black_box: no tail jump, so render_json keeps this frame as its parent in profiles.
        Ok(()) => black_box(render_json(title)),
        Err(e) => format!(r#"{{"error":"title {}: {e:?}"}}"#, title.id),
    }
}

/// Answers one `GET /titles/<id>` line with one line of JSON.
#[inline(never)]
fn handle_request(line: &str, catalogue: &[Title]) -> String {
    let id = line.trim_end().strip_prefix("GET /titles/");
    let mut reply = match id.and_then(|id| lookup_title(catalogue, id.parse().ok()?)) {
        Some(title) => build_title_response(title),
        None => r#"{"error":"not found"}"#.to_owned(),
    };
    reply.push('\n');
    reply
}

#[inline(never)]
fn serve_connection(stream: TcpStream, catalogue: &[Title]) -> io::Result<()> {
    // Each reply is a single write; Nagle would only add delay.
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        writer.write_all(handle_request(&line?, catalogue).as_bytes())?;
    }
    Ok(())
}

/// Closed loop, one request in flight, so the worker is busy exactly as long as handling takes.
/// Reconnecting every 100 requests gives other clients a turn on the worker.
fn loadgen(addr: SocketAddr, first: u64) -> io::Result<()> {
    let mut reply = Vec::new();
    for batch in first.. {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream.try_clone()?);
        for n in 0..100 {
            let id = (batch * 100 + n) % TITLE_COUNT;
            stream.write_all(format!("GET /titles/{id}\n").as_bytes())?;
            reply.clear();
            reader.read_until(b'\n', &mut reply)?;
        }
    }
    Ok(())
}

/// xorshift64: deterministic test data without a dependency.
fn random_below(state: &mut u64, bound: u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % bound
}

/// 8-16 KiB of SRT, so per-track cost, and so request latency, has a spread.
fn generate_track(language: &'static str, rng: &mut u64) -> SubtitleTrack {
    let ts = |ms: u64| {
        let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
        format!("{h:02}:{m:02}:{s:02},{:03}", ms % 1000)
    };
    let target = 8 * 1024 + random_below(rng, 8 * 1024) as usize;
    let (mut srt, mut cue, mut end) = (String::with_capacity(target + 128), 1, 0);
    while srt.len() < target {
        let start = end + 200 + random_below(rng, 1500);
        end = start + 1000 + random_below(rng, 3000);
        let text = LINES[random_below(rng, LINES.len() as u64) as usize];
        let _ = write!(srt, "{cue}\n{} --> {}\n{text}\n\n", ts(start), ts(end));
        cue += 1;
    }
    let srt = srt.into_bytes();
    SubtitleTrack { language, srt }
}

fn build_catalogue(tracks: usize) -> Vec<Title> {
    let mut rng = 0x9e37_79b9_7f4a_7c15;
    let synopsis = LINES.repeat(SYNOPSIS_REPEATS).join("\n");
    let mut track = |n: usize| generate_track(LANGUAGES[n % LANGUAGES.len()], &mut rng);
    (0..TITLE_COUNT)
        .map(|id| Title {
            id,
            name: format!("Championship Final {id}: Extended Highlights"),
            synopsis: synopsis.clone(),
            tracks: (0..tracks).map(&mut track).collect(),
        })
        .collect()
}

/// Returns `[seconds, tracks, workers]`.
fn parse_args() -> Result<[u64; 3], String> {
    let mut options = [("--seconds", 120), ("--tracks", 37), ("--workers", 1)];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let Some((_, slot)) = options.iter_mut().find(|(name, _)| *name == arg) else {
            return Err(format!("unknown argument '{arg}' ({USAGE})"));
        };
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        *slot = (value.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{arg} must be a positive integer, got '{value}'"))?;
    }
    Ok(options.map(|(_, value)| value))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name.to_owned()).spawn(f)
}

fn main() -> io::Result<()> {
    let [seconds, tracks, workers] = parse_args().unwrap_or_else(|e| {
        eprintln!("livetrace-demo: {e}");
        std::process::exit(2)
    });
    // Started first, so nothing after it, start-up included, can outlive the time limit.
    let watchdog = spawn("watchdog", move || {
        thread::sleep(Duration::from_secs(seconds));
        std::process::exit(0);
    })?;

    // An upstream that accepts the consumer, then goes quiet and never publishes an event;
    // main holds its end open until the watchdog ends the process.
    let bus = TcpListener::bind("127.0.0.1:0")?;
    let mut events = TcpStream::connect(bus.local_addr()?)?;
    let _upstream = bus.accept()?;
    spawn("event-consumer", move || {
        // Waiting for catalogue update events: blocked in read() for the whole run.
        let mut buf = [0; 4096];
        while matches!(events.read(&mut buf), Ok(n) if n > 0) {}
    })?;

    let catalogue: Arc<[Title]> = build_catalogue(tracks as usize).into();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    for worker in 0..workers {
        let (listener, catalogue) = (listener.try_clone()?, Arc::clone(&catalogue));
        spawn("http-worker", move || {
            for stream in listener.incoming().flatten() {
                // A client hanging up mid-request only ends its own connection.
                let _ = serve_connection(stream, &catalogue);
            }
        })?;
        // One closed-loop client per worker, each starting at a different title.
        spawn("loadgen", move || drop(loadgen(addr, worker * 7)))?;
    }

    let pid = std::process::id();
    println!("catalogue-api pid={pid} listening on {addr}, stopping after {seconds}s");
    io::stdout().flush()?;
    let _ = watchdog.join();
    Ok(())
}
