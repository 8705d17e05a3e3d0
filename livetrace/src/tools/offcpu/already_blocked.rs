//! Threads that were already blocked when a capture began never pass through `sched_switch`
//! during it, yet they are often the answer (a deadlock, a read that never returns). This finds
//! them at start and recovers their stacks without pausing them:
//! - the kernel stack from `/proc/PID/task/TID/stack` (root only);
//! - the user stack from the registers in `/proc/PID/task/TID/syscall` (sp, pc of a thread in a
//!   system call) and the stack memory, read with `process_vm_readv`, unwound with the
//!   binaries' CFI (as `--unwind dwarf` does) where that reaches the root; otherwise the first
//!   code address above sp is taken as the caller of the system-call wrapper, then the
//!   frame-pointer chain above it, whichever is longer;
//! - a CPython thread's Python frames from the interpreter's frame chain in the process's memory
//!   (it does not change while the thread waits), put above the native frames that run them.

use std::collections::HashMap;

use crate::{
    proc::{maps::Maps, memory, task},
    python::{
        PythonFrame,
        code::Codes,
        process::{self, Found},
    },
    unwind::DwarfUnwinder,
};

/// A thread found sleeping at the start of a capture, with what could be recovered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockedThread {
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
    /// 'S' or 'D'.
    pub state: char,
    /// Kernel function names, outermost first.
    pub kernel_frames: Vec<String>,
    /// User return addresses, leaf first (as BPF stacks are), `pc` first; Python frames among
    /// them as tagged values that index `python_frames`.
    pub user_addrs: Vec<u64>,
    pub python_frames: Vec<PythonFrame>,
}

/// How far above sp to look for the caller and the frame chain.
const SCAN_BYTES: usize = 16 * 1024;
const MAX_FRAMES: usize = 127;

/// The sleeping threads of the given processes and threads.
pub fn scan(tgids: &[u32], tids: &[u32]) -> Vec<BlockedThread> {
    let mut unwinder = DwarfUnwinder::default();
    let mut threads: Vec<(u32, u32)> = Vec::new();
    for &tgid in tgids {
        threads.extend(task::threads(tgid).into_iter().map(|tid| (tgid, tid)));
    }
    for &tid in tids {
        if let Some(tgid) = crate::proc::task::thread_group_of(tid) {
            threads.push((tgid, tid));
        }
    }
    threads.sort_unstable();
    threads.dedup();
    let mut pythons: HashMap<u32, Option<Python>> = HashMap::new();
    threads
        .into_iter()
        .filter_map(|(tgid, tid)| {
            let python = pythons.entry(tgid).or_insert_with(|| python_of(tgid));
            let thread = python
                .as_mut()
                .and_then(|(codes, states)| Some((codes, *states.get(&tid)?)));
            recover(tgid, tid, &mut unwinder, thread)
        })
        .collect()
}

/// A process's CPython (with its code objects, read once for all its threads), and its threads'
/// states by tid.
type Python = (Codes, HashMap<u32, u64>);

/// The CPython whose frames are read in `pid`, if it runs one (and no perf map names them).
fn python_of(pid: u32) -> Option<Python> {
    if process::writes_perf_map(pid) {
        return None;
    }
    match process::find(pid)? {
        Found::Readable(mut interpreter) => {
            let states = interpreter.threads().into_iter().collect();
            Some((Codes::new(*interpreter), states))
        }
        Found::Unsupported(_) => None,
    }
}

/// `python`: the thread's CPython and its thread state, if it is a Python thread.
fn recover(
    tgid: u32,
    tid: u32,
    unwinder: &mut DwarfUnwinder,
    python: Option<(&mut Codes, u64)>,
) -> Option<BlockedThread> {
    let (comm, state) = task::thread_state(tgid, tid)?;
    if state != 'S' && state != 'D' {
        return None;
    }
    let kernel_frames = task::thread_file(tgid, tid, "stack")
        .map(|text| parse_kernel_stack(&text))
        .unwrap_or_default();
    let mut user_addrs = task::thread_file(tgid, tid, "syscall")
        .and_then(|text| parse_syscall_registers(&text))
        .map(|(sp, pc)| walk_user_stack(tgid, sp, pc, unwinder))
        .unwrap_or_default();
    let mut python_frames = Vec::new();
    if let Some((merged, frames)) =
        python.and_then(|(p, state)| crate::python::merge::merge_waiting(p, state, &user_addrs))
    {
        user_addrs = merged.trace;
        python_frames = frames;
    }
    Some(BlockedThread {
        tgid,
        tid,
        comm,
        state,
        kernel_frames,
        user_addrs,
        python_frames,
    })
}

/// `[<0>] pipe_read+0x31e/0x3f0` lines, innermost first, to names outermost first.
fn parse_kernel_stack(text: &str) -> Vec<String> {
    let mut frames: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let symbol = line.split_once("] ")?.1.trim();
            let name = symbol.split('+').next()?.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect();
    frames.reverse();
    frames
}

/// `/proc/.../syscall` is `nr arg1 .. arg6 sp pc` for a thread in a system call (`running` or
/// `-1 sp pc` otherwise).
fn parse_syscall_registers(text: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() < 3 || fields[0] == "running" {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let sp = hex(fields[fields.len() - 2])?;
    let pc = hex(fields[fields.len() - 1])?;
    Some((sp, pc))
}

/// Walks the user stack from (sp, pc) in a copy of the stack memory. glibc's system-call wrappers
/// keep no frame pointer, so the frame chain skips the function that called them; its return
/// address is the first word above sp that points into executable code, and the chain starts at
/// the first saved-frame-pointer/return-address pair above that.
fn walk_user_stack(pid: u32, sp: u64, pc: u64, unwinder: &mut DwarfUnwinder) -> Vec<u64> {
    let code = Maps::of(pid)
        .map(|maps| maps.code_ranges())
        .unwrap_or_default();
    let is_code = |addr: u64| code.iter().any(|range| range.contains(&addr));
    let mut addrs = vec![pc];
    let Some(stack) = memory::read(pid, sp, SCAN_BYTES) else {
        return addrs;
    };
    let word = |addr: u64| -> Option<u64> {
        let at = usize::try_from(addr.checked_sub(sp)?).ok()?;
        let bytes = stack.get(at..at + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    };
    let stack_end = sp + stack.len() as u64;
    let in_stack = |addr: u64| addr > sp && addr < stack_end && addr.is_multiple_of(8);
    // A frame record is (saved fp, return address) with the saved fp above it in the stack.
    let is_frame = |at: u64| {
        word(at).is_some_and(|fp| in_stack(fp) && fp > at) && word(at + 8).is_some_and(&is_code)
    };
    let mut at = sp;
    let mut caller_found = false;
    while at + 16 <= stack_end {
        if !caller_found && word(at).is_some_and(&is_code) {
            addrs.push(word(at).unwrap_or_default());
            caller_found = true;
        } else if caller_found && is_frame(at) {
            break;
        }
        at += 8;
    }
    // The innermost frame record is where a frame-pointer function's rbp points; the libc
    // frames below it usually leave rbp alone, so it is the register's likely value.
    let bp_guess = if is_frame(at) { at } else { 0 };
    // Follow the frame-pointer chain.
    while at + 16 <= stack_end && addrs.len() < MAX_FRAMES && is_frame(at) {
        addrs.push(word(at + 8).unwrap_or_default());
        at = word(at).unwrap_or_default();
    }
    let (unwound, complete) = unwinder.unwind_copy(pid, (pc, sp, bp_guess), &stack);
    if complete || unwound.len() > addrs.len() {
        return unwound;
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kernel stacks come outermost first, without offsets.
    #[test]
    fn parses_proc_stack() {
        let text = "[<0>] pipe_read+0x31e/0x3f0\n[<0>] vfs_read+0x2d5/0x300\n\
                    [<0>] ksys_read+0x6b/0xf0\n[<0>] do_syscall_64+0x71/0x290\n";
        assert_eq!(
            parse_kernel_stack(text),
            ["do_syscall_64", "ksys_read", "vfs_read", "pipe_read"]
        );
    }

    /// sp and pc are the last two fields; a running thread has none.
    #[test]
    fn parses_syscall_registers() {
        assert_eq!(
            parse_syscall_registers("0 0x3 0x7ffd 0x1 0x0 0x0 0x0 0x7ffc8000 0x7f0011"),
            Some((0x7ffc_8000, 0x7f_0011))
        );
        assert_eq!(parse_syscall_registers("running"), None);
        assert_eq!(parse_syscall_registers(""), None);
    }
}
