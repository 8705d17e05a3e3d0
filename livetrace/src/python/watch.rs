//! Keeping the BPF program's view of Python processes current during a capture: which targets
//! run a readable CPython (looked for at start and then again, less and less often, since a
//! command's interpreter starts after livetrace does), and where each of their threads keeps its
//! state (threads that ended are forgotten, so that a reused tid is never read with a stale
//! state).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use aya::{Ebpf, maps::HashMap as BpfHashMap};
use livetrace_common::python::{PY_PROCESSES, PY_THREADS, PyLayout, PyThread};

use super::process::{self, Found, Interpreter};
use crate::bpf;

/// The readable interpreters by process, shared with the unwinding thread that names frames.
pub type Interpreters = Arc<Mutex<HashMap<u32, Interpreter>>>;

/// How long after a look that found no CPython a process is looked at again: at first soon (a
/// command's interpreter loads within a second), then less often, up to [`LOOK_AT_MOST`].
const LOOK_AGAIN: Duration = Duration::from_millis(250);
const LOOK_AT_MOST: Duration = Duration::from_secs(8);
/// How long after a process exits the watch forgets it: its last samples, drained within
/// milliseconds, have long been unwound and named by then.
const FORGET_AFTER: Duration = Duration::from_secs(10);

/// The capture's Python processes, and what the BPF program knows of them.
#[derive(Default)]
pub struct Watch {
    pub interpreters: Interpreters,
    /// Processes looked at and found to run no readable CPython: when, and when to look again.
    looked: HashMap<u32, (Instant, Duration)>,
    /// Versions found that livetrace does not read, by process.
    pub unsupported: HashMap<u32, String>,
    /// Threads the program was told of: tid -> (process, thread state).
    threads: HashMap<u32, (u32, u64)>,
    /// Interpreters found by [`Watch::look`] that the program has not been told of yet.
    found: Vec<Interpreter>,
    /// By process: the threads listed at the last look, and when to look again for those
    /// still without a Python name.
    named: HashMap<u32, (HashSet<u32>, Instant, Duration)>,
    /// Processes known here that have exited, and since when.
    gone_since: HashMap<u32, Instant>,
    /// Processes forgotten by [`Watch::forget_exited`].
    forgotten: HashSet<u32>,
}

impl Watch {
    /// Whether a readable CPython was found.
    pub fn found_any(&self) -> bool {
        !self.found.is_empty()
            || !self
                .interpreters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
    }

    /// Looks for CPython in `pids` not yet found, before there is a program to tell (to choose
    /// which program to load); the next [`Watch::refresh`] tells it.
    pub fn look(&mut self, pids: impl IntoIterator<Item = u32>) {
        let found = self.look_for_new(pids);
        self.found.extend(found);
    }

    /// Looks for CPython in `pids` not yet found, and tells the program of every thread of every
    /// interpreter found. Cheap enough for every tick: a few reads per thread.
    pub fn refresh(&mut self, ebpf: &mut Ebpf, pids: impl IntoIterator<Item = u32>) {
        self.forget_exited(ebpf);
        self.look(pids);
        for interpreter in std::mem::take(&mut self.found) {
            if let Err(err) = tell_process(ebpf, &interpreter) {
                log::warn!(
                    "pid {}: cannot read its Python frames: {err:#}",
                    interpreter.pid
                );
                continue;
            }
            log::info!(
                "pid {}: CPython {}, runtime at {:#x}",
                interpreter.pid,
                interpreter.version_text(),
                interpreter.runtime
            );
            self.interpreters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(interpreter.pid, interpreter);
        }
        let mut interpreters: Vec<Interpreter> = self
            .interpreters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|i| !self.forgotten.contains(&i.pid))
            .cloned()
            .collect();
        for interpreter in &mut interpreters {
            self.update_threads(ebpf, interpreter);
        }
        // Reading the threads may have learnt where the C library keeps a tid (before 3.11).
        let mut shared = self
            .interpreters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for interpreter in interpreters {
            shared.insert(interpreter.pid, interpreter);
        }
    }

    /// Forgets the processes gone for [`FORGET_AFTER`]: their entries in the program's maps
    /// (which a long capture of a service that starts Python processes would otherwise fill:
    /// `PY_PROCESSES` holds 1024), their threads, and the watch's state of them. Their
    /// interpreters stay, with their threads' Python names, which are read when the profile is
    /// built; so do versions found unsupported, for the footer.
    fn forget_exited(&mut self, ebpf: &mut Ebpf) {
        let interpreters: Vec<u32> = self
            .interpreters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        let known: HashSet<u32> = (interpreters.into_iter())
            .chain(self.looked.keys().copied())
            .chain(self.named.keys().copied())
            .filter(|pid| !self.forgotten.contains(pid))
            .collect();
        let now = Instant::now();
        self.gone_since.retain(|pid, _| known.contains(pid));
        for &pid in &known {
            if crate::proc::task::is_alive(pid) {
                self.gone_since.remove(&pid);
            } else {
                self.gone_since.entry(pid).or_insert(now);
            }
        }
        let forget: HashSet<u32> = (self.gone_since.iter())
            .filter(|(_, since)| since.elapsed() >= FORGET_AFTER)
            .map(|(&pid, _)| pid)
            .collect();
        if forget.is_empty() {
            return;
        }
        if let Ok(map) = bpf::map_mut(ebpf, PY_PROCESSES)
            && let Ok(mut processes) = BpfHashMap::<_, u32, PyLayout>::try_from(map)
        {
            for pid in &forget {
                let _ = processes.remove(pid);
            }
        }
        let ended: Vec<u32> = (self.threads.iter())
            .filter(|(_, (tgid, _))| forget.contains(tgid))
            .map(|(&tid, _)| tid)
            .collect();
        if let Ok(map) = bpf::map_mut(ebpf, PY_THREADS)
            && let Ok(mut threads) = BpfHashMap::<_, u32, PyThread>::try_from(map)
        {
            for tid in &ended {
                let _ = threads.remove(tid);
            }
        }
        for tid in ended {
            self.threads.remove(&tid);
        }
        for pid in forget {
            self.looked.remove(&pid);
            self.named.remove(&pid);
            self.gone_since.remove(&pid);
            self.forgotten.insert(pid);
        }
    }

    /// The readable interpreters among `pids` not found before.
    fn look_for_new(&mut self, pids: impl IntoIterator<Item = u32>) -> Vec<Interpreter> {
        let known = self
            .interpreters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut found = Vec::new();
        for pid in pids {
            let due = self
                .looked
                .get(&pid)
                .is_none_or(|(at, wait)| at.elapsed() >= *wait);
            let pending = self.found.iter().any(|i| i.pid == pid);
            if known.contains_key(&pid) || pending || !due || self.unsupported.contains_key(&pid) {
                continue;
            }
            let wait = self
                .looked
                .get(&pid)
                .map_or(LOOK_AGAIN, |(_, w)| (*w * 2).min(LOOK_AT_MOST));
            self.looked.insert(pid, (Instant::now(), wait));
            if process::writes_perf_map(pid) {
                continue;
            }
            match process::find(pid) {
                Some(Found::Readable(interpreter)) => found.push(*interpreter),
                Some(Found::Unsupported(version)) => {
                    self.unsupported.insert(pid, version);
                }
                None => {}
            }
        }
        found
    }

    /// Tells the program of the interpreter's threads now, and forgets those that ended.
    fn update_threads(&mut self, ebpf: &mut Ebpf, interpreter: &mut Interpreter) {
        let pid = interpreter.pid;
        let now = interpreter.threads();
        let listed: HashSet<u32> = now.iter().map(|(tid, _)| *tid).collect();
        let ended: Vec<u32> = self
            .threads
            .iter()
            .filter(|(tid, (tgid, _))| *tgid == pid && !listed.contains(tid))
            .map(|(tid, _)| *tid)
            .collect();
        let Ok(mut map) = bpf::map_mut(ebpf, PY_THREADS)
            .map_err(anyhow::Error::from)
            .and_then(|m| BpfHashMap::<_, u32, PyThread>::try_from(m).map_err(Into::into))
        else {
            return;
        };
        for tid in ended {
            let _ = map.remove(&tid);
            self.threads.remove(&tid);
        }
        self.name_threads(interpreter, &listed);
        for (tid, state) in now {
            if self.threads.get(&tid) == Some(&(pid, state)) {
                continue;
            }
            let thread = PyThread {
                state,
                tgid: pid,
                _pad: 0,
            };
            match map.insert(tid, thread, 0) {
                Ok(()) => {
                    self.threads.insert(tid, (pid, state));
                }
                // Its samples are counted as from a thread not known.
                Err(err) => log::warn!("pid {pid}: thread {tid} not told to the program: {err}"),
            }
        }
    }
}

impl Watch {
    /// Reads Python's names of the interpreter's threads when a thread without one appears, and
    /// again, less and less often, while some have none: a thread has its state before
    /// `threading` lists it, and threads that C code started are never listed.
    fn name_threads(&mut self, interpreter: &mut Interpreter, listed: &HashSet<u32>) {
        let (seen, due, wait) = self
            .named
            .entry(interpreter.pid)
            .or_insert_with(|| (HashSet::new(), Instant::now(), LOOK_AGAIN));
        // A tid listed again after it was not is a new thread: the old one's name goes.
        for tid in listed.difference(seen) {
            interpreter.thread_names.remove(tid);
        }
        let unnamed: HashSet<u32> = listed
            .iter()
            .filter(|tid| !interpreter.thread_names.contains_key(tid))
            .copied()
            .collect();
        let new = listed.iter().any(|tid| !seen.contains(tid));
        seen.clone_from(listed);
        if unnamed.is_empty() || (!new && Instant::now() < *due) {
            return;
        }
        let tasks = crate::proc::task::threads_by_namespace_tid(interpreter.pid);
        let names = super::threads::thread_names(interpreter, &tasks);
        // Threads that ended keep their names (their stacks are still shown), within a bound.
        for (tid, name) in names {
            let known = &mut interpreter.thread_names;
            if known.len() < MAX_THREAD_NAMES || known.contains_key(&tid) {
                known.insert(tid, name);
            }
        }
        *wait = if new {
            LOOK_AGAIN
        } else {
            (*wait * 2).min(LOOK_AT_MOST)
        };
        *due = Instant::now() + *wait;
    }
}

/// Most thread names kept per process.
const MAX_THREAD_NAMES: usize = 1 << 14;

fn tell_process(ebpf: &mut Ebpf, interpreter: &Interpreter) -> anyhow::Result<()> {
    let mut map: BpfHashMap<_, u32, PyLayout> =
        BpfHashMap::try_from(bpf::map_mut(ebpf, PY_PROCESSES)?)?;
    map.insert(interpreter.pid, interpreter.layout.frames, 0)?;
    Ok(())
}
