//! `livetrace check` against this host: what it reports must be what is true here, in the same
//! words the tools use when the same thing is missing, as text and as the same data in JSON.
//! (The layout itself has golden files: `src/tools/check/snapshots/`.) Its answer without
//! capabilities is tested in privileges.rs, with the other unprivileged runs.

mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Finished, Livetrace, Process, livetrace, run_livetrace, start_fixture};

const SLACK: Duration = Duration::from_secs(20);

fn check_with_env(env: &[(&str, &str)]) -> (Finished, serde_json::Value) {
    let text = Livetrace::start_with_env(["check"], env).finish(SLACK);
    let json = Livetrace::start_with_env(["check", "--json"], env).finish(SLACK);
    let report = serde_json::from_str(&json.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", json.stdout));
    assert_eq!(text.status.code(), json.status.code(), "{}", text.stderr);
    (text, report)
}

fn item<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .expect("checks is a list")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check named {name}: {report:#}"))
}

fn verdict<'a>(report: &'a serde_json::Value, subcommand: &str) -> &'a serde_json::Value {
    report["subcommands"]
        .as_array()
        .expect("subcommands is a list")
        .iter()
        .find(|v| v["subcommand"] == subcommand)
        .unwrap_or_else(|| panic!("no verdict for {subcommand}: {report:#}"))
}

/// As root on this machine every tool is ready; the report names this kernel and agrees with
/// /sys, and the text shows the same verdicts and checks as the JSON.
#[test]
fn as_root_every_tool_can_run_and_the_facts_are_this_hosts() {
    common::require_root();
    let (text, report) = check_with_env(&[]);
    text.assert_success();
    let release = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(report["facts"]["release"], release.as_str());
    assert_eq!(
        item(&report, "BTF")["status"] == "ok",
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
    );
    assert_eq!(item(&report, "capabilities")["status"], "ok");
    assert_eq!(item(&report, "verifier")["status"], "ok");
    for subcommand in ["profile", "offcpu", "uprobe-hist", "diff"] {
        // Runtimes seen elsewhere on the machine may limit profile and offcpu; nothing stops
        // a tool here.
        assert_ne!(verdict(&report, subcommand)["status"], "missing");
        let line = text
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(subcommand))
            .unwrap_or_else(|| panic!("no verdict line for {subcommand}:\n{}", text.stdout));
        assert!(line.contains("ready"), "{line}");
    }
    // Every check the JSON lists is on a line of the text, in the same order (runtimes past
    // the first six are summed up in the text).
    let mut rest = text.stdout.as_str();
    for check in report["checks"].as_array().unwrap() {
        if check["section"] == "runtimes" {
            continue;
        }
        let name = check["name"].as_str().unwrap();
        let at = rest
            .find(&format!(" {name} "))
            .unwrap_or_else(|| panic!("{name} missing or out of order in:\n{}", text.stdout));
        rest = &rest[at..];
    }
}

/// Without BTF, check says what uprobe-hist says when it fails for the same reason, and that
/// offcpu falls back; the exit status says that a tool cannot run.
#[test]
fn missing_btf_is_reported_in_the_tools_own_words() {
    common::require_root();
    let env = [("LIVETRACE_BTF_PATH", "/nonexistent/vmlinux")];
    let (text, report) = check_with_env(&env);
    assert_eq!(text.status.code(), Some(1), "{}", text.stderr);
    assert_eq!(item(&report, "BTF")["status"], "missing");
    assert_eq!(verdict(&report, "uprobe-hist")["status"], "missing");
    assert_eq!(verdict(&report, "offcpu")["status"], "limited");
    assert!(
        text.stderr.contains("uprobe-hist cannot run on this host"),
        "{}",
        text.stderr
    );

    let latency = start_fixture("latency", &["loop", "20"]);
    let pid = latency.pid().to_string();
    let tool =
        Livetrace::start_with_env(["uprobe-hist", "timed_work", "-p", &pid, "-d", "1"], &env)
            .finish(SLACK);
    assert_eq!(tool.status.code(), Some(1), "{}", tool.stderr);
    let fix = livetrace::kernel_btf::MISSING_BTF_FIX;
    assert!(tool.stderr.contains(fix), "{}", tool.stderr);
    assert_eq!(item(&report, "BTF")["fix"], fix);
    assert!(
        text.stdout.replace("\n    ", " ").contains(fix),
        "{}",
        text.stdout
    );
}

/// Where the verifier refuses stack copies, check asks it (it does not guess from the kernel
/// version) and says that profile and offcpu walk frame pointers instead.
#[test]
fn a_verifier_that_refuses_stack_copies_is_reported() {
    common::require_root();
    let (text, report) = check_with_env(&[("LIVETRACE_TEST_REFUSE_STACK_COPIES", "1")]);
    text.assert_success();
    let verifier = item(&report, "verifier");
    assert_eq!(verifier["status"], "limited", "{verifier}");
    assert!(
        verifier["detail"]
            .as_str()
            .unwrap()
            .contains("frame pointers"),
        "{verifier}"
    );
    assert_eq!(verdict(&report, "profile")["status"], "limited");
}

/// In a PID namespace of its own, with /proc showing only that namespace, livetrace would see
/// PIDs the kernel does not report: the tools refuse before loading anything, and check says
/// so, with the fix, in the same words.
#[test]
fn a_pid_namespace_of_its_own_is_refused_with_the_fix() {
    common::require_root();
    let in_namespace = |args: &[&str]| {
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--mount-proc", "--"])
            .arg(livetrace())
            .args(args);
        Livetrace::start_command(command).finish(SLACK)
    };
    let profile = in_namespace(&["profile", "-d", "1"]);
    assert_eq!(profile.status.code(), Some(1), "{}", profile.stderr);
    let fix = livetrace::session::targets::FOREIGN_PID_NAMESPACE_FIX;
    assert!(profile.stderr.contains(fix), "{}", profile.stderr);

    let check = in_namespace(&["check", "--json"]);
    assert_eq!(check.status.code(), Some(1), "{}", check.stderr);
    let report: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
    let namespace = item(&report, "PID namespace");
    assert_eq!(namespace["status"], "missing");
    assert_eq!(namespace["fix"], fix);
}

/// The runtimes it can see: a Node.js and a CPython whose perf maps name their functions, and
/// one of each without: the Node.js is limited, with the fix profile's own advice gives; the
/// CPython 3.12 is named all the same, from its own frames.
#[test]
fn runtimes_are_found_and_judged_by_their_perf_maps() {
    common::require_root();
    let workdir = tempfile::tempdir().unwrap();
    let spawn = |program: PathBuf, args: &[&str]| {
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(workdir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Process::spawn(command)
    };
    let idle_js = "setTimeout(() => {}, 30000)";
    let node = common::require_tool("node", "apt-get install nodejs");
    let node_plain = spawn(node.clone(), &["-e", idle_js]);
    let node_named = spawn(node, &["--perf-basic-prof", "-e", idle_js]);
    let home = std::env::var("HOME").unwrap();
    let python312 = PathBuf::from(&home).join(".pyenv/versions/3.12.1/bin/python3.12");
    assert!(python312.exists(), "this test needs pyenv's CPython 3.12.1");
    let idle_py = "import time; time.sleep(30)";
    let python_named = spawn(python312.clone(), &["-X", "perf", "-c", idle_py]);
    let python_plain = spawn(python312, &["-c", idle_py]);
    let perf_map = |pid: u32| PathBuf::from(format!("/tmp/perf-{pid}.map"));
    common::wait_until(
        "both runtimes started with -X perf / --perf-basic-prof write their maps",
        SLACK,
        || perf_map(node_named.pid()).exists() && perf_map(python_named.pid()).exists(),
    );
    // The maps exist from the start, so they exist when check looks (whatever else starts).
    let (_, report) = check_with_env(&[]);
    let listed = |pid: u32| {
        report["facts"]["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
            .unwrap_or_else(|| panic!("pid {pid} is not listed: {:#}", report["facts"]))
    };
    // A CPython 3.12 is named either way: from its perf map, or from its own frames.
    for (process, runtime, perf_map, status) in [
        (&node_plain, "Node.js", false, "limited"),
        (&node_named, "Node.js", true, "ok"),
        (&python_named, "CPython 3.12", true, "ok"),
        (&python_plain, "CPython 3.12", false, "ok"),
    ] {
        let entry = listed(process.pid());
        assert_eq!(entry["runtime"], runtime, "{entry}");
        assert_eq!(entry["perf_map"], perf_map, "{entry}");
        let name = format!("{} {}", process.pid(), entry["comm"].as_str().unwrap());
        let line = item(&report, &name);
        assert_eq!(line["status"], status, "{line}");
    }
    let node_fix = item(&report, &format!("{} node", node_plain.pid()))["fix"].clone();
    assert!(
        node_fix.as_str().unwrap().contains("--perf-basic-prof"),
        "{node_fix}"
    );
    for pid in [node_named.pid(), python_named.pid()] {
        let _ = std::fs::remove_file(perf_map(pid));
    }
}

/// `diff` needs nothing, and check itself needs nothing: it runs as anyone (see privileges.rs)
/// and touches nothing but /proc and /sys; `--help` documents its exit status.
#[test]
fn help_documents_the_exit_status() {
    let help = run_livetrace(["check", "--help"], SLACK);
    help.assert_success();
    assert!(help.stdout.contains("Exit status"), "{}", help.stdout);
}
