//! Where the probes go: the function found in each target's executable or libraries.

use std::time::{Duration, Instant};

use anyhow::bail;

use super::usdt::SpanSites;
use crate::{
    histogram::span_name,
    proc::{self, maps::Maps, task},
    session::targets::Target,
    tools::uprobe_hist::target::{
        self as target, Candidate, ElfInfo, FunctionSymbol, Lookup, Scope, Search, SymbolSpec,
        close_names, describe_ambiguity, find_symbol, function_symbols, variable_named,
    },
};

/// One place the probes go: a function in a file, for one process (or every process).
pub(super) struct Site {
    pub(super) pid: Option<u32>,
    pub(super) file: Candidate,
    pub(super) symbol: FunctionSymbol,
    /// The function is in the command's own executable (`-- COMMAND`, no TARGET): one probe on
    /// the file, filtered in the kernel to the command's processes, covers every child that
    /// runs it from its birth, however short its life.
    pub(super) in_command_executable: bool,
}

impl Site {
    pub(super) fn describe(&self, command_pid: Option<u32>) -> String {
        match self.pid.or(command_pid) {
            Some(pid) => format!("{} (pid {pid})", self.file.shown),
            None => format!("{} (every process)", self.file.shown),
        }
    }
}

/// What uprobe-hist times: a function's calls, or the spans between two USDT probes.
pub(super) enum Probed {
    Function(Vec<Site>),
    Spans(Vec<SpanSites>),
}

impl Probed {
    /// The function's name, or the two probes' (`from → to`).
    pub(super) fn name(&self) -> String {
        match self {
            Self::Function(sites) => sites[0].symbol.demangled.clone(),
            Self::Spans(spans) => {
                let probe =
                    |site: &crate::usdt::ProbeSite| format!("{}:{}", site.provider, site.name);
                span_name(
                    &probe(&spans[0].from.sites[0]),
                    &probe(&spans[0].to.sites[0]),
                )
            }
        }
    }

    pub(super) fn describe(&self, command_pid: Option<u32>) -> Vec<String> {
        match self {
            Self::Function(sites) => sites.iter().map(|s| s.describe(command_pid)).collect(),
            Self::Spans(spans) => spans.iter().map(|s| s.describe(command_pid)).collect(),
        }
    }

    /// The file whose loading a started command is waited for.
    pub(super) fn first_file(&self) -> &std::path::Path {
        match self {
            Self::Function(sites) => &sites[0].file.path,
            Self::Spans(spans) => &spans[0].from.file.path,
        }
    }

    /// Processes whose memory maps the symboliser should snapshot.
    pub(super) fn pids(&self) -> Vec<u32> {
        match self {
            Self::Function(sites) => sites.iter().filter_map(|s| s.pid).collect(),
            Self::Spans(spans) => spans.iter().filter_map(|s| s.pid).collect(),
        }
    }
}

/// Finds the function once per process (or once for the command or the whole system).
pub(super) fn find_sites(spec: &SymbolSpec, target: &Target) -> anyhow::Result<Vec<Site>> {
    match target {
        Target::Threads { pids, .. } => pids
            .iter()
            .map(|&pid| find_site(spec, &Scope::Pid(pid), Some(pid)))
            .collect(),
        Target::Command(argv) => Ok(vec![find_site(spec, &Scope::Command(argv), None)?]),
        Target::System => Ok(vec![find_site(spec, &Scope::System, None)?]),
    }
}

fn find_site(spec: &SymbolSpec, scope: &Scope<'_>, pid: Option<u32>) -> anyhow::Result<Site> {
    let place = describe_place(scope);
    let search = target::files_to_search(scope, spec.target.as_deref())?;
    if search.files.is_empty() {
        bail!(nothing_to_search(spec, &search, &place));
    }
    if let (Scope::Pid(pid), Some(t)) = (scope, &spec.target)
        && t.contains('/')
        && !maps_file(*pid, &search.files[0])
    {
        crate::say!(
            "livetrace: warning: pid {pid} does not map {} now: the probe fires only once it \
             loads that file",
            search.files[0].shown
        );
    }

    let mut looked = look_in_files(spec, &search)?;
    if looked.found.len() > 1 {
        return Err(crate::UsageError::error(in_several_libraries(
            spec,
            &looked.found,
            &place,
        )));
    }
    let Some((file, symbol, info)) = looked.found.pop() else {
        bail!(not_found(spec, scope, &search, &looked, &place));
    };
    if let Some(evidence) = info.go_evidence {
        bail!(
            "{} is a Go program ({evidence}): uretprobes replace return addresses on the stack, \
             which Go's runtime copies and checks when stacks grow, and the program crashes. \
             livetrace refuses to risk that; for Go, use Go's own tools (pprof, runtime/trace) \
             or a uprobe on entry only",
            file.shown
        );
    }
    if symbol.size == 0 {
        log::info!("{} has size 0 in the symbol table", symbol.demangled);
    }
    // With no TARGET, the command's executable comes first in the search.
    let in_command_executable = matches!(scope, Scope::Command(_))
        && spec.target.is_none()
        && search.files.first().is_some_and(|e| e.path == file.path);
    Ok(Site {
        pid,
        file,
        symbol,
        in_command_executable,
    })
}

/// The target as the messages name it.
fn describe_place(scope: &Scope<'_>) -> String {
    match scope {
        Scope::Pid(pid) => match task::name(*pid) {
            Some(name) => format!("pid {pid} ({name})"),
            None => format!("pid {pid}"),
        },
        Scope::Command(argv) => format!("`{}`", argv[0].to_string_lossy()),
        Scope::System => "the system's library directories".into(),
    }
}

fn nothing_to_search(spec: &SymbolSpec, search: &Search, place: &str) -> String {
    let what = spec.target.as_deref().unwrap_or("the executable");
    let mut message = format!("cannot find {what} for {place}; tried:");
    for tried in &search.tried {
        message.push_str("\n  ");
        message.push_str(tried);
    }
    if search.tried.is_empty() {
        message.push_str(" nothing");
    }
    message.push_str(
        "\ngive the library's full path (TARGET:SYMBOL), or check that the process has loaded it",
    );
    message
}

/// What the search through the files found.
#[derive(Default)]
struct Looked {
    /// Every file that defines the function (the first file stops the search when it does).
    found: Vec<(Candidate, FunctionSymbol, ElfInfo)>,
    /// Every function searched, for suggestions when the name is not there.
    all_symbols: Vec<FunctionSymbol>,
    /// The first file, when it has no `.symtab`, and how many exported functions it has.
    stripped: Option<(String, usize)>,
}

/// Looks for the function in each file. The first file (the executable, or the named file)
/// wins outright; among libraries, more than one definition is for the caller to report.
fn look_in_files(spec: &SymbolSpec, search: &Search) -> anyhow::Result<Looked> {
    let mut looked = Looked::default();
    for (index, file) in search.files.iter().enumerate() {
        let primary = index == 0;
        let read =
            ElfInfo::read(&file.path).and_then(|info| Ok((info, function_symbols(&file.path)?)));
        let (info, symbols) = match read {
            Ok(read) => read,
            Err(err) if primary => return Err(err),
            Err(err) => {
                log::debug!("skipping {}: {err:#}", file.shown);
                continue;
            }
        };
        match find_symbol(&symbols, spec) {
            Lookup::Found(symbol) => {
                looked.found.push((file.clone(), symbol, info));
                if primary {
                    break;
                }
            }
            Lookup::Ambiguous(candidates) => {
                return Err(crate::UsageError::error(describe_ambiguity(
                    spec,
                    &file.shown,
                    &candidates,
                )));
            }
            Lookup::NotAt(address, candidates) => {
                return Err(crate::UsageError::error(not_at(
                    spec,
                    &file.shown,
                    address,
                    &candidates,
                )));
            }
            Lookup::Missing => {
                if primary && !info.has_symtab {
                    looked.stripped = Some((file.shown.clone(), symbols.len()));
                }
                looked.all_symbols.extend(symbols);
            }
        }
    }
    Ok(looked)
}

fn not_at(spec: &SymbolSpec, file: &str, address: u64, candidates: &[FunctionSymbol]) -> String {
    let at: Vec<String> = candidates
        .iter()
        .map(|c| format!("{:#x}", c.addr))
        .collect();
    format!(
        "no function '{}' starts at {address:#x} in {file}: it is at {}; pick one of those, \
         e.g. {}@{}",
        spec.symbol,
        at.join(", "),
        spec.symbol,
        at[0]
    )
}

fn in_several_libraries(
    spec: &SymbolSpec,
    found: &[(Candidate, FunctionSymbol, ElfInfo)],
    place: &str,
) -> String {
    let mut message = format!(
        "'{}' is defined in {} libraries of {place}:",
        spec.symbol,
        found.len()
    );
    for (file, symbol, _) in found {
        message.push_str(&format!("\n  {}  at {:#x}", file.shown, symbol.addr));
    }
    message.push_str(&format!(
        "\nname the library: e.g. {}:{}",
        found[0].0.shown, spec.symbol
    ));
    message
}

/// Why the function was not found, with the closest names and what to try next.
fn not_found(
    spec: &SymbolSpec,
    scope: &Scope<'_>,
    search: &Search,
    looked: &Looked,
    place: &str,
) -> String {
    if let Some((file, address)) = search
        .files
        .iter()
        .find_map(|f| variable_named(&f.path, &spec.symbol).map(|a| (f, a)))
    {
        return format!(
            "'{}' in {} is a variable (data at {address:#x}), not a function: uprobe-hist times \
             the calls of a function",
            spec.symbol, file.shown
        );
    }
    let searched = if search.files.len() == 1 {
        search.files[0].shown.clone()
    } else {
        let how = if matches!(scope, Scope::Pid(_)) {
            "has loaded"
        } else {
            "links"
        };
        format!(
            "{} or the {} libraries it {how}",
            search.files[0].shown,
            search.files.len() - 1
        )
    };
    let mut message = format!(
        "function '{}' not found in {searched} ({place})",
        spec.symbol
    );
    let close = close_names(&looked.all_symbols, &spec.symbol, 8);
    if close.is_empty() {
        message.push_str("\n  no function has a similar name");
    } else {
        message.push_str(&format!("\n  closest names: {}", close.join(", ")));
    }
    if let Some((file, count)) = &looked.stripped {
        let exported = match count {
            0 => "it exports no functions either".to_owned(),
            n => format!("only its {n} exported functions could be searched"),
        };
        message.push_str(&format!(
            "\n  {file} is stripped (it has no .symtab): {exported}; use a build with symbols, \
             or install its debug symbols"
        ));
    }
    if !search.explicit {
        message.push_str(
            "\n  if the function is in a library the program loads later, name it: \
             LIBRARY:SYMBOL",
        );
    }
    message
}

/// Whether `pid` currently maps `file`.
fn maps_file(pid: u32, file: &Candidate) -> bool {
    Maps::of(pid).is_ok_and(|maps| {
        maps.maps_file(|path| target::same_file(&proc::in_root_of(pid, path), &file.path))
    })
}

/// Waits (at most 200 ms) until `pid` has exec'd and mapped `file` and the libraries its
/// executable links.
pub(super) fn wait_until_loaded(pid: u32, file: &std::path::Path) {
    let exe = task::executable(pid);
    let needed = exe
        .as_deref()
        .and_then(|_| ElfInfo::read(file).ok())
        .map(|info| info.needed)
        .unwrap_or_default();
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        let Ok(maps) = Maps::of(pid) else {
            return;
        };
        let mapped = |lib: &str| maps.maps_file(|path| path.file_name() == Some(lib.as_ref()));
        if name.as_deref().is_some_and(mapped) && needed.iter().all(|lib| mapped(lib)) {
            return;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}
