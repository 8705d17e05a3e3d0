//! Integration tests of `livetrace diff`: two real captures of the shift fixture, whose CPU
//! split is known on both sides, must show the change with the right sign and size, for the
//! moved leaf and for its callers; and bad inputs fail naming the file.

mod common;

use std::{fs, path::Path, time::Duration};

use common::{
    Livetrace, Profile, assert_well_formed_svg, cpu_exclusive, path_arg, require_root,
    run_livetrace, start_fixture,
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

/// hot_60 drops from 60% to 20% and 40% moves under a new caller d: the table shows -40 points
/// for hot_60 and for its caller c, +40 for d, nothing for b; the SVG's frames say the same;
/// and pprof and folded inputs of the same captures give the same table.
#[test]
fn diff_shows_a_moved_hot_function_in_leaves_and_callers() {
    require_root();
    // Two busy fixtures at once, one per CPU.
    let _cpus = cpu_exclusive();
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name);
    let secs = CAPTURE_SECS.to_string();
    let before_fixture = start_fixture("shift", &["15", "6", "3", "1", "0"]);
    let after_fixture = start_fixture("shift", &["15", "2", "3", "1", "4"]);
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
    drop((before_fixture, after_fixture));

    let svg = out("diff.svg");
    let table = diff(&out("before.pb.gz"), &out("after.folded"), &svg);
    let inclusive = table_section(&table, "inclusive");
    let self_rows = table_section(&table, "self");
    // A share's standard error is at most sqrt(0.25/n), a difference's sqrt(0.25/n1 + 0.25/n2):
    // 0.035 for 400 samples a side. Three of them, in points, and never below 10.
    let samples = |name: &str| Profile::read(&out(name)).total() as f64;
    let (n1, n2) = (samples("before.folded"), samples("after.folded"));
    assert!(
        n1.min(n2) >= 60.0,
        "only {n1} and {n2} samples: the fixtures hardly ran; is the machine overloaded?"
    );
    let tolerance = (300.0 * (0.25 / n1 + 0.25 / n2).sqrt()).max(10.0);
    for (what, value, expected) in [
        ("hot_60's self delta", delta_of(&self_rows, "hot_60"), -40.0),
        (
            "hot_60's inclusive delta",
            delta_of(&inclusive, "hot_60"),
            -40.0,
        ),
        ("c's inclusive delta", delta_of(&inclusive, "c"), -40.0),
        ("d's inclusive delta", delta_of(&inclusive, "d"), 40.0),
        (
            "hot_30's inclusive delta",
            delta_of(&inclusive, "hot_30"),
            40.0,
        ),
        ("b's inclusive delta", delta_of(&inclusive, "b"), 0.0),
    ] {
        assert!(
            (value - expected).abs() <= tolerance,
            "{what} is {value:+.1} points, expected {expected:+.1} ± {tolerance}\n{table}"
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
    for (name, expected) in [("c", -40.0), ("d", 40.0), ("b", 0.0)] {
        let value = frame_delta(name);
        assert!(
            (value - expected).abs() <= tolerance,
            "the SVG's {name} frame changes by {value:+.1} points, expected {expected:+.1}"
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
