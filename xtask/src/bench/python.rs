//! Python frames: what profiling a CPython without `-X perf` costs the process, livetrace (which
//! reads the frames in the kernel at each sample) against py-spy (which reads them from outside,
//! by default pausing the process to get a consistent stack, or with `--nonblocking`).
//!
//! `xtask/bench/pyserve.py` serves requests for a fixed time on pyenv's CPython 3.12 and prints
//! how many it served. It runs with no profiler, and under each profiler at 99 and 999 Hz, in
//! the same run and interleaved round by round. Reported: the throughput kept (served / served
//! without a profiler, medians), the profiler's own CPU time and peak RSS, the share of samples
//! that name `parse_subtitle_track`, and livetrace's in-kernel time per sample
//! (`kernel.bpf_stats_enabled`).

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use super::{
    median, mib,
    process::{Proc, Sysctl, bpf_prog_stats},
};
use crate::workspace_root;

/// How long each workload run serves requests; a profiler watches all but its first 0.5 s.
const SECONDS: f64 = 5.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profiler {
    None,
    Livetrace,
    PySpy,
    PySpyNonblocking,
}

impl Profiler {
    const ALL: [Profiler; 4] = [
        Profiler::None,
        Profiler::Livetrace,
        Profiler::PySpy,
        Profiler::PySpyNonblocking,
    ];

    fn label(self) -> &'static str {
        match self {
            Profiler::None => "no profiler",
            Profiler::Livetrace => "livetrace profile",
            Profiler::PySpy => "py-spy record",
            Profiler::PySpyNonblocking => "py-spy record --nonblocking",
        }
    }
}

/// One run under one profiler.
struct Run {
    served: f64,
    cpu: Option<Duration>,
    max_rss: Option<u64>,
    named: Option<f64>,
    bpf_ns: Option<f64>,
}

fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
}

/// Runs the comparison; returns a markdown table, or a note when CPython 3.12 or py-spy is
/// missing.
pub fn run(livetrace: &Path, runs: usize) -> anyhow::Result<String> {
    let python = home().join(".pyenv/versions/3.12.1/bin/python3.12");
    let cache =
        std::env::var_os("XDG_CACHE_HOME").map_or_else(|| home().join(".cache"), PathBuf::from);
    let py_spy = cache.join("livetrace/py-spy-0.4.3/bin/py-spy");
    if !python.is_file() || !py_spy.is_file() {
        return Ok(format!(
            "Not measured: {} or {} is missing (`cargo xtask setup` installs py-spy).\n",
            python.display(),
            py_spy.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("livetrace-bench-python-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let stats = Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    let mut table = String::from(
        "| profiler | Hz | throughput kept | profiler CPU | profiler peak RSS | samples naming \
         parse_subtitle_track | BPF ns/sample |\n|---|---|---|---|---|---|---|\n",
    );
    for hz in [99u32, 999] {
        let mut results: Vec<Vec<Run>> = Profiler::ALL.iter().map(|_| Vec::new()).collect();
        for _ in 0..runs {
            for (i, &profiler) in Profiler::ALL.iter().enumerate() {
                let tools = Tools {
                    python: &python,
                    py_spy: &py_spy,
                    livetrace,
                    dir: &dir,
                };
                results[i].push(one_run(&tools, profiler, hz)?);
            }
        }
        let baseline =
            median(&results[0].iter().map(|r| r.served).collect::<Vec<_>>()).unwrap_or(f64::NAN);
        for (profiler, runs) in Profiler::ALL.iter().zip(&results) {
            let med = |f: &dyn Fn(&Run) -> Option<f64>| {
                median(&runs.iter().filter_map(f).collect::<Vec<_>>())
            };
            let served = med(&|r| Some(r.served)).unwrap_or(f64::NAN);
            table += &format!(
                "| {} | {hz} | {:.1}% | {} | {} | {} | {} |\n",
                profiler.label(),
                100.0 * served / baseline,
                med(&|r| r.cpu.map(|c| c.as_secs_f64()))
                    .map_or("-".into(), |s| format!("{s:.2} s")),
                med(&|r| r.max_rss.map(|b| b as f64)).map_or("-".into(), |b| mib(b as u64)),
                med(&|r| r.named).map_or("-".into(), |s| format!("{:.0}%", s * 100.0)),
                med(&|r| r.bpf_ns).map_or("-".into(), |ns| format!("{ns:.0}")),
            );
        }
    }
    drop(stats);
    let _ = fs::remove_dir_all(&dir);
    Ok(table)
}

struct Tools<'a> {
    python: &'a Path,
    py_spy: &'a Path,
    livetrace: &'a Path,
    dir: &'a Path,
}

fn one_run(tools: &Tools, profiler: Profiler, hz: u32) -> anyhow::Result<Run> {
    let script = workspace_root().join("xtask/bench/pyserve.py");
    let mut workload = Proc::spawn(
        "pyserve.py",
        Command::new(tools.python)
            .arg(&script)
            .arg(SECONDS.to_string())
            .stdout(Stdio::piped()),
    )?;
    let pid = workload.pid().to_string();
    std::thread::sleep(Duration::from_millis(500));
    let watch = format!("{:.1}", SECONDS - 1.0);
    let out = tools.dir.join("profile.folded");
    let _ = fs::remove_file(&out);
    let mut tracer = match profiler {
        Profiler::None => None,
        Profiler::Livetrace => Some(Proc::spawn(
            "livetrace profile",
            Command::new(tools.livetrace)
                .args([
                    "profile",
                    "-U",
                    "-F",
                    &hz.to_string(),
                    "-p",
                    &pid,
                    "-d",
                    &watch,
                    "-o",
                ])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?),
        Profiler::PySpy | Profiler::PySpyNonblocking => {
            let mut command = Command::new(tools.py_spy);
            command
                .args(["record", "--format", "raw", "--rate", &hz.to_string()])
                .args([
                    "--pid",
                    &pid,
                    "--duration",
                    &format!("{}", SECONDS as u64 - 1),
                    "-o",
                ])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if profiler == Profiler::PySpyNonblocking {
                command.arg("--nonblocking");
            }
            Some(Proc::spawn("py-spy record", &mut command)?)
        }
    };
    // livetrace's program's run time, read near the end of its capture (gone afterwards).
    let bpf_ns = if profiler == Profiler::Livetrace {
        std::thread::sleep(Duration::from_secs_f64(SECONDS - 2.0));
        tracer
            .as_ref()
            .and_then(|t| bpf_prog_stats(t.pid()).ok())
            .map(|s| s.run_time_ns as f64 / s.run_cnt.max(1) as f64)
    } else {
        None
    };
    let limit = Duration::from_secs_f64(SECONDS + 30.0);
    let exit = tracer.as_mut().map(|t| t.wait_success(limit)).transpose()?;
    let mut text = String::new();
    workload
        .child
        .stdout
        .take()
        .context("the workload's stdout")?
        .read_to_string(&mut text)?;
    workload.wait_success(limit)?;
    let served: f64 = text.trim().parse().context("pyserve.py printed no count")?;
    let named = exit.and_then(|_| named_share(&out, profiler));
    Ok(Run {
        served,
        cpu: exit.map(|e| e.cpu),
        max_rss: exit.map(|e| e.max_rss),
        named,
        bpf_ns,
    })
}

/// The share of the samples in a folded file (livetrace's or py-spy's raw one) that name
/// parse_subtitle_track.
fn named_share(path: &Path, profiler: Profiler) -> Option<f64> {
    let text = fs::read_to_string(path).ok()?;
    let frame = if profiler == Profiler::Livetrace {
        "py::parse_subtitle_track"
    } else {
        "parse_subtitle_track ("
    };
    let (mut total, mut named) = (0u64, 0u64);
    for line in text.lines() {
        let (stack, count) = line.rsplit_once(' ')?;
        let count: u64 = count.parse().ok()?;
        total += count;
        if stack.contains(frame) {
            named += count;
        }
    }
    (total > 0).then(|| named as f64 / total as f64)
}
