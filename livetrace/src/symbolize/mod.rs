//! Addresses to function names, with one long-lived blazesym `Symbolizer` (it caches parsed ELF
//! and DWARF, so every process of a binary is parsed once), batched per process.
//!
//! A process may exit before the capture ends, taking `/proc/PID/maps` with it. So every process
//! is snapshotted (name and file mappings) when it is first seen during the capture; an exited
//! process is then symbolised from its snapshot through the ELF files themselves.

pub mod names;
pub mod perf_map;

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use blazesym::{
    Pid,
    symbolize::{
        Input, Symbolized, Symbolizer as Blaze,
        source::{Elf, Kernel, Process, Source},
    },
};

pub use self::names::{demangle, module_offset};
use self::{
    names::{describe, gnu_build_id_note, hex, jit_symbol, path_name, symbols_of},
    perf_map::PerfMap,
};
pub use crate::{model::KERNEL_MODULE, proc::maps::Mapping};
use crate::{
    proc::{self, maps::Maps, task},
    runtimes::Runtime,
    signals,
};

/// Why a frame is a raw address after a second Ctrl-C.
pub const INTERRUPTED: &str = "symbolisation interrupted by a second signal";

/// Why an address has no name when it lies outside every file the process mapped.
const NOT_IN_A_FILE: &str = "not in a file mapping (JIT or anonymous code)";

/// One resolved address: the function, followed by any inlined callees (outermost first), or an
/// unresolved placeholder and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    Frames(Located),
    Unknown { name: String, reason: &'static str },
}

/// The functions at one address, and where that address is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The module as the process mapped it (or [`KERNEL_MODULE`]).
    pub module: Option<Arc<str>>,
    /// The address in the module's ELF address space (kernel: the kernel address).
    pub address: u64,
    /// Outermost first; all but the first were inlined into the one before.
    pub symbols: Vec<Symbol>,
}

/// A function at an address, with its source position there when debug info has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
}

#[derive(Clone, Debug, Default)]
struct Snapshot {
    name: Option<String>,
    /// The executable when the snapshot was taken: a process that execs gets a new snapshot.
    exe: Option<PathBuf>,
    /// Where its code started: a process that execs the same program again (a fork that execs
    /// itself) gets a new, randomised layout, and a new snapshot.
    start_code: Option<u64>,
    mappings: Vec<Mapping>,
    /// Executable memory backed by no file: where JIT compilers put their code.
    anon_exec: Vec<Range<u64>>,
    /// When this executable was first seen: snapshots are refreshed for a few seconds after,
    /// while the process is still mapping its libraries (and right after an exec, its mappings
    /// are not even complete yet).
    first_seen: Option<std::time::Instant>,
}

/// How long after first seeing a process (or its exec) its memory map keeps being re-read.
const SETTLING_TIME: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Symbolizer {
    blaze: Blaze,
    snapshots: HashMap<u32, Snapshot>,
    /// Build IDs (hex) by module path, looked up once each.
    build_ids: HashMap<Arc<str>, Option<String>>,
    /// A batch was left unsymbolised because a second stop signal asked to hurry.
    interrupted: bool,
    /// Each process's JIT symbol file, read when its addresses are symbolised.
    perf_maps: HashMap<u32, Option<PerfMap>>,
    /// Processes with JIT frames left unnamed, for the hint on how to name them.
    unnamed_jit: BTreeSet<u32>,
    /// Processes found gone at the last [`Symbolizer::forget_exited`].
    gone: BTreeSet<u32>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            blaze: Blaze::builder()
                .enable_inlined_fns(true)
                .enable_code_info(true)
                .enable_demangling(false)
                .build(),
            snapshots: HashMap::new(),
            build_ids: HashMap::new(),
            interrupted: false,
            perf_maps: HashMap::new(),
            gone: BTreeSet::new(),
            unnamed_jit: BTreeSet::new(),
        }
    }

    /// The GNU build ID of a module that `pid` mapped (or of the kernel, for
    /// [`KERNEL_MODULE`]), in hex; `None` when the file has none or cannot be read.
    pub fn build_id(&mut self, pid: u32, module: &Arc<str>) -> Option<String> {
        if let Some(known) = self.build_ids.get(module) {
            return known.clone();
        }
        let id = if &**module == KERNEL_MODULE {
            fs::read("/sys/kernel/notes")
                .ok()
                .and_then(|notes| gnu_build_id_note(&notes))
                .map(|id| hex(&id))
        } else {
            blazesym::helper::read_elf_build_id(&proc::reachable(pid, Path::new(&**module)))
                .ok()
                .flatten()
                .map(|id| hex(&id))
        };
        self.build_ids.insert(module.clone(), id.clone());
        id
    }

    /// Records a process's name and file mappings the first time it is seen, and again if it
    /// has exec'd another program since.
    pub fn note_process(&mut self, pid: u32) {
        if pid == 0 {
            return;
        }
        // No executable: exiting or a zombie (whose maps read empty). Keep what we had.
        let Some(exe) = task::executable(pid) else {
            return;
        };
        let exe = Some(exe);
        // A process that execs the same program again keeps its exe path, not its code address.
        let start_code = task::start_code(pid);
        let mut first_seen = Some(std::time::Instant::now());
        if let Some(known) = self.snapshots.get(&pid)
            && known.exe == exe
            && known.start_code == start_code
        {
            if known
                .first_seen
                .is_some_and(|t| t.elapsed() > SETTLING_TIME)
            {
                return;
            }
            first_seen = known.first_seen;
        }
        let Some((mappings, anon_exec)) = read_mappings(pid).filter(|(m, _)| !m.is_empty()) else {
            return; // gone (or going) already: keep what we had
        };
        let snapshot = Snapshot {
            name: task::name(pid),
            exe,
            start_code,
            mappings,
            anon_exec,
            first_seen,
        };
        self.snapshots.insert(pid, snapshot);
    }

    /// Forgets the processes that have exited, once their stacks are named (`record` names
    /// each bucket as it cuts it): a long recording of a forking service stays bounded.
    ///
    /// Gone at two calls in a row: samples a process took just before it exited may be named
    /// in the next bucket.
    pub fn forget_exited(&mut self) {
        let gone: BTreeSet<u32> = self
            .snapshots
            .keys()
            .chain(self.perf_maps.keys())
            .copied()
            .filter(|&pid| !task::is_alive(pid))
            .collect();
        let forget: BTreeSet<u32> = gone.intersection(&self.gone).copied().collect();
        self.snapshots.retain(|pid, _| !forget.contains(pid));
        self.perf_maps.retain(|pid, _| !forget.contains(pid));
        self.unnamed_jit.retain(|pid| !forget.contains(pid));
        self.gone = gone;
    }

    /// Takes the executable mappings someone else read of `pid` more recently (the unwinding
    /// thread, as it unwound its stacks): if the process exits before its frames are named, they
    /// are named with these, libraries it loaded late included.
    pub fn learn_mappings(&mut self, pid: u32, mappings: Vec<Mapping>, anon_exec: Vec<Range<u64>>) {
        if mappings.is_empty() {
            return;
        }
        let snapshot = self.snapshots.entry(pid).or_insert_with(|| Snapshot {
            name: task::name(pid),
            exe: fs::read_link(format!("/proc/{pid}/exe")).ok(),
            start_code: task::start_code(pid),
            first_seen: Some(std::time::Instant::now()),
            ..Snapshot::default()
        });
        snapshot.mappings = mappings;
        snapshot.anon_exec = anon_exec;
    }

    /// The name recorded for a process, if it was seen alive.
    pub fn process_name(&self, pid: u32) -> Option<&str> {
        self.snapshots.get(&pid)?.name.as_deref()
    }

    /// Whether some addresses were left as raw addresses after a second stop signal.
    pub fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Checked before each batch: after a second stop signal, addresses stay raw.
    fn skip_batch(&mut self) -> bool {
        test_symbolize_delay();
        if signals::aborted() {
            self.interrupted = true;
        }
        self.interrupted
    }

    /// Symbolises one process's addresses (already adjusted to point into the call instruction).
    pub fn user(&mut self, pid: u32, addrs: &[u64]) -> Vec<Resolved> {
        if !addrs.is_empty() && self.skip_batch() {
            let snapshot = self.snapshots.get(&pid);
            return addrs
                .iter()
                .map(|&addr| Resolved::Unknown {
                    name: snapshot
                        .and_then(|s| s.find(addr))
                        .map_or_else(|| format!("{addr:#x}"), |m| module_offset(m, addr)),
                    reason: INTERRUPTED,
                })
                .collect();
        }
        let mut resolved = self.user_native(pid, addrs);
        self.name_jit_frames(pid, addrs, &mut resolved);
        resolved
    }

    /// Symbolises addresses in the process's files (the perf map is not consulted here).
    fn user_native(&mut self, pid: u32, addrs: &[u64]) -> Vec<Resolved> {
        if task::is_alive(pid) {
            // Refresh: libraries may have been loaded since the first look.
            if let Some((mappings, anon_exec)) = read_mappings(pid) {
                let snapshot = self.snapshots.entry(pid).or_default();
                snapshot.mappings = mappings;
                snapshot.anon_exec = anon_exec;
            }
            let mut process = Process::new(Pid::from(pid));
            process.perf_map = false;
            let source = Source::Process(process);
            match self.blaze.symbolize(&source, Input::AbsAddr(addrs)) {
                Ok(results) => {
                    return results
                        .iter()
                        .zip(addrs)
                        .map(|(sym, &addr)| self.resolved(pid, addr, sym))
                        .collect();
                }
                Err(err) => log::debug!("symbolizing pid {pid} failed: {err:#}"),
            }
        }
        self.user_from_snapshot(pid, addrs)
    }

    /// Names the frames in JIT code (outside every file mapping) through the process's perf map.
    /// A frame-pointer walk gone astray also lands outside every file: an address is called JIT
    /// code only when the perf map names it or it lies in anonymous executable memory.
    fn name_jit_frames(&mut self, pid: u32, addrs: &[u64], resolved: &mut [Resolved]) {
        let snapshot = self.snapshots.get(&pid);
        // blazesym reports anonymous code as unmapped or uncovered, depending on the mapping.
        let candidates: Vec<(usize, bool)> = (0..addrs.len())
            .filter(|&i| {
                matches!(resolved[i], Resolved::Unknown { .. })
                    && snapshot.is_none_or(|s| s.find(addrs[i]).is_none())
            })
            .map(|i| (i, snapshot.is_some_and(|s| s.in_anon_exec(addrs[i]))))
            .collect();
        if candidates.is_empty() {
            return;
        }
        // Read again if the runtime wrote one since, or more (Node appends, jcmd rewrites).
        if !matches!(self.perf_maps.get(&pid), Some(Some(map)) if map.is_current()) {
            let map = PerfMap::read(pid);
            self.perf_maps.insert(pid, map);
        }
        let map = self.perf_maps.get(&pid).and_then(Option::as_ref);
        let mut unnamed = false;
        for (i, anonymous) in candidates {
            let addr = addrs[i];
            match map.and_then(|m| m.find(addr).map(|name| (m, name))) {
                Some((map, name)) => {
                    resolved[i] = Resolved::Frames(Located {
                        module: Some(Arc::from(map.path.to_string_lossy().as_ref())),
                        address: addr,
                        symbols: vec![jit_symbol(name)],
                    });
                }
                None if !anonymous => {} // not JIT code: blazesym's reason stands
                None => {
                    unnamed = true;
                    resolved[i] = Resolved::Unknown {
                        name: "[unknown]".into(),
                        reason: if map.is_some() {
                            "JIT code missing from its perf map"
                        } else {
                            "JIT code, and no perf map names it"
                        },
                    };
                }
            }
        }
        if unnamed {
            self.unnamed_jit.insert(pid);
        }
    }

    /// What was wrong with the perf maps read, for the data-quality notes.
    pub fn perf_map_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for map in self.perf_maps.values().flatten() {
            if map.malformed > 0 {
                notes.push(format!(
                    "{}: {} lines could not be read and were skipped",
                    map.path.display(),
                    map.malformed
                ));
            }
            if map.truncated {
                notes.push(format!(
                    "{}: only its first 256 MiB were read (it keeps growing while the runtime \
                     runs; restart the runtime to start a fresh one)",
                    map.path.display()
                ));
            }
        }
        notes
    }

    /// How to get JIT frames named, for each kind of runtime that had some unnamed.
    pub fn jit_advice(&self) -> Vec<String> {
        self.unnamed_jit
            .iter()
            .take(3)
            .map(|&pid| match self.runtime_of(pid) {
                Some(runtime) => {
                    format!("pid {pid} ({}): {}", runtime.name(), runtime.advice(pid))
                }
                None => format!(
                    "pid {pid} runs JIT code that no perf map names: its runtime can usually \
                     write /tmp/perf-{pid}.map (perf's JIT interface)"
                ),
            })
            .collect()
    }

    /// The language runtime a process runs, from its executable and mapped files as first seen.
    /// The processes noted so far.
    pub fn processes(&self) -> impl Iterator<Item = u32> + '_ {
        self.snapshots.keys().copied()
    }

    pub fn runtime_of(&self, pid: u32) -> Option<Runtime> {
        let snapshot = self.snapshots.get(&pid)?;
        let exe = snapshot
            .exe
            .as_ref()
            .and_then(|e| e.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Runtime::detect(&exe, snapshot.mappings.iter().map(|m| m.path.as_path()))
    }

    /// For processes that are gone: map each address to (file, offset) through the snapshot and
    /// symbolise in the file.
    fn user_from_snapshot(&self, pid: u32, addrs: &[u64]) -> Vec<Resolved> {
        let Some(snapshot) = self.snapshots.get(&pid) else {
            return addrs
                .iter()
                .map(|_| Resolved::Unknown {
                    name: "[unknown]".into(),
                    reason: "process exited before it could be looked at",
                })
                .collect();
        };
        addrs
            .iter()
            .map(|&addr| {
                let Some(mapping) = snapshot.find(addr) else {
                    return Resolved::Unknown {
                        name: "[unknown]".into(),
                        reason: NOT_IN_A_FILE,
                    };
                };
                let file_offset = mapping.file_offset(addr);
                let source = Source::Elf(Elf::new(proc::reachable(pid, &mapping.path)));
                match self
                    .blaze
                    .symbolize_single(&source, Input::FileOffset(file_offset))
                {
                    Ok(sym) => self.resolved(pid, addr, &sym),
                    Err(_) => Resolved::Unknown {
                        name: module_offset(mapping, addr),
                        reason: "binary unreadable after the process exited",
                    },
                }
            })
            .collect()
    }

    pub fn kernel(&mut self, addrs: &[u64]) -> Vec<Resolved> {
        if !addrs.is_empty() && self.skip_batch() {
            return addrs
                .iter()
                .map(|&addr| Resolved::Unknown {
                    name: format!("{addr:#x}"),
                    reason: INTERRUPTED,
                })
                .collect();
        }
        // kallsyms is enough for function names; hunting for a vmlinux image is slow and
        // rarely fruitful on production machines.
        let source = Source::Kernel(Kernel {
            vmlinux: blazesym::MaybeDefault::None,
            ..Kernel::default()
        });
        match self.blaze.symbolize(&source, Input::AbsAddr(addrs)) {
            Ok(results) => results
                .iter()
                .map(|sym| match sym {
                    Symbolized::Sym(sym) => Resolved::Frames(Located {
                        module: Some(Arc::from(KERNEL_MODULE)),
                        address: sym.addr + sym.offset as u64,
                        symbols: symbols_of(sym),
                    }),
                    Symbolized::Unknown(reason) => Resolved::Unknown {
                        name: "[unknown]".into(),
                        reason: describe(*reason),
                    },
                })
                .collect(),
            Err(err) => {
                log::debug!("kernel symbolization failed: {err:#}");
                addrs
                    .iter()
                    .map(|_| Resolved::Unknown {
                        name: "[unknown]".into(),
                        reason: "kernel symbols unreadable (/proc/kallsyms)",
                    })
                    .collect()
            }
        }
    }

    fn resolved(&self, pid: u32, addr: u64, sym: &Symbolized<'_>) -> Resolved {
        match sym {
            Symbolized::Sym(sym) => {
                // The path from /proc/PID/maps, as the process sees it; blazesym's may be a
                // /proc/PID/root/... or map_files path.
                let module = self
                    .snapshots
                    .get(&pid)
                    .and_then(|s| s.find(addr))
                    .map(|m| path_name(&m.path))
                    .or_else(|| sym.module.as_ref().map(|m| path_name(Path::new(m))));
                Resolved::Frames(Located {
                    module,
                    address: sym.addr + sym.offset as u64,
                    symbols: symbols_of(sym),
                })
            }
            Symbolized::Unknown(reason) => {
                let mapping = self.snapshots.get(&pid).and_then(|s| s.find(addr));
                Resolved::Unknown {
                    name: mapping.map_or_else(|| "[unknown]".into(), |m| module_offset(m, addr)),
                    reason: describe(*reason),
                }
            }
        }
    }
}

impl Snapshot {
    fn find(&self, addr: u64) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.contains(addr))
    }

    fn in_anon_exec(&self, addr: u64) -> bool {
        self.anon_exec.iter().any(|r| r.contains(&addr))
    }
}

/// File-backed executable mappings of a process, and its anonymous executable ranges.
fn read_mappings(pid: u32) -> Option<(Vec<Mapping>, Vec<Range<u64>>)> {
    let maps = Maps::of(pid).ok()?;
    Some((maps.code_files().collect(), maps.anonymous_code()))
}

/// A test hook: `LIVETRACE_TEST_SLOW_SYMBOLIZE=MS` makes each symbolisation batch take MS
/// longer (in steps that notice the abort flag), so tests can deliver a second signal while
/// symbolisation runs.
fn test_symbolize_delay() {
    let Some(ms) = std::env::var("LIVETRACE_TEST_SLOW_SYMBOLIZE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end && !signals::aborted() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address in a snapshot's mapping is named by module and file offset.
    #[test]
    fn names_unresolved_addresses_by_module_and_offset() {
        let maps = Maps::parse(
            "55d0c0a01000-55d0c0a05000 r-xp 00001000 fd:01 123 /usr/bin/app\n\
             7f1000000000-7f1000100000 r-xp 00028000 fd:01 456 /lib/x86_64-linux-gnu/libc.so.6\n",
        );
        let snapshot = Snapshot {
            mappings: maps.code_files().collect(),
            ..Snapshot::default()
        };
        let m = snapshot.find(0x7f1000000010).unwrap();
        assert_eq!(module_offset(m, 0x7f1000000010), "[libc.so.6+0x28010]");
    }

    /// A function of this very test binary resolves to its name through the live-process path.
    #[test]
    fn resolves_own_function() {
        #[inline(never)]
        fn marker_function_for_symbolizer_test() -> u64 {
            std::hint::black_box(42)
        }
        let addr = marker_function_for_symbolizer_test as *const () as u64;
        let mut symbolizer = Symbolizer::new();
        let pid = std::process::id();
        symbolizer.note_process(pid);
        match &symbolizer.user(pid, &[addr])[0] {
            Resolved::Frames(located) => {
                assert!(
                    located.symbols[0]
                        .name
                        .contains("marker_function_for_symbolizer_test"),
                    "{located:?}"
                );
                let module = located.module.clone().expect("the module is known");
                let exe = fs::read_link("/proc/self/exe").unwrap();
                assert_eq!(Path::new(&*module), exe, "{located:?}");
                // Cargo links test binaries with a build ID.
                let id = symbolizer.build_id(pid, &module).expect("a build ID");
                assert!(
                    id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{id}"
                );
            }
            other => panic!("not resolved: {other:?}"),
        }
    }
}
