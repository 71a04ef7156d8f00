//! The engine through the real binary: incremental builds, early cutoff,
//! fan-out, failures, crashes, concurrency, corruption and gc.

// The helpers every kvt integration test shares.
#[path = "../../../tests/common/mod.rs"]
mod common;
use common::*;
use std::process::Stdio;

const ALL: &[&str] = &[
    "count",
    "read",
    "report",
    "scale[budget=0.2]",
    "scale[budget=0.5]",
    "scale[budget=1.0]",
];

#[test]
fn first_build_runs_everything_second_runs_nothing() {
    let p = Project::new();
    assert_eq!(p.build(&[]), strs(ALL));
    assert_eq!(
        p.read("runs/t1/out.txt"),
        "counts:\nscale[budget=0.2] 3000\nscale[budget=0.5] 6000\nscale[budget=1.0] 12000"
    );
    assert!(p.build(&[]).is_empty());
}

#[test]
fn changing_a_used_value_reruns_that_node_and_what_its_output_changes() {
    let p = Project::new();
    p.build(&[]);
    assert_eq!(
        p.build(&["--set", "analysis.bootstrap.iters=2"]),
        strs(&["count", "report"])
    );
    assert!(p.read("runs/t1/out.txt").contains("scale[budget=1.0] 24"));
    // Back to the old value: its result is still cached, nothing runs.
    assert!(p.build(&[]).is_empty());
    assert!(p
        .read("runs/t1/out.txt")
        .contains("scale[budget=1.0] 12000"));
}

#[test]
fn upstream_rebuilt_to_identical_bytes_leaves_downstream_fresh() {
    let p = Project::new();
    p.build(&[]);
    // The input is already lower case: `identity` gives the same words as `lower`.
    let ran = p.build(&["--set", "model.name=identity"]);
    assert_eq!(
        ran,
        strs(&[
            "scale[budget=0.2]",
            "scale[budget=0.5]",
            "scale[budget=1.0]"
        ])
    );
    // --force reruns the node; identical output keeps everything downstream fresh.
    assert_eq!(
        p.build(&["--set", "model.name=identity", "--force", "read"]),
        strs(&["read"])
    );
}

#[test]
fn adding_a_foreach_item_runs_only_the_new_instance_and_the_consumers() {
    let p = Project::new();
    p.build(&[]);
    let ran = p.build(&["--set", "kv.budgets=[1.0, 0.5, 0.2, 0.1]"]);
    assert_eq!(ran, strs(&["count", "report", "scale[budget=0.1]"]));
}

#[test]
fn editing_an_external_input_reruns_from_the_source() {
    let p = Project::new();
    p.build(&[]);
    p.write("input.txt", "a different text entirely\n");
    assert_eq!(p.build(&[]), strs(ALL));
}

#[test]
fn a_target_builds_only_its_ancestors() {
    let p = Project::new();
    let _ = std::fs::remove_file(p.path("oplog.txt"));
    p.testops()
        .args([
            "build",
            "scale[budget=0.5]",
            "-c",
            "config/experiments/t.yaml",
        ])
        .assert()
        .success();
    assert_eq!(p.ran(), strs(&["read", "scale[budget=0.5]"]));
}

#[test]
fn dry_run_runs_nothing_and_says_why() {
    let p = Project::new();
    let out = p
        .testops()
        .args(["build", "-c", "config/experiments/t.yaml", "--dry-run"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        stdout_of(&out).contains("would run read: never built"),
        "{}",
        stdout_of(&out)
    );
    assert!(stdout_of(&out).contains("may run count: waits for"));
    assert!(p.ran().is_empty());
    assert!(!p.path("cache/v1/actions").exists());
}

const FAIL_PIPELINE: &str = "\
stages:
  read: {op: t_read, uses: [dataset.path]}
  flaky: {op: t_maybe_fail, needs: [read], uses: [engine.label]}
  after: {op: t_maybe_fail, needs: [flaky], uses: [engine.label]}
  sibling: {op: t_scale, needs: [read], uses: [model.name], foreach: {budget: kv.budgets}}
";

#[test]
fn a_failing_node_stops_its_dependents_not_its_siblings() {
    let p = Project::new();
    p.write("pipelines/test.yaml", FAIL_PIPELINE);
    let out = p
        .testops()
        .args([
            "build",
            "-c",
            "config/experiments/t.yaml",
            "--set",
            "engine.label=fail",
            "--keep-going",
            "-j",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("stage `flaky`") && err.contains("planted failure"),
        "{err}"
    );
    assert!(err.contains("not run (upstream failed): after"), "{err}");
    let ran = p.ran();
    assert!(
        ran.contains(&"sibling[budget=0.2]".to_string()) && !ran.contains(&"after".to_string()),
        "{ran:?}"
    );
    // Fixing the cause reruns only what failed or never ran.
    let _ = std::fs::remove_file(p.path("oplog.txt"));
    p.testops()
        .args(["build", "-c", "config/experiments/t.yaml"])
        .assert()
        .success();
    assert_eq!(p.ran(), strs(&["after", "flaky"]));
}

/// Issue #26, finding 13: nodes a stopped build never reached, though they
/// depend on nothing that failed (the other infer nodes under `--remote
/// required`), were listed "not run (upstream failed)". Now they are named
/// for what happened: the build stopped, and `--keep-going` runs them.
#[test]
fn regression_nodes_independent_of_a_failure_are_not_called_upstream_failed() {
    let p = Project::new();
    p.write("pipelines/test.yaml", FAIL_PIPELINE);
    let out = p
        .testops()
        .args(["build", "-c", "config/experiments/t.yaml"])
        .args(["--set", "engine.label=fail", "-j", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    let line = |prefix: &str| {
        err.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_default()
            .to_string()
    };
    let upstream = line("not run (upstream failed)");
    let stopped = line("not run (the build stopped");
    assert!(
        upstream.contains("after") && !upstream.contains("sibling"),
        "{err}"
    );
    assert!(
        stopped.contains("sibling[")
            && stopped.contains("--keep-going")
            && !stopped.contains("after"),
        "{err}"
    );
}

/// Starts a build whose `slow` node works for 30 s; returns once that node is running.
fn start_slow_build(p: &Project) -> std::process::Child {
    p.write(
        "pipelines/test.yaml",
        "stages:\n  read: {op: t_read, uses: [dataset.path]}\n  slow: {op: t_slow, needs: [read], uses: [engine.timeout_s]}\n",
    );
    let child = std::process::Command::new(common::testops_bin())
        .current_dir(p.root())
        .args([
            "build",
            "-c",
            "config/experiments/t.yaml",
            "--set",
            "engine.timeout_s=30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the slow node to start", || p.path("slow.started").exists());
    child
}

#[test]
fn sigkill_mid_node_leaves_a_cache_that_verifies_and_a_rebuild_that_finishes() {
    let p = Project::new();
    let mut child = start_slow_build(&p);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    p.testops().args(["cache", "verify"]).assert().success();
    let _ = std::fs::remove_file(p.path("oplog.txt"));
    // `read` finished before the kill and stays cached; `slow` reruns and completes.
    p.testops()
        .args([
            "build",
            "-c",
            "config/experiments/t.yaml",
            "--set",
            "engine.timeout_s=0.05",
        ])
        .assert()
        .success();
    assert_eq!(p.ran(), strs(&["slow"]));
    p.testops().args(["cache", "verify"]).assert().success();
}

#[test]
fn a_flipped_byte_is_detected_reported_and_rebuilt() {
    let p = Project::new();
    p.build(&[]);
    let report_obj = p
        .objects()
        .into_iter()
        .find(|o| std::fs::read_to_string(o).is_ok_and(|s| s.starts_with("counts:")))
        .unwrap();
    let mut bytes = std::fs::read(&report_obj).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&report_obj, &bytes).unwrap();
    // A build notices the damaged output and rebuilds that node, never using it.
    assert_eq!(p.build(&[]), strs(&["report"]));
    assert!(p.read("runs/t1/out.txt").starts_with("counts:"));
    // `cache verify` finds a flipped byte in an intermediate object and exits 1.
    let words_obj = p
        .objects()
        .into_iter()
        .find(|o| std::fs::read_to_string(o).is_ok_and(|s| s == "the quick brown"))
        .unwrap();
    let mut bytes = std::fs::read(&words_obj).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&words_obj, &bytes).unwrap();
    let out = p.testops().args(["cache", "verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout_of(&out).contains("corrupt: object"),
        "{}",
        stdout_of(&out)
    );
    assert_eq!(p.build(&[]), strs(&["scale[budget=0.2]"]));
    p.testops().args(["cache", "verify"]).assert().success();
}

#[test]
fn two_concurrent_builds_leave_a_consistent_cache() {
    let p = Project::new();
    let spawn = || {
        std::process::Command::new(common::testops_bin())
            .current_dir(p.root())
            .args(["build", "-c", "config/experiments/t.yaml"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    // Each node ran exactly once across both processes.
    assert_eq!(p.ran(), strs(ALL));
    p.testops().args(["cache", "verify"]).assert().success();
    assert!(p.build(&[]).is_empty());
}

#[test]
fn no_wait_fails_clearly_while_the_cache_is_locked() {
    let p = Project::new();
    let mut child = start_slow_build(&p);
    let out = p
        .testops()
        .args(["build", "-c", "config/experiments/t.yaml", "--no-wait"])
        .output()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("is locked by pid"),
        "{}",
        stderr_of(&out)
    );
    // The CLI's hint, added by the error's kind (not by matching its text).
    assert!(
        stderr_of(&out).contains("`--no-wait` was given; drop it to wait for the lock"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn gc_with_a_size_limit_keeps_what_live_configs_need() {
    let p = Project::new();
    p.build(&[]);
    // Results of a config that no longer exists: dead once we go back.
    p.build(&[
        "--set",
        "model.name=upper",
        "--set",
        "analysis.bootstrap.iters=7",
    ]);
    let before = p.objects().len();
    p.testops()
        .args(["cache", "gc", "--max-size", "0"])
        .assert()
        .success();
    assert!(p.objects().len() < before);
    // Everything config/experiments/t.yaml needs survived: nothing reruns.
    assert!(p.build(&[]).is_empty());
    p.testops().args(["cache", "verify"]).assert().success();
    // The dead results are gone: building them again runs them.
    assert!(!p
        .build(&[
            "--set",
            "model.name=upper",
            "--set",
            "analysis.bootstrap.iters=7"
        ])
        .is_empty());
}

#[test]
fn moving_the_project_keeps_everything_fresh() {
    let p = Project::new();
    p.build(&[]);
    let moved = tempfile::tempdir().unwrap();
    let dest = moved.path().join("elsewhere");
    std::fs::rename(p.root(), &dest).unwrap();
    let out = std::process::Command::new(common::testops_bin())
        .current_dir(&dest)
        .args(["build", "-c", "config/experiments/t.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !dest.join("oplog.txt").exists()
            || std::fs::read_to_string(dest.join("oplog.txt"))
                .unwrap()
                .lines()
                .count()
                == 6
    );
    assert!(
        stderr_of(&out).contains("0 built, 6 fresh"),
        "{}",
        stderr_of(&out)
    );
    std::fs::rename(&dest, p.root()).unwrap();
}

/// A byte flip that keeps the object's size and mtime passes the cheap
/// freshness check; the node that reads it finds it. The same build then
/// quarantines the object, reruns its producer and the reader, and succeeds.
#[test]
fn a_corrupt_object_met_during_a_build_is_quarantined_and_rebuilt_in_that_build() {
    let p = Project::new();
    p.build(&[]);
    let words_obj = p
        .objects()
        .into_iter()
        .find(|o| std::fs::read_to_string(o).is_ok_and(|s| s == "the quick brown"))
        .unwrap();
    let mtime = std::fs::metadata(&words_obj).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&words_obj).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&words_obj, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&words_obj)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    // Only `count` (and what follows) is stale; it reads the damaged object.
    let out = p
        .testops()
        .args(["build", "-c", "config/experiments/t.yaml"])
        .args(["--set", "analysis.bootstrap.iters=2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut built = built_nodes(&out);
    built.sort();
    assert_eq!(built, strs(&["count", "report", "scale[budget=0.2]"]));
    assert!(stderr_of(&out).contains("corrupt"), "{}", stderr_of(&out));
    assert!(p.read("runs/t1/out.txt").contains("scale[budget=0.2] 6"));
    p.testops().args(["cache", "verify"]).assert().success();
}
