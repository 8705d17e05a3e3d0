//! Which ELF files to search for the function: a path, a library name, the executable of `-p`
//! or of the command and then its libraries, through `/proc/PID/root` for a process in a
//! container.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::ElfInfo;
use crate::proc::{self, maps::Maps, task};

/// An ELF file to search, as livetrace can open it and as the process knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Openable from livetrace's mount namespace (e.g. `/proc/123/root/usr/lib/libc.so.6`).
    pub path: PathBuf,
    /// The path as the target process sees it, for messages.
    pub shown: String,
}

impl Candidate {
    fn plain(path: PathBuf) -> Self {
        let shown = path.display().to_string();
        Self { path, shown }
    }
}

/// Where to look for TARGET and the executable.
pub enum Scope<'a> {
    Pid(u32),
    Command(&'a [OsString]),
    System,
}

/// The files to search, in order (the first that has the function wins), and every path that
/// was tried without success.
pub struct Search {
    pub files: Vec<Candidate>,
    pub tried: Vec<String>,
    /// True when TARGET named one file (so a miss is a miss in that file).
    pub explicit: bool,
}

/// Lists the files to search for the function in `scope`.
pub fn files_to_search(scope: &Scope<'_>, target: Option<&str>) -> anyhow::Result<Search> {
    match (scope, target) {
        (Scope::Pid(pid), Some(path)) if path.contains('/') => in_process_by_path(*pid, path),
        (Scope::Pid(pid), Some(name)) => in_process_by_library(*pid, name),
        (Scope::Pid(pid), None) => in_process(*pid),
        (Scope::Command(argv), target) => in_command(argv, target),
        (Scope::System, Some(path)) if path.contains('/') => {
            explicit_file(absolute(Path::new(path))?, Vec::new())
        }
        (Scope::System, Some(name)) => in_system_libraries(name),
        (Scope::System, None) => Err(crate::UsageError::error(
            "no process to search for the function: give -p PID, a COMMAND after --, or a \
             TARGET (a path or library name) before the symbol, e.g. libc:malloc",
        )),
    }
}

/// `-p PID /path/file:symbol`: the file as the process sees it, else as we do.
fn in_process_by_path(pid: u32, target: &str) -> anyhow::Result<Search> {
    let mut tried = Vec::new();
    let absolute = absolute(Path::new(target))?;
    let through_root = proc::in_root_of(pid, &absolute);
    for path in [&through_root, &absolute] {
        if path.is_file() {
            return Ok(Search {
                files: vec![Candidate {
                    path: path.clone(),
                    shown: absolute.display().to_string(),
                }],
                tried,
                explicit: true,
            });
        }
        tried.push(path.display().to_string());
    }
    Ok(Search {
        files: vec![],
        tried,
        explicit: true,
    })
}

/// `-p PID libname:symbol`: the libraries the process maps that the name designates.
fn in_process_by_library(pid: u32, name: &str) -> anyhow::Result<Search> {
    let mapped = mapped_files(pid)?;
    let matching = pick_library(name, mapped.iter().map(|p| p.as_path()));
    let tried = mapped
        .iter()
        .map(|p| format!("{} (mapped by pid {pid})", p.display()))
        .collect();
    let files = matching
        .into_iter()
        .map(|p| Candidate {
            path: proc::in_root_of(pid, p),
            shown: p.display().to_string(),
        })
        .collect();
    Ok(Search {
        files,
        tried,
        explicit: true,
    })
}

/// `-p PID symbol`: the executable, then the libraries it maps.
fn in_process(pid: u32) -> anyhow::Result<Search> {
    let exe = task::executable(pid)
        .with_context(|| format!("cannot read /proc/{pid}/exe (is pid {pid} running?)"))?;
    let mut files = vec![Candidate {
        path: existing_or(proc::in_root_of(pid, &exe), format!("/proc/{pid}/exe")),
        shown: exe.display().to_string(),
    }];
    for lib in mapped_files(pid)? {
        if lib != exe {
            files.push(Candidate {
                path: proc::in_root_of(pid, &lib),
                shown: lib.display().to_string(),
            });
        }
    }
    Ok(Search {
        files,
        tried: Vec::new(),
        explicit: false,
    })
}

/// `-- COMMAND`: a path, or the libraries the program links that a name designates, or the
/// program and then the libraries it links.
fn in_command(argv: &[OsString], target: Option<&str>) -> anyhow::Result<Search> {
    let mut tried = Vec::new();
    let exe = command_path(argv)?;
    match target {
        Some(path) if path.contains('/') => explicit_file(absolute(Path::new(path))?, tried),
        Some(name) => {
            let libs = linked_libraries(&exe, &mut tried);
            let mut files: Vec<Candidate> = Vec::new();
            if pick_library(name, [exe.as_path()]).len() == 1 {
                files.push(Candidate::plain(exe.clone()));
            }
            files.extend(
                pick_library(name, libs.iter().map(|p| p.as_path()))
                    .into_iter()
                    .map(|p| Candidate::plain(p.to_path_buf())),
            );
            Ok(Search {
                files,
                tried,
                explicit: true,
            })
        }
        None => {
            let mut files = vec![Candidate::plain(exe.clone())];
            files.extend(
                linked_libraries(&exe, &mut tried)
                    .into_iter()
                    .map(Candidate::plain),
            );
            Ok(Search {
                files,
                tried,
                explicit: false,
            })
        }
    }
}

/// `libname:symbol` for every process: the name in the linker's library directories.
fn in_system_libraries(name: &str) -> anyhow::Result<Search> {
    let mut tried = Vec::new();
    let mut found = Vec::new();
    for dir in library_dirs(&[]) {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        tried.push(format!("{}/{name}*", dir.display()));
        // Files only: `python3.11` is also a directory of modules beside libpython3.11.so.
        let mut names: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        for path in pick_library(name, names.iter().map(|p| p.as_path())) {
            let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            if !found.contains(&canonical) {
                found.push(canonical);
            }
        }
    }
    Ok(Search {
        files: found.into_iter().map(Candidate::plain).collect(),
        tried,
        explicit: true,
    })
}

fn explicit_file(path: PathBuf, mut tried: Vec<String>) -> anyhow::Result<Search> {
    let files = if path.is_file() {
        vec![Candidate::plain(path)]
    } else {
        tried.push(path.display().to_string());
        vec![]
    };
    Ok(Search {
        files,
        tried,
        explicit: true,
    })
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot read the current directory")?
        .join(path))
}

fn existing_or(path: PathBuf, fallback: String) -> PathBuf {
    if path.is_file() {
        path
    } else {
        PathBuf::from(fallback)
    }
}

/// Executable file mappings of a process (paths as it sees them), in address order, deduplicated.
fn mapped_files(pid: u32) -> anyhow::Result<Vec<PathBuf>> {
    Ok(Maps::of(pid)
        .with_context(|| format!("cannot read /proc/{pid}/maps (is pid {pid} running?)"))?
        .code_paths())
}

/// The files among `paths` that a library name designates: the exact file name, or the name
/// followed by a version or `.so` suffix (`libc` -> `libc.so.6`, `libc-2.31.so`). An exact file
/// name match wins over suffixed ones.
pub fn pick_library<'a>(name: &str, paths: impl IntoIterator<Item = &'a Path>) -> Vec<&'a Path> {
    let name = name.trim();
    let mut exact = Vec::new();
    let mut prefixed = Vec::new();
    for path in paths {
        let Some(file) = path.file_name().map(|f| f.to_string_lossy()) else {
            continue;
        };
        if file == name {
            exact.push(path);
        } else if [".so", "-", "."]
            .iter()
            .any(|sep| file.starts_with(&format!("{name}{sep}")))
            && (file.contains(".so") || !name.contains(".so"))
        {
            prefixed.push(path);
        }
    }
    if exact.is_empty() { prefixed } else { exact }
}

/// The command's executable, as `execvp` would find it.
pub fn command_path(argv: &[OsString]) -> anyhow::Result<PathBuf> {
    let program = argv.first().context("no command given after --")?;
    let path = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        // Without `.` components, for messages; symlinks are left alone.
        return Ok(absolute(path)?.components().collect());
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("command '{}' not found in PATH", program.to_string_lossy()))
}

/// The shared libraries an executable links (DT_NEEDED, breadth first, transitively), found
/// the way the dynamic loader would: RPATH/RUNPATH, LD_LIBRARY_PATH, ld.so.conf, default dirs.
fn linked_libraries(exe: &Path, tried: &mut Vec<String>) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut queue: Vec<PathBuf> = vec![exe.to_path_buf()];
    let mut seen_names = BTreeSet::new();
    while let Some(file) = queue.pop() {
        let Ok(info) = ElfInfo::read(&file) else {
            continue;
        };
        let dirs = library_dirs(&info.search_dirs);
        for name in info.needed {
            if !seen_names.insert(name.clone()) {
                continue;
            }
            match dirs.iter().map(|d| d.join(&name)).find(|p| p.is_file()) {
                Some(path) => {
                    queue.insert(0, path.clone());
                    found.push(path);
                }
                None => tried.push(format!("{name} (needed by {})", file.display())),
            }
        }
    }
    found
}

/// Directories the dynamic loader searches, `first` before the rest.
fn library_dirs(first: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = first.to_vec();
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    read_ld_so_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    for dir in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        dirs.push(PathBuf::from(dir));
    }
    let mut unique = Vec::new();
    for dir in dirs {
        if !unique.contains(&dir) {
            unique.push(dir);
        }
    }
    unique
}

fn read_ld_so_conf(path: &Path, dirs: &mut Vec<PathBuf>, depth: u32) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include ") {
            // Only the `dir/*.conf` form is used in practice.
            let pattern = Path::new(pattern.trim());
            let (Some(dir), Some(glob)) = (pattern.parent(), pattern.file_name()) else {
                continue;
            };
            let suffix = glob.to_string_lossy().trim_start_matches('*').to_owned();
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(&suffix))
                .collect();
            files.sort();
            for file in files {
                if depth < 4 {
                    read_ld_so_conf(&file, dirs, depth + 1);
                }
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
}

/// Whether two paths are the same file (device and inode).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
