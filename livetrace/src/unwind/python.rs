//! The unwinding thread's side of Python frames: it keeps each thread's latest Python record
//! until the sample it belongs to (sent just after it by the same program run) arrives, then
//! names the frames and puts them in the sample's stack, counting every one it cannot place.

use std::collections::HashMap;

use livetrace_common::{
    python::{PY_COMPLETE, PY_FAULT, PY_TOO_DEEP, PY_UNKNOWN_THREAD, PyFrame},
    unwind::{HEADER_LEN, UnwindSampleHeader},
};

use super::{SampleKey, Unwound};
use crate::python::{
    Interpreters, PythonFrame,
    code::Codes,
    merge::{self, PYTHON_TAG},
};

/// Why a sample of a Python process lacks some or all of its Python frames.
const NO_RECORD: &str = "Python frames: not sent (taken before the program was told of the \
     process, which was found during the capture; or the ring buffer was full)";
const UNKNOWN_THREAD: &str =
    "Python frames: the thread started during the capture and was not known yet";
const FAULT: &str = "Python frames: a frame could not be read (outermost frames missing)";
const TOO_DEEP: &str = "Python frames: deeper than the 48 read (outermost frames missing)";
const UNPLACED: &str =
    "Python frames: put at the root (the native stack stopped before their evaluation frame)";
const UNNAMED: &str = "Python frames: a code object could not be read (freed, or not code)";

pub(super) struct PythonFrames {
    interpreters: Interpreters,
    /// Each process's code objects, as read.
    codes: HashMap<u32, Codes>,
    /// Each thread's latest record, until its sample arrives: status and frames, leaf first.
    pending: HashMap<u32, (u32, Vec<PyFrame>)>,
}

impl PythonFrames {
    pub(super) fn new(interpreters: Interpreters) -> Self {
        Self {
            interpreters,
            codes: HashMap::new(),
            pending: HashMap::new(),
        }
    }

    /// Forgets the code objects read of processes that have exited.
    pub(super) fn forget_exited(&mut self) {
        self.codes
            .retain(|&pid, _| crate::proc::task::is_alive(pid));
    }

    /// A Python record: kept for the sample that follows it.
    pub(super) fn arrived(&mut self, header: &UnwindSampleHeader, record: &[u8]) {
        let bytes = record
            .get(HEADER_LEN..HEADER_LEN + header.stack_len as usize)
            .unwrap_or_default();
        let frames = bytes
            .chunks_exact(std::mem::size_of::<PyFrame>())
            .map(|chunk| {
                let word = |i: usize| {
                    u64::from_le_bytes(chunk[i * 8..i * 8 + 8].try_into().unwrap_or_default())
                };
                PyFrame {
                    code: word(0),
                    instr: word(1),
                    marker: word(2),
                }
            })
            .collect();
        self.pending.insert(header.tid, (header._reserved, frames));
    }

    /// Puts the Python frames of `header`'s thread into its sample's (or block's) stack; what
    /// cannot be is counted by sample (or by block: a block's weight comes with its end).
    pub(super) fn attach(
        &mut self,
        header: &UnwindSampleHeader,
        key: &mut SampleKey,
        out: &mut Unwound,
    ) {
        let interpreter = self
            .interpreters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&header.tgid)
            .cloned();
        let Some(interpreter) = interpreter else {
            return;
        };
        // Only a stack that runs Python can miss Python frames: a native thread of a Python
        // process (a BLAS worker, say) has none to miss.
        let runs_python = key.user.as_ref().is_ok_and(|native| {
            native.iter().enumerate().any(|(depth, &a)| {
                interpreter
                    .eval
                    .contains(&if depth == 0 { a } else { a.wrapping_sub(1) })
            })
        });
        if !runs_python {
            self.pending.remove(&header.tid);
            return;
        }
        let Some((status, frames)) = self.pending.remove(&header.tid) else {
            out.lose_python(NO_RECORD, header.weight.max(1));
            return;
        };
        match status {
            PY_COMPLETE => {}
            PY_UNKNOWN_THREAD => return out.lose_python(UNKNOWN_THREAD, header.weight.max(1)),
            PY_FAULT => out.lose_python(FAULT, header.weight.max(1)),
            PY_TOO_DEEP => out.lose_python(TOO_DEEP, header.weight.max(1)),
            _ => return out.lose_python(FAULT, header.weight.max(1)),
        }
        let Ok(native) = &key.user else {
            return;
        };
        let codes = self
            .codes
            .entry(header.tgid)
            .or_insert_with(|| Codes::new(interpreter.clone()));
        if codes.interpreter.runtime != interpreter.runtime {
            // Another program since (an exec): its code objects are others.
            *codes = Codes::new(interpreter.clone());
        }
        let calls = merge::by_evaluation_call(&frames, &interpreter.layout);
        let mut unnamed = false;
        let merged = merge::merge(native, &calls, &interpreter.eval, |frame| {
            let named = merge::name(frame, codes).unwrap_or_else(|| {
                unnamed = true;
                PythonFrame::unknown()
            });
            PYTHON_TAG | u64::from(out.intern_python(named))
        });
        if merged.unplaced {
            out.lose_python(UNPLACED, header.weight.max(1));
        }
        if unnamed {
            out.lose_python(UNNAMED, header.weight.max(1));
        }
        key.user = Ok(merged.trace);
    }
}
