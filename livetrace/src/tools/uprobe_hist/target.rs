//! Finding the function that `uprobe-hist` probes: parsing `[TARGET:]SYMBOL[@0xADDR]`, finding
//! the ELF file (a path, a library name, the executable of `-p` or of the command and then its
//! libraries), and finding the symbol in it by its plain, mangled or demangled name.
//!
//! Files are read through `/proc/PID/root` so that a process in another mount namespace (a
//! container) is probed in the file it actually runs. Symbols come from the ELF symbol tables
//! (`.symtab`, then `.dynsym`) through blazesym's inspector; probes attach by file offset.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fmt::Write as _,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use blazesym::{
    SymType,
    inspect::{Inspector, source::Elf},
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, read::elf::ElfFile64};

use crate::{
    proc::{self, maps::Maps, task},
    symbolize::demangle,
};

/// `[TARGET:]SYMBOL[@0xADDR]` as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolSpec {
    /// A path (contains `/`) or a library name (`libc`, `libc.so.6`).
    pub target: Option<String>,
    pub symbol: String,
    /// Picks one of several functions of the same name by its ELF address.
    pub address: Option<u64>,
}

impl SymbolSpec {
    /// Parses the positional argument; errors are usage errors. The TARGET separator is a single
    /// `:`, so Rust and C++ paths (`a::b`) stay whole.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = text.as_bytes();
        let separator = (0..bytes.len()).find(|&i| {
            bytes[i] == b':' && bytes.get(i + 1) != Some(&b':') && (i == 0 || bytes[i - 1] != b':')
        });
        let (target, rest) = match separator {
            Some(i) => (Some(&text[..i]), &text[i + 1..]),
            None => (None, text),
        };
        if target.is_some_and(str::is_empty) {
            return Err(format!(
                "'{text}' has an empty TARGET before ':'; give a path or library name, or leave \
                 out the ':'"
            ));
        }
        let (symbol, address) = match rest.rsplit_once('@') {
            Some((symbol, addr)) if addr.starts_with("0x") || addr.starts_with("0X") => {
                let value = u64::from_str_radix(&addr[2..], 16).map_err(|_| {
                    format!("'{addr}' in '{text}' is not a hexadecimal address like 0x1139")
                })?;
                (symbol, Some(value))
            }
            _ => (rest, None),
        };
        if symbol.is_empty() {
            return Err(format!(
                "'{text}' names no function: give [TARGET:]SYMBOL, e.g. libc:malloc"
            ));
        }
        Ok(Self {
            target: target.map(str::to_owned),
            symbol: symbol.to_owned(),
            address,
        })
    }
}

/// An ELF file to search, as livetrace can open it and as the process knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Openable from livetrace's mount namespace (e.g. `/proc/123/root/usr/lib/libc.so.6`).
    pub path: PathBuf,
    /// The path as the target process sees it, for messages.
    pub shown: String,
}

impl Candidate {
    fn plain(path: PathBuf) -> Self {
        let shown = path.display().to_string();
        Self { path, shown }
    }
}

/// Where to look for TARGET and the executable.
pub enum Scope<'a> {
    Pid(u32),
    Command(&'a [OsString]),
    System,
}

/// The files to search, in order (the first that has the function wins), and every path that
/// was tried without success.
pub struct Search {
    pub files: Vec<Candidate>,
    pub tried: Vec<String>,
    /// True when TARGET named one file (so a miss is a miss in that file).
    pub explicit: bool,
}

/// Lists the files to search for the function in `scope`.
pub fn files_to_search(scope: &Scope<'_>, target: Option<&str>) -> anyhow::Result<Search> {
    let mut tried = Vec::new();
    match (scope, target) {
        (Scope::Pid(pid), Some(target)) if target.contains('/') => {
            let absolute = absolute(Path::new(target))?;
            let through_root = proc::in_root_of(*pid, &absolute);
            for path in [&through_root, &absolute] {
                if path.is_file() {
                    return Ok(Search {
                        files: vec![Candidate {
                            path: path.clone(),
                            shown: absolute.display().to_string(),
                        }],
                        tried,
                        explicit: true,
                    });
                }
                tried.push(path.display().to_string());
            }
            Ok(Search {
                files: vec![],
                tried,
                explicit: true,
            })
        }
        (Scope::Pid(pid), Some(name)) => {
            let mapped = mapped_files(*pid)?;
            let matching = pick_library(name, mapped.iter().map(|p| p.as_path()));
            tried.extend(
                mapped
                    .iter()
                    .map(|p| format!("{} (mapped by pid {pid})", p.display())),
            );
            let files = matching
                .into_iter()
                .map(|p| Candidate {
                    path: proc::in_root_of(*pid, p),
                    shown: p.display().to_string(),
                })
                .collect();
            Ok(Search {
                files,
                tried,
                explicit: true,
            })
        }
        (Scope::Pid(pid), None) => {
            let exe = task::executable(*pid)
                .with_context(|| format!("cannot read /proc/{pid}/exe (is pid {pid} running?)"))?;
            let mut files = vec![Candidate {
                path: existing_or(proc::in_root_of(*pid, &exe), format!("/proc/{pid}/exe")),
                shown: exe.display().to_string(),
            }];
            for lib in mapped_files(*pid)? {
                if lib != exe {
                    files.push(Candidate {
                        path: proc::in_root_of(*pid, &lib),
                        shown: lib.display().to_string(),
                    });
                }
            }
            Ok(Search {
                files,
                tried,
                explicit: false,
            })
        }
        (Scope::Command(argv), target) => {
            let exe = command_path(argv)?;
            match target {
                Some(path) if path.contains('/') => {
                    let path = absolute(Path::new(path))?;
                    explicit_file(path, tried)
                }
                Some(name) => {
                    let libs = linked_libraries(&exe, &mut tried);
                    let mut files: Vec<Candidate> = Vec::new();
                    if pick_library(name, [exe.as_path()]).len() == 1 {
                        files.push(Candidate::plain(exe.clone()));
                    }
                    files.extend(
                        pick_library(name, libs.iter().map(|p| p.as_path()))
                            .into_iter()
                            .map(|p| Candidate::plain(p.to_path_buf())),
                    );
                    Ok(Search {
                        files,
                        tried,
                        explicit: true,
                    })
                }
                None => {
                    let mut files = vec![Candidate::plain(exe.clone())];
                    files.extend(
                        linked_libraries(&exe, &mut tried)
                            .into_iter()
                            .map(Candidate::plain),
                    );
                    Ok(Search {
                        files,
                        tried,
                        explicit: false,
                    })
                }
            }
        }
        (Scope::System, Some(path)) if path.contains('/') => {
            explicit_file(absolute(Path::new(path))?, tried)
        }
        (Scope::System, Some(name)) => {
            let mut found = Vec::new();
            for dir in library_dirs(&[]) {
                let Ok(entries) = fs::read_dir(&dir) else {
                    continue;
                };
                tried.push(format!("{}/{name}*", dir.display()));
                let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                names.sort();
                for path in pick_library(name, names.iter().map(|p| p.as_path())) {
                    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                    if !found.contains(&canonical) {
                        found.push(canonical);
                    }
                }
            }
            Ok(Search {
                files: found.into_iter().map(Candidate::plain).collect(),
                tried,
                explicit: true,
            })
        }
        (Scope::System, None) => Err(crate::UsageError::error(
            "no process to search for the function: give -p PID, a COMMAND after --, or a \
             TARGET (a path or library name) before the symbol, e.g. libc:malloc",
        )),
    }
}

fn explicit_file(path: PathBuf, mut tried: Vec<String>) -> anyhow::Result<Search> {
    let files = if path.is_file() {
        vec![Candidate::plain(path)]
    } else {
        tried.push(path.display().to_string());
        vec![]
    };
    Ok(Search {
        files,
        tried,
        explicit: true,
    })
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot read the current directory")?
        .join(path))
}

fn existing_or(path: PathBuf, fallback: String) -> PathBuf {
    if path.is_file() {
        path
    } else {
        PathBuf::from(fallback)
    }
}

/// Executable file mappings of a process (paths as it sees them), in address order, deduplicated.
fn mapped_files(pid: u32) -> anyhow::Result<Vec<PathBuf>> {
    Ok(Maps::of(pid)
        .with_context(|| format!("cannot read /proc/{pid}/maps (is pid {pid} running?)"))?
        .code_paths())
}

/// The files among `paths` that a library name designates: the exact file name, or the name
/// followed by a version or `.so` suffix (`libc` -> `libc.so.6`, `libc-2.31.so`). An exact file
/// name match wins over suffixed ones.
pub fn pick_library<'a>(name: &str, paths: impl IntoIterator<Item = &'a Path>) -> Vec<&'a Path> {
    let name = name.trim();
    let mut exact = Vec::new();
    let mut prefixed = Vec::new();
    for path in paths {
        let Some(file) = path.file_name().map(|f| f.to_string_lossy()) else {
            continue;
        };
        if file == name {
            exact.push(path);
        } else if [".so", "-", "."]
            .iter()
            .any(|sep| file.starts_with(&format!("{name}{sep}")))
            && (file.contains(".so") || !name.contains(".so"))
        {
            prefixed.push(path);
        }
    }
    if exact.is_empty() { prefixed } else { exact }
}

/// The command's executable, as `execvp` would find it.
pub fn command_path(argv: &[OsString]) -> anyhow::Result<PathBuf> {
    let program = argv.first().context("no command given after --")?;
    let path = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        // Without `.` components, for messages; symlinks are left alone.
        return Ok(absolute(path)?.components().collect());
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("command '{}' not found in PATH", program.to_string_lossy()))
}

/// The shared libraries an executable links (DT_NEEDED, breadth first, transitively), found
/// the way the dynamic loader would: RPATH/RUNPATH, LD_LIBRARY_PATH, ld.so.conf, default dirs.
fn linked_libraries(exe: &Path, tried: &mut Vec<String>) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut queue: Vec<PathBuf> = vec![exe.to_path_buf()];
    let mut seen_names = BTreeSet::new();
    while let Some(file) = queue.pop() {
        let Ok(info) = ElfInfo::read(&file) else {
            continue;
        };
        let dirs = library_dirs(&info.search_dirs);
        for name in info.needed {
            if !seen_names.insert(name.clone()) {
                continue;
            }
            match dirs.iter().map(|d| d.join(&name)).find(|p| p.is_file()) {
                Some(path) => {
                    queue.insert(0, path.clone());
                    found.push(path);
                }
                None => tried.push(format!("{name} (needed by {})", file.display())),
            }
        }
    }
    found
}

/// Directories the dynamic loader searches, `first` before the rest.
fn library_dirs(first: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = first.to_vec();
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    read_ld_so_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    for dir in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        dirs.push(PathBuf::from(dir));
    }
    let mut unique = Vec::new();
    for dir in dirs {
        if !unique.contains(&dir) {
            unique.push(dir);
        }
    }
    unique
}

fn read_ld_so_conf(path: &Path, dirs: &mut Vec<PathBuf>, depth: u32) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include ") {
            // Only the `dir/*.conf` form is used in practice.
            let pattern = Path::new(pattern.trim());
            let (Some(dir), Some(glob)) = (pattern.parent(), pattern.file_name()) else {
                continue;
            };
            let suffix = glob.to_string_lossy().trim_start_matches('*').to_owned();
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(&suffix))
                .collect();
            files.sort();
            for file in files {
                if depth < 4 {
                    read_ld_so_conf(&file, dirs, depth + 1);
                }
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
}

/// What livetrace needs to know about an ELF file besides its functions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElfInfo {
    /// Why the file looks like a Go program (a section or symbol name), if it does.
    pub go_evidence: Option<String>,
    /// Whether it has a full symbol table (`.symtab`); without one it is stripped.
    pub has_symtab: bool,
    /// DT_NEEDED entries.
    pub needed: Vec<String>,
    /// DT_RUNPATH / DT_RPATH directories, `$ORIGIN` expanded.
    pub search_dirs: Vec<PathBuf>,
}

impl ElfInfo {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&data, path)
    }

    pub fn parse(data: &[u8], path: &Path) -> anyhow::Result<Self> {
        let file = ElfFile64::<object::Endianness>::parse(data).with_context(|| {
            format!(
                "{} is not a 64-bit ELF file (uprobes need an executable or shared library)",
                path.display()
            )
        })?;
        let mut info = Self::default();
        for section in file.sections() {
            let name = section.name().unwrap_or("");
            if name == ".symtab" {
                info.has_symtab = true;
            }
            if matches!(name, ".go.buildinfo" | ".gopclntab" | ".note.go.buildid")
                && info.go_evidence.is_none()
            {
                info.go_evidence = Some(format!("it has a {name} section"));
            }
        }
        if info.go_evidence.is_none()
            && file
                .symbols()
                .any(|s| s.name() == Ok("runtime.main") || s.name() == Ok("runtime.goexit"))
        {
            info.go_evidence = Some("it defines runtime.main".into());
        }
        let origin = path
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(table) = file.elf_dynamic_table() {
            for entry in table.iter() {
                let Ok(value) = table.string(entry) else {
                    continue;
                };
                let value = String::from_utf8_lossy(value).into_owned();
                match entry.tag {
                    object::elf::DT_NEEDED => info.needed.push(value),
                    object::elf::DT_RPATH | object::elf::DT_RUNPATH => {
                        info.search_dirs.extend(value.split(':').map(|dir| {
                            PathBuf::from(
                                dir.replace("$ORIGIN", &origin)
                                    .replace("${ORIGIN}", &origin),
                            )
                        }));
                    }
                    _ => {}
                }
            }
        }
        Ok(info)
    }
}

/// One function symbol of an ELF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionSymbol {
    /// As in the symbol table (possibly mangled).
    pub name: String,
    /// Demangled, without a Rust hash.
    pub demangled: String,
    /// ELF virtual address (`st_value`).
    pub addr: u64,
    pub size: u64,
    /// Where the function's first instruction is in the file: what uprobes attach to.
    pub file_offset: u64,
}

impl FunctionSymbol {
    /// Every spelling a user may reasonably give: raw, demangled, demangled with a Rust hash,
    /// and a C++ name without its parameter list.
    fn spellings(&self) -> Vec<String> {
        let mut names = vec![self.name.clone(), self.demangled.clone()];
        if (self.name.starts_with("_ZN") || self.name.starts_with("_R"))
            && let Ok(full) = rustc_demangle::try_demangle(&self.name)
        {
            names.push(full.to_string());
        }
        if self.name.starts_with("_Z")
            && let Some(short) = cpp_demangle::Symbol::new(self.name.as_str())
                .ok()
                .and_then(|s| {
                    s.demangle_with_options(
                        &cpp_demangle::DemangleOptions::new()
                            .no_params()
                            .no_return_type(),
                    )
                    .ok()
                })
        {
            names.push(short);
        }
        names
    }
}

/// The function symbols of an ELF file (from `.symtab` and `.dynsym`), one per (name, address).
pub fn function_symbols(path: &Path) -> anyhow::Result<Vec<FunctionSymbol>> {
    let inspector = Inspector::new();
    let mut source = Elf::new(path);
    // Symbol tables only: DWARF would name inlined copies that have no address of their own.
    source.debug_syms = false;
    let mut symbols = BTreeMap::new();
    inspector
        .for_each(&source.into(), |sym| {
            if sym.sym_type == SymType::Function
                && let Some(file_offset) = sym.file_offset
                && sym.addr != 0
            {
                symbols
                    .entry((sym.name.to_string(), sym.addr))
                    .or_insert_with(|| FunctionSymbol {
                        name: sym.name.to_string(),
                        demangled: demangle(&sym.name),
                        addr: sym.addr,
                        size: sym.size.unwrap_or(0) as u64,
                        file_offset,
                    });
            }
            std::ops::ControlFlow::Continue(())
        })
        .with_context(|| format!("cannot read the symbols of {}", path.display()))?;
    Ok(symbols.into_values().collect())
}

/// The address of a data symbol (a variable) named `name` in the ELF file, if it has one: a
/// name the user took for a function.
pub fn variable_named(path: &Path, name: &str) -> Option<u64> {
    let inspector = Inspector::new();
    let mut source = Elf::new(path);
    source.debug_syms = false;
    let mut found = None;
    inspector
        .for_each(&source.into(), |sym| {
            if sym.sym_type == SymType::Variable
                && (sym.name == name || demangle(&sym.name) == name)
            {
                found = Some(sym.addr);
                return std::ops::ControlFlow::Break(());
            }
            std::ops::ControlFlow::Continue(())
        })
        .ok()?;
    found
}

/// The outcome of looking a function up in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(FunctionSymbol),
    /// Several functions at different addresses answer to the name.
    Ambiguous(Vec<FunctionSymbol>),
    /// `SYMBOL@0xADDR`: functions answer to the name, but none at that address.
    NotAt(u64, Vec<FunctionSymbol>),
    Missing,
}

/// Finds `spec`'s function among `symbols`. Aliases (several names, one address) count once.
pub fn find_symbol(symbols: &[FunctionSymbol], spec: &SymbolSpec) -> Lookup {
    let mut by_addr: BTreeMap<u64, FunctionSymbol> = BTreeMap::new();
    for sym in symbols {
        if sym.spellings().contains(&spec.symbol) {
            by_addr.entry(sym.addr).or_insert_with(|| sym.clone());
        }
    }
    if let Some(address) = spec.address {
        return match by_addr.remove(&address) {
            Some(sym) => Lookup::Found(sym),
            None if by_addr.is_empty() => Lookup::Missing,
            None => Lookup::NotAt(address, by_addr.into_values().collect()),
        };
    }
    let mut found: Vec<FunctionSymbol> = by_addr.into_values().collect();
    match found.len() {
        0 => Lookup::Missing,
        1 => Lookup::Found(found.remove(0)),
        _ => Lookup::Ambiguous(found),
    }
}

/// Up to `limit` function names close to `query`: names containing it (or its last path
/// component) first, then the nearest by edit distance.
pub fn close_names(symbols: &[FunctionSymbol], query: &str, limit: usize) -> Vec<String> {
    let query_lower = query.to_lowercase();
    let last = query_lower
        .rsplit("::")
        .next()
        .unwrap_or(&query_lower)
        .to_owned();
    let names: BTreeSet<&str> = symbols.iter().map(|s| s.demangled.as_str()).collect();
    let mut scored: Vec<(usize, usize, &str)> = Vec::new();
    for name in names {
        let lower = name.to_lowercase();
        let name_last = lower.rsplit("::").next().unwrap_or(&lower);
        let distance = edit_distance(&last, name_last).min(edit_distance(&query_lower, &lower));
        let contains = lower.contains(&last);
        let threshold = (last.len() / 3).max(2);
        if contains {
            scored.push((0, distance, name));
        } else if distance <= threshold {
            scored.push((1, distance, name));
        }
    }
    scored.sort();
    scored
        .into_iter()
        .take(limit)
        .map(|(_, _, name)| name.to_owned())
        .collect()
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The candidates of an ambiguous name, one per line, and how to pick one.
pub fn describe_ambiguity(spec: &SymbolSpec, file: &str, found: &[FunctionSymbol]) -> String {
    let mut out = format!(
        "'{}' matches {} functions in {file}:",
        spec.symbol,
        found.len()
    );
    for sym in found {
        let _ = write!(
            out,
            "\n  {}  at {:#x}, {} bytes{}",
            sym.demangled,
            sym.addr,
            sym.size,
            if sym.name == sym.demangled {
                String::new()
            } else {
                format!(" ({})", sym.name)
            }
        );
    }
    let example = &found[0];
    let _ = write!(
        out,
        "\npick one by address, e.g. {}@{:#x}, or by its full mangled name",
        spec.symbol, example.addr
    );
    out
}

/// Whether two paths are the same file (device and inode).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(name: &str, addr: u64) -> FunctionSymbol {
        FunctionSymbol {
            name: name.into(),
            demangled: demangle(name),
            addr,
            size: 16,
            file_offset: addr,
        }
    }

    /// TARGET is split off at a single colon only; `::` paths and `@0xADDR` parse.
    #[test]
    fn parses_target_symbol_and_address() {
        let spec = SymbolSpec::parse("libc:malloc").unwrap();
        assert_eq!(spec.target.as_deref(), Some("libc"));
        assert_eq!(spec.symbol, "malloc");
        let spec = SymbolSpec::parse("livetrace_demo::validate_subtitle_track").unwrap();
        assert_eq!(spec.target, None);
        assert_eq!(spec.symbol, "livetrace_demo::validate_subtitle_track");
        let spec = SymbolSpec::parse("/opt/app/bin:ns::Class::run@0x1a2B").unwrap();
        assert_eq!(spec.target.as_deref(), Some("/opt/app/bin"));
        assert_eq!(spec.symbol, "ns::Class::run");
        assert_eq!(spec.address, Some(0x1a2b));
        // A version suffix is part of the name, not an address.
        assert_eq!(
            SymbolSpec::parse("memcpy@GLIBC_2.14").unwrap().symbol,
            "memcpy@GLIBC_2.14"
        );
        assert!(SymbolSpec::parse(":x").is_err());
        assert!(SymbolSpec::parse("libc:").is_err());
        assert!(SymbolSpec::parse("f@0xzz").is_err());
    }

    /// Rust names match demangled with or without the hash, C++ names without parameters, C
    /// names as they are; aliases of one address are one function; two addresses are ambiguous
    /// until an address picks one.
    #[test]
    fn finds_symbols_by_any_spelling() {
        let symbols = vec![
            sym(
                "_ZN14livetrace_demo23validate_subtitle_track17h0123456789abcdefE",
                0x100,
            ),
            sym("_ZN2ns5Class3runEi", 0x200),
            sym("helper", 0x300),
            sym("helper", 0x400),
            sym("malloc", 0x500),
            sym("__libc_malloc", 0x500),
        ];
        let find = |text: &str| find_symbol(&symbols, &SymbolSpec::parse(text).unwrap());
        for text in [
            "livetrace_demo::validate_subtitle_track",
            "livetrace_demo::validate_subtitle_track::h0123456789abcdef",
            "_ZN14livetrace_demo23validate_subtitle_track17h0123456789abcdefE",
        ] {
            assert!(
                matches!(find(text), Lookup::Found(s) if s.addr == 0x100),
                "{text}"
            );
        }
        assert!(matches!(find("ns::Class::run"), Lookup::Found(s) if s.addr == 0x200));
        assert!(matches!(find("ns::Class::run(int)"), Lookup::Found(s) if s.addr == 0x200));
        assert!(matches!(find("malloc"), Lookup::Found(s) if s.addr == 0x500));
        assert!(matches!(find("helper"), Lookup::Ambiguous(v) if v.len() == 2));
        assert!(matches!(find("helper@0x400"), Lookup::Found(s) if s.addr == 0x400));
        assert!(matches!(find("helper@0x999"), Lookup::NotAt(0x999, _)));
        assert_eq!(find("validate_subtitle_track"), Lookup::Missing);
    }

    /// Suggestions: substrings first, then small typos; unrelated names are left out.
    #[test]
    fn suggests_close_names() {
        let symbols = vec![
            sym("timed_work", 1),
            sym("timed_work_slow", 2),
            sym("main", 3),
            sym(
                "_ZN14livetrace_demo23validate_subtitle_track17h0123456789abcdefE",
                4,
            ),
        ];
        let close = close_names(&symbols, "timed_wrk", 5);
        assert_eq!(close.first().map(String::as_str), Some("timed_work"));
        assert!(!close.contains(&"main".to_owned()));
        let close = close_names(&symbols, "validate_subtitle_track", 5);
        assert_eq!(close, vec!["livetrace_demo::validate_subtitle_track"]);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    /// Library names pick the versioned file, and an exact file name wins.
    #[test]
    fn picks_libraries_by_name() {
        let paths = [
            PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            PathBuf::from("/usr/lib/x86_64-linux-gnu/libcap.so.2"),
            PathBuf::from("/opt/libhist.so"),
            PathBuf::from("/usr/bin/chain"),
        ];
        let pick = |name| pick_library(name, paths.iter().map(PathBuf::as_path));
        assert_eq!(pick("libc"), vec![paths[0].as_path()]);
        assert_eq!(pick("libc.so.6"), vec![paths[0].as_path()]);
        assert_eq!(pick("libhist.so"), vec![paths[2].as_path()]);
        assert_eq!(pick("libhist"), vec![paths[2].as_path()]);
        assert_eq!(pick("chain"), vec![paths[3].as_path()]);
        assert!(pick("libz").is_empty());
    }

    /// The Go detector recognises Go's sections, and this (Rust) test binary is not Go; it has
    /// a symbol table and its own functions are found by demangled path.
    #[test]
    fn inspects_elf_files() {
        let me = std::env::current_exe().unwrap();
        let info = ElfInfo::read(&me).unwrap();
        assert_eq!(info.go_evidence, None);
        assert!(info.has_symtab);
        let symbols = function_symbols(&me).unwrap();
        let spec =
            SymbolSpec::parse("livetrace::tools::uprobe_hist::target::edit_distance").unwrap();
        assert!(
            matches!(find_symbol(&symbols, &spec), Lookup::Found(_)),
            "{:?}",
            close_names(&symbols, "edit_distance", 5)
        );

        let go = synthetic_elf_with_section(".gopclntab");
        let info = ElfInfo::parse(&go, Path::new("go-program")).unwrap();
        assert_eq!(
            info.go_evidence.as_deref(),
            Some("it has a .gopclntab section")
        );
        let plain = synthetic_elf_with_section(".text");
        assert_eq!(
            ElfInfo::parse(&plain, Path::new("c-program"))
                .unwrap()
                .go_evidence,
            None
        );
    }

    /// A minimal ELF with one named section, written with `object`'s writer.
    fn synthetic_elf_with_section(name: &str) -> Vec<u8> {
        use object::write::{Object, StandardSegment};
        let mut obj = Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let segment = obj.segment_name(StandardSegment::Data).to_vec();
        let id = obj.add_section(
            segment,
            name.as_bytes().to_vec(),
            object::SectionKind::ReadOnlyData,
        );
        obj.append_section_data(id, b"\xf1\xff\xff\xff\x00\x00\x01\x08", 8);
        obj.write().unwrap()
    }
}
