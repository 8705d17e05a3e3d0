//! livetrace: live debugging with eBPF. Answers three questions about a running process without
//! pausing it: where its CPU time goes (`profile`), where its threads block (`offcpu`), and the
//! latency distribution of one function (`uprobe-hist`).
//!
//! Exit codes: 0 when the outputs were written (whatever ended the capture), 1 for runtime errors,
//! 2 for usage errors.

#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use livetrace::{UsageError, build_info, session::command, tools};

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ABOUT: &str = "Live debugging with eBPF: see where a running process spends its CPU time, \
where it blocks, and how long a function takes, without stopping it.";

const AFTER_HELP: &str = "\
Signals: Ctrl-C (SIGINT), SIGTERM or SIGHUP stop the capture and write every output; a second one
while symbolising writes the frames as raw addresses and exits. SIGUSR1 writes a snapshot of every
output (uprobe-hist: prints the histogram so far; record: the window it keeps) and the capture
goes on.

Exit status: 0 when every output was written (whatever ended the capture), 1 on runtime errors
(a process that is gone, a kernel that refuses, a missing capability), 2 on usage errors (the
command line itself is wrong).

Privileges: root, or these capabilities (checked before anything is loaded):
  profile, offcpu, record   CAP_BPF CAP_PERFMON, and CAP_SYSLOG for kernel frame names
                    (not with -U); dump: the recorder's owner (its socket is 0600)
  offcpu --attach tracepoint   also CAP_DAC_READ_SEARCH (and CAP_SYS_ADMIN if tracefs is unmounted)
  uprobe-hist       CAP_BPF CAP_PERFMON CAP_SYS_ADMIN, and CAP_SYS_PTRACE for another user's -p
  diff              none
  e.g. sudo setcap cap_bpf,cap_perfmon,cap_syslog+ep /path/to/livetrace
Under sudo, a command given after -- runs as the invoking user (SUDO_UID); --as-root keeps root.";

#[derive(Parser, Debug)]
#[command(name = "livetrace", about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    /// More detail about what livetrace is doing (repeat for more).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// On-CPU stack sampling: where is the CPU time going?
    Profile(tools::profile::Args),
    /// Off-CPU time: where are the threads blocked, and for how long?
    Offcpu(tools::offcpu::Args),
    /// The flight recorder: keeps the last minutes of on-CPU and off-CPU stacks.
    Record(tools::record::Args),
    /// Writes a window of a running `livetrace record`.
    Dump(tools::record::DumpArgs),
    /// Differential flamegraph and table of two captures (folded or pprof).
    Diff(tools::diff::Args),
    /// Latency histogram of one function: what are its p50, p99 and p99.9?
    UprobeHist(tools::uprobe_hist::Args),
    /// The USDT probes of a binary, library or process: provider, name, semaphore, arguments.
    Probes(tools::probes::Args),
    /// What this host supports and lacks for each subcommand, and how to fix what is missing.
    Check(tools::check::Args),
    /// Shell completions, e.g. `source <(livetrace completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Writes the man pages (livetrace.1 and one per subcommand) into DIR (`cargo xtask dist`
    /// runs it).
    #[command(hide = true)]
    GenerateMan { dir: std::path::PathBuf },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The command line's definition, with the version strings that are only known at run time.
fn command() -> clap::Command {
    // Leaked once: clap keeps &'static strings, and the process parses its command line once.
    let short: &'static str = Box::leak(build_info::short_version().into_boxed_str());
    let long: &'static str = Box::leak(build_info::long_version().into_boxed_str());
    Cli::command().version(short).long_version(long)
}

fn completions(shell: Shell) {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command(), "livetrace", &mut script);
    livetrace::console::stdout(&script);
}

fn generate_man(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(command(), dir)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == command::HOLD_SHIM) {
        // `livetrace __livetrace-hold-exec -- COMMAND...`: see command::HeldCommand.
        return command::hold_shim_main(&args[2..]);
    }
    // Before anything else: a closed standard stream must not be handed to the next file
    // opened, and a stop signal sent as soon as livetrace runs must not kill it.
    livetrace::console::guard_standard_streams();
    if let Err(err) = livetrace::signals::install() {
        livetrace::say!("livetrace: error: cannot install the signal handlers: {err}");
        return ExitCode::from(1);
    }
    let matches = command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp(None)
        .parse_default_env()
        .init();
    let result = match cli.command {
        Command::Profile(args) => tools::profile::run(args),
        Command::Offcpu(args) => tools::offcpu::run(args),
        Command::Record(args) => tools::record::run(args),
        Command::Dump(args) => tools::record::dump(args),
        Command::Diff(args) => tools::diff::run(args),
        Command::UprobeHist(args) => tools::uprobe_hist::run(args),
        Command::Probes(args) => tools::probes::run(args),
        Command::Check(args) => tools::check::run(&args),
        Command::Completions { shell } => {
            completions(shell);
            Ok(())
        }
        Command::GenerateMan { dir } => generate_man(&dir),
    };
    let result = result.and_then(|()| match livetrace::console::stdout_failure() {
        // The files are written; the results on standard output are not.
        Some(err) => Err(anyhow::anyhow!("cannot write to standard output: {err}")),
        None => Ok(()),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            livetrace::say!("livetrace: error: {err:#}");
            if err.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
