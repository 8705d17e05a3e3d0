//! Putting a sample's Python frames where they ran: each native frame of the evaluation function
//! is one C-level evaluation call, and the Python frames it runs go right above it, in call
//! order, as py-spy's merge does. A C function that calls back into Python thus shows Python
//! above it and below it.

use livetrace_common::python::PyFrame;

use super::{code::Codes, layout::Layout};

/// A Python frame, named, as the stacks show it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PythonFrame {
    /// `qualified.name`.
    pub name: String,
    pub file: String,
    pub line: Option<u32>,
}

/// A Python frame stands in a trace of addresses as this tag and its index in the capture's list
/// of [`PythonFrame`]s. User addresses are below 2^47 and kernel ones start 0xffff8…, so a tagged
/// value is neither.
pub const PYTHON_TAG: u64 = 0xa000_0000_0000_0000;
const TAG_MASK: u64 = 0xf000_0000_0000_0000;

pub fn is_python(address: u64) -> bool {
    address & TAG_MASK == PYTHON_TAG
}

pub fn python_index(address: u64) -> Option<usize> {
    is_python(address).then_some((address & !TAG_MASK) as usize)
}

/// The Python frames of one sample, split by the evaluation call that runs them, leaf first:
/// 3.11 ends a call's frames with its `is_entry` frame, 3.12+ with a shim frame that is no Python
/// frame of its own.
pub fn by_evaluation_call(frames: &[PyFrame], layout: &Layout) -> Vec<Vec<PyFrame>> {
    let mut calls = Vec::new();
    let mut current = Vec::new();
    for frame in frames {
        let (ends, shim) = layout.marker_meaning(frame.marker);
        if !shim {
            current.push(*frame);
        }
        if ends {
            calls.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        calls.push(current);
    }
    calls
}

/// How a merge went: Python frames that found no evaluation frame to stand on (the native walk
/// stopped short of it) are put at the root end, and counted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub trace: Vec<u64>,
    pub unplaced: bool,
}

/// `native` (leaf first) with each evaluation call's Python frames just leafward of its native
/// frame; `frame_id` names a Python frame and returns its tagged value.
pub fn merge(
    native: &[u64],
    calls: &[Vec<PyFrame>],
    eval: &std::ops::Range<u64>,
    mut frame_id: impl FnMut(&PyFrame) -> u64,
) -> Merged {
    let mut trace = Vec::with_capacity(native.len() + calls.iter().map(Vec::len).sum::<usize>());
    let mut next = calls.iter();
    for (depth, &address) in native.iter().enumerate() {
        // A return address points after the call: look at the call itself.
        let at = if depth == 0 {
            address
        } else {
            address.wrapping_sub(1)
        };
        if eval.contains(&at)
            && let Some(call) = next.next()
        {
            trace.extend(call.iter().map(&mut frame_id));
        }
        trace.push(address);
    }
    let rest: Vec<u64> = next.flatten().map(&mut frame_id).collect();
    let unplaced = !rest.is_empty();
    trace.extend(rest);
    Merged { trace, unplaced }
}

/// Names `frame` of a process whose code objects `codes` reads; `None` if its code object
/// cannot be read (freed since, or not a code object).
pub fn name(frame: &PyFrame, codes: &mut Codes) -> Option<PythonFrame> {
    let code = codes.get(frame.code)?;
    Some(PythonFrame {
        name: code.qualname.clone(),
        file: code.filename.clone(),
        line: code.line(&codes.interpreter, frame.code, frame.instr),
    })
}

/// The Python frames of a thread of `codes`' process that waits now (its thread state at
/// `state`), merged into its native stack `native` (leaf first): the trace, whose tagged values
/// index the frames returned with it. `None` if the thread runs no Python (or its frames could
/// not be read).
pub fn merge_waiting(
    codes: &mut Codes,
    state: u64,
    native: &[u64],
) -> Option<(Merged, Vec<PythonFrame>)> {
    let interpreter = codes.interpreter.clone();
    let frames = interpreter.frames_of(state, MAX_WAITING_FRAMES)?;
    if frames.is_empty() {
        return None;
    }
    let calls = by_evaluation_call(&frames, &interpreter.layout);
    let mut named = Vec::new();
    let merged = merge(native, &calls, &interpreter.eval, |frame| {
        named.push(name(frame, codes).unwrap_or_else(PythonFrame::unknown));
        PYTHON_TAG | (named.len() - 1) as u64
    });
    Some((merged, named))
}

/// Most frames read of a waiting thread: more than a sample's (the reads are user space's).
const MAX_WAITING_FRAMES: usize = 256;

impl PythonFrame {
    /// A frame whose code object could not be read.
    pub fn unknown() -> Self {
        Self {
            name: "[unknown Python code]".into(),
            file: String::new(),
            line: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(code: u64, marker: u64) -> PyFrame {
        PyFrame {
            code,
            instr: 0,
            marker,
        }
    }

    #[test]
    fn calls_split_at_entries_and_shims() {
        let v311 = Layout::of(3, 11).unwrap();
        let frames = [frame(1, 0), frame(2, 1), frame(3, 0), frame(4, 1)];
        let calls = by_evaluation_call(&frames, &v311);
        assert_eq!(
            calls,
            vec![vec![frames[0], frames[1]], vec![frames[2], frames[3]]]
        );

        let v312 = Layout::of(3, 12).unwrap();
        let frames = [
            frame(1, 0),
            frame(2, 0),
            frame(9, 3),
            frame(3, 0),
            frame(9, 3),
        ];
        let calls = by_evaluation_call(&frames, &v312);
        assert_eq!(calls, vec![vec![frames[0], frames[1]], vec![frames[3]]]);
    }

    #[test]
    fn python_frames_go_above_their_evaluation_frame() {
        let eval = 0x1000..0x2000;
        // leaf first: a C leaf, eval (inner call), a C function calling back, eval, main.
        let native = [0x9000, 0x1500, 0x5000, 0x1800, 0x4000];
        let calls = vec![vec![frame(1, 0), frame(2, 0)], vec![frame(3, 0)]];
        let merged = merge(&native, &calls, &eval, |f| PYTHON_TAG | f.code);
        assert_eq!(
            merged.trace,
            [
                0x9000,
                PYTHON_TAG | 1,
                PYTHON_TAG | 2,
                0x1500,
                0x5000,
                PYTHON_TAG | 3,
                0x1800,
                0x4000
            ]
        );
        assert!(!merged.unplaced);

        let cut = merge(&native[..2], &calls, &eval, |f| PYTHON_TAG | f.code);
        assert_eq!(
            cut.trace,
            [
                0x9000,
                PYTHON_TAG | 1,
                PYTHON_TAG | 2,
                0x1500,
                PYTHON_TAG | 3
            ]
        );
        assert!(cut.unplaced);
        assert_eq!(python_index(PYTHON_TAG | 3), Some(3));
        assert_eq!(python_index(0x1500), None);
    }
}
