//! One stack key's frames, root first: the process, the thread, the user stack and the kernel
//! stack, each named from one batch of symbolisation, with a marker frame wherever a stack is
//! lost or cut short and the reason recorded.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use livetrace_common::stacks::{StackKey, stack_errno};

use super::{KERNEL_MAX_DEPTH, RECOVERED_MARKER, RawStacks, StackRef, comm};
use crate::{
    model::{Frame, FrameKind},
    symbolize::{Resolved, Symbolizer},
};

/// Every address but the leaf is a return address: look up the call instruction before it, or a
/// call at the very end of a function would be named after the next function.
fn lookup_addrs(trace: &[u64]) -> Vec<u64> {
    trace
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            if i == 0 || crate::python::is_python(a) {
                a
            } else {
                a.saturating_sub(1)
            }
        })
        .collect()
}

/// Resolved names for every address of every stack, symbolised in one batch per process and
/// one for the kernel.
pub(super) struct Names {
    user: HashMap<(u32, u64), Resolved>,
    kernel: HashMap<u64, Resolved>,
}

impl Names {
    pub(super) fn resolve(raw: &RawStacks, symbolizer: &mut Symbolizer) -> Self {
        let mut user_addrs: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
        let mut kernel_addrs: HashSet<u64> = HashSet::new();
        for key in raw.keys() {
            if let Some(trace) = raw.user_trace(key) {
                user_addrs
                    .entry(key.tgid)
                    .or_default()
                    .extend(lookup_addrs(trace));
            }
            if let Some(trace) = raw.trace(StackRef::of(key.kernel_stack_id)) {
                kernel_addrs.extend(lookup_addrs(trace));
            }
        }
        let mut user = HashMap::new();
        for (pid, addrs) in user_addrs {
            let (python, addrs): (Vec<u64>, Vec<u64>) = addrs
                .into_iter()
                .partition(|&a| crate::python::is_python(a));
            for tagged in python {
                let frame =
                    crate::python::python_index(tagged).and_then(|i| raw.python_frames.get(i));
                user.insert((pid, tagged), python_resolved(frame));
            }
            for (addr, resolved) in addrs.iter().zip(symbolizer.user(pid, &addrs)) {
                user.insert((pid, *addr), resolved);
            }
        }
        let kernel_addrs: Vec<u64> = kernel_addrs.into_iter().collect();
        let kernel = kernel_addrs
            .iter()
            .copied()
            .zip(symbolizer.kernel(&kernel_addrs))
            .collect();
        Self { user, kernel }
    }
}

/// A Python frame as the symbolizer would name a native one: `py::qualified.name`, as `-X perf`
/// names it, with its file and line.
fn python_resolved(frame: Option<&crate::python::PythonFrame>) -> Resolved {
    match frame {
        Some(frame) => Resolved::Frames(crate::symbolize::Located {
            module: None,
            address: 0,
            symbols: vec![crate::symbolize::Symbol {
                name: format!("py::{}", frame.name),
                file: Some(Arc::from(frame.file.as_str())),
                line: frame.line,
            }],
        }),
        None => Resolved::Unknown {
            name: "[unknown]".into(),
            reason: "Python frame missing from the capture's list (a livetrace bug)",
        },
    }
}

/// What building one key's frames found out, for the data-quality record.
#[derive(Default)]
pub(super) struct KeyFindings {
    pub(super) unknown_reasons: Vec<&'static str>,
    pub(super) losses: Vec<String>,
    pub(super) cut_short: Vec<String>,
    pub(super) map_full: bool,
    /// (a process that mapped it, module), for build IDs.
    pub(super) modules: Vec<(u32, Arc<str>)>,
    /// The process, if this stack runs Python code that is shown only as the interpreter.
    pub(super) python_unnamed: Option<u32>,
}

/// The reason counted for a stack whose Python functions are shown as CPython's evaluation
/// function: no perf map names them (the process was not started with `-X perf`).
pub(super) const PYTHON_UNNAMED: &str = "Python functions shown as the interpreter's frames";

/// CPython's bytecode evaluation function: where a Python function runs, as the native stack
/// sees it (`PyEval_EvalFrameEx` before 3.6; a `.cold` part where the compiler split it). The
/// names are CPython's own, whether libpython is a library or linked into the program.
fn is_python_eval(frame: &Frame) -> bool {
    let name = frame.name.split('.').next().unwrap_or_default();
    name == "_PyEval_EvalFrameDefault" || name == "PyEval_EvalFrameEx"
}

/// The frames of one key, root first: process, optional thread, user frames, kernel frames.
pub(super) fn key_frames(
    raw: &RawStacks,
    names: &Names,
    symbolizer: &Symbolizer,
    key: &StackKey,
    per_thread: bool,
    findings: &mut KeyFindings,
) -> Vec<Frame> {
    let mut frames = vec![Frame::new(
        FrameKind::Process,
        symbolizer
            .process_name(key.tgid)
            .map_or_else(|| comm(&key.comm), str::to_owned),
    )];
    if per_thread {
        // A Python thread by the name Python gave it, the others by their comm.
        let name = raw
            .thread_names
            .get(&key.tid)
            .map_or_else(|| comm(&key.comm), Clone::clone);
        frames.push(Frame::new(FrameKind::Thread, format!("{name}-{}", key.tid)));
    }
    let user = StackRef::of(key.user_stack_id);
    if user == StackRef::Recovered {
        frames.push(Frame::new(FrameKind::Lost, RECOVERED_MARKER));
    }
    for (kind, stack) in [
        (FrameKind::User, user),
        (FrameKind::Kernel, StackRef::of(key.kernel_stack_id)),
    ] {
        match (stack, kind) {
            (StackRef::NotCollected, _) => {}
            (StackRef::Recovered, FrameKind::Kernel) => {
                let recovered = raw.recovered.get(&key.tid);
                frames.extend(recovered.into_iter().flat_map(|thread| {
                    let names = thread.kernel_frames.iter();
                    names.map(|n| Frame::new(FrameKind::Kernel, n.clone()))
                }));
            }
            _ => push_stack(&mut frames, raw, names, key, (kind, stack), findings),
        }
    }
    frames
}

/// Appends one stack of a key (root first), or the marker of its loss.
fn push_stack(
    frames: &mut Vec<Frame>,
    raw: &RawStacks,
    names: &Names,
    key: &StackKey,
    (kind, stack): (FrameKind, StackRef),
    findings: &mut KeyFindings,
) {
    let side = if kind == FrameKind::User {
        "user"
    } else {
        "kernel"
    };
    let trace = match kind {
        FrameKind::User => raw.user_trace(key),
        _ => raw.trace(stack),
    };
    let Some(trace) = trace else {
        // Kernel threads have no user stack: nothing is lost.
        let kernel_thread = kind == FrameKind::User
            && stack == StackRef::Lost(stack_errno::EFAULT)
            && crate::proc::task::is_kernel_thread(key.tgid);
        if !kernel_thread {
            findings.map_full |= stack == StackRef::Lost(stack_errno::ENOMEM);
            frames.push(Frame::new(FrameKind::Lost, format!("[lost {side} stack]")));
            findings
                .losses
                .push(format!("{side} stack: {}", stack.loss()));
        }
        return;
    };
    if let Some(cause) = cut_short(raw, kind, stack, trace.len()) {
        // The frames that could not be unwound would sit here, under the process (or between
        // the user and the kernel frames).
        let marker = if kind == FrameKind::User {
            "[stack cut short]"
        } else {
            "[kernel stack cut short]"
        };
        frames.push(Frame::new(FrameKind::Lost, marker));
        findings.cut_short.push(cause);
    }
    let first_frame = frames.len();
    // BPF gives the leaf first; profiles read root first.
    let resolved = lookup_addrs(trace).into_iter().rev().map(|addr| {
        let resolved = match kind {
            FrameKind::User => names.user.get(&(key.tgid, addr)),
            _ => names.kernel.get(&addr),
        };
        (addr, resolved)
    });
    push_trace(frames, kind, key.tgid, resolved, findings);
    if kind == FrameKind::User
        && let Some(at) = gil_wait_at(&frames[first_frame..])
    {
        frames.insert(first_frame + at, Frame::new(FrameKind::User, GIL_WAIT));
    }
    let pushed = &frames[first_frame..];
    // With -X perf, every Python function has its own frame (py::name from the perf map)
    // beside the evaluation function's; without it, the evaluation function is all there is.
    if kind == FrameKind::User
        && pushed.iter().any(is_python_eval)
        && !pushed.iter().any(|f| f.name.starts_with("py::"))
    {
        findings.python_unnamed = Some(key.tgid);
        findings.unknown_reasons.push(PYTHON_UNNAMED);
    }
    if kind == FrameKind::Kernel {
        // A stack taken from a tracepoint ends in the tracer's own frames (the trampoline and
        // the BPF program): they say nothing about the traced thread.
        if let Some(at) = frames[first_frame..]
            .iter()
            .position(|f| is_tracer_frame(&f.name))
        {
            frames.truncate(first_frame + at);
        }
    }
}

/// Why a stack stops before its root: what the unwinder said of its own stacks, or a kernel
/// walk that filled its frames.
fn cut_short(raw: &RawStacks, kind: FrameKind, stack: StackRef, depth: usize) -> Option<String> {
    let unwound = match (kind, stack.id()) {
        (FrameKind::User, Some(id)) => raw.cut_short.get(&id).cloned(),
        _ => None,
    };
    unwound.or_else(|| {
        let full = stack.id().is_some() && depth >= KERNEL_MAX_DEPTH && !stack.is_synthetic();
        let side = if kind == FrameKind::User {
            "user"
        } else {
            "kernel"
        };
        full.then(|| {
            format!(
                "{side} stack walk filled the kernel's {KERNEL_MAX_DEPTH} frames: the stack is \
                 deeper (its outermost frames are missing), or the walk went astray in code \
                 without frame pointers"
            )
        })
    })
}

/// The frame that says a Python thread waits for the GIL: blocked (or spinning) in CPython's
/// `take_gil`, the answer to "why is my thread slow while the CPU is idle".
pub(super) const GIL_WAIT: &str = "[waiting for the GIL]";

/// Where, in a user stack (root first), to say that it waits for the GIL: just above `take_gil`;
/// in a stripped interpreter, which does not name it, just above the timed condition wait that
/// the interpreter itself calls (CPython waits on a condition variable for the GIL only).
fn gil_wait_at(frames: &[Frame]) -> Option<usize> {
    let eval = frames.iter().rposition(is_python_eval)?;
    if let Some(at) = frames[eval..].iter().position(|f| f.name == "take_gil") {
        return Some(eval + at);
    }
    let interpreter = frames[eval].module.as_ref()?;
    let wait = frames[eval..]
        .iter()
        .position(|f| f.name.contains("pthread_cond_timedwait"))?;
    let caller = &frames[(eval + wait).checked_sub(1)?];
    // An address without a name reads `[file+0xoffset]`, and carries no module.
    let file = interpreter.rsplit('/').next().unwrap_or(interpreter);
    let in_interpreter = caller.module.as_ref() == Some(interpreter)
        || caller.name.starts_with(&format!("[{file}+0x"));
    (wait > 0 && in_interpreter).then_some(eval + wait)
}

/// Appends the frames of a trace's addresses, root first, each with its names. The Python
/// frames an evaluation call runs go right above the evaluation function even where the compiler
/// inlined helpers into it (`_Py_DECREF` calling a deallocator, say): below the helpers, which run
/// on behalf of the innermost of those Python frames.
fn push_trace<'a>(
    frames: &mut Vec<Frame>,
    kind: FrameKind,
    tgid: u32,
    trace: impl Iterator<Item = (u64, Option<&'a Resolved>)>,
    findings: &mut KeyFindings,
) {
    let mut python_slot: Option<usize> = None;
    for (addr, resolved) in trace {
        if let Some(at) = python_slot.filter(|_| crate::python::is_python(addr)) {
            let mut python = Vec::new();
            push_resolved(&mut python, kind, tgid, resolved, findings);
            python_slot = Some(at + python.len());
            frames.splice(at..at, python);
            continue;
        }
        let start = frames.len();
        push_resolved(frames, kind, tgid, resolved, findings);
        let inlined_eval = frames.len() > start + 1 && is_python_eval(&frames[start]);
        python_slot = inlined_eval.then_some(start + 1);
    }
}

/// Appends the frames one address was named as (an inlined call gives several).
fn push_resolved(
    frames: &mut Vec<Frame>,
    kind: FrameKind,
    tgid: u32,
    resolved: Option<&Resolved>,
    findings: &mut KeyFindings,
) {
    match resolved {
        Some(Resolved::Frames(located)) => {
            for (depth, symbol) in located.symbols.iter().enumerate() {
                frames.push(Frame {
                    name: symbol.name.clone(),
                    kind,
                    module: located.module.clone(),
                    address: Some(located.address),
                    inlined: depth > 0,
                    file: symbol.file.clone(),
                    line: symbol.line,
                });
            }
            if let Some(module) = &located.module {
                findings.modules.push((tgid, module.clone()));
            }
        }
        Some(Resolved::Unknown { name, reason }) => {
            frames.push(Frame::new(kind, name.clone()));
            if !findings.unknown_reasons.contains(reason) {
                findings.unknown_reasons.push(reason);
            }
        }
        None => frames.push(Frame::new(kind, "[unknown]")),
    }
}

fn is_tracer_frame(name: &str) -> bool {
    name.starts_with("bpf_trace_run")
        || name.starts_with("__traceiter_")
        || name.starts_with("__bpf_trace_")
        || name.starts_with("bpf_prog_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str) -> Frame {
        Frame::new(FrameKind::User, name)
    }

    #[test]
    fn the_evaluation_function_is_recognised() {
        assert!(is_python_eval(&frame("_PyEval_EvalFrameDefault")));
        assert!(is_python_eval(&frame("_PyEval_EvalFrameDefault.cold")));
        assert!(is_python_eval(&frame("PyEval_EvalFrameEx")));
        assert!(!is_python_eval(&frame("_PyEval_Vector")));
        assert!(!is_python_eval(&frame("py::serve_request")));
    }

    fn named(names: &[&str]) -> Resolved {
        Resolved::Frames(crate::symbolize::Located {
            module: None,
            address: 0,
            symbols: names
                .iter()
                .map(|name| crate::symbolize::Symbol {
                    name: (*name).into(),
                    file: None,
                    line: None,
                })
                .collect(),
        })
    }

    /// The evaluation function with `_Py_DECREF` inlined into it, running two Python functions
    /// and freeing an object: the Python frames sit right on the evaluation function.
    fn in_module(name: &str, module: &str) -> Frame {
        Frame {
            module: Some(Arc::from(module)),
            ..frame(name)
        }
    }

    #[test]
    fn a_wait_for_the_gil_is_found_by_name_or_by_its_condition_wait() {
        let named = [
            in_module("_PyEval_EvalFrameDefault", "libpython3.12.so"),
            frame("py::crunch"),
            in_module("_Py_HandlePending", "libpython3.12.so"),
            in_module("take_gil", "libpython3.12.so"),
            frame("___pthread_cond_timedwait64"),
        ];
        assert_eq!(gil_wait_at(&named), Some(3));
        let stripped = [
            in_module("_PyEval_EvalFrameDefault", "/usr/bin/python3.11"),
            frame("py::crunch"),
            frame("[python3.11+0xf94ed]"),
            in_module("___pthread_cond_timedwait64", "libc.so.6"),
        ];
        assert_eq!(gil_wait_at(&stripped), Some(3));
        // A condition wait that an extension module makes is no wait for the GIL.
        let other = [
            in_module("_PyEval_EvalFrameDefault", "python3.11"),
            frame("py::wait"),
            in_module("wait_for_it", "ext.so"),
            in_module("___pthread_cond_timedwait64", "libc.so.6"),
        ];
        assert_eq!(gil_wait_at(&other), None);
        assert_eq!(
            gil_wait_at(&[frame("main"), frame("take_gil")]),
            None,
            "no Python"
        );
    }

    #[test]
    fn python_frames_go_below_helpers_inlined_into_the_evaluation_function() {
        let (main, eval, outer, inner, free) = (
            named(&["main"]),
            named(&["_PyEval_EvalFrameDefault", "_Py_DECREF"]),
            named(&["py::serve"]),
            named(&["py::parse"]),
            named(&["object_dealloc"]),
        );
        let tag = crate::python::merge::PYTHON_TAG;
        let trace = [
            (0x10, Some(&main)),
            (0x20, Some(&eval)),
            (tag, Some(&outer)),
            (tag | 1, Some(&inner)),
            (0x30, Some(&free)),
        ];
        let mut frames = Vec::new();
        let mut findings = KeyFindings::default();
        push_trace(
            &mut frames,
            FrameKind::User,
            1,
            trace.into_iter(),
            &mut findings,
        );
        let names: Vec<&str> = frames.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "main",
                "_PyEval_EvalFrameDefault",
                "py::serve",
                "py::parse",
                "_Py_DECREF",
                "object_dealloc"
            ]
        );
    }
}
