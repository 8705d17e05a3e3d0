//! Messages that contradicted themselves (issue 14): help examples that were refused, advice to
//! use a flag the tool lacks or a value it already has, clap's stock wording where the user
//! needs livetrace's, and mistakes that passed without a word. Each failed before it was fixed.

mod common;

use std::{fs, process::Command, time::Duration};

use common::*;

const SLACK: Duration = Duration::from_secs(15);

/// Runs `livetrace ARGS` and returns the run; no capture is expected to start.
fn livetrace(args: &[&str]) -> Finished {
    run_livetrace(args, SLACK)
}

/// The help's `--stack-copy-size` example is a value the flag accepts (it was 32k, refused).
#[test]
fn help_examples_use_values_the_flags_accept() {
    let help = livetrace(&["profile", "--help"]).stdout;
    let sizes: Vec<&str> = help
        .split("--stack-copy-size ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|value| value.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect();
    assert!(!sizes.is_empty(), "no --stack-copy-size example:\n{help}");
    let pid = unused_pid().to_string();
    for size in sizes {
        let run = livetrace(&["profile", "-p", &pid, "--stack-copy-size", size]);
        assert_ne!(run.status.code(), Some(2), "{size}: {}", run.stderr);
    }
}

/// Every -o help lists every format its tool writes.
#[test]
fn output_help_lists_every_format() {
    for tool in ["profile", "offcpu"] {
        let help = livetrace(&[tool, "--help"]).stdout;
        for ext in [".svg", ".folded", ".pb.gz", ".speedscope.json", ".json"] {
            assert!(help.contains(ext), "{tool} --help lacks {ext}:\n{help}");
        }
    }
    let help = livetrace(&["uprobe-hist", "--help"]).stdout;
    for ext in [
        ".txt",
        ".json",
        ".svg",
        ".folded",
        ".pb.gz",
        ".speedscope.json",
    ] {
        assert!(
            help.contains(ext),
            "uprobe-hist --help lacks {ext}:\n{help}"
        );
    }
}

/// `-F 0` and negative durations get livetrace's words, not clap's range or its tip to write
/// `-- -1` (which would run a command named -1).
#[test]
fn bad_numbers_are_explained() {
    let zero = livetrace(&["profile", "-F", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{}", zero.stderr);
    assert!(
        zero.stderr.contains("1 or more") && !zero.stderr.contains("18446744073709551615"),
        "{}",
        zero.stderr
    );
    for args in [["profile", "-d", "-1"], ["offcpu", "--min-block", "-5ms"]] {
        let negative = livetrace(&args);
        assert_eq!(negative.status.code(), Some(2), "{}", negative.stderr);
        assert!(
            negative.stderr.contains("negative") && !negative.stderr.contains("-- -1"),
            "{args:?}: {}",
            negative.stderr
        );
    }
}

/// A zombie is named as one (it used to be "no process exists").
#[test]
fn a_zombie_is_named_as_one() {
    require_root();
    // A child that exits and is not reaped until the guard drops.
    let mut zombie = Command::new("true").spawn().unwrap();
    let pid = zombie.id();
    wait_until("the child is a zombie", SLACK, || {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    });
    let run = livetrace(&["profile", "-p", &pid.to_string(), "-d", "1"]);
    let _ = zombie.wait();
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("zombie"), "{}", run.stderr);
}

/// uprobe-hist has no -t: a thread id given as -p is answered with the process's -p.
#[test]
fn uprobe_hist_advice_names_only_its_own_flags() {
    require_root();
    let _cpus = cpu_shared();
    let fixture = start_fixture("offcpu", &["20"]);
    wait_for_offcpu_fixture(fixture.pid());
    let tid = thread_named(fixture.pid(), "napper").unwrap();
    let run = livetrace(&["uprobe-hist", "take_nap", "-p", &tid.to_string()]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("-p {}", fixture.pid())) && !run.stderr.contains("-t "),
        "{}",
        run.stderr
    );
}

/// A variable is not "not found": uprobe-hist says it is data, not a function.
#[test]
fn a_variable_is_named_as_one() {
    require_root();
    let latency = fixture("latency");
    let run = livetrace(&[
        "uprobe-hist",
        "truth_count",
        "--",
        path_arg(&latency),
        "mix",
    ]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("is a variable"), "{}", run.stderr);
}

/// `SYMBOL@0xWRONG` says the address is wrong and lists the right ones, instead of repeating
/// that the name is ambiguous.
#[test]
fn a_wrong_address_is_named_as_such() {
    require_root();
    let program = build_fixture(
        "ambiguous",
        &[
            "cc",
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "@ambiguous/a.c",
            "@ambiguous/b.c",
        ],
    );
    let run = livetrace(&[
        "uprobe-hist",
        "helper@0x12345",
        "--",
        path_arg(&program),
        "5",
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("starts at 0x12345") && !run.stderr.contains("matches 2 functions"),
        "{}",
        run.stderr
    );
}

/// With --wakers, which walks frame pointers only, the footer does not advise --unwind dwarf.
#[test]
fn wakers_footer_does_not_advise_what_wakers_refuses() {
    require_root();
    let _cpus = cpu_shared();
    let fixture = start_fixture("offcpu", &["20"]);
    wait_for_offcpu_fixture(fixture.pid());
    let pid = fixture.pid().to_string();
    let (_, run) = run_folded(&["offcpu", "-p", &pid, "-d", "1", "--wakers"], SLACK);
    // The advice: the footer's line on how stacks were walked, and its hints.
    let advice = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("  user stacks:") || l.starts_with("  hint:"));
    for line in advice {
        assert!(!line.contains("--unwind dwarf"), "{line}\n{}", run.stderr);
    }
}

/// diff refuses an off-CPU capture against an on-CPU one, also as folded stacks (which do not
/// say their unit); its help no longer promises "just the table" (an SVG is always written).
#[test]
fn diff_refuses_off_cpu_against_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let on_cpu = dir.path().join("on.folded");
    let off_cpu = dir.path().join("off.folded");
    fs::write(&on_cpu, "app;main;work 40\napp;main;parse 10\n").unwrap();
    fs::write(
        &off_cpu,
        "app;main;read;entry_SYSCALL_64_[k];__schedule_[k] 900000\n\
         app;main;sleep;do_nanosleep_[k];__schedule_[k] 100000\n",
    )
    .unwrap();
    let svg = dir.path().join("d.svg");
    let run = livetrace(&[
        "diff",
        path_arg(&on_cpu),
        path_arg(&off_cpu),
        "-o",
        path_arg(&svg),
    ]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("off-CPU"), "{}", run.stderr);
    assert!(!svg.exists());
    let help = livetrace(&["diff", "--help"]).stdout;
    assert!(!help.contains("just the table"), "{help}");
}
