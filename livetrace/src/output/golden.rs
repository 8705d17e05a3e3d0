//! Golden files for output layouts, in `livetrace/tests/data/`. `LIVETRACE_BLESS=1 cargo test`
//! rewrites them from the current output; otherwise a difference fails with the file and line
//! of the first differing line.

use std::{fs, path::PathBuf};

/// Compares `actual` with the golden file `name` (or writes it when blessing).
pub fn check(name: &str, actual: &[u8]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    if std::env::var_os("LIVETRACE_BLESS").is_some_and(|v| v == "1") {
        fs::create_dir_all(path.parent().expect("has a parent")).unwrap();
        fs::write(&path, actual).unwrap_or_else(|e| panic!("cannot bless {}: {e}", path.display()));
        return;
    }
    let expected = fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read golden file {}: {e}; run with LIVETRACE_BLESS=1 to create it",
            path.display()
        )
    });
    if expected == actual {
        return;
    }
    let expected = String::from_utf8_lossy(&expected);
    let actual = String::from_utf8_lossy(actual);
    let mut expected_lines = expected.lines();
    let mut actual_lines = actual.lines();
    for line in 1.. {
        match (expected_lines.next(), actual_lines.next()) {
            (Some(e), Some(a)) if e == a => continue,
            (e, a) => panic!(
                "{}:{line}: output differs from the golden file (LIVETRACE_BLESS=1 to accept)\n\
                 expected: {}\n  actual: {}",
                path.display(),
                e.unwrap_or("<end of file>"),
                a.unwrap_or("<end of output>")
            ),
        }
    }
}
