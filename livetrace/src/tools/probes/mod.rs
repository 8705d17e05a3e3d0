//! `livetrace probes`: the USDT probes of a binary, a library, or a process (its executable and
//! every library it maps), as `bpftrace -l 'usdt:...'` and BCC's `tplist` list them: provider
//! and name, how many sites, whether a semaphore guards them, and their arguments. Reads files
//! only: needs no privileges beyond reading them (and `/proc/PID/maps` with `-p`).

use std::ffi::OsString;

use anyhow::bail;
use clap::Args as ClapArgs;
use serde::Serialize;

use crate::{
    UsageError,
    tools::uprobe_hist::target::{Candidate, Scope, command_path, files_to_search},
    usdt::{self, NotesError, Probe, args},
};

const EXAMPLES: &str = "\
Examples:
  livetrace probes /usr/lib/postgresql/15/bin/postgres   # a binary
  livetrace probes -p 1234                               # a process and every library it maps
  livetrace probes -p 1234 libpython3.11                 # one library of a process
  livetrace probes python3.11 'python:gc*'               # a command on PATH, some probes";

#[derive(ClapArgs, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// A binary or library: a path, a library name (`libc`, `libpython3.11`), or a command on
    /// PATH. With -p, a library of that process; without TARGET, all of the process's files
    /// (then a lone argument with `:` or `*` is the PATTERN).
    #[arg(value_name = "TARGET")]
    pub target: Option<String>,
    /// Only probes matching PROVIDER:NAME, where `*` matches anything (`postgresql:query*`).
    #[arg(value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// The process whose executable and mapped libraries are listed.
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pid: Option<u32>,
    /// One JSON object on stdout: every file, probe and site, with addresses, file offsets and
    /// argument specs.
    #[arg(long)]
    pub json: bool,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    // `probes -p PID 'lt:*'`: a lone PROVIDER:NAME pattern is no file name.
    if args.pattern.is_none()
        && let Some(target) = args.target.take_if(|t| t.contains(':') || t.contains('*'))
    {
        args.pattern = Some(target);
    }
    let files = files(&args)?;
    let pattern = args.pattern.as_deref().unwrap_or("*");
    let mut listed = Vec::new();
    let mut without = Vec::new();
    for file in &files {
        match usdt::probes_in(&file.path)? {
            Ok(found) => listed.push((file, found)),
            Err(NotesError::NoProbes) => without.push(file.shown.clone()),
            Err(err) if files.len() == 1 => {
                bail!("{}: {err}{}", file.shown, script_hint(&file.path))
            }
            // A library name also finds static archives and linker scripts: not ELF, not probed.
            Err(err) => log::debug!("skipping {}: {err}", file.shown),
        }
    }
    for (_, found) in &mut listed {
        found.probes.retain(|p| glob_match(pattern, &p.full_name()));
    }
    listed.retain(|(_, found)| !found.probes.is_empty() || !found.skipped.is_empty());
    if listed.is_empty() {
        bail!(nothing_found(&files, &without, args.pattern.as_deref()));
    }
    if args.json {
        let mut out = serde_json::to_vec_pretty(&json(&listed))?;
        out.push(b'\n');
        crate::console::stdout(&out);
    } else {
        crate::console::stdout(text(&listed).as_bytes());
    }
    Ok(())
}

/// The files to list: TARGET as uprobe-hist finds it, else a command on PATH.
fn files(args: &Args) -> anyhow::Result<Vec<Candidate>> {
    let scope = match args.pid {
        Some(pid) => Scope::Pid(pid),
        None => Scope::System,
    };
    let Some(target) = args.target.as_deref() else {
        if args.pid.is_none() {
            return Err(UsageError::error(
                "nothing to list: give a binary or library (a path, a library name or a \
                 command), or -p PID",
            ));
        }
        return Ok(files_to_search(&scope, None)?.files);
    };
    let search = files_to_search(&scope, Some(target))?;
    if !search.files.is_empty() {
        return Ok(search.files);
    }
    if args.pid.is_none()
        && !target.contains('/')
        && let Ok(path) = command_path(&[OsString::from(target)])
    {
        return Ok(vec![Candidate {
            shown: path.display().to_string(),
            path,
        }]);
    }
    let mut message = format!("cannot find {target}; tried:");
    for tried in &search.tried {
        message.push_str("\n  ");
        message.push_str(tried);
    }
    message.push_str("\ngive its full path, or a library name the process has loaded (with -p)");
    Err(UsageError::error(message))
}

fn nothing_found(files: &[Candidate], without: &[String], pattern: Option<&str>) -> String {
    let shown: Vec<&str> = files.iter().map(|f| f.shown.as_str()).collect();
    match (pattern, shown.as_slice()) {
        (Some(pattern), [one]) if without.is_empty() => {
            format!(
                "no probe matches '{pattern}' in {one}: run without the pattern to list them all"
            )
        }
        (Some(pattern), _) if without.len() < files.len() => format!(
            "no probe matches '{pattern}' in {}: run without the pattern to list them all",
            shown.join(", ")
        ),
        (_, [one]) => format!(
            "{one} has no USDT probes (no .note.stapsdt section): its authors placed none, or \
             built it without sys/sdt.h"
        ),
        _ => format!(
            "none of these {} files has USDT probes (no .note.stapsdt section): {}",
            files.len(),
            shown.join(", ")
        ),
    }
}

/// For a file that is a script (a pyenv shim, a wrapper): what to name instead.
fn script_hint(path: &std::path::Path) -> &'static str {
    let mut start = [0u8; 2];
    let is_script = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut start))
        .is_ok_and(|()| &start == b"#!");
    if is_script {
        "; it is a script: name the binary it runs (its interpreter, or the program it starts)"
    } else {
        ""
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(text) = text.strip_prefix(head) else {
                return false;
            };
            (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .any(|i| glob_match(rest, &text[i..]))
        }
    }
}

/// One section per file: a line per probe, its arguments as bpftrace numbers them.
fn text(listed: &[(&Candidate, usdt::FileProbes)]) -> String {
    let mut out = String::new();
    for (file, found) in listed {
        let count = found.probes.len();
        out.push_str(&format!(
            "{}: {count} USDT probe{}\n",
            file.shown,
            if count == 1 { "" } else { "s" }
        ));
        let width = found
            .probes
            .iter()
            .map(|p| p.full_name().len())
            .max()
            .unwrap_or(0);
        for probe in &found.probes {
            out.push_str(&format!(
                "  {:width$}  {}\n",
                probe.full_name(),
                describe(probe)
            ));
        }
        for skipped in &found.skipped {
            out.push_str(&format!("  (a note was skipped: {skipped})\n"));
        }
    }
    out
}

/// `2 sites, semaphore, arg0: u64 in %rbx (8@%rbx)`.
fn describe(probe: &Probe) -> String {
    let mut parts = Vec::new();
    if probe.sites.len() > 1 {
        parts.push(format!("{} sites", probe.sites.len()));
    }
    if probe.sites.iter().any(|s| s.semaphore.is_some()) {
        parts.push("semaphore".to_owned());
    }
    let spec = &probe.sites[0].args;
    parts.push(match args::parse(spec) {
        Ok(parsed) if parsed.is_empty() => "no arguments".to_owned(),
        Ok(parsed) => parsed
            .iter()
            .enumerate()
            .map(|(i, arg)| format!("arg{i}: {arg}"))
            .collect::<Vec<_>>()
            .join(", "),
        Err(why) => format!("unreadable: {why}"),
    });
    let mut line = parts.join(", ");
    if probe.sites.iter().any(|s| s.args != *spec) {
        line.push_str(" (the first site's; the others keep them elsewhere)");
    }
    line
}

#[derive(Serialize)]
struct JsonFile<'a> {
    file: &'a str,
    probes: Vec<JsonProbe<'a>>,
    skipped: &'a [String],
}

#[derive(Serialize)]
struct JsonProbe<'a> {
    provider: &'a str,
    name: &'a str,
    sites: Vec<JsonSite<'a>>,
}

#[derive(Serialize)]
struct JsonSite<'a> {
    address: u64,
    file_offset: u64,
    semaphore: Option<u64>,
    semaphore_file_offset: Option<u64>,
    args: &'a str,
    arg_count: Option<usize>,
}

fn json<'a>(listed: &'a [(&Candidate, usdt::FileProbes)]) -> Vec<JsonFile<'a>> {
    listed
        .iter()
        .map(|(file, found)| JsonFile {
            file: &file.shown,
            skipped: &found.skipped,
            probes: found
                .probes
                .iter()
                .map(|probe| JsonProbe {
                    provider: &probe.provider,
                    name: &probe.name,
                    sites: probe
                        .sites
                        .iter()
                        .map(|site| JsonSite {
                            address: site.address,
                            file_offset: site.file_offset,
                            semaphore: site.semaphore.map(|s| s.address),
                            semaphore_file_offset: site.semaphore.map(|s| s.file_offset),
                            args: &site.args,
                            arg_count: args::parse(&site.args).ok().map(|a| a.len()),
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_provider_and_name() {
        assert!(glob_match("*", "postgresql:query__start"));
        assert!(glob_match("postgresql:query*", "postgresql:query__start"));
        assert!(glob_match("*:gc__*", "python:gc__start"));
        assert!(!glob_match("python:gc*", "postgresql:query__start"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXbY"));
    }
}
