//! Finding a process's CPython from outside: the ELF file that exports `_PyRuntime` (libpython,
//! or the executable it is linked into), its version, where it is loaded, and the threads its
//! interpreters run. Only `.dynsym` is used, so a stripped interpreter works too.

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    path::Path,
};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use livetrace_common::python::{PyFrame, PyLayout};

use super::layout::{Layout, ThreadId};
use crate::proc::{self, maps::Maps};

/// A CPython that livetrace reads, in one process.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub pid: u32,
    /// (major, minor, micro); before 3.11 the micro version is not known (`None`).
    pub version: (u32, u32, Option<u32>),
    pub layout: Layout,
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// Where `_PyEval_EvalFrameDefault` is in the process: a native frame here runs Python.
    pub eval: Range<u64>,
    /// Address of `PyCode_Type`: an object whose type is this is a code object.
    pub code_type: u64,
    /// Before 3.11: where glibc's thread descriptor keeps the tid, once found.
    pthread_tid: Option<u64>,
    /// Python's names of its threads (`threading`), by tid, as far as read
    /// ([`super::watch::Watch`] reads them).
    pub thread_names: HashMap<u32, String>,
}

/// What a process runs, as far as Python goes.
#[derive(Clone, Debug)]
pub enum Found {
    Readable(Box<Interpreter>),
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

/// Whether `pid` was started with `-X perf` (or `PYTHONPERFSUPPORT`): its perf map names every
/// Python function already, and reading its frames too would show each one twice.
pub fn writes_perf_map(pid: u32) -> bool {
    let perf_map = std::path::PathBuf::from(format!("/tmp/perf-{pid}.map"));
    proc::in_root_of(pid, &perf_map).exists()
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
    // Py_Version (3.11+) is a constant in the file: 0xMMmmuu.. like PY_VERSION_HEX. Before,
    // the file's name says the minor version ("libpython3.10.so.1.0", "python3.9").
    let hex = symbols.version.and_then(|at| {
        let segment = elf
            .segments()
            .find(|s| (s.address()..s.address() + s.size()).contains(&at))?;
        let bytes = segment.data_range(at, 4).ok()??;
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    });
    let version = match hex {
        Some(hex) => (hex >> 24, (hex >> 16) & 0xff, Some((hex >> 8) & 0xff)),
        None => match name_version(name) {
            Some((major, minor)) if (major, minor) < (3, 11) => (major, minor, None),
            found => {
                let text = found.map_or_else(|| "?".into(), |(a, b)| format!("{a}.{b}"));
                return Some(Found::Unsupported(text));
            }
        },
    };
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
    Some(Found::Readable(Box::new(Interpreter {
        pid,
        version,
        layout,
        runtime: runtime.wrapping_add(bias),
        eval: eval.start.wrapping_add(bias)..eval.end.wrapping_add(bias),
        code_type: code_type.wrapping_add(bias),
        pthread_tid: None,
        thread_names: HashMap::new(),
    })))
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
    let (major, minor) = name_version(name)?;
    Some(format!("{major}.{minor}"))
}

fn name_version(name: &str) -> Option<(u32, u32)> {
    let rest = name
        .strip_prefix("lib")
        .unwrap_or(name)
        .strip_prefix("python")?;
    crate::runtimes::python_version(rest)
}

/// Most interpreters and threads walked: a bound against a chain gone astray while it changes.
const MAX_INTERPRETERS: usize = 64;
const MAX_THREADS: usize = 4096;

impl Interpreter {
    /// Every thread of every interpreter: (tid, address of its `PyThreadState`), with tids as
    /// the kernel numbers them (a process in a container numbers its threads in its own PID
    /// namespace). Read while the process runs: a thread that starts or ends meanwhile may be
    /// missed, and is found next time.
    pub fn threads(&mut self) -> Vec<(u32, u64)> {
        let layout = self.layout;
        let mut states = Vec::new();
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
                // A thread state points back at its interpreter (`interp`): a chain read
                // while it changed, or a wrong layout, stops here.
                if self.read_u64(state.wrapping_add(THREAD_INTERP)) != Some(interp) {
                    break;
                }
                let id_at = match layout.thread_id {
                    ThreadId::Native(at) | ThreadId::Pthread(at) => at,
                };
                if let Some(id) = self.read_u64(state.wrapping_add(id_at)) {
                    states.push((id, state));
                }
                thread = self.read_u64(state.wrapping_add(layout.thread_next));
            }
            interpreter = self.read_u64(interp.wrapping_add(layout.interpreter_next));
        }
        let tasks = proc::task::threads_by_namespace_tid(self.pid);
        if matches!(layout.thread_id, ThreadId::Pthread(_)) && self.pthread_tid.is_none() {
            self.pthread_tid = pthread_tid_offset(self.pid, &states, &tasks);
        }
        let mut by_tid = HashMap::new();
        for (id, state) in states {
            let own_tid = match layout.thread_id {
                ThreadId::Native(_) => Some(id as u32),
                ThreadId::Pthread(_) => self
                    .pthread_tid
                    .and_then(|at| self.read_u32(id.wrapping_add(at))),
            };
            // The list runs newest first; a thread state made for a thread about to start holds
            // its creator's id until the thread sets its own, so the older one wins.
            if let Some(&tid) = own_tid.and_then(|t| tasks.get(&t)) {
                by_tid.insert(tid, state);
            }
        }
        by_tid.into_iter().collect()
    }

    /// The frame chain of the thread whose state is at `state`, leaf first, read as the BPF
    /// program reads it at a sample, but from user space: for a thread that waits (its chain does
    /// not change while it does). `None` where a read faulted; at most `limit` frames.
    pub fn frames_of(&self, state: u64, limit: usize) -> Option<Vec<PyFrame>> {
        let layout = &self.layout.frames;
        let holder = if layout.cframe == PyLayout::IN_THREAD_STATE {
            state
        } else {
            self.read_u64(state.wrapping_add(u64::from(layout.cframe)))?
        };
        let mut frame = self.read_u64(holder.wrapping_add(u64::from(layout.current_frame)))?;
        let mut frames = Vec::new();
        while frame != 0 && frames.len() < limit {
            let field = |offset: u32| self.read_u64(frame.wrapping_add(u64::from(offset)));
            frames.push(PyFrame {
                code: field(layout.code)?,
                instr: field(layout.instr)?,
                marker: field(layout.marker)? & 0xff,
            });
            frame = field(layout.previous)?;
        }
        Some(frames)
    }

    fn read_u32(&self, addr: u64) -> Option<u32> {
        let bytes = proc::memory::read(self.pid, addr, 4)?;
        Some(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?))
    }

    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let bytes = proc::memory::read(self.pid, addr, 8)?;
        Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    /// A `str` object's text: compact strings only (every name, file name and dict key livetrace
    /// reads is one). Not escaped: the traced program chose it.
    pub fn read_str(&self, address: u64) -> Option<String> {
        let header = proc::memory::read(self.pid, address, 40)?;
        let length = usize::try_from(i64::from_le_bytes(header.get(16..24)?.try_into().ok()?))
            .ok()?
            .min(MAX_STRING);
        let state = u32::from_le_bytes(header.get(32..36)?.try_into().ok()?);
        let (kind, compact, ascii) = (
            (state >> 2) & 7,
            state & (1 << 5) != 0,
            state & (1 << 6) != 0,
        );
        if !compact {
            return None;
        }
        // A zero-length read reads nothing, which is not a failure.
        if length == 0 {
            return Some(String::new());
        }
        if ascii {
            let at = address.wrapping_add(self.layout.ascii_data);
            return String::from_utf8(proc::memory::read(self.pid, at, length)?).ok();
        }
        let at = address.wrapping_add(self.layout.compact_data);
        let bytes = proc::memory::read(self.pid, at, length * kind as usize)?;
        match kind {
            1 => Some(bytes.iter().map(|&b| char::from(b)).collect()),
            2 => bytes
                .chunks_exact(2)
                .map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]]))))
                .collect(),
            4 => bytes
                .chunks_exact(4)
                .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            _ => None,
        }
    }

    /// "3.11.7", or "3.10" where the micro version is not known.
    pub fn version_text(&self) -> String {
        match self.version {
            (major, minor, Some(micro)) => format!("{major}.{minor}.{micro}"),
            (major, minor, None) => format!("{major}.{minor}"),
        }
    }
}

/// Longest string read: a bound against a pointer gone astray.
const MAX_STRING: usize = 4096;

/// `PyThreadState.interp`, in every version.
const THREAD_INTERP: u64 = 16;

/// How much of a thread descriptor is searched for the tid.
const PTHREAD_SEARCHED: usize = 0x1000;

/// Where glibc's `struct pthread` keeps the tid, found in the descriptors of this process's
/// Python threads (`pthread_t` is the descriptor's address): the tid is followed by an unused
/// pid, `robust_prev` and `robust_head`, whose `list` points at itself while the thread holds no
/// robust mutex (as glibc sets it up, and CPython takes none). A field that holds a live tid of
/// the process at the same place in every descriptor, with that self-pointer 16 bytes on, is it
/// (0x2d0 in glibc 2.36). Other C libraries (musl) are not recognised: their threads stay
/// unknown, and their samples are counted so.
fn pthread_tid_offset(pid: u32, states: &[(u64, u64)], tasks: &HashMap<u32, u32>) -> Option<u64> {
    let descriptors: HashSet<u64> = states.iter().map(|(id, _)| *id).take(16).collect();
    let read: Vec<(u64, Vec<u8>)> = descriptors
        .into_iter()
        .filter_map(|at| Some((at, proc::memory::read(pid, at, PTHREAD_SEARCHED)?)))
        .collect();
    if read.is_empty() {
        return None;
    }
    (0..PTHREAD_SEARCHED).step_by(8).find_map(|offset| {
        read.iter()
            .all(|(at, bytes)| {
                let tid = bytes.get(offset..offset + 4);
                let list = bytes.get(offset + 16..offset + 24);
                let robust_head = at.wrapping_add(offset as u64 + 16);
                matches!((tid, list), (Some(tid), Some(list))
                    if tasks.contains_key(&u32::from_le_bytes(tid.try_into().unwrap_or_default()))
                        && u64::from_le_bytes(list.try_into().unwrap_or_default()) == robust_head)
            })
            .then_some(offset as u64)
    })
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
