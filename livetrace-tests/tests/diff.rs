//! Integration tests of `livetrace diff`: two real captures of the shift fixture, whose CPU
//! split is known on both sides (it measures it itself), must show the change with the right sign
//! and size, for the moved leaf and for its callers; and bad inputs fail naming the file.

mod common;

use std::{fs, path::Path, time::Duration};

use common::{
    Livetrace, MeasuredFixture, Profile, Truth, assert_well_formed_svg, cpu_exclusive, path_arg,
    require_root, run_livetrace,
};

const SLACK: Duration = Duration::from_secs(8);
const CAPTURE_SECS: u64 = 4;

/// Rows of one section of the diff table: function -> (before, after, delta), in percent.
fn table_section(table: &str, section: &str) -> Vec<(String, f64, f64, f64)> {
    table
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(section))
        .skip(2)
        .take_while(|l| l.starts_with("    "))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let n = fields.len();
            let number = |s: &str| s.trim_end_matches('%').parse::<f64>().ok();
            Some((
                fields[..n - 3].join(" "),
                number(fields[n - 3])?,
                number(fields[n - 2])?,
                number(fields[n - 1])?,
            ))
        })
        .collect()
}

fn delta_of(rows: &[(String, f64, f64, f64)], name: &str) -> f64 {
    rows.iter().find(|r| r.0 == name).map_or(0.0, |r| r.3)
}

/// How far the change of a share from `p1` (`n1` samples) to `p2` (`n2` samples) may stray from
/// the fixtures' measured change, in points: the reasoning of `common::share_tolerance`, for a
/// difference of two independent shares.
fn delta_tolerance(p1: f64, n1: u64, p2: f64, n2: u64) -> f64 {
    assert!(
        n1.min(n2) >= 60,
        "only {n1} and {n2} samples: the fixtures hardly ran; is the machine overloaded?"
    );
    let variance = p1 * (1.0 - p1) / n1 as f64 + p2 * (1.0 - p2) / n2 as f64;
    100.0 * (4.0 * variance.sqrt() + 0.02)
}

/// Runs `livetrace diff` and returns its table, panicking with stderr on failure.
fn diff(before: &Path, after: &Path, svg: &Path) -> String {
    let run = run_livetrace(
        [
            "diff",
            path_arg(before),
            path_arg(after),
            "-o",
            path_arg(svg),
        ],
        SLACK,
    );
    run.assert_success();
    run.stdout
}

/// hot_60 drops from 60% to 20% and 40% moves under a new caller d: the table shows about -40
/// points for hot_60 and for its caller c, +40 for d, nothing for b (each exactly as the two
/// fixtures measured their own split); the SVG's frames say the same; and pprof and folded
/// inputs of the same captures give the same table.
#[test]
fn diff_shows_a_moved_hot_function_in_leaves_and_callers() {
    require_root();
    // Two busy fixtures at once, one per CPU.
    let _cpus = cpu_exclusive();
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name);
    let secs = CAPTURE_SECS.to_string();
    let mut before_fixture = MeasuredFixture::start("shift", &["15", "6", "3", "1", "0"]);
    let mut after_fixture = MeasuredFixture::start("shift", &["15", "2", "3", "1", "4"]);
    // Each fixture's truth over the window that was profiled.
    let (before_start, after_start) = (before_fixture.mark(), after_fixture.mark());
    let capture = |pid: u32, name: &str| {
        Livetrace::start([
            "profile".to_owned(),
            "-p".to_owned(),
            pid.to_string(),
            "-d".to_owned(),
            secs.clone(),
            "-o".to_owned(),
            path_arg(&out(&format!("{name}.folded"))).to_owned(),
            "-o".to_owned(),
            path_arg(&out(&format!("{name}.pb.gz"))).to_owned(),
        ])
    };
    let before_run = capture(before_fixture.pid(), "before");
    let after_run = capture(after_fixture.pid(), "after");
    let timeout = Duration::from_secs(CAPTURE_SECS) + SLACK;
    before_run.finish(timeout).assert_success();
    after_run.finish(timeout).assert_success();
    let before = before_start.until(&before_fixture.mark());
    let after = after_start.until(&after_fixture.mark());

    let svg = out("diff.svg");
    let table = diff(&out("before.pb.gz"), &out("after.folded"), &svg);
    let inclusive = table_section(&table, "inclusive");
    let self_rows = table_section(&table, "self");
    let samples = |name: &str| Profile::read(&out(name)).total();
    let (n1, n2) = (samples("before.folded"), samples("after.folded"));
    // The change of each frame's share, in points, as the fixtures measured it (hot_30 counts its
    // calls under c and under d; b holds c and d).
    let truth_delta = |share: &dyn Fn(&Truth) -> f64| {
        let (p1, p2) = (share(&before), share(&after));
        (100.0 * (p2 - p1), delta_tolerance(p1, n1, p2, n2))
    };
    let expected = |name: &str| match name {
        "b" => truth_delta(&|t: &Truth| t.share("c") + t.share("d")),
        _ => truth_delta(&|t: &Truth| t.share(name)),
    };
    for (what, value, frame) in [
        (
            "hot_60's self delta",
            delta_of(&self_rows, "hot_60"),
            "hot_60",
        ),
        (
            "hot_60's inclusive delta",
            delta_of(&inclusive, "hot_60"),
            "hot_60",
        ),
        ("c's inclusive delta", delta_of(&inclusive, "c"), "c"),
        ("d's inclusive delta", delta_of(&inclusive, "d"), "d"),
        (
            "hot_30's inclusive delta",
            delta_of(&inclusive, "hot_30"),
            "hot_30",
        ),
        ("b's inclusive delta", delta_of(&inclusive, "b"), "b"),
    ] {
        let (expected, tolerance) = expected(frame);
        assert!(
            (value - expected).abs() <= tolerance,
            "{what} is {value:+.1} points, the fixtures measured {expected:+.1} \
             (± {tolerance:.1})\n{table}"
        );
    }

    // The SVG: one frame per path, its tooltip with the inclusive change of that path.
    let text = fs::read_to_string(&svg).unwrap();
    assert_well_formed_svg(&text);
    let frame_delta = |name: &str| -> f64 {
        let start = format!("<title>{name} — inclusive ");
        let title = text
            .split(start.as_str())
            .nth(1)
            .unwrap_or_else(|| panic!("no frame {name} in the SVG"));
        let inside = title.split('(').nth(1).unwrap();
        inside.split(' ').next().unwrap().parse().unwrap()
    };
    for name in ["c", "d", "b"] {
        let value = frame_delta(name);
        let (expected, tolerance) = expected(name);
        assert!(
            (value - expected).abs() <= tolerance,
            "the SVG's {name} frame changes by {value:+.1} points, the fixtures measured \
             {expected:+.1} (± {tolerance:.1})"
        );
    }

    // The same captures read from the other format give the same numbers.
    let swapped = diff(
        &out("before.folded"),
        &out("after.pb.gz"),
        &out("diff2.svg"),
    );
    let numbers = |t: &str| {
        let mut rows = table_section(t, "inclusive");
        rows.extend(table_section(t, "self"));
        rows
    };
    assert_eq!(numbers(&table), numbers(&swapped), "{table}\n{swapped}");
}

/// A file that is neither folded stacks nor pprof fails with exit 1 and names the file and the
/// problem; a missing argument is a usage error (exit 2). Neither writes the SVG.
#[test]
fn bad_inputs_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.folded");
    fs::write(&good, "app;main;work 3\n").unwrap();
    let bad = dir.path().join("bad.folded");
    fs::write(&bad, "app;main;work 3\nthis is not folded\n").unwrap();
    let corrupt = dir.path().join("corrupt.pb.gz");
    fs::write(&corrupt, b"\x1f\x8b\x08\x00garbage").unwrap();
    let svg = dir.path().join("d.svg");

    for (input, problem) in [
        (&bad, "line 2"),
        (&corrupt, "gzip"),
        (&dir.path().join("missing.folded"), "cannot read"),
    ] {
        let run = run_livetrace(
            [
                "diff",
                path_arg(&good),
                path_arg(input),
                "-o",
                path_arg(&svg),
            ],
            SLACK,
        );
        assert_eq!(run.status.code(), Some(1), "stderr:\n{}", run.stderr);
        assert!(
            run.stderr.contains(path_arg(input)) && run.stderr.contains(problem),
            "stderr does not name {} and '{problem}':\n{}",
            input.display(),
            run.stderr
        );
        assert!(
            !svg.exists(),
            "the SVG was written although the diff failed"
        );
    }

    let run = run_livetrace(["diff", path_arg(&good)], SLACK);
    assert_eq!(run.status.code(), Some(2), "stderr:\n{}", run.stderr);
    let run = run_livetrace(
        ["diff", path_arg(&good), path_arg(&good), "-o", "d.png"],
        SLACK,
    );
    assert_eq!(run.status.code(), Some(2), "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains(".svg"), "{}", run.stderr);
}
