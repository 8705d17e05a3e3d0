//! Finding the function that `uprobe-hist` probes: parsing `[TARGET:]SYMBOL[@0xADDR]`, finding
//! the ELF file (a path, a library name, the executable of `-p` or of the command and then its
//! libraries), and finding the symbol in it by its plain, mangled or demangled name.
//!
//! Files are read through `/proc/PID/root` so that a process in another mount namespace (a
//! container) is probed in the file it actually runs. Symbols come from the ELF symbol tables
//! (`.symtab`, then `.dynsym`) through blazesym's inspector; probes attach by file offset.

mod files;
mod symbols;

pub use self::{
    files::{Candidate, Scope, Search, command_path, files_to_search, pick_library, same_file},
    symbols::{
        ElfInfo, FunctionSymbol, Lookup, close_names, describe_ambiguity, find_symbol,
        function_symbols, variable_named,
    },
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{symbols::edit_distance, *};
    use crate::symbolize::demangle;

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
            SymbolSpec::parse("livetrace::tools::uprobe_hist::target::symbols::edit_distance")
                .unwrap();
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
