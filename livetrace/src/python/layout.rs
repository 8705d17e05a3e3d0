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
    /// `PyThreadState.next` and `.native_thread_id` (the kernel's tid).
    pub thread_next: u64,
    pub native_thread_id: u64,
    /// What the BPF walk reads.
    pub frames: PyLayout,
    pub code: CodeLayout,
    /// Where a compact ASCII string's characters start (`sizeof(PyASCIIObject)`), and a compact
    /// non-ASCII one's (`sizeof(PyCompactUnicodeObject)`).
    pub ascii_data: u64,
    pub compact_data: u64,
}

/// `PyCodeObject` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub firstlineno: u64,
    pub filename: u64,
    pub qualname: u64,
    pub linetable: u64,
    /// Where the bytecode starts, inline in the code object (`co_code_adaptive`).
    pub bytecode: u64,
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
            qualname: 128,
            linetable: 136,
            bytecode: 192,
        };
        Some(match minor {
            11 => Layout {
                minor,
                interpreters_head: 40,
                interpreter_next: 0,
                threads_head: 16,
                thread_next: 8,
                native_thread_id: 160,
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
                    qualname: 128,
                    linetable: 136,
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
                thread_next: 8,
                native_thread_id: 144,
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
                thread_next: 8,
                native_thread_id: 160,
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
    /// itself (3.11's `is_entry`), and whether it is a shim that is not a Python frame (3.12+).
    pub fn marker_meaning(&self, marker: u64) -> (bool, bool) {
        if self.minor == 11 {
            (marker != 0, false)
        } else {
            let shim = marker == OWNED_BY_C_STACK;
            (shim, shim)
        }
    }
}
