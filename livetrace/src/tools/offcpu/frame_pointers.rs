//! Whether a program was built with frame pointers, judged from how its functions begin: with
//! them, an x86-64 function opens with `push %rbp` (after an optional `endbr64`) and sets
//! `mov %rsp,%rbp` within its first few instructions (the scheduler may slip others in between),
//! whichever compiler built it. Without them, `%rbp` is an ordinary register and is never
//! loaded from `%rsp`. offcpu's `--unwind auto` uses this to copy stacks (which costs
//! about twice as much per context switch) only for programs that need it.
//!
//! Go is judged by its toolchain instead: on x86-64 it has kept frame pointers since Go 1.7, but
//! its functions open with a stack-growth check and set `%rbp` after it (`sub $N,%rsp; mov
//! %rbp,N-8(%rsp); lea N-8(%rsp),%rbp`), and it ships no `.eh_frame` for CFI unwinding at all.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

use crate::proc::{self, maps::Maps};

/// `endbr64`, which CET-enabled builds put first in every function.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// `push %rbp`.
const PUSH_RBP: u8 = 0x55;
/// `mov %rsp,%rbp`.
const MOV_RSP_RBP: [u8; 3] = [0x48, 0x89, 0xe5];
/// How far into a function `mov %rsp,%rbp` is looked for.
const PROLOGUE_BYTES: usize = 16;
/// Fewer functions than this say nothing either way.
const MIN_FUNCTIONS: usize = 20;
/// Enough to judge by; a large binary is not read whole.
const MAX_FUNCTIONS: usize = 4000;

/// `Some(true)` when most of the ELF file's functions set up a frame pointer, `Some(false)` when
/// most do not, `None` when it cannot be told (unreadable, not x86-64, too few symbols).
pub fn built_with_frame_pointers(path: &Path) -> Option<bool> {
    let file = File::open(path).ok()?;
    // SAFETY: read-only mapping of a program file; see unwind.rs on files replaced while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    judge(&map)
}

/// [`built_with_frame_pointers`] on the bytes of an ELF file.
pub fn judge(elf: &[u8]) -> Option<bool> {
    let file = object::File::parse(elf).ok()?;
    if file.architecture() != object::Architecture::X86_64 {
        return None;
    }
    if is_go(&file) {
        return Some(true);
    }
    let text = file.section_by_name(".text")?;
    let data = text.data().ok()?;
    let base = text.address();
    let symbols: Vec<_> = if file.symbols().next().is_some() {
        file.symbols().collect()
    } else {
        file.dynamic_symbols().collect()
    };
    let (mut functions, mut with_frame) = (0usize, 0usize);
    for symbol in symbols {
        if symbol.kind() != SymbolKind::Text || symbol.size() < 8 {
            continue;
        }
        let Some(at) = symbol.address().checked_sub(base) else {
            continue;
        };
        let Some(code) = data.get(at as usize..) else {
            continue;
        };
        let code = code.strip_prefix(&ENDBR64).unwrap_or(code);
        let prologue = &code[..code.len().min(PROLOGUE_BYTES)];
        functions += 1;
        with_frame += usize::from(
            prologue.first() == Some(&PUSH_RBP) && prologue.windows(3).any(|w| w == MOV_RSP_RBP),
        );
        if functions >= MAX_FUNCTIONS {
            break;
        }
    }
    (functions >= MIN_FUNCTIONS).then_some(with_frame * 2 >= functions)
}

/// Whether the Go toolchain built the file: its build-info section (Go 1.13+) or its PC-line
/// table, which every Go binary carries.
fn is_go(file: &object::File<'_>) -> bool {
    file.section_by_name(".go.buildinfo").is_some() || file.section_by_name(".gopclntab").is_some()
}

/// Why a process's stacks need copying for unwinding: the first of its program and mapped
/// libraries found without frame pointers (libc included: blocking goes through it), or `None`
/// when all that could be judged have them. A process none of whose files can be judged is
/// given the benefit of the doubt the other way (complete stacks first).
pub fn missing_in_process(pid: u32) -> Option<String> {
    let paths = Maps::of(pid).ok()?.code_paths();
    missing_in_files(&paths, |path| proc::in_root_of(pid, path))
}

/// As [`missing_in_process`], for a command not started yet: its program, and the C library
/// (the one livetrace itself maps, which a program of this system maps too).
pub fn missing_in_command(program: &Path) -> Option<String> {
    let mut paths = vec![program.to_path_buf()];
    paths.extend(
        Maps::of_self()
            .map(|maps| maps.code_paths())
            .unwrap_or_default()
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libc."))
            }),
    );
    missing_in_files(&paths, Path::to_path_buf)
}

fn missing_in_files(paths: &[PathBuf], open_as: impl Fn(&Path) -> PathBuf) -> Option<String> {
    let mut judged_any = false;
    for path in paths {
        match built_with_frame_pointers(&open_as(path)) {
            Some(false) => return Some(format!("{} has no frame pointers", path.display())),
            Some(true) => judged_any = true,
            None => {}
        }
    }
    (!judged_any).then(|| "whether its code has frame pointers could not be told".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Thirty functions compiled by cc at -O2, with and without frame pointers.
    fn compile(flag: &str) -> Vec<u8> {
        std::fs::read(compile_into(&tempfile::tempdir().unwrap(), flag)).unwrap()
    }

    fn compile_into(dir: &tempfile::TempDir, flag: &str) -> PathBuf {
        let source = dir.path().join("f.c");
        let mut text = String::from("volatile int sink;\n");
        for i in 0..30 {
            text += &format!(
                "__attribute__((noinline)) int f{i}(int x) {{ sink = x; return x * {i} + f{}(x); }}\n",
                (i + 1) % 30
            );
        }
        text += "int main(void) { return f0(1); }\n";
        std::fs::write(&source, text).unwrap();
        let out = dir.path().join(flag);
        let status = std::process::Command::new("cc")
            .args(["-O2", flag, "-o"])
            .arg(&out)
            .arg(&source)
            .status()
            .expect("cc runs");
        assert!(status.success());
        out
    }

    #[test]
    fn tells_builds_with_and_without_frame_pointers_apart() {
        assert_eq!(judge(&compile("-fno-omit-frame-pointer")), Some(true));
        assert_eq!(judge(&compile("-fomit-frame-pointer")), Some(false));
    }

    /// One file without frame pointers among the process's is enough to copy stacks; files
    /// that cannot be judged are passed over.
    #[test]
    fn the_first_file_without_frame_pointers_decides() {
        let dir = tempfile::tempdir().unwrap();
        let with = compile_into(&dir, "-fno-omit-frame-pointer");
        let without = compile_into(&dir, "-fomit-frame-pointer");
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let same = |p: &Path| p.to_path_buf();
        assert_eq!(
            missing_in_files(&[with.clone(), script.clone()], same),
            None
        );
        let why = missing_in_files(&[with, script.clone(), without.clone()], same).unwrap();
        assert!(why.starts_with(&*without.to_string_lossy()), "{why}");
        assert!(missing_in_files(&[script], same).is_some());
    }

    #[test]
    fn not_an_elf_file_says_nothing() {
        assert_eq!(judge(b"#!/bin/sh\necho hello\n"), None);
    }
}
