//! Another process's memory, read without stopping it (`process_vm_readv`: CAP_SYS_PTRACE for
//! another user's process).

/// Copies up to `len` bytes at `addr` of process `pid`; stops early at the end of a mapping.
/// `None` if nothing could be read.
pub fn read(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` describes our own buffer of `len` bytes; the kernel checks `remote`.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n <= 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_our_own_memory() {
        let data = [7u8, 1, 2, 9];
        let read = super::read(std::process::id(), data.as_ptr() as u64, data.len());
        assert_eq!(read.as_deref(), Some(&data[..]));
    }
}
