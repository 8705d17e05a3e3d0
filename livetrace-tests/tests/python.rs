//! Integration tests of profiling CPython processes that were not started with `-X perf`: every
//! interpreter on these machines (pyenv's 2.7 to 3.13, built without frame pointers, and
//! Debian's stripped /usr/bin/python3.11) gets complete native stacks, and the footer counts the
//! samples whose Python functions show only as the interpreter, names the version and says what
//! names them. They run the real binary as root.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Process, cpu_shared, require_root, run_folded, wait_for_cpu};

/// Bound on a run's wall time beyond its capture; only reached when livetrace hangs.
const SLACK: Duration = Duration::from_secs(8);

/// A CPU-bound loop that runs on Python 2.7 and 3, and ends itself after 20 s.
const HOT_LOOP: &str = "
import time
def hot():
    total = 0
    for i in range(10000):
        total += i * i
    return total
end = time.time() + 20
while time.time() < end:
    hot()
";

/// Every CPython on these machines: (version as the footer names it, interpreter).
fn interpreters() -> Vec<(&'static str, PathBuf)> {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()));
    let pyenv = |version: &str, minor: &str| {
        home.join(format!(".pyenv/versions/{version}/bin/python{minor}"))
    };
    vec![
        ("2.7", pyenv("2.7.18", "2.7")),
        ("3.6", pyenv("3.6.15", "3.6")),
        ("3.8", pyenv("3.8.18", "3.8")),
        ("3.9", pyenv("3.9.18", "3.9")),
        ("3.10", pyenv("3.10.13", "3.10")),
        ("3.11", pyenv("3.11.7", "3.11")),
        ("3.12", pyenv("3.12.1", "3.12")),
        ("3.13", pyenv("3.13.0", "3.13")),
        ("3.11", PathBuf::from("/usr/bin/python3.11")),
    ]
}

/// The number after `label` in `text` ("... shown as the interpreter's frames 97, ...").
fn count_after(text: &str, label: &str) -> Option<u64> {
    let rest = &text[text.find(label)? + label.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Without `-X perf`, each interpreter's stacks are complete native stacks (down to _start,
/// through libpython without frame pointers), and the footer does not say "unresolved frames:
/// none": it counts the samples whose Python functions show as the interpreter's frames, and its
/// hint names the version and the way to get the names.
#[test]
fn python_without_perf_maps_is_counted_and_named_by_version() {
    require_root();
    let _cpus = cpu_shared();
    for (version, interpreter) in interpreters() {
        assert!(
            interpreter.is_file(),
            "{} is missing: this test needs pyenv's CPython 2.7, 3.6 and 3.8 to 3.13 and \
             Debian's python3.11 (`cargo xtask setup`)",
            interpreter.display()
        );
        let mut command = Command::new(&interpreter);
        command
            .args(["-c", HOT_LOOP])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let python = Process::spawn(command);
        // Past start-up, into the loop.
        wait_for_cpu(python.pid(), 0.2);
        let pid = python.pid().to_string();

        let (profile, run) = run_folded(&["profile", "-p", &pid, "-U", "-d", "1"], SLACK);
        drop(python);
        let context = format!(
            "{}\n{}\n{}",
            interpreter.display(),
            profile.summary(),
            run.stderr
        );
        let total = profile.total();
        assert!(total >= 50, "only {total} samples\n{context}");
        let rooted = profile.share_where(|s| s.user_frames().first() == Some(&"_start"));
        assert!(
            rooted >= 0.95,
            "only {rooted:.3} of the stacks reach _start\n{context}"
        );
        let unnamed = count_after(&run.stderr, "shown as the interpreter's frames")
            .unwrap_or_else(|| panic!("the footer does not count the unnamed Python\n{context}"));
        assert!(
            unnamed as f64 >= 0.9 * total as f64 && unnamed <= total,
            "{unnamed} of {total} samples counted as Python shown as the interpreter\n{context}"
        );
        let eval = if version == "2.7" {
            "PyEval_EvalFrameEx"
        } else {
            "_PyEval_EvalFrameDefault"
        };
        assert!(
            profile.has_frame(eval),
            "no {eval} frame in the stacks\n{context}"
        );
        for hint in [
            format!("pid {pid} (CPython {version})"),
            format!("({eval})"),
            format!("`py-spy dump --pid {pid}`"),
        ] {
            assert!(
                run.stderr.contains(&hint),
                "the hint lacks {hint:?}\n{context}"
            );
        }
    }
}

/// offcpu builds its stacks the same way: a CPython thread sleeping in a Python function has its
/// blocked time counted as Python shown as the interpreter, with the same hint.
#[test]
fn offcpu_counts_python_without_perf_maps_too() {
    require_root();
    let _cpus = cpu_shared();
    let (_, interpreter) = interpreters()
        .into_iter()
        .find(|(version, _)| *version == "3.11")
        .expect("3.11 is listed");
    let mut command = Command::new(&interpreter);
    command
        .args([
            "-c",
            "import time\ndef nap():\n    time.sleep(0.01)\nend = time.time() + 20\n\
             while time.time() < end:\n    nap()\n",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let python = Process::spawn(command);
    wait_for_cpu(python.pid(), 0.02);
    let pid = python.pid().to_string();

    let (profile, run) = run_folded(&["offcpu", "-p", &pid, "-d", "1"], SLACK);
    drop(python);
    let context = format!("{}\n{}", profile.summary(), run.stderr);
    let total = profile.total();
    let unnamed = count_after(&run.stderr, "shown as the interpreter's frames")
        .unwrap_or_else(|| panic!("the footer does not count the unnamed Python\n{context}"));
    assert!(
        unnamed as f64 >= 0.9 * total as f64 && unnamed <= total,
        "{unnamed} of {total} us counted as Python shown as the interpreter\n{context}"
    );
    assert!(
        run.stderr.contains(&format!("pid {pid} (CPython 3.11)"))
            && run.stderr.contains(&format!("`py-spy dump --pid {pid}`")),
        "no hint for pid {pid}\n{context}"
    );
}
