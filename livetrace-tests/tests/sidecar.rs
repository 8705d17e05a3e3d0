//! The static binary (`cargo xtask dist`) where an SRE puts it: a debugging sidecar, a root of
//! its own that holds nothing but livetrace, with /proc and /sys mounted and a /tmp. From
//! there it must profile a process of the host by PID with every frame named, and time a
//! function in a host binary: everything it knows about the target it learns through /proc.
//!
//! `cargo xtask test` builds the static binary and passes its path in `LIVETRACE_STATIC`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{
    Finished, Livetrace, MeasuredFixture, Profile, assert_share, cpu_shared, require_root,
    start_fixture,
};

const SLACK: Duration = Duration::from_secs(10);

/// The static binary, built by `cargo xtask test` (or `cargo xtask dist`).
fn static_binary() -> PathBuf {
    let path = std::env::var_os("LIVETRACE_STATIC")
        .map(PathBuf::from)
        .expect(
            "LIVETRACE_STATIC is not set: run the tests with `cargo xtask test`, which builds the \
         static binary first",
        );
    assert!(path.is_file(), "no static binary at {}", path.display());
    path
}

/// An otherwise empty root: the binary, and mount points for /proc and /sys. Its /tmp is a
/// plain directory, which the test reads the outputs from.
struct EmptyRoot {
    dir: tempfile::TempDir,
}

impl EmptyRoot {
    fn new() -> EmptyRoot {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        for sub in ["proc", "sys", "tmp"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::copy(static_binary(), dir.path().join("livetrace"))
            .expect("cannot copy the static binary");
        EmptyRoot { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `livetrace ARGS...` chrooted into this root, in a mount namespace of its own where a
    /// fresh procfs and sysfs are mounted (as a container runtime mounts them), started with
    /// nothing else: no libc, no /dev, no /usr.
    fn livetrace(&self, args: &[&str]) -> Livetrace {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "set -e; root=$1; shift; mount -t proc proc \"$root/proc\"; \
                 mount -t sysfs sysfs \"$root/sys\"; exec chroot \"$root\" /livetrace \"$@\"",
            )
            .arg("sh")
            .arg(self.path())
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        Livetrace::start_command(command)
    }

    fn run(&self, args: &[&str], timeout: Duration) -> Finished {
        let finished = self.livetrace(args).finish(timeout);
        finished.assert_success();
        finished
    }
}

/// Profiled from the empty root, a host process's stacks are complete and named, and split as
/// the fixture measured its own time.
#[test]
fn static_binary_in_an_empty_root_profiles_a_host_process_with_names() {
    require_root();
    let _cpus = cpu_shared();
    let root = EmptyRoot::new();
    let version = root.run(&["--version"], SLACK);
    assert!(
        version.stdout.contains("static (musl)"),
        "not the static build: {}",
        version.stdout
    );

    let mut chain = MeasuredFixture::start("chain", &["20"]);
    let pid = chain.pid().to_string();
    let (run, truth) = chain.during(|| {
        root.run(
            &[
                "profile",
                "-p",
                &pid,
                "-d",
                "3",
                "-o",
                "/tmp/profile.folded",
            ],
            Duration::from_secs(3) + SLACK,
        )
    });
    let profile = Profile::read(&root.path().join("tmp/profile.folded"));
    let total = profile.total();
    let named = profile.share_where(|s| s.contains_run(&["main", "a", "b", "c"]));
    assert!(
        named >= 0.95,
        "only {named:.3} of {total} samples name main;a;b;c\n{}\n{}",
        run.stderr,
        profile.summary()
    );
    for leaf in ["hot_60", "hot_30", "hot_10"] {
        let share = profile.share_where(|s| s.user_leaf() == Some(leaf));
        assert_share(leaf, share, total, truth.share(leaf), &profile.summary());
    }
}

/// From the empty root, uprobe-hist finds a function in a host binary it cannot see by path,
/// and times it.
#[test]
fn static_binary_in_an_empty_root_times_a_function_in_a_host_binary() {
    require_root();
    let _cpus = cpu_shared();
    let root = EmptyRoot::new();
    let latency = start_fixture("latency", &["loop", "20"]);
    let pid = latency.pid().to_string();
    let run = root.run(
        &["uprobe-hist", "timed_work", "-p", &pid, "-d", "2", "--json"],
        Duration::from_secs(2) + SLACK,
    );
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", run.stdout, run.stderr));
    let count = report["count"].as_u64().unwrap_or(0);
    // The loop calls timed_work(100 us) back to back: about 10,000 calls a second on a CPU of
    // its own, fewer on a busy machine, never none.
    assert!(count >= 200, "{count} calls timed in 2 s:\n{}", run.stderr);
    let p50 = report["percentiles_ns"]["p50"].as_f64().unwrap_or(0.0);
    assert!(
        (100_000.0..1_000_000.0).contains(&p50),
        "p50 {p50} ns for a 100 us busy-wait:\n{}",
        run.stderr
    );
}

/// `livetrace check` in the empty root finds what a sidecar run as root needs. (Whether the
/// runtimes it sees are named depends on what else runs: not judged here.)
#[test]
fn check_in_an_empty_root_finds_every_tool_able_to_run() {
    require_root();
    let root = EmptyRoot::new();
    let run = root.run(&["check", "--json"], SLACK);
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.stdout));
    for verdict in report["subcommands"].as_array().unwrap() {
        assert_ne!(verdict["status"], "missing", "{verdict}\n{}", run.stdout);
    }
    for name in ["BTF", "uprobes", "verifier", "PID namespace", "tracefs"] {
        let item = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check:\n{}", run.stdout));
        assert_eq!(item["status"], "ok", "{item}");
    }
}
