//! What a symbolised address is called: demangled and sanitised names, inlined callees, perf-map
//! names, module+offset for the unnamed, and build IDs.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use blazesym::symbolize::{CodeInfo, Reason};

use super::{Mapping, NOT_IN_A_FILE, Symbol};
/// The function and its inlined callees, outermost first, each with its own source position at
/// the address (blazesym gives each frame the position inside that frame's function).
pub(super) fn symbols_of(sym: &blazesym::symbolize::Sym<'_>) -> Vec<Symbol> {
    let position = |info: Option<&CodeInfo<'_>>| -> (Option<Arc<str>>, Option<u32>) {
        let Some(info) = info else {
            return (None, None);
        };
        let file = match &info.dir {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(&info.file),
            _ => PathBuf::from(&*info.file),
        };
        (Some(path_name(&file)), info.line)
    };
    let (file, line) = position(sym.code_info.as_deref());
    let name = demangle(&sym.name);
    let mut symbols = vec![Symbol { name, file, line }];
    symbols.extend(sym.inlined.iter().map(|f| {
        let (file, line) = position(f.code_info.as_ref());
        Symbol {
            name: demangle(&f.name),
            file,
            line,
        }
    }));
    symbols
}

/// A perf-map name as a frame: CPython's split into function and file, others as written
/// (sanitised: the process wrote them).
pub(super) fn jit_symbol(name: &str) -> Symbol {
    match python_perf_map_name(name) {
        Some((function, file)) => Symbol {
            name: crate::names::sanitized(function),
            file: Some(Arc::from(crate::names::sanitize(file).as_ref())),
            line: None,
        },
        None => Symbol {
            name: crate::names::sanitized(name),
            file: None,
            line: None,
        },
    }
}

/// A file path as frames and formats carry it (sanitised: a process names its own files).
pub(super) fn path_name(path: &Path) -> Arc<str> {
    Arc::from(crate::names::sanitize(&path.to_string_lossy()).as_ref())
}

/// CPython's `-X perf` trampolines are named `py::FUNCTION:/path/to/file.py` in its perf map:
/// the function keeps the `py::` prefix (so Python frames stand out) and the path becomes the
/// frame's file.
pub(super) fn python_perf_map_name(name: &str) -> Option<(&str, &str)> {
    if !name.starts_with("py::") {
        return None;
    }
    let at = name
        .find(":/")
        .or_else(|| name[4..].find(':').map(|i| i + 4))?;
    Some((&name[..at], &name[at + 1..]))
}

/// The descriptor of the first `NT_GNU_BUILD_ID` note in an ELF note section's bytes (the
/// kernel exports its own as /sys/kernel/notes).
pub(super) fn gnu_build_id_note(mut notes: &[u8]) -> Option<Vec<u8>> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let word = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let align = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let name_size = word(notes, 0)? as usize;
        let desc_size = word(notes, 4)? as usize;
        let kind = word(notes, 8)?;
        let name_end = 12 + align(name_size);
        let desc_end = name_end + align(desc_size);
        let name = notes.get(12..12 + name_size)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return notes
                .get(name_end..name_end + desc_size)
                .map(<[u8]>::to_vec);
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Rust (legacy and v0) and C++ names made readable, then sanitised (symbols are the traced
/// program's to choose); anything that is not a mangled name is left alone (a C function
/// called `a` stays `a`). Rust hashes are dropped.
pub fn demangle(name: &str) -> String {
    crate::names::sanitized(&demangle_raw(name))
}

pub(super) fn demangle_raw(name: &str) -> String {
    if (name.starts_with("_ZN") || name.starts_with("_R"))
        && let Ok(demangled) = rustc_demangle::try_demangle(name)
    {
        return format!("{demangled:#}");
    }
    if name.starts_with("_Z")
        && let Some(demangled) = cpp_demangle::Symbol::new(name)
            .ok()
            .and_then(|symbol| symbol.demangle().ok())
    {
        return demangled;
    }
    name.to_owned()
}

/// `[libfoo.so+0x1234]`: where the address is, when its name is not known.
pub fn module_offset(mapping: &Mapping, addr: u64) -> String {
    let module = mapping.path.file_name().map_or_else(
        || mapping.path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    format!(
        "[{}+{:#x}]",
        crate::names::sanitize(&module),
        mapping.file_offset(addr)
    )
}

pub(super) fn describe(reason: Reason) -> &'static str {
    match reason {
        Reason::Unmapped => "not in the process's memory map",
        Reason::InvalidFileOffset => "invalid file offset",
        Reason::MissingComponent => NOT_IN_A_FILE,
        Reason::MissingSyms => "binary has no symbols (stripped)",
        Reason::Unsupported => "unsupported kind of mapping",
        Reason::UnknownAddr => "address not covered by any symbol",
        _ => "symbolization error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mangled Rust and C++ names are demangled (Rust without its hash); plain C names that
    /// happen to look like Itanium type codes are left alone.
    #[test]
    fn demangles_only_mangled_names() {
        assert_eq!(demangle("a"), "a");
        assert_eq!(demangle("c"), "c");
        assert_eq!(demangle("main"), "main");
        assert_eq!(
            demangle("_ZN14livetrace_demo23validate_subtitle_track17h0123456789abcdefE"),
            "livetrace_demo::validate_subtitle_track"
        );
        assert_eq!(demangle("_Z3fooi"), "foo(int)");
    }

    /// CPython perf-map names lose their file path to the frame's file field.
    #[test]
    fn splits_python_perf_map_names() {
        assert_eq!(
            python_perf_map_name("py::parse_subtitle_track:/srv/catalogue.py"),
            Some(("py::parse_subtitle_track", "/srv/catalogue.py"))
        );
        assert_eq!(
            python_perf_map_name("py::<module>:<stdin>"),
            Some(("py::<module>", "<stdin>"))
        );
        assert_eq!(python_perf_map_name("main"), None);
    }

    /// The kernel's build ID note is found among other notes, whatever their sizes.
    #[test]
    fn finds_the_gnu_build_id_note() {
        let mut notes = Vec::new();
        for (name, kind, desc) in [
            (&b"Xen\0"[..], 1u32, &[9u8; 5][..]),
            (&b"GNU\0"[..], 3, &[0xab, 0xcd, 0xef][..]),
        ] {
            notes.extend((name.len() as u32).to_ne_bytes());
            notes.extend((desc.len() as u32).to_ne_bytes());
            notes.extend(kind.to_ne_bytes());
            notes.extend(name);
            notes.resize(notes.len().div_ceil(4) * 4, 0);
            notes.extend(desc);
            notes.resize(notes.len().div_ceil(4) * 4, 0);
        }
        assert_eq!(gnu_build_id_note(&notes), Some(vec![0xab, 0xcd, 0xef]));
        assert_eq!(hex(&[0xab, 0x01]), "ab01");
    }
}
