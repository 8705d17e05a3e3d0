//! Everything livetrace reads of other processes through /proc, in one place: their memory maps
//! ([`maps`]), their tasks' state ([`task`]) and their memory ([`memory`]); and how a file a
//! process maps is reached from here, when the process lives in another mount namespace (a
//! container) or the file was deleted since.

pub mod maps;
pub mod memory;
pub mod task;

use std::path::{Path, PathBuf};

/// `path` as process `pid` sees it, through `/proc/PID/root` (its root directory, which may be
/// a container's), whether or not that exists.
pub fn in_root_of(pid: u32, path: &Path) -> PathBuf {
    let mut through = PathBuf::from(format!("/proc/{pid}/root"));
    // `path` is absolute: push would replace the prefix, so append its components.
    through.push(path.strip_prefix("/").unwrap_or(path));
    through
}

/// The file a process maps, reachable from here: through its root while it is alive, else the
/// same path in ours (the process is gone, and with it its root).
pub fn reachable(pid: u32, path: &Path) -> PathBuf {
    let through = in_root_of(pid, path);
    if through.exists() {
        through
    } else {
        path.to_path_buf()
    }
}

/// The file mapped at `range` of process `pid`, through `/proc/PID/map_files` (root only): the
/// way to a file deleted since it was mapped.
pub fn map_file(pid: u32, range: &std::ops::Range<u64>) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        range.start, range.end
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_through_the_processs_root() {
        assert_eq!(
            in_root_of(42, Path::new("/usr/lib/libc.so.6")),
            PathBuf::from("/proc/42/root/usr/lib/libc.so.6")
        );
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(reachable(me, &exe), in_root_of(me, &exe));
        let gone = Path::new("/no/such/file");
        assert_eq!(reachable(me, gone), gone);
    }
}
