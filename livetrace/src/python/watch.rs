//! Keeping the BPF program's view of Python processes current during a capture: which targets
//! run a readable CPython (looked for at start and then now and then, since a command's
//! interpreter starts after livetrace does), and where each of their threads keeps its state.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use aya::{Ebpf, maps::HashMap as BpfHashMap};
use livetrace_common::python::{PY_PROCESSES, PY_THREADS, PyLayout};

use super::process::{self, Found, Interpreter};
use crate::bpf;

/// The readable interpreters by process, shared with the unwinding thread that names frames.
pub type Interpreters = Arc<Mutex<HashMap<u32, Interpreter>>>;

/// How long after a look that found no CPython a process is looked at again (a command's
/// interpreter may not have loaded yet).
const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// The capture's Python processes, and what the BPF program knows of them.
#[derive(Default)]
pub struct Watch {
    pub interpreters: Interpreters,
    /// Processes looked at and found to run no readable CPython, and when.
    looked: HashMap<u32, Instant>,
    /// Versions found that livetrace does not read, by process.
    pub unsupported: HashMap<u32, String>,
    /// Threads the program was told of: tid -> thread state.
    threads: HashMap<u32, u64>,
}

impl Watch {
    /// Looks for CPython in `pids` not yet found, and tells the program of every thread of every
    /// interpreter found. Cheap enough for every tick: a few reads per thread.
    pub fn refresh(&mut self, ebpf: &mut Ebpf, pids: impl IntoIterator<Item = u32>) {
        let mut found = Vec::new();
        {
            let known = self
                .interpreters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for pid in pids {
                let recent = self
                    .looked
                    .get(&pid)
                    .is_some_and(|t| t.elapsed() < LOOK_AGAIN);
                if known.contains_key(&pid) || recent || self.unsupported.contains_key(&pid) {
                    continue;
                }
                self.looked.insert(pid, Instant::now());
                // Started with -X perf: its perf map names every Python function already, and
                // reading its frames too would show each one twice.
                let perf_map = std::path::PathBuf::from(format!("/tmp/perf-{pid}.map"));
                if crate::proc::in_root_of(pid, &perf_map).exists() {
                    continue;
                }
                match process::find(pid) {
                    Some(Found::Readable(interpreter)) => found.push(interpreter),
                    Some(Found::Unsupported(version)) => {
                        self.unsupported.insert(pid, version);
                    }
                    None => {}
                }
            }
        }
        for interpreter in found {
            if let Err(err) = self.tell_process(ebpf, &interpreter) {
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
        let interpreters: Vec<Interpreter> = self
            .interpreters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for interpreter in interpreters {
            for (tid, state) in interpreter.threads() {
                if self.threads.get(&tid) != Some(&state)
                    && self.tell_thread(ebpf, tid, state).is_ok()
                {
                    self.threads.insert(tid, state);
                }
            }
        }
    }

    fn tell_process(&self, ebpf: &mut Ebpf, interpreter: &Interpreter) -> anyhow::Result<()> {
        let mut map: BpfHashMap<_, u32, PyLayout> =
            BpfHashMap::try_from(bpf::map_mut(ebpf, PY_PROCESSES)?)?;
        map.insert(interpreter.pid, interpreter.layout.frames, 0)?;
        Ok(())
    }

    fn tell_thread(&self, ebpf: &mut Ebpf, tid: u32, state: u64) -> anyhow::Result<()> {
        let mut map: BpfHashMap<_, u32, u64> =
            BpfHashMap::try_from(bpf::map_mut(ebpf, PY_THREADS)?)?;
        map.insert(tid, state, 0)?;
        Ok(())
    }
}
