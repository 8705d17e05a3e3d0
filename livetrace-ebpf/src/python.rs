//! The Python frames of a sampled CPython thread (`livetrace_common::python`): from the thread's
//! `PyThreadState` (found by user space) along the chain of `_PyInterpreterFrame`s (or of
//! `PyFrameObject`s before 3.11: the same walk at other offsets), recording
//! each frame's code object, instruction pointer and marker byte. Sent on the `--unwind dwarf`
//! ring buffer just before the sample's own record.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::bpf_probe_read_user,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use livetrace_common::{
    python::{
        MAX_PY_FRAMES, PY_COMPLETE, PY_FAULT, PY_TOO_DEEP, PY_UNKNOWN_THREAD, PyFrame, PyLayout,
        PyStack, PyThread, RECORD_PYTHON,
    },
    stacks::Counter,
    unwind::{HEADER_LEN, UnwindSampleHeader},
};

use crate::stacks::count;

// Defined by the binaries that read Python frames ([`python_maps!`](crate::python_maps)); the
// ring buffer is `unwind_maps!`'s.
unsafe extern "Rust" {
    static UNWIND_SAMPLES: RingBuf;
    static PY_PROCESSES: HashMap<u32, PyLayout>;
    static PY_THREADS: HashMap<u32, PyThread>;
    static PY_SCRATCH: PerCpuArray<PyStack>;
}

/// Defines the maps of Python processes and threads; the loader fills them.
#[macro_export]
macro_rules! python_maps {
    () => {
        #[aya_ebpf::macros::map]
        static PY_PROCESSES: aya_ebpf::maps::HashMap<u32, livetrace_common::python::PyLayout> =
            aya_ebpf::maps::HashMap::with_max_entries(1024, 0);
        #[aya_ebpf::macros::map]
        static PY_THREADS: aya_ebpf::maps::HashMap<u32, livetrace_common::python::PyThread> =
            aya_ebpf::maps::HashMap::with_max_entries(16384, 0);
        #[aya_ebpf::macros::map]
        static PY_SCRATCH: aya_ebpf::maps::PerCpuArray<livetrace_common::python::PyStack> =
            aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);
    };
}

/// If `tgid` runs a CPython that user space found, sends the Python frames of thread `tid`.
#[inline(always)]
pub fn submit(tgid: u32, tid: u32) {
    // SAFETY: plain values, copied out at once.
    let Some(layout) = (unsafe { PY_PROCESSES.get(tgid) }).copied() else {
        return;
    };
    let Some(scratch) = (unsafe { &PY_SCRATCH }).get_ptr_mut(0) else {
        count(Counter::UnwindScratchMissing);
        return;
    };
    // SAFETY: the per-CPU slot is ours while this program runs on this CPU.
    let record = unsafe { &mut *scratch };
    let (frames, status) = match unsafe { PY_THREADS.get(tid) }.copied() {
        Some(thread) if thread.tgid == tgid => walk(&layout, thread.state, &mut record.frames),
        _ => (0, PY_UNKNOWN_THREAD),
    };
    record.header = UnwindSampleHeader {
        tgid,
        tid,
        kind: RECORD_PYTHON,
        stack_len: frames * core::mem::size_of::<PyFrame>() as u32,
        _reserved: status,
        ..UnwindSampleHeader::default()
    };
    let len = HEADER_LEN + (frames as usize).min(MAX_PY_FRAMES) * core::mem::size_of::<PyFrame>();
    // SAFETY: `len` is within the record (at most every frame).
    let bytes =
        unsafe { core::slice::from_raw_parts((record as *const PyStack).cast::<u8>(), len) };
    if unsafe { &UNWIND_SAMPLES }
        .output::<[u8]>(bytes, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count(Counter::UnwindRingFull);
    }
}

/// Reads the frame chain of the thread whose state is at `thread_state` into `frames`, leaf
/// first; returns how many were read and the record's status.
#[inline(always)]
fn walk(layout: &PyLayout, thread_state: u64, frames: &mut [PyFrame; MAX_PY_FRAMES]) -> (u32, u32) {
    let holder = if layout.cframe == PyLayout::IN_THREAD_STATE {
        Some(thread_state)
    } else {
        read_u64(thread_state + u64::from(layout.cframe))
    };
    let Some(mut frame) = holder.and_then(|h| read_u64(h + u64::from(layout.current_frame))) else {
        return (0, PY_FAULT);
    };
    let mut read = 0u32;
    for slot in frames.iter_mut() {
        if frame == 0 {
            return (read, PY_COMPLETE);
        }
        let code = read_u64(frame + u64::from(layout.code));
        let instr = read_u64(frame + u64::from(layout.instr));
        let marker = read_u8(frame + u64::from(layout.marker));
        let previous = read_u64(frame + u64::from(layout.previous));
        let (Some(code), Some(instr), Some(marker), Some(previous)) =
            (code, instr, marker, previous)
        else {
            return (read, PY_FAULT);
        };
        *slot = PyFrame {
            code,
            instr,
            marker: u64::from(marker),
        };
        read += 1;
        frame = previous;
    }
    (read, if frame == 0 { PY_COMPLETE } else { PY_TOO_DEEP })
}

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the address; a fault is an error, not a crash.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
fn read_u8(addr: u64) -> Option<u8> {
    // SAFETY: as read_u64.
    unsafe { bpf_probe_read_user(addr as *const u8) }.ok()
}
