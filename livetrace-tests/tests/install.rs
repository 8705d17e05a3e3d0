//! What gets livetrace onto a host besides the binary: shell completions that load in each
//! shell and complete, man pages for every subcommand, and a version that says what was built.

mod common;

use std::{process::Command, time::Duration};

use common::{livetrace, require_tool, run_livetrace};

const SLACK: Duration = Duration::from_secs(20);

/// `source <(livetrace completions bash)` registers a completion function, and it completes
/// subcommands, options and option values.
#[test]
fn bash_completions_load_and_complete() {
    let livetrace = livetrace();
    let script = format!(
        "source <({livetrace} completions bash) && complete -p livetrace && \
         complete_words() {{ COMP_WORDS=(\"$@\"); COMP_CWORD=$(( $# - 1 )); \
           _livetrace livetrace \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; \
           echo \"${{COMPREPLY[*]}}\"; }} && \
         complete_words livetrace pro && \
         complete_words livetrace profile --unw && \
         complete_words livetrace profile --unwind ''"
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("complete ") && lines[0].ends_with(" livetrace"),
        "{stdout}"
    );
    assert_eq!(lines[1], "profile probes", "{stdout}");
    assert!(lines[2].split(' ').any(|w| w == "--unwind"), "{stdout}");
    assert_eq!(lines[3], "fp dwarf auto", "{stdout}");
}

/// zsh: the script registers `_livetrace` for livetrace with compinit.
#[test]
fn zsh_completions_load() {
    let zsh = require_tool("zsh", "apt-get install zsh");
    let livetrace = livetrace();
    let output = Command::new(zsh)
        .arg("-fc")
        .arg(format!(
            "autoload -U compinit && compinit -u -D && source <({livetrace} completions zsh) && \
             print -r -- ${{_comps[livetrace]}}"
        ))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "_livetrace");
}

/// fish: the script loads and `complete -C` completes subcommands and option values.
#[test]
fn fish_completions_load_and_complete() {
    let fish = require_tool("fish", "apt-get install fish");
    let livetrace = livetrace();
    let output = Command::new(fish)
        .arg("-c")
        .arg(format!(
            "source ({livetrace} completions fish | psub); complete -C 'livetrace pro'; \
             complete -C 'livetrace offcpu --state '"
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("profile\t")),
        "{stdout}"
    );
    for state in ["any", "D", "S"] {
        assert!(
            stdout.lines().any(|l| l.split('\t').next() == Some(state)),
            "no {state}:\n{stdout}"
        );
    }
}

/// A man page for livetrace and one for each subcommand, each rendered by man(1) without
/// complaint, naming its options.
#[test]
fn man_pages_for_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_livetrace(["generate-man".as_ref(), dir.path().as_os_str()], SLACK);
    run.assert_success();
    let man = require_tool("man", "apt-get install man-db");
    for (page, option) in [
        ("livetrace.1", "--verbose"),
        ("livetrace-profile.1", "--frequency"),
        ("livetrace-offcpu.1", "--wakers"),
        ("livetrace-uprobe-hist.1", "--slow"),
        ("livetrace-diff.1", "--output"),
        ("livetrace-check.1", "--json"),
        ("livetrace-completions.1", "bash"),
    ] {
        let output = Command::new(&man)
            .arg("-l")
            .arg(dir.path().join(page))
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{page}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.stderr.is_empty(),
            "{page}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(text.contains(option), "{page} has no {option}:\n{text}");
    }
}

/// `--version` names the commit, how the binary is linked and the BPF programs inside; `-V` is
/// the one line.
#[test]
fn version_says_what_was_built() {
    let long = run_livetrace(["--version"], SLACK);
    long.assert_success();
    let short = run_livetrace(["-V"], SLACK);
    assert_eq!(short.stdout.lines().count(), 1, "{}", short.stdout);
    assert_eq!(long.stdout.lines().next(), short.stdout.lines().next());
    let commit = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output()
        .unwrap();
    let commit = String::from_utf8_lossy(&commit.stdout).trim().to_owned();
    assert!(
        short.stdout.contains(&commit),
        "{} vs {commit}",
        short.stdout
    );
    for program in ["perf_event", "tp_btf/sched_switch", "uprobe", "uretprobe"] {
        assert!(long.stdout.contains(program), "{}", long.stdout);
    }
    assert!(long.stdout.contains("dynamic (glibc)"), "{}", long.stdout);
}
