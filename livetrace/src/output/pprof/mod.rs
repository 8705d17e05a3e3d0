//! pprof output (`.pb.gz`): a gzip-compressed `perftools.profiles.Profile` protobuf, as
//! `go tool pprof`, Pyroscope, Parca and Grafana read it; and the reverse, for `livetrace diff`.
//!
//! The messages below mirror google/pprof's `proto/profile.proto` field for field (same tags and
//! types), encoded and decoded by prost's derive: no protoc, no build script, no generated code
//! to keep in sync. What goes where:
//! - sample types say what was measured: on-CPU `samples/count` and `cpu/nanoseconds` (samples
//!   × the sampling period), off-CPU `off_cpu/nanoseconds` (blocked µs × 1000);
//! - the process and (with `--per-thread`) thread frames become the sample labels `process` and
//!   `thread`, not locations, as other eBPF profilers do (`-tagroot=process` shows them as roots);
//! - one location per address, its inlined functions as several lines (innermost first, as the
//!   format wants), under a mapping per module carrying its build ID; kernel frames sit under a
//!   `[kernel.kallsyms]` mapping; every mapping says it has functions, so readers do not try to
//!   symbolise again;
//! - the data-quality footer goes into the profile's comments (`go tool pprof -comments`).

mod decode;
mod encode;

use std::io::{self, Read, Write};

use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use prost::Message as _;

pub use self::{decode::decode, encode::encode};
use crate::model::StackProfile;

/// `perftools.profiles.Profile`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "7")]
    pub drop_frames: i64,
    #[prost(int64, tag = "8")]
    pub keep_frames: i64,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// Leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Innermost inlined function first; the last is the function the address is in.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
    #[prost(bool, tag = "5")]
    pub is_folded: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
    #[prost(int64, tag = "3")]
    pub column: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// Label keys for the frames that are not code.
const PROCESS_LABEL: &str = "process";
const THREAD_LABEL: &str = "thread";

pub fn write<W: Write>(profile: &StackProfile, out: W) -> io::Result<()> {
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&encode(profile).encode_to_vec())?;
    gz.finish()?.flush()
}

/// Why a file could not be read as pprof.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("its gzip stream is broken")]
    Gzip(#[source] io::Error),
    #[error("it is not a pprof profile (protobuf decoding failed)")]
    Decode(#[from] prost::DecodeError),
    #[error("malformed pprof profile: {0}")]
    Malformed(String),
    #[error("it decompresses to more than {} MiB, more than any real profile", .0 >> 20)]
    TooLarge(u64),
}

/// What a gzipped pprof input may decompress to: far beyond real profiles, and a bound on what a
/// hostile file (a gzip bomb) can make `diff` allocate.
const MAX_DECOMPRESSED: u64 = 1 << 30;

/// Reads a pprof profile (gzip-compressed or not) into a stack profile. Of several sample types
/// it takes a count (`samples/count`) if there is one, else the default (or last) type; time in
/// nanoseconds becomes microseconds. The `process` and `thread` labels become root frames again.
pub fn read(bytes: &[u8]) -> Result<StackProfile, ReadError> {
    let raw;
    let data = if bytes.starts_with(&[0x1f, 0x8b]) {
        raw = gunzip(bytes, MAX_DECOMPRESSED)?;
        &raw[..]
    } else {
        bytes
    };
    decode(&Profile::decode(data)?)
}

/// Decompresses at most `limit` bytes; more is an error, not an allocation.
fn gunzip(bytes: &[u8], limit: u64) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::new();
    GzDecoder::new(bytes)
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(ReadError::Gzip)?;
    if buf.len() as u64 > limit {
        return Err(ReadError::TooLarge(limit));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{DataQuality, Frame, FrameKind, KERNEL_MODULE, WeightUnit, WeightedStack};

    fn frame(kind: FrameKind, name: &str, address: Option<u64>, inlined: bool) -> Frame {
        Frame {
            module: address.map(|_| {
                Arc::from(if kind == FrameKind::Kernel {
                    KERNEL_MODULE
                } else {
                    "/usr/bin/app"
                })
            }),
            address,
            inlined,
            line: address.map(|_| 7),
            file: address.map(|_| Arc::from("app.c")),
            ..Frame::new(kind, name)
        }
    }

    fn sample_profile() -> StackProfile {
        use FrameKind::*;
        let mut profile = StackProfile {
            title: "pid 1 (app)".into(),
            unit: WeightUnit::Samples,
            period_ns: Some(10_101_010),
            stacks: vec![
                WeightedStack {
                    frames: vec![
                        Frame::new(Process, "app"),
                        Frame::new(Thread, "app-7"),
                        frame(User, "main", Some(0x1100), false),
                        frame(User, "work", Some(0x1200), false),
                        frame(User, "inlined_helper", Some(0x1200), true),
                        frame(Kernel, "do_syscall_64", Some(0xffff_ffff_8100_0000), false),
                    ],
                    weight: 3,
                },
                WeightedStack {
                    frames: vec![
                        Frame::new(Process, "app"),
                        Frame::new(Thread, "app-7"),
                        frame(User, "main", Some(0x1100), false),
                        Frame::new(Lost, "[lost user stack]"),
                    ],
                    weight: 2,
                },
            ],
            quality: DataQuality::default(),
            build_ids: [(Arc::from("/usr/bin/app"), "abcd".to_owned())].into(),
        };
        profile.normalize();
        profile
    }

    /// The encoding has both on-CPU sample types, one location per address with inlined
    /// functions as lines (innermost first), mappings with build IDs, the kernel mapping, and the
    /// process and thread as labels.
    #[test]
    fn encodes_locations_lines_mappings_and_labels() {
        let p = encode(&sample_profile());
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<_> = p
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        assert_eq!(p.period, 10_101_010);
        let heavy = p.sample.iter().find(|s| s.value[0] == 3).unwrap();
        assert_eq!(heavy.value, [3, 30_303_030]);
        assert_eq!(heavy.location_id.len(), 3, "kernel, work+inlined, main");
        let labels: Vec<_> = heavy.label.iter().map(|l| (s(l.key), s(l.str))).collect();
        assert_eq!(labels, [("process", "app"), ("thread", "app-7")]);
        let work = p
            .location
            .iter()
            .find(|l| l.id == heavy.location_id[1])
            .unwrap();
        let names: Vec<_> = work
            .line
            .iter()
            .map(|l| s(p.function[l.function_id as usize - 1].name))
            .collect();
        assert_eq!(names, ["inlined_helper", "work"]);
        let mapping = |name: &str| p.mapping.iter().find(|m| s(m.filename) == name).unwrap();
        assert_eq!(s(mapping("/usr/bin/app").build_id), "abcd");
        let kernel = mapping(KERNEL_MODULE);
        assert_eq!(kernel.memory_start, 0xffff_ffff_8100_0000);
        assert!(p.comment.iter().any(|&c| s(c).starts_with("data quality:")));
    }

    /// Encoding then decoding gives back the same stacks, addresses and inlining included.
    #[test]
    fn round_trips_through_bytes() {
        let profile = sample_profile();
        let mut bytes = Vec::new();
        write(&profile, &mut bytes).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic");
        let back = read(&bytes).unwrap();
        assert_eq!(back.unit, WeightUnit::Samples);
        assert_eq!(back.stacks, profile.stacks);
    }

    /// Off-CPU microseconds become off_cpu/nanoseconds, and come back as microseconds.
    #[test]
    fn off_cpu_time_is_in_nanoseconds() {
        let mut profile = sample_profile();
        profile.unit = WeightUnit::Microseconds;
        profile.period_ns = None;
        let p = encode(&profile);
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(
            (s(p.sample_type[0].r#type), s(p.sample_type[0].unit)),
            ("off_cpu", "nanoseconds")
        );
        assert!(p.sample.iter().any(|s| s.value == [3000]));
        let back = decode(&p).unwrap();
        assert_eq!(back.unit, WeightUnit::Microseconds);
        assert_eq!(back.total_weight(), 5);
    }

    /// Garbage is refused with a reason, not mistaken for an empty profile.
    #[test]
    fn refuses_garbage() {
        let err = read(b"\x1f\x8bnot really gzip").unwrap_err();
        assert!(err.to_string().contains("gzip"), "{err}");
        let err = read(b"\x0f\xff\xff garbage").unwrap_err();
        assert!(err.to_string().contains("pprof"), "{err}");
    }

    /// A gzip stream that expands past the limit is refused before it is all in memory.
    #[test]
    fn gzip_bombs_are_refused() {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
        encoder.write_all(&vec![0u8; 64 * 1024]).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(matches!(
            gunzip(&bomb, 4096),
            Err(ReadError::TooLarge(4096))
        ));
        assert_eq!(gunzip(&bomb, 64 * 1024).unwrap().len(), 64 * 1024);
    }
}
