//! Integration tests of `livetrace uprobe-hist`: the real binary, as root, against fixtures with
//! a known truth (tests/fixtures/latency.c and friends), checked against that truth.
//!
//! Timing truth. This VM is shared and often busy, which stretches busy-waits; so the fixture
//! measures each call itself from inside the function (CLOCK_MONOTONIC at its first and last
//! line, `LATENCY_TRUTH`), and livetrace's numbers are held to those measurements. A probed call
//! as livetrace sees it lasts from the end of the entry probe to the start of the return probe,
//! which contains the fixture's own measurement plus part of the probes' trap path: at least the
//! truth, and at most the truth plus `PROBE_SLACK`. Percentiles add the histogram's resolution
//! (1/32 of the value) and allow `OUTLIERS` calls whose probe path was preempted.

mod common;

use std::{fs, path::Path, process::Command, time::Duration};

use common::{
    Livetrace, build_fixture, cpu_exclusive, cpu_shared, fixture, path_arg, require_root,
    run_livetrace, start_fixture, wait_until,
};
use serde_json::Value;

/// Upper bound on a run's wall time beyond what the fixture takes: start-up, symbol lookup,
/// detaching (the kernel's uprobe unregistration can take a few hundred ms) and writing.
const SLACK: Duration = Duration::from_secs(10);

/// Most time the probes' trap path adds to a call on top of the fixture's own measurement. It is
/// a few microseconds here (measured: at most 4.5 us over 1000 calls); 50 us leaves room for an
/// interrupt or a short preemption inside the probe path.
const PROBE_SLACK_NS: f64 = 50_000.0;

/// Calls whose probe path may have been preempted for longer than `PROBE_SLACK` (a busy machine).
const OUTLIERS: usize = 3;

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{stdout}"))
}

fn truth(path: &Path) -> Vec<f64> {
    let mut values: Vec<f64> = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the fixture wrote no truth to {}: {e}", path.display()))
        .lines()
        .map(|l| l.parse().expect("a number of ns"))
        .collect();
    values.sort_by(f64::total_cmp);
    values
}

/// Checks each standard percentile against the sorted truth: the estimate lies between the
/// truth at that rank (less the resolution) and the truth a few ranks up (plus the probe slack
/// and the resolution), and its bounds are consistent with the truth.
fn assert_percentiles_match(report: &Value, truth: &[f64]) {
    let n = truth.len();
    for (p, label) in [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")] {
        let rank = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n);
        let exact = truth[rank - 1];
        let above = truth[(rank - 1 + OUTLIERS).min(n - 1)];
        let estimate = report["percentiles_ns"][label].as_f64().expect(label);
        let bounds = &report["percentile_bounds_ns"][label];
        let (low, high) = (bounds[0].as_f64().unwrap(), bounds[1].as_f64().unwrap());
        let resolution = |v: f64| v / 32.0 + 1.0;
        assert!(
            estimate >= exact - resolution(exact)
                && estimate <= above + PROBE_SLACK_NS + resolution(above),
            "{label} is {estimate} ns, the fixture measured {exact} ns (and {above} ns {OUTLIERS} \
             ranks up); report: {report:#}"
        );
        assert!(
            low <= above + PROBE_SLACK_NS && high > exact,
            "{label}'s bounds [{low}, {high}) do not fit the truth {exact} ns"
        );
        assert!(
            high - low <= resolution(low) + 1.0,
            "{label}'s bounds [{low}, {high}) are wider than the stated resolution"
        );
    }
}

/// Every loss counter is zero: each call was paired.
fn assert_nothing_lost(report: &Value) {
    let q = &report["data_quality"];
    for field in [
        "too_deep",
        "abandoned",
        "exited_inside",
        "still_open",
        "thread_map_full",
        "return_without_entry",
        "return_unmatched",
        "helper_failed",
        "slow_ring_full",
    ] {
        assert_eq!(q[field], 0, "{field} is not 0: {q:#}");
    }
}

/// 900 x 50 us, 90 x 500 us, 10 x 5 ms: exactly 1000 calls, percentiles within resolution.
#[test]
fn known_distribution_has_exact_count_and_percentiles() {
    require_root();
    let _cpus = cpu_exclusive();
    let dir = tempfile::tempdir().unwrap();
    let truth_path = dir.path().join("truth");
    let latency = fixture("latency");
    let run = Livetrace::start_with_env(
        [
            "uprobe-hist",
            "timed_work",
            "--json",
            "--",
            path_arg(&latency),
            "mix",
        ],
        &[("LATENCY_TRUTH", path_arg(&truth_path))],
    )
    .finish(SLACK);
    run.assert_success();
    let report = json(&run.stdout);
    let truth = truth(&truth_path);
    assert_eq!(truth.len(), 1000, "the fixture makes 1000 calls");
    // Command mode: the probes are attached before the command's first instruction, so every
    // call is seen.
    assert_eq!(report["count"], 1000, "{:#}", report["data_quality"]);
    assert_eq!(report["data_quality"]["entries"], 1000);
    assert_eq!(report["data_quality"]["returns"], 1000);
    assert_nothing_lost(&report);
    assert_percentiles_match(&report, &truth);
    // min and max are exact, so they too sit within the probe slack of the truth.
    let min = report["min_ns"].as_f64().unwrap();
    let max = report["max_ns"].as_f64().unwrap();
    assert!(
        min >= truth[0] && min <= truth[OUTLIERS] + PROBE_SLACK_NS,
        "min {min}"
    );
    assert!(
        max >= truth[999 - OUTLIERS] && max <= truth[999] + PROBE_SLACK_NS,
        "max {max}"
    );
    let mean = report["mean_ns"].as_f64().unwrap();
    let true_mean = truth.iter().sum::<f64>() / 1000.0;
    assert!(
        mean >= true_mean && mean <= true_mean + PROBE_SLACK_NS,
        "mean {mean} vs {true_mean}"
    );
    // The documented schema: buckets are the non-empty ones, with bounds, adding up to count.
    let buckets = report["buckets"].as_array().expect("buckets");
    let mut total = 0;
    for bucket in buckets {
        let (low, high) = (
            bucket["low_ns"].as_u64().unwrap(),
            bucket["high_ns"].as_u64().unwrap(),
        );
        assert!(
            low < high && bucket["count"].as_u64().unwrap() > 0,
            "{bucket}"
        );
        total += bucket["count"].as_u64().unwrap();
    }
    assert_eq!(total, 1000);
    for key in [
        "function",
        "sites",
        "duration_s",
        "percentiles_ns",
        "percentile_bounds_ns",
    ] {
        assert!(report.get(key).is_some(), "no {key} in {report:#}");
    }
    assert_eq!(report["function"], "timed_work");
    assert!(report["percentiles_ns"]["max"].is_u64());
}

/// Recursion 5 deep (1 ms per level): each call is paired with its own return, none lost.
#[test]
fn recursion_pairs_each_call_with_its_own_return() {
    require_root();
    let _cpus = cpu_exclusive();
    let dir = tempfile::tempdir().unwrap();
    let truth_path = dir.path().join("truth");
    let latency = fixture("latency");
    let run = Livetrace::start_with_env(
        [
            "uprobe-hist",
            "recurse",
            "--json",
            "--",
            path_arg(&latency),
            "recurse",
            "20",
        ],
        &[("LATENCY_TRUTH", path_arg(&truth_path))],
    )
    .finish(SLACK);
    run.assert_success();
    let report = json(&run.stdout);
    let truth = truth(&truth_path);
    assert_eq!(truth.len(), 100);
    assert_eq!(report["count"], 100, "{:#}", report["data_quality"]);
    assert_nothing_lost(&report);
    // Each bucket, expanded into one entry per call and sorted, against the sorted truth: a
    // mispaired return (an inner return closing an outer call) would put a call in a bucket far
    // from its own duration (1 ms steps here, buckets 3% wide).
    let mut measured = Vec::new();
    for bucket in report["buckets"].as_array().unwrap() {
        for _ in 0..bucket["count"].as_u64().unwrap() {
            measured.push((
                bucket["low_ns"].as_f64().unwrap(),
                bucket["high_ns"].as_f64().unwrap(),
            ));
        }
    }
    for (i, ((low, high), exact)) in measured.iter().zip(&truth).enumerate() {
        let above = truth[(i + OUTLIERS).min(truth.len() - 1)];
        assert!(
            *high > *exact && *low <= above + PROBE_SLACK_NS,
            "call {i} by duration: measured in [{low}, {high}), the fixture measured {exact} ns"
        );
    }
    assert_percentiles_match(&report, &truth);
}

/// A library function is found by path and by name with -p, and through DT_NEEDED with a command.
#[test]
fn library_function_by_path_by_name_and_through_the_command() {
    require_root();
    let _cpus = cpu_shared();
    let lib = build_fixture(
        "libhist.so",
        &[
            "cc",
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-shared",
            "-fPIC",
            "@histlib/libhist.c",
        ],
    );
    let uselib = build_fixture(
        "uselib",
        &[
            "cc",
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "@histlib/uselib.c",
            "-L{dir}",
            "-lhist",
            "-Wl,-rpath,{dir}",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let lib_target = format!("{}:hist_work", path_arg(&lib));
    for (i, target) in [
        lib_target.as_str(),
        "libhist:hist_work",
        "libhist.so:hist_work",
    ]
    .into_iter()
    .enumerate()
    {
        // The fixture waits for a file, so the calls start only once the probes are in place.
        let go = dir.path().join(format!("go{i}"));
        let fixture = start_fixture("uselib", &["wait", path_arg(&go), "150"]);
        let pid = fixture.pid().to_string();
        // Only once the dynamic loader has mapped the library can a name find it in the process
        // (on a loaded machine that takes a while after the fork).
        let maps = format!("/proc/{pid}/maps");
        wait_until("the fixture has mapped libhist.so", SLACK, || {
            fs::read_to_string(&maps).is_ok_and(|m| m.contains("libhist.so"))
        });
        let mut run = Livetrace::start(["uprobe-hist", target, "-p", &pid, "--json"]);
        run.wait_for_stderr("livetrace: timing", Duration::from_secs(10));
        fs::write(&go, "").unwrap();
        // The capture ends by itself when the fixture exits.
        let run = run.finish(SLACK);
        run.assert_success();
        let report = json(&run.stdout);
        assert_eq!(
            report["count"], 150,
            "{target}: {:#}",
            report["data_quality"]
        );
        assert_nothing_lost(&report);
        let site = report["sites"][0].as_str().unwrap();
        assert!(site.ends_with(&format!("libhist.so (pid {pid})")), "{site}");
        // 200 us busy-waits.
        let p50 = report["percentiles_ns"]["p50"].as_f64().unwrap();
        assert!(p50 >= 200_000.0 * (1.0 - 1.0 / 32.0), "{target}: p50 {p50}");
    }

    // No TARGET, with a command: the executable does not define hist_work, the library it links
    // does.
    let run = run_livetrace(
        [
            "uprobe-hist",
            "hist_work",
            "--json",
            "--",
            path_arg(&uselib),
            "count",
            "40",
        ],
        SLACK,
    );
    run.assert_success();
    let report = json(&run.stdout);
    assert_eq!(report["count"], 40, "{:#}", report["data_quality"]);
    assert!(report["sites"][0].as_str().unwrap().contains("libhist.so"));
}

/// `-- COMMAND` follows the processes the command forks (a pre-fork server's workers): each
/// child is probed as its fork is seen, so the calls of the parent and of all four children are
/// counted, exactly (the children start working 300 ms after their fork), and the footer says
/// how many children were followed.
#[test]
fn command_children_are_followed() {
    require_root();
    let _cpus = cpu_shared();
    let latency = fixture("latency");
    let run = run_livetrace(
        [
            "uprobe-hist",
            "timed_work",
            "--json",
            "--",
            path_arg(&latency),
            "children",
            "4",
        ],
        SLACK,
    );
    run.assert_success();
    let report = json(&run.stdout);
    assert_eq!(
        report["count"], 100,
        "20 calls in the parent and in each of 4 children\n{:#}\n{}",
        report["data_quality"], run.stderr
    );
    run.assert_stderr_has("followed 4 child processes");
}

/// A Rust function is attached by its demangled path (the `::h<hash>` suffix left out).
#[test]
fn rust_function_by_demangled_path() {
    require_root();
    let _cpus = cpu_shared();
    let program = build_fixture(
        "hist_target",
        &[
            "rustc",
            "-O",
            "-C",
            "force-frame-pointers=yes",
            "@rust/hist_target.rs",
        ],
    );
    let run = run_livetrace(
        [
            "uprobe-hist",
            "hist_target::codec::decode_frame",
            "--json",
            "--",
            path_arg(&program),
            "200",
        ],
        SLACK,
    );
    run.assert_success();
    let report = json(&run.stdout);
    assert_eq!(report["function"], "hist_target::codec::decode_frame");
    assert_eq!(report["count"], 200, "{:#}", report["data_quality"]);
    let p50 = report["percentiles_ns"]["p50"].as_f64().unwrap();
    assert!(p50 >= 100_000.0 * (1.0 - 1.0 / 32.0), "p50 {p50}");
}

/// A misspelt function is an error (status 1, nothing loaded) that names the closest real ones.
#[test]
fn missing_symbol_lists_close_names() {
    require_root();
    let run = run_livetrace(
        [
            "uprobe-hist",
            "timed_wrok",
            "--",
            path_arg(&fixture("latency")),
            "mix",
        ],
        SLACK,
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    run.assert_stderr_has("'timed_wrok' not found");
    run.assert_stderr_has("closest names: timed_work");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

/// A stripped binary: the error says it is stripped and what to do about it.
#[test]
fn stripped_binary_is_named_as_stripped() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("latency-stripped");
    fs::copy(fixture("latency"), &stripped).unwrap();
    let status = Command::new("strip")
        .arg(&stripped)
        .status()
        .expect("run strip");
    assert!(status.success());
    let run = run_livetrace(
        [
            "uprobe-hist",
            "timed_work",
            "--",
            path_arg(&stripped),
            "mix",
        ],
        SLACK,
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("is stripped (it has no .symtab)")
            && run.stderr.contains("debug symbols"),
        "{}",
        run.stderr
    );
}

/// Two static `helper`s: the error lists both with addresses, and NAME@ADDR picks one.
#[test]
fn ambiguous_symbol_lists_candidates_and_an_address_picks_one() {
    require_root();
    let _cpus = cpu_shared();
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
    let run = run_livetrace(
        ["uprobe-hist", "helper", "--", path_arg(&program), "5"],
        SLACK,
    );
    // An ambiguous name is a command-line mistake: the command line must say which.
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    run.assert_stderr_has("'helper' matches 2 functions");
    let addresses: Vec<&str> = run
        .stderr
        .lines()
        .filter_map(|line| line.trim().strip_prefix("helper  at "))
        .map(|rest| rest.split(',').next().unwrap())
        .collect();
    assert_eq!(addresses.len(), 2, "{}", run.stderr);
    assert!(run.stderr.contains("helper@0x"), "{}", run.stderr);

    // The 300 us helper is in b.c, linked after a.c: the higher address.
    let pick = format!("helper@{}", addresses[1]);
    let run = run_livetrace(
        [
            "uprobe-hist",
            &pick,
            "--json",
            "--",
            path_arg(&program),
            "20",
        ],
        SLACK,
    );
    run.assert_success();
    let report = json(&run.stdout);
    assert_eq!(report["count"], 20, "{:#}", report["data_quality"]);
    let p50 = report["percentiles_ns"]["p50"].as_f64().unwrap();
    assert!(p50 >= 290_000.0, "picked the 300 us helper, p50 {p50}");
}

/// pthread_exit inside the function is counted as exited inside, and nothing stays in the map.
#[test]
fn thread_exiting_inside_the_function_is_counted() {
    require_root();
    let _cpus = cpu_shared();
    let latency = fixture("latency");
    let run = run_livetrace(
        [
            "uprobe-hist",
            "exit_inside",
            "--json",
            "--",
            path_arg(&latency),
            "threads",
            "4",
        ],
        SLACK,
    );
    run.assert_success();
    let report = json(&run.stdout);
    let q = &report["data_quality"];
    assert_eq!(q["entries"], 4, "{q:#}");
    assert_eq!(q["exited_inside"], 4, "{q:#}");
    assert_eq!(report["count"], 0);
    // Freed at exit: nothing is left open in the thread map.
    assert_eq!(q["still_open"], 0, "{q:#}");
    assert!(
        run.stderr
            .contains("4 calls still in the function when their thread exited"),
        "{}",
        run.stderr
    );

    let run = run_livetrace(
        [
            "uprobe-hist",
            "timed_work",
            "--json",
            "--",
            path_arg(&latency),
            "threads",
            "4",
        ],
        SLACK,
    );
    run.assert_success();
    let report = json(&run.stdout);
    assert_eq!(report["count"], 40, "{:#}", report["data_quality"]);
    assert_nothing_lost(&report);
}

/// Recursion 100 deep: the 64 outermost calls are measured, the 36 deeper counted and explained.
#[test]
fn recursion_past_64_is_counted_and_explained() {
    require_root();
    let _cpus = cpu_shared();
    let run = run_livetrace(
        [
            "uprobe-hist",
            "deep",
            "--json",
            "--",
            path_arg(&fixture("latency")),
            "deep",
            "3",
            "100",
        ],
        SLACK,
    );
    run.assert_success();
    let report = json(&run.stdout);
    let q = &report["data_quality"];
    assert_eq!(q["entries"], 300, "{q:#}");
    assert_eq!(report["count"], 3 * 64, "{q:#}");
    assert_eq!(q["too_deep"], 3 * 36, "{q:#}");
    for field in ["abandoned", "return_unmatched", "still_open"] {
        assert_eq!(q[field], 0, "{field}: {q:#}");
    }
    assert!(
        run.stderr.contains("nested more than 64 deep") && run.stderr.contains("hint:"),
        "{}",
        run.stderr
    );
}

/// --slow lists the slow calls with their real caller, and -o writes their stacks.
#[test]
fn slow_calls_are_listed_with_their_caller() {
    require_root();
    let _cpus = cpu_shared();
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("slow.folded");
    let svg = dir.path().join("slow.svg");
    let run = run_livetrace(
        [
            "uprobe-hist",
            "timed_work",
            "--slow",
            "1ms",
            "-o",
            path_arg(&folded),
            "-o",
            path_arg(&svg),
            "--",
            path_arg(&fixture("latency")),
            "callers",
        ],
        SLACK,
    );
    run.assert_success();
    // 10 calls of 3 ms from slow_caller, 90 of 20 us from fast_caller. A busy machine can
    // stretch a fast call past 1 ms too; it is then listed, under its own caller. So: every
    // listed call names one of the two real callers, and slow_caller's calls are all there.
    let slowest: Vec<&str> = run
        .stdout
        .lines()
        .filter(|line| line.contains("called from"))
        .collect();
    assert_eq!(slowest.len(), 10, "{}", run.stdout);
    for line in &slowest {
        assert!(
            line.contains("called from slow_caller <- run <- main")
                || line.contains("called from fast_caller <- run <- main"),
            "a slow call without its real caller: {line}\n{}",
            run.stdout
        );
    }
    assert!(
        run.stdout.contains("called from slow_caller"),
        "{}",
        run.stdout
    );
    let text = fs::read_to_string(&folded).unwrap();
    let slow_weight: u64 = text
        .lines()
        .filter(|l| l.contains("main;run;slow_caller;timed_work "))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    // Ten calls of at least 3 ms each: at least 30 ms, in microseconds (less rounding).
    assert!(
        slow_weight >= 29_900,
        "slow_caller's weight {slow_weight} us\n{text}"
    );
    common::assert_well_formed_svg(&fs::read_to_string(&svg).unwrap());
}

/// A Go program (recognised by its sections) is refused with the reason, before anything runs.
#[test]
fn go_binary_is_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload");
    fs::write(&payload, [0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8]).unwrap();
    let go_like = dir.path().join("go-like");
    let status = Command::new("objcopy")
        .arg(format!("--add-section=.gopclntab={}", path_arg(&payload)))
        .arg(fixture("latency"))
        .arg(&go_like)
        .status()
        .expect("run objcopy");
    assert!(status.success());
    let run = run_livetrace(
        ["uprobe-hist", "timed_work", "--", path_arg(&go_like), "mix"],
        SLACK,
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("is a Go program (it has a .gopclntab section)")
            && run.stderr.contains("uretprobes"),
        "{}",
        run.stderr
    );
}

/// An absent TARGET file lists every path tried; a usage error exits with status 2.
#[test]
fn absent_file_lists_paths_and_usage_errors_exit_2() {
    require_root();
    let run = run_livetrace(
        [
            "uprobe-hist",
            "/nonexistent/libfoo.so:foo",
            "--",
            path_arg(&fixture("latency")),
            "mix",
        ],
        SLACK,
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    run.assert_stderr_has("tried:\n  /nonexistent/libfoo.so");
    let run = run_livetrace(
        [
            "uprobe-hist",
            "timed_work",
            "-o",
            "x.svg",
            "--",
            path_arg(&fixture("latency")),
            "mix",
        ],
        SLACK,
    );
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--slow"), "{}", run.stderr);
}

/// -i prints each interval then the total, and Ctrl-C still writes every output.
#[test]
fn intervals_then_total_and_ctrl_c_still_prints() {
    require_root();
    let _cpus = cpu_shared();
    let fixture = start_fixture("latency", &["loop", "20"]);
    let pid = fixture.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("hist.txt");
    let mut run = Livetrace::start([
        "uprobe-hist",
        "timed_work",
        "-p",
        &pid,
        "-i",
        "1",
        "-o",
        path_arg(&text),
    ]);
    run.wait_for_stderr("livetrace: timing", Duration::from_secs(10));
    run.wait_for("it has printed two intervals", SLACK, |stdout, _| {
        stdout.matches("] timed_work").count() >= 2
    });
    run.signal(libc::SIGINT);
    let run = run.finish(SLACK);
    run.assert_success();
    // Two, and perhaps a third if its second ended while the signal was on its way.
    let intervals = run.stdout.matches("] timed_work").count();
    assert!(
        (2..=3).contains(&intervals),
        "{intervals} intervals at -i 1 when stopped after the second:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("total over the whole capture:"),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("SIGINT"), "{}", run.stderr);
    let written = fs::read_to_string(&text).unwrap();
    assert!(
        written.contains("p99.9") && written.contains("data quality:"),
        "{written}"
    );
}

/// The probes' own share of each call is measured for the probed function's first instruction,
/// and matches what they add to a function of known length (20 us): little behind a nop, which
/// the kernel emulates; a trap more behind a lea, which it single-steps. Where that share is
/// large, the report says the times are inflated.
#[test]
fn the_probes_own_share_of_each_call_is_measured() {
    require_root();
    let _cpus = cpu_shared();
    let program = fixture("first_instruction");
    for function in ["spin_behind_nop", "spin_behind_lea"] {
        let run = run_livetrace(
            [
                "uprobe-hist",
                function,
                "--json",
                "--",
                path_arg(&program),
                "1000",
            ],
            SLACK,
        );
        run.assert_success();
        let report = json(&run.stdout);
        let p50 = report["percentiles_ns"]["p50"].as_f64().unwrap();
        let overhead = report["data_quality"]["probe_overhead_ns"]
            .as_f64()
            .unwrap_or_else(|| panic!("{function}: no probe_overhead_ns: {report:#}"));
        // What the probes added to a 20 us spin, as this run measured it.
        let added = p50 - 20_000.0;
        assert!(
            (overhead - added).abs() <= 0.5 * added.abs() + 1_000.0,
            "{function}: the probes' share was measured at {overhead} ns, but they added {added} \
             ns to a 20 us function"
        );
        let inflated = run.stderr.contains("times are inflated");
        assert_eq!(
            inflated,
            overhead >= 0.1 * p50,
            "{function}: overhead {overhead} ns of p50 {p50} ns:\n{}",
            run.stderr
        );
    }
}

/// A command whose calls are made by children that each live about a millisecond: every call
/// is counted (the probe on the command's executable covers its children from birth, filtered
/// to them in the kernel), and nothing is reported as not probed. Per-child probes came too
/// late: 0 calls, and a "could not be probed" line for each child.
#[test]
fn calls_of_short_lived_children_are_all_counted() {
    require_root();
    let _cpus = cpu_shared();
    let brood = fixture("brood");
    let run = run_livetrace(
        [
            "uprobe-hist",
            "timed_call",
            "--json",
            "--",
            path_arg(&brood),
            "call",
            "50",
        ],
        SLACK,
    );
    run.assert_success();
    let report = json(&run.stdout);
    assert_eq!(report["count"], 500, "{:#}", report["data_quality"]);
    assert!(
        !run.stderr.contains("could not be probed"),
        "{}",
        run.stderr
    );
}
