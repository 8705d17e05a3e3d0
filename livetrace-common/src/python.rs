//! Python frames of a live CPython (3.8 to 3.13), read in the kernel at each sample: the
//! sampled thread is stopped while the program runs, so its frame chain is consistent. User space
//! finds each Python process's interpreter, tells the program where its structures keep their
//! fields ([`PyLayout`], by process) and where each thread's state is (by thread), and names the
//! code objects the program recorded.
//!
//! The frames travel in the `--unwind dwarf` ring buffer, just before the sample they belong to:
//! an [`UnwindSampleHeader`] of kind [`RECORD_PYTHON`] whose `stack_len` bytes are
//! [`PyFrame`]s, leaf first, and whose `_reserved` field is a [`PY_COMPLETE`]-style status.

use crate::unwind::UnwindSampleHeader;

/// `HashMap<u32, PyLayout>`: tgid -> where its interpreter keeps what the walk reads.
pub const PY_PROCESSES: &str = "PY_PROCESSES";
/// `HashMap<u32, PyThread>`: tid -> its `PyThreadState`, and its process (a tid reused by
/// another process must not be read with this one's state).
pub const PY_THREADS: &str = "PY_THREADS";
/// Per-CPU one-slot array holding the record being assembled ([`PyStack`]).
pub const PY_SCRATCH: &str = "PY_SCRATCH";

/// The Python frames of the sample that follows (see the module's documentation).
pub const RECORD_PYTHON: u32 = 5;

/// Most Python frames read per sample.
pub const MAX_PY_FRAMES: usize = 48;

/// Statuses of a Python record: every frame was read.
pub const PY_COMPLETE: u32 = 0;
/// The chain goes on past [`MAX_PY_FRAMES`]: its outermost frames are missing.
pub const PY_TOO_DEEP: u32 = 1;
/// A read faulted (a frame or thread state not in memory): the frames before it are kept.
pub const PY_FAULT: u32 = 2;
/// The thread's state is not known yet (a thread started since user space last looked).
pub const PY_UNKNOWN_THREAD: u32 = 3;

/// Where a CPython version keeps what the walk reads, in bytes from the start of each struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyLayout {
    /// `PyThreadState.cframe` (3.11, 3.12), the struct that holds the current frame; or
    /// [`PyLayout::IN_THREAD_STATE`] when the thread state holds it itself (3.13, and the
    /// `PyFrameObject *frame` of 3.8 to 3.10).
    pub cframe: u32,
    /// The current `_PyInterpreterFrame *`, in the cframe or the thread state.
    pub current_frame: u32,
    /// `_PyInterpreterFrame.previous`, `.f_code` (`f_executable` in 3.13), and the instruction
    /// pointer (`prev_instr`, or `instr_ptr` in 3.13); before 3.11 `PyFrameObject.f_back`,
    /// `.f_code` and `.f_lasti` (an index, not a pointer).
    pub previous: u32,
    pub code: u32,
    pub instr: u32,
    /// The byte that marks where one C-level evaluation call's frames end: `is_entry` (3.11)
    /// or `owner` (3.12+, where the entry is a shim frame owned by the C stack). Before 3.11
    /// each frame is a call of its own, and the byte read is not looked at.
    pub marker: u32,
}

impl PyLayout {
    pub const IN_THREAD_STATE: u32 = u32::MAX;
}

/// A thread's state, and the process it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyThread {
    pub state: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// One Python frame as read: its code object, where in it, and its marker byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrame {
    pub code: u64,
    pub instr: u64,
    pub marker: u64,
}

/// The per-CPU buffer a Python record is assembled in.
#[repr(C)]
pub struct PyStack {
    pub header: UnwindSampleHeader,
    pub frames: [PyFrame; MAX_PY_FRAMES],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` plain integers without padding.
    unsafe impl aya::Pod for super::PyLayout {}
    unsafe impl aya::Pod for super::PyThread {}
    unsafe impl aya::Pod for super::PyFrame {}
}
