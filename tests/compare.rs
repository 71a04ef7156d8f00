//! `kvt compare`: two variants of a small experiment on the reference
//! engine, side by side (the table is snapshotted with insta).

mod common;
use common::*;

const SMALL: &str = "output: {exp_group_id: small}
dataset: {lengths: [300, 900], per_length: 12}
binning: {n_bins: 2, edges: [0, 600, 1200]}
sampling: {n_per_bin: 12}
engine: {kind: reference}
kv: {policies: [streaming, snapkv], budgets: [1.0, 0.3]}
analysis: {bootstrap: {iters: 300}}
";

fn project() -> Project {
    let p = Project::new();
    p.write("config/experiments/small.yaml", SMALL);
    p
}

fn compare(p: &Project, args: &[&str]) -> std::process::Output {
    p.kvt().arg("compare").args(args).output().unwrap()
}

#[test]
fn unbuilt_scores_are_a_usage_error_naming_the_build_to_run() {
    let p = project();
    let out = compare(&p, &["small", "small", "--set-b", "kv.window=8"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("not built"), "{err}");
    assert!(
        err.contains("kvt build score -c config/experiments/small.yaml"),
        "{err}"
    );
    assert!(err.contains("--build"), "{err}");
    // Nothing was built or sent.
    assert!(!p.path("runs").exists());

    let out = compare(&p, &["nosuch", "small"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(
        err.contains("`nosuch`") && err.contains("known: small"),
        "{err}"
    );
}

#[test]
fn two_variants_line_up_by_cell_and_example() {
    let p = project();
    let out = compare(
        &p,
        &["small", "small", "--set-b", "kv.window=8", "--build", "-q"],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let table = stdout_of(&out);
    insta::assert_snapshot!("window_32_vs_8", table);
    // Every cell of both sides is paired, 12 examples each.
    assert_eq!(table.matches("| 12 |").count(), 6, "{table}");
    // The full cache is the same cell on both sides: no difference at all.
    assert!(
        table.contains("| full | 1.0 | 0–600 | 12 |") && table.contains("+0.00 [+0.00, +0.00]"),
        "{table}"
    );
    // The same cell on both sides agrees on every example; the 0.3 SnapKV
    // cells, whose means differ, cannot (and each side carries its interval).
    assert!(
        table.contains(
            "| full | 1.0 | 0–600 | 12 | 1.00 [0.76, 1.00] | 1.00 [0.76, 1.00] | 100 % |"
        ),
        "{table}"
    );
    let snap = table
        .lines()
        .find(|l| l.starts_with("| snapkv | 0.3 | 0–600 |"))
        .unwrap();
    let agree: f64 = snap
        .split('|')
        .nth(7)
        .unwrap()
        .trim()
        .trim_end_matches(" %")
        .parse()
        .unwrap();
    assert!(agree < 100.0, "{snap}");
    let dir = "runs/compare/small-vs-small_with_kv_window_8";
    assert_eq!(p.read(&format!("{dir}/compare.md")), table);
    let html = p.read(&format!("{dir}/compare.html"));
    assert!(html.starts_with("<!doctype html>") && html.contains("<td>streaming</td>"));

    // Built now: a second comparison reads the cache and sends nothing.
    let out = compare(&p, &["small", "small", "--set-b", "kv.window=8"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), table);

    // Different budgets: the shared cells are paired, the rest listed.
    let out = compare(
        &p,
        &[
            "small",
            "small",
            "--set-b",
            "kv.budgets=[1.0,0.5]",
            "--build",
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let t = stdout_of(&out);
    assert!(t.contains("Cells only in A (4): snapkv 0.3 · 0–600"), "{t}");
    assert!(t.contains("Cells only in B (4): snapkv 0.5 · 0–600"), "{t}");
    assert_eq!(t.matches("| 12 |").count(), 2, "{t}");
}
