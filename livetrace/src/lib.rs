//! livetrace as a library: every tool, output format and parser, so that the binary stays a thin
//! command line over it and the parsers can be reached by fuzz targets (`fuzz/`) and tests.
//! The modules are the binary's; nothing here is a stable API for other crates.
// Standard output and error go through `console`, whose writes never panic.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod bpf;
pub mod build_info;
pub mod console;
pub mod duration;
#[cfg(test)]
mod fuzz_smoke;
pub mod histogram;
pub mod kernel_btf;
pub mod model;
pub mod names;
pub mod output;
pub mod privileges;
pub mod proc;
pub mod python;
pub mod runtimes;
pub mod session;
pub mod signals;
pub mod stacks;
pub mod symbolize;
pub mod tools;
pub mod unwind;
pub mod usdt;

/// A mistake in the command line that clap cannot see by itself (options that contradict each
/// other): reported like clap's own errors, with exit status 2.
#[derive(Debug)]
pub struct UsageError(String);

impl UsageError {
    pub fn error(message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Self(message.into()))
    }
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `20261126-045103` in UTC, for default output names.
pub fn timestamp() -> String {
    timestamp_of(std::time::SystemTime::now())
}

/// [`timestamp`] of a given time.
pub fn timestamp_of(at: std::time::SystemTime) -> String {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}
