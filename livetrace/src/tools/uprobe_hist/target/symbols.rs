//! The function in an ELF file: its symbols (`.symtab`, then `.dynsym`, through blazesym's
//! inspector), found by plain, mangled or demangled name, with close names when it is not
//! there; and what else the file says (a Go program, the libraries it needs).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use blazesym::{
    SymType,
    inspect::{Inspector, source::Elf},
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, read::elf::ElfFile64};

use super::SymbolSpec;
use crate::symbolize::demangle;

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
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
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
