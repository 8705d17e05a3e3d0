//! Where the probes go: the function found in each target's executable or libraries.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::{
    proc::{self, maps::Maps, task},
    session::targets::Target,
    tools::uprobe_hist::target::{
        self as target, Candidate, ElfInfo, FunctionSymbol, Lookup, Scope, SymbolSpec, close_names,
        describe_ambiguity, find_symbol, function_symbols, variable_named,
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
    let place = match scope {
        Scope::Pid(pid) => match crate::proc::task::name(*pid) {
            Some(name) => format!("pid {pid} ({name})"),
            None => format!("pid {pid}"),
        },
        Scope::Command(argv) => format!("`{}`", argv[0].to_string_lossy()),
        Scope::System => "the system's library directories".into(),
    };
    let search = target::files_to_search(scope, spec.target.as_deref())?;
    if search.files.is_empty() {
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
            "\ngive the library's full path (TARGET:SYMBOL), or check that the process has \
             loaded it",
        );
        bail!(message);
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

    // The first file that has the function wins; with no TARGET the executable comes first.
    let mut found: Vec<(Candidate, FunctionSymbol, ElfInfo)> = Vec::new();
    let executable = match scope {
        Scope::Command(_) if spec.target.is_none() => search.files.first().cloned(),
        _ => None,
    };
    let mut all_symbols: Vec<FunctionSymbol> = Vec::new();
    let mut stripped: Vec<(String, usize)> = Vec::new();
    for (index, file) in search.files.iter().enumerate() {
        let primary = index == 0;
        let info = match ElfInfo::read(&file.path) {
            Ok(info) => info,
            Err(err) if primary => return Err(err),
            Err(err) => {
                log::debug!("skipping {}: {err:#}", file.shown);
                continue;
            }
        };
        let symbols = match function_symbols(&file.path) {
            Ok(symbols) => symbols,
            Err(err) if primary => return Err(err),
            Err(err) => {
                log::debug!("skipping {}: {err:#}", file.shown);
                continue;
            }
        };
        match find_symbol(&symbols, spec) {
            Lookup::Found(symbol) => {
                found.push((file.clone(), symbol, info));
                // The executable (or the named file) wins outright.
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
                let at: Vec<String> = candidates
                    .iter()
                    .map(|c| format!("{:#x}", c.addr))
                    .collect();
                return Err(crate::UsageError::error(format!(
                    "no function '{}' starts at {address:#x} in {}: it is at {}; pick one of \
                     those, e.g. {}@{}",
                    spec.symbol,
                    file.shown,
                    at.join(", "),
                    spec.symbol,
                    at[0]
                )));
            }
            Lookup::Missing => {
                if primary && !info.has_symtab {
                    stripped.push((file.shown.clone(), symbols.len()));
                }
                all_symbols.extend(symbols);
            }
        }
    }
    if found.len() > 1 {
        let mut message = format!(
            "'{}' is defined in {} libraries of {place}:",
            spec.symbol,
            found.len()
        );
        for (file, symbol, _) in &found {
            message.push_str(&format!("\n  {}  at {:#x}", file.shown, symbol.addr));
        }
        message.push_str(&format!(
            "\nname the library: e.g. {}:{}",
            found[0].0.shown, spec.symbol
        ));
        return Err(crate::UsageError::error(message));
    }
    let Some((file, symbol, info)) = found.pop() else {
        let searched = if search.files.len() == 1 {
            search.files[0].shown.clone()
        } else {
            format!(
                "{} or the {} libraries it {}",
                search.files[0].shown,
                search.files.len() - 1,
                if matches!(scope, Scope::Pid(_)) {
                    "has loaded"
                } else {
                    "links"
                }
            )
        };
        if let Some((file, address)) = search
            .files
            .iter()
            .find_map(|f| variable_named(&f.path, &spec.symbol).map(|a| (f, a)))
        {
            bail!(
                "'{}' in {} is a variable (data at {address:#x}), not a function: uprobe-hist \
                 times the calls of a function",
                spec.symbol,
                file.shown
            );
        }
        let mut message = format!(
            "function '{}' not found in {searched} ({place})",
            spec.symbol
        );
        let close = close_names(&all_symbols, &spec.symbol, 8);
        if close.is_empty() {
            message.push_str("\n  no function has a similar name");
        } else {
            message.push_str(&format!("\n  closest names: {}", close.join(", ")));
        }
        for (file, count) in stripped {
            let exported = match count {
                0 => "it exports no functions either".to_owned(),
                n => format!("only its {n} exported functions could be searched"),
            };
            message.push_str(&format!(
                "\n  {file} is stripped (it has no .symtab): {exported}; use a build with \
                 symbols, or install its debug symbols"
            ));
        }
        if !search.explicit {
            message.push_str(
                "\n  if the function is in a library the program loads later, name it: \
                 LIBRARY:SYMBOL",
            );
        }
        bail!(message);
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
    let in_command_executable = executable.is_some_and(|e| e.path == file.path);
    Ok(Site {
        pid,
        file,
        symbol,
        in_command_executable,
    })
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
