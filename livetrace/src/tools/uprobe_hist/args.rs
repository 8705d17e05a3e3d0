//! `uprobe-hist`'s command line: what to time, for how long, and where the report goes.

use std::{path::PathBuf, time::Duration};

use clap::Args as ClapArgs;
use livetrace_common::uprobe_hist::{DEFAULT_MAX_KEYS, DEFAULT_MAX_THREADS};

use super::{
    target::SymbolSpec,
    usdt::{By, UsdtPoint},
};
use crate::{duration::parse_positive_duration, output::OutputSpec, session::targets::ProcessArgs};

const EXAMPLES: &str = "\
Examples:
  livetrace uprobe-hist livetrace_demo::validate_subtitle_track -p 1234 -d 10
                                  # a Rust function of pid 1234, by its demangled path
  livetrace uprobe-hist libc:malloc -p 1234 -i 1   # malloc in pid 1234, a histogram a second
  livetrace uprobe-hist parse_request --slow 5ms -o slow.svg -- ./server
                                  # start ./server; calls over 5 ms with their callers
  livetrace uprobe-hist /usr/lib/libssl.so.3:SSL_read -d 30 --json   # every process, JSON
  livetrace uprobe-hist 'helper@0x1139' -p 1234    # one of several functions named helper
  livetrace uprobe-hist --from usdt:/usr/lib/postgresql/15/bin/postgres:postgresql:query__start \
      --to usdt:postgresql:query__done --by 'str(arg0)' -d 30
                                  # every PostgreSQL backend's queries: latency, and by text

TARGET is a path or a library name (libc, libc.so.6); without it the executable of -p (or of
the command) is searched, then the libraries it has loaded (or links). SYMBOL is a C name, or
a Rust or C++ function by its demangled path (a Rust ::h<hash> suffix is optional), or a
mangled name. Go programs are refused: uretprobes corrupt Go stacks.";

#[derive(ClapArgs, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The function to time: [TARGET:]SYMBOL[@0xADDR].
    #[arg(value_name = "[TARGET:]SYMBOL", value_parser = SymbolSpec::parse,
          required_unless_present = "from", conflicts_with = "from")]
    pub symbol: Option<SymbolSpec>,
    /// Time spans instead of calls: from this USDT probe to --to on the same thread
    /// (usdt:[TARGET:]PROVIDER:NAME; `livetrace probes` lists them).
    #[arg(long = "from", value_name = "USDT", value_parser = UsdtPoint::parse, requires = "to")]
    pub from: Option<UsdtPoint>,
    /// Where each span ends: a USDT probe, usdt:[TARGET:]PROVIDER:NAME (without TARGET, in
    /// --from's).
    #[arg(long = "to", value_name = "USDT", value_parser = UsdtPoint::parse, requires = "from")]
    pub to: Option<UsdtPoint>,
    /// Break spans down by an argument of the --from probe: argN (its value) or str(argN)
    /// (the string it points to, e.g. a query's text): the top keys by count and by time.
    #[arg(long = "by", value_name = "ARG", value_parser = By::parse, requires = "from")]
    pub by: Option<By>,
    /// Bytes of a --by str(argN) key kept (the rest is cut).
    #[arg(long = "by-length", value_name = "BYTES", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=127))]
    pub by_length: u32,
    /// Distinct --by keys kept; spans of further keys are counted in the total only.
    #[arg(long = "max-keys", value_name = "N", default_value_t = DEFAULT_MAX_KEYS,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_keys: u32,
    #[command(flatten)]
    pub processes: ProcessArgs,
    /// How long to trace (30, 1.5s, 500ms); default: until Ctrl-C or the targets exit.
    #[arg(short = 'd', long = "duration", value_name = "SECS", value_parser = parse_positive_duration,
          allow_hyphen_values = true)]
    pub duration: Option<Duration>,
    /// Also print a histogram every SECS (at least 1 s), then the total.
    #[arg(short = 'i', long = "interval", value_name = "SECS", value_parser = parse_interval,
          allow_hyphen_values = true)]
    pub interval: Option<Duration>,
    /// Print one JSON object on stdout instead of the text report.
    #[arg(long = "json")]
    pub json: bool,
    /// Record calls at least this long (5ms, 250us) with their caller's stack; list the slowest.
    #[arg(long = "slow", value_name = "DUR", value_parser = parse_positive_duration,
          allow_hyphen_values = true)]
    pub slow: Option<Duration>,
    /// Write an output; the format follows the extension: .txt (the text report), .json, or
    /// with --slow the slow calls' callers, weighted by their total time in us: .svg, .folded,
    /// .pb.gz (pprof) or .speedscope.json; - is the text report on stdout. Repeatable.
    #[arg(short = 'o', long = "output", value_name = "PATH", value_parser = HistOutput::parse)]
    pub outputs: Vec<HistOutput>,
    /// Threads that can be inside the function at the same time.
    #[arg(long = "max-threads", value_name = "N", default_value_t = DEFAULT_MAX_THREADS,
          value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub max_threads: u32,
}

/// Where one `-o` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistOutput {
    /// The text report; `None` is stdout.
    Text(Option<PathBuf>),
    Json(PathBuf),
    /// A flamegraph or folded stacks of the slow calls.
    Stacks(OutputSpec),
}

impl HistOutput {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "-" {
            return Ok(Self::Text(None));
        }
        let lower = text.to_ascii_lowercase();
        if lower.ends_with(".txt") {
            return Ok(Self::Text(Some(PathBuf::from(text))));
        }
        if lower.ends_with(".json") {
            return Ok(Self::Json(PathBuf::from(text)));
        }
        OutputSpec::parse(text).map(Self::Stacks).map_err(|_| {
            format!(
                "cannot tell the format of '{text}' from its extension: use .txt (the \
                     histogram), .json, .svg, .folded, .pb.gz or .speedscope.json (slow calls' \
                     stacks, with --slow), or - (the histogram on stdout)"
            )
        })
    }

    pub(super) fn path(&self) -> Option<&PathBuf> {
        match self {
            Self::Text(path) => path.as_ref(),
            Self::Json(path) => Some(path),
            Self::Stacks(spec) => spec.path.as_ref(),
        }
    }
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_positive_duration(text)?;
    if interval < Duration::from_secs(1) {
        return Err(format!(
            "'{text}' is shorter than a second: -i takes 1 s or more"
        ));
    }
    Ok(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output formats come from extensions; stack formats need --slow (checked in run), and an
    /// unknown extension names the supported ones.
    #[test]
    fn picks_output_format_from_extension() {
        assert_eq!(HistOutput::parse("-").unwrap(), HistOutput::Text(None));
        assert!(matches!(
            HistOutput::parse("h.TXT").unwrap(),
            HistOutput::Text(Some(_))
        ));
        assert!(matches!(
            HistOutput::parse("h.json").unwrap(),
            HistOutput::Json(_)
        ));
        assert!(matches!(
            HistOutput::parse("s.svg").unwrap(),
            HistOutput::Stacks(_)
        ));
        assert!(matches!(
            HistOutput::parse("s.folded").unwrap(),
            HistOutput::Stacks(_)
        ));
        let err = HistOutput::parse("h.png").unwrap_err();
        assert!(err.contains("'h.png'") && err.contains(".txt"), "{err}");
    }

    /// -i below a second is refused with a message naming the value.
    #[test]
    fn interval_must_be_at_least_a_second() {
        assert!(parse_interval("1").is_ok());
        assert!(parse_interval("2.5s").is_ok());
        assert!(parse_interval("500ms").unwrap_err().contains("'500ms'"));
    }
}
