//! Where each supported CPython keeps what livetrace reads, in bytes from the start of each
//! struct (x86-64). Derived with `offsetof()` against each version's installed headers
//! (`Include/internal` with `Py_BUILD_CORE`), and checked against py-spy's bindings, the
//! OpenTelemetry profiler's tables and, for 3.13, CPython's own `_Py_DebugOffsets`. Debian's
//! 3.11 has pyenv's 3.11 layout. docs/python.md says where each comes from.

use livetrace_common::python::PyLayout;

/// Everything livetrace reads of one CPython minor version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub minor: u32,
    /// `_PyRuntime.interpreters.head`.
    pub interpreters_head: u64,
    /// `PyInterpreterState.next` and `.threads.head`.
    pub interpreter_next: u64,
    pub threads_head: u64,
    /// `PyInterpreterState.modules` (`.imports.modules` in 3.12+): `sys.modules`.
    pub modules: u64,
    /// `PyThreadState.next`, and how a thread state names its thread.
    pub thread_next: u64,
    pub thread_id: ThreadId,
    /// What the BPF walk reads.
    pub frames: PyLayout,
    pub code: CodeLayout,
    /// Where a compact ASCII string's characters start (`sizeof(PyASCIIObject)`), and a compact
    /// non-ASCII one's (`sizeof(PyCompactUnicodeObject)`).
    pub ascii_data: u64,
    pub compact_data: u64,
}

/// Where a `PyThreadState` says which thread it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadId {
    /// `native_thread_id` (3.11+): the thread's tid, as its own PID namespace numbers it.
    Native(u64),
    /// `thread_id` (3.8 to 3.10): its `pthread_t`, the address of libc's thread descriptor,
    /// which holds the tid somewhere ([`super::process`] finds where).
    Pthread(u64),
}

/// `PyCodeObject` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub firstlineno: u64,
    pub filename: u64,
    /// `co_qualname` (3.11+), or `co_name` before: "Worker.run" or "run".
    pub name: u64,
    /// The table of lines: `co_linetable`, or `co_lnotab` (3.8, 3.9).
    pub linetable: u64,
    pub lines: Lines,
    /// The header's length: where the bytecode starts, inline in the code object
    /// (`co_code_adaptive`, 3.11+), or the size of the code object.
    pub bytecode: u64,
}

/// How a frame's position in its code maps to a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lines {
    /// `co_lnotab` (3.8, 3.9), with `f_lasti` in bytes.
    Lnotab,
    /// 3.10's `co_linetable`, with `f_lasti` in code units of two bytes.
    LineTable310,
    /// The location table of 3.11+, with a pointer to the instruction.
    Locations,
}

/// The marker byte of 3.12+ frames: a frame owned by the C stack is the shim an evaluation call
/// starts with (`FRAME_OWNED_BY_CSTACK`).
pub const OWNED_BY_C_STACK: u64 = 3;

impl Layout {
    /// The layout of CPython 3.`minor`, if livetrace reads that version.
    pub fn of(major: u32, minor: u32) -> Option<Layout> {
        if major != 3 {
            return None;
        }
        let code_312 = CodeLayout {
            firstlineno: 68,
            filename: 112,
            name: 128,
            linetable: 136,
            lines: Lines::Locations,
            bytecode: 192,
        };
        // Before 3.11 each frame is a `PyFrameObject` that its own evaluation call runs: the
        // thread state points at the current one, `f_back` at its caller. There is no marker
        // byte to read (the code pointer's first byte stands in).
        let frame_object = |lasti| PyLayout {
            cframe: PyLayout::IN_THREAD_STATE,
            current_frame: 24, // PyThreadState.frame
            previous: 24,      // f_back
            code: 32,
            instr: lasti, // f_lasti, an int: the upper half read is f_lineno
            marker: 32,
        };
        let before_311 = |lasti, lines| Layout {
            minor,
            interpreters_head: 32,
            interpreter_next: 0,
            threads_head: 8,
            modules: if minor == 8 { 56 } else { 856 },
            thread_next: 8,
            thread_id: ThreadId::Pthread(176),
            frames: frame_object(lasti),
            code: CodeLayout {
                firstlineno: 40,
                filename: 104,
                name: 112,
                linetable: 120,
                lines,
                bytecode: 176,
            },
            ascii_data: 48,
            compact_data: 72,
        };
        Some(match minor {
            8 | 9 => before_311(104, Lines::Lnotab),
            10 => before_311(96, Lines::LineTable310),
            11 => Layout {
                minor,
                interpreters_head: 40,
                interpreter_next: 0,
                threads_head: 16,
                modules: 888,
                thread_next: 8,
                thread_id: ThreadId::Native(160),
                frames: PyLayout {
                    cframe: 56,
                    current_frame: 8,
                    previous: 48,
                    code: 32,
                    instr: 56,
                    marker: 68, // is_entry
                },
                code: CodeLayout {
                    firstlineno: 72,
                    filename: 112,
                    name: 128,
                    linetable: 136,
                    lines: Lines::Locations,
                    bytecode: 184,
                },
                ascii_data: 48,
                compact_data: 72,
            },
            12 => Layout {
                minor,
                interpreters_head: 40,
                interpreter_next: 0,
                threads_head: 72,
                modules: 944,
                thread_next: 8,
                thread_id: ThreadId::Native(144),
                frames: PyLayout {
                    cframe: 56,
                    current_frame: 0,
                    previous: 8,
                    code: 0,
                    instr: 56,
                    marker: 70, // owner
                },
                code: code_312,
                ascii_data: 40,
                compact_data: 56,
            },
            13 => Layout {
                minor,
                interpreters_head: 632,
                interpreter_next: 7264,
                threads_head: 7344,
                modules: 7656,
                thread_next: 8,
                thread_id: ThreadId::Native(160),
                frames: PyLayout {
                    cframe: PyLayout::IN_THREAD_STATE,
                    current_frame: 72,
                    previous: 8,
                    code: 0,
                    instr: 56,
                    marker: 70, // owner
                },
                code: CodeLayout {
                    bytecode: 200,
                    ..code_312
                },
                ascii_data: 40,
                compact_data: 56,
            },
            _ => return None,
        })
    }

    /// Whether a frame with this marker byte ends the frames of one evaluation call, counting
    /// itself (3.11's `is_entry`; every frame before 3.11), and whether it is a shim that is not
    /// a Python frame (3.12+).
    pub fn marker_meaning(&self, marker: u64) -> (bool, bool) {
        if self.minor < 11 {
            (true, false)
        } else if self.minor == 11 {
            (marker != 0, false)
        } else {
            let shim = marker == OWNED_BY_C_STACK;
            (shim, shim)
        }
    }
}
