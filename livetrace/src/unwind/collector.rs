//! The drain-and-unwind thread of a capture: it drains the ring buffer of stack copies every few
//! milliseconds and unwinds each at once.

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};
use livetrace_common::{
    python::RECORD_PYTHON,
    unwind::{RECORD_BLOCK_END, RECORD_BLOCK_START, RECORD_EXEC, RECORD_FORK, RECORD_SAMPLE},
};

use crate::{
    python::Interpreters,
    symbolize::{Mapping, Symbolizer},
};

use super::{CopyLimits, DwarfUnwinder, POLL, Unwound, YOUNG_POLL, python::PythonFrames};

/// A process's executable mappings, as the unwinding thread read them.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    pub files: Vec<Mapping>,
    pub anonymous: Vec<Range<u64>>,
}

/// What the unwinding thread learnt of processes since it was last asked.
#[derive(Default)]
pub(super) struct Sightings {
    /// Processes sampled (to snapshot their maps for symbolisation).
    pids: HashSet<u32>,
    /// The memory maps it read, newest for each process: a process that has exited since is
    /// still named with the map its stacks were unwound against (libraries it loaded late
    /// included).
    maps: HashMap<u32, ProcessMaps>,
}

/// The drain-and-unwind thread of a capture.
pub struct Collector {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Sightings>>,
    /// Updated by the thread after each batch, so a snapshot can be read mid-capture.
    unwound: Arc<Mutex<Unwound>>,
    thread: JoinHandle<()>,
    /// The interpreters, for the names of their threads.
    pythons: Option<Interpreters>,
}

impl Collector {
    /// Starts draining `ring`. `per_thread` keeps thread ids in the keys. `limits`: the
    /// per-thread copy sizes, learnt here from the stacks unwound. `pythons`: the interpreters
    /// whose Python frames the samples carry, to name and merge them here.
    pub fn start(
        ring: RingBuf<MapData>,
        per_thread: bool,
        limits: Option<CopyLimits>,
        pythons: Option<Interpreters>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Sightings::default()));
        let unwound = Arc::new(Mutex::new(Unwound::default()));
        let thread = std::thread::Builder::new().name("unwind".into()).spawn({
            let (stop, seen, unwound) = (stop.clone(), seen.clone(), unwound.clone());
            let pythons = pythons.clone();
            move || {
                let python = PythonFrames::new(pythons.unwrap_or_default());
                drain_loop(ring, per_thread, limits, python, &stop, &seen, &unwound);
            }
        })?;
        Ok(Self {
            stop,
            seen,
            unwound,
            thread,
            pythons,
        })
    }

    /// What has been unwound so far (for a SIGUSR1 snapshot); the capture goes on.
    pub fn snapshot(&self) -> Unwound {
        let mut unwound = self
            .unwound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        unwound.thread_names = self.python_thread_names();
        unwound
    }

    /// What was unwound since the last take (`record`'s buckets); the capture goes on.
    pub fn take(&self) -> Unwound {
        let mut unwound = self
            .unwound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        unwound.thread_names = self.python_thread_names();
        unwound
    }

    /// Python's names of the threads of every interpreter, by tid.
    fn python_thread_names(&self) -> HashMap<u32, String> {
        let Some(pythons) = &self.pythons else {
            return HashMap::new();
        };
        let pythons = pythons.lock().unwrap_or_else(PoisonError::into_inner);
        pythons
            .values()
            .flat_map(|p| {
                p.thread_names
                    .iter()
                    .map(|(tid, name)| (*tid, name.clone()))
            })
            .collect()
    }

    /// Tells the symbolizer what was learnt since the last call: the processes sampled (it
    /// snapshots their maps while they live) and the maps read here.
    pub fn tell(&self, symbolizer: &mut Symbolizer) {
        tell(&self.seen, symbolizer);
    }

    /// Drains what is left, tells the symbolizer what that taught, and returns the aggregated
    /// stacks. Call after the BPF program has stopped recording.
    pub fn finish(self, symbolizer: &mut Symbolizer) -> anyhow::Result<Unwound> {
        let thread_names = self.python_thread_names();
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the unwinding thread panicked"))?;
        tell(&self.seen, symbolizer);
        let mut unwound =
            std::mem::take(&mut *self.unwound.lock().unwrap_or_else(PoisonError::into_inner));
        unwound.thread_names = thread_names;
        Ok(unwound)
    }
}

fn tell(seen: &Mutex<Sightings>, symbolizer: &mut Symbolizer) {
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
    for pid in seen.pids {
        symbolizer.note_process(pid);
    }
    for (pid, maps) in seen.maps {
        symbolizer.learn_mappings(pid, maps.files, maps.anonymous);
    }
}

/// How often the unwinding thread forgets the processes that have exited.
const FORGET_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

fn drain_loop(
    mut ring: RingBuf<MapData>,
    per_thread: bool,
    mut limits: Option<CopyLimits>,
    mut python: PythonFrames,
    stop: &AtomicBool,
    seen: &Mutex<Sightings>,
    shared: &Mutex<Unwound>,
) {
    let mut unwinder = DwarfUnwinder::default();
    let mut forgot_at = std::time::Instant::now();
    loop {
        // Read the flag before draining, so that the last drain follows the stop.
        let stopping = stop.load(Ordering::Acquire);
        let mut drained = 0usize;
        let mut new_pids = Vec::new();
        let mut out = shared.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(item) = ring.next() {
            drained += 1;
            let Some((header, mut key)) = unwinder.record(&item, per_thread) else {
                out.malformed += 1;
                continue;
            };
            if let (Some(limits), Some(key)) = (&mut limits, &mut key) {
                limits.learn(&header, key, unwinder.stack_used);
            }
            if unwinder.noted.insert(header.tgid) {
                new_pids.push(header.tgid);
            }
            match (header.kind, key) {
                (RECORD_PYTHON, _) => python.arrived(&header, &item),
                (RECORD_SAMPLE, Some(mut key)) => {
                    python.attach(&header, &mut key, &mut out);
                    *out.counts.entry(key).or_default() += header.weight;
                }
                (RECORD_BLOCK_START, Some(mut key)) => {
                    python.attach(&header, &mut key, &mut out);
                    out.pending.insert(header.tid, (header.start_ns, key));
                }
                (RECORD_BLOCK_END, _) => {
                    out.end_block(header.tid, header.start_ns, header.weight);
                }
                // What follows runs another program: forget the old one's memory map.
                (RECORD_EXEC, _) => unwinder.exec(header.tgid),
                (RECORD_FORK, _) => unwinder.fork(header.tgid, header.weight as u32),
                _ => out.malformed += 1,
            }
        }
        drop(out);
        if !new_pids.is_empty() || !unwinder.fresh_maps.is_empty() {
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.pids.extend(new_pids);
            seen.maps.extend(unwinder.fresh_maps.drain());
        }
        if stopping {
            return;
        }
        if forgot_at.elapsed() >= FORGET_EVERY {
            unwinder.forget_exited();
            python.forget_exited();
            forgot_at = std::time::Instant::now();
        }
        let young = unwinder.reread_young();
        if drained == 0 {
            std::thread::sleep(if young { YOUNG_POLL } else { POLL });
        }
    }
}
