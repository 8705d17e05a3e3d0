//! A process's or thread's state from `/proc/ID/stat`, `status`, `comm`, `exe` and `task/`.
//! Every reader answers `None` (or false) for a task that is gone: callers decide what that
//! means.

use std::{fs, path::PathBuf};

/// The process (tgid) a task belongs to, if the task exists and is not a zombie.
pub fn thread_group_of(id: u32) -> Option<u32> {
    if id == 0 {
        return None;
    }
    let status = fs::read_to_string(format!("/proc/{id}/status")).ok()?;
    if status_field(&status, "State:")?.starts_with('Z') {
        return None;
    }
    status_field(&status, "Tgid:")?.parse().ok()
}

/// Whether the task exists and is not a zombie.
pub fn is_alive(id: u32) -> bool {
    thread_group_of(id).is_some()
}

/// Whether the task exists as a zombie: exited, not yet reaped.
pub fn is_zombie(id: u32) -> bool {
    stat_fields(id).is_some_and(|fields| fields.first() == Some(&"Z".to_owned()))
}

/// Whether the task is a kernel thread (no user address space). Exited tasks count as user
/// processes: kernel threads rarely exit during a capture.
pub fn is_kernel_thread(id: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    // `flags` is the 9th field of stat, the 7th after the comm.
    stat_fields(id)
        .and_then(|fields| fields.get(6)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// The `startcode` field of stat: changes when the process execs, even the same file.
pub fn start_code(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(23)?.parse().ok()
}

/// The process's `comm`, e.g. "nginx" (sanitised: the process chose it).
pub fn name(pid: u32) -> Option<String> {
    fs::read(format!("/proc/{pid}/comm")).ok().map(|bytes| {
        let name = String::from_utf8_lossy(&bytes);
        crate::names::sanitized(name.strip_suffix('\n').unwrap_or(&name))
    })
}

/// The executable's path, as the process sees it (reading it takes CAP_SYS_PTRACE for another
/// user's process).
pub fn executable(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The PID the process has in its own (innermost) PID namespace: the last field of `NStgid`.
pub fn namespace_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&status, "NStgid:")?
        .split_ascii_whitespace()
        .next_back()?
        .parse()
        .ok()
}

/// The thread ids of process `tgid` (none if it is gone).
pub fn threads(tgid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(format!("/proc/{tgid}/task")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The threads of process `tgid`, by the tid their own PID namespace gives them (what the process
/// itself sees, e.g. in `gettid()`), to the tid /proc and the kernel's events give them. The same
/// number twice, unless the process lives in a PID namespace of its own (a container).
pub fn threads_by_namespace_tid(tgid: u32) -> std::collections::HashMap<u32, u32> {
    let tids = threads(tgid);
    if namespace_pid(tgid) == Some(tgid) {
        return tids.into_iter().map(|tid| (tid, tid)).collect();
    }
    tids.into_iter()
        .filter_map(|tid| {
            let status = fs::read_to_string(format!("/proc/{tgid}/task/{tid}/status")).ok()?;
            let own = status_field(&status, "NSpid:")?
                .split_ascii_whitespace()
                .next_back()?
                .parse()
                .ok()?;
            Some((own, tid))
        })
        .collect()
}

/// A thread's comm and state letter (`S`, `D`, `R`...), from its stat.
pub fn thread_state(tgid: u32, tid: u32) -> Option<(String, char)> {
    let stat = fs::read_to_string(format!("/proc/{tgid}/task/{tid}/stat")).ok()?;
    let (comm_part, rest) = stat.rsplit_once(')')?;
    let comm = comm_part.split_once('(')?.1.to_owned();
    Some((comm, rest.trim_start().chars().next()?))
}

/// One of a thread's files (`stack`, `syscall`), as text.
pub fn thread_file(tgid: u32, tid: u32, name: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/{tgid}/task/{tid}/{name}")).ok()
}

/// The fields of stat after the parenthesised comm (which may hold spaces and parentheses):
/// the state first.
fn stat_fields(id: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{id}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_ascii_whitespace().map(str::to_owned).collect())
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_task() {
        let me = std::process::id();
        assert_eq!(thread_group_of(me), Some(me));
        assert!(is_alive(me) && !is_zombie(me) && !is_kernel_thread(me));
        assert!(start_code(me).is_some_and(|c| c > 0));
        assert_eq!(namespace_pid(me), Some(me));
        assert_eq!(executable(me), std::env::current_exe().ok());
        assert!(threads(me).contains(&me));
        assert!(name(me).is_some());
        assert!(!is_alive(0) && thread_group_of(u32::MAX - 1).is_none());
    }
}
