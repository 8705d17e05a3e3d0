//! Finding a process's CPython from outside: the ELF file that exports `_PyRuntime` (libpython,
//! or the executable it is linked into), its version, where it is loaded, and the threads its
//! interpreters run. Only `.dynsym` is used, so a stripped interpreter works too.

use std::{ops::Range, path::Path};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use super::layout::Layout;
use crate::proc::{self, maps::Maps};

/// A CPython that livetrace reads, in one process.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub pid: u32,
    /// (major, minor, micro).
    pub version: (u32, u32, u32),
    pub layout: Layout,
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// Where `_PyEval_EvalFrameDefault` is in the process: a native frame here runs Python.
    pub eval: Range<u64>,
    /// Address of `PyCode_Type`: an object whose type is this is a code object.
    pub code_type: u64,
}

/// What a process runs, as far as Python goes.
#[derive(Clone, Debug)]
pub enum Found {
    Readable(Interpreter),
    /// A CPython whose frames livetrace does not read: its version, as "3.10" or "2.7".
    Unsupported(String),
}

/// The symbols livetrace needs, from one ELF file's `.dynsym`, at their file addresses.
#[derive(Default)]
struct Symbols {
    runtime: Option<u64>,
    version: Option<u64>,
    eval: Option<Range<u64>>,
    code_type: Option<u64>,
    /// `_PyThreadState_Current`: the runtime symbol of CPython before 3.7.
    old_runtime: bool,
}

/// Looks for a CPython in process `pid`; `None` if it runs none (or its files cannot be read).
/// Only files named like CPython's are opened (`libpython*`, or an executable `python*`), so that
/// looking at a process that is no Python costs a read of its memory map, not of its binaries.
pub fn find(pid: u32) -> Option<Found> {
    let maps = Maps::of(pid).ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let mut candidates: Vec<&Path> = Vec::new();
    for region in maps.regions() {
        if let proc::maps::Backing::File(path) = &region.backing {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let executable = exe.as_deref() == Some(path.as_path());
            let wanted =
                name.starts_with("libpython") || (executable && name.starts_with("python"));
            if wanted && !candidates.contains(&path.as_path()) {
                candidates.push(path);
            }
        }
    }
    candidates
        .into_iter()
        .find_map(|path| from_file(pid, &maps, path))
}

/// The CPython in `path`, a file that `pid` maps, if it exports the runtime.
fn from_file(pid: u32, maps: &Maps, path: &Path) -> Option<Found> {
    // Mapped, not read: libpython with its debug info is tens of MiB, of which .dynsym and a
    // few words are needed.
    let file = std::fs::File::open(proc::reachable(pid, path)).ok()?;
    // SAFETY: a read-only private mapping; a file truncated meanwhile makes reads fault, as any
    // mapped binary would (the same as the unwinder's mappings).
    let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let elf = object::File::parse(&*data).ok()?;
    let mut symbols = Symbols::default();
    for symbol in elf.dynamic_symbols() {
        let address = symbol.address();
        match symbol.name() {
            Ok("_PyRuntime") => symbols.runtime = Some(address),
            Ok("Py_Version") => symbols.version = Some(address),
            Ok("_PyEval_EvalFrameDefault") => {
                symbols.eval = Some(address..address + symbol.size());
            }
            Ok("PyCode_Type") => symbols.code_type = Some(address),
            Ok("_PyThreadState_Current") => symbols.old_runtime = true,
            _ => {}
        }
    }
    let name = path.file_name()?.to_str()?;
    let Some(runtime) = symbols.runtime else {
        return symbols
            .old_runtime
            .then(|| Found::Unsupported(version_in_name(name).unwrap_or_else(|| "?".into())));
    };
    // Py_Version (3.11+) is a constant in the file: 0xMMmmuu.. like PY_VERSION_HEX.
    let hex = symbols.version.and_then(|at| {
        let segment = elf
            .segments()
            .find(|s| (s.address()..s.address() + s.size()).contains(&at))?;
        let bytes = segment.data_range(at, 4).ok()??;
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    });
    let Some(hex) = hex else {
        return Some(Found::Unsupported(
            version_in_name(name).unwrap_or_else(|| "?".into()),
        ));
    };
    let version = (hex >> 24, (hex >> 16) & 0xff, (hex >> 8) & 0xff);
    if free_threaded(&elf, runtime) {
        // Another layout of thread states and objects (`ob_type` moves): not read.
        return Some(Found::Unsupported(format!("{}.{}t", version.0, version.1)));
    }
    let (Some(layout), Some(eval), Some(code_type)) = (
        Layout::of(version.0, version.1),
        symbols.eval,
        symbols.code_type,
    ) else {
        return Some(Found::Unsupported(format!("{}.{}", version.0, version.1)));
    };
    let bias = load_bias(&elf, maps, path)?;
    Some(Found::Readable(Interpreter {
        pid,
        version,
        layout,
        runtime: runtime.wrapping_add(bias),
        eval: eval.start.wrapping_add(bias)..eval.end.wrapping_add(bias),
        code_type: code_type.wrapping_add(bias),
    }))
}

/// Whether a 3.13+ runtime is a free-threaded build: `_PyRuntime` starts with its debug offsets,
/// the cookie `xdebugpy`, the version and then `free_threaded` (initialised data in the file).
fn free_threaded(elf: &object::File, runtime: u64) -> bool {
    let header = elf
        .segments()
        .find(|s| (s.address()..s.address() + s.size()).contains(&runtime))
        .and_then(|s| s.data_range(runtime, 24).ok().flatten());
    match header {
        Some(bytes) if &bytes[..8] == b"xdebugpy" => bytes[16..24].iter().any(|&b| b != 0),
        _ => false,
    }
}

/// How far from its link-time addresses `path` is loaded: where its first page is mapped, less
/// its lowest segment's page.
fn load_bias(elf: &object::File, maps: &Maps, path: &Path) -> Option<u64> {
    let lowest = elf.segments().map(|s| s.address()).min()? & !0xfff;
    let first = maps.regions().iter().find(|r| {
        r.offset == 0 && matches!(&r.backing, proc::maps::Backing::File(p) if p == path)
    })?;
    Some(first.range.start.wrapping_sub(lowest))
}

/// "3.10" from "libpython3.10.so.1.0" or "python3.10", "2.7" from "python2.7".
fn version_in_name(name: &str) -> Option<String> {
    let rest = name
        .strip_prefix("lib")
        .unwrap_or(name)
        .strip_prefix("python")?;
    let (major, minor) = crate::runtimes::python_version(rest)?;
    Some(format!("{major}.{minor}"))
}

/// Most interpreters and threads walked: a bound against a chain gone astray while it changes.
const MAX_INTERPRETERS: usize = 64;
const MAX_THREADS: usize = 4096;

impl Interpreter {
    /// Every thread of every interpreter: (tid, address of its `PyThreadState`). Read while the
    /// process runs: a thread that starts or ends meanwhile may be missed, and is found next time.
    pub fn threads(&self) -> Vec<(u32, u64)> {
        let layout = &self.layout;
        let mut threads = Vec::new();
        let mut interpreter = self.read_u64(self.runtime.wrapping_add(layout.interpreters_head));
        for _ in 0..MAX_INTERPRETERS {
            let Some(interp) = interpreter.filter(|&a| a != 0) else {
                break;
            };
            let mut thread = self.read_u64(interp.wrapping_add(layout.threads_head));
            for _ in 0..MAX_THREADS {
                let Some(state) = thread.filter(|&a| a != 0) else {
                    break;
                };
                if let Some(tid) = self.read_u64(state.wrapping_add(layout.native_thread_id)) {
                    threads.push((tid as u32, state));
                }
                thread = self.read_u64(state.wrapping_add(layout.thread_next));
            }
            interpreter = self.read_u64(interp.wrapping_add(layout.interpreter_next));
        }
        threads
    }

    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let bytes = proc::memory::read(self.pid, addr, 8)?;
        Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    /// "3.11.7".
    pub fn version_text(&self) -> String {
        let (major, minor, micro) = self.version;
        format!("{major}.{minor}.{micro}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_file_names() {
        assert_eq!(
            version_in_name("libpython3.10.so.1.0").as_deref(),
            Some("3.10")
        );
        assert_eq!(version_in_name("python2.7").as_deref(), Some("2.7"));
        assert_eq!(
            version_in_name("libpython3.6m.so.1.0").as_deref(),
            Some("3.6")
        );
        assert_eq!(version_in_name("python3"), None);
    }
}
