//! `kvt graph` in text, dot and JSON, snapshotted (insta) for every stale reason.

mod common;
use common::*;

fn graph(p: &Project, format: &str, extra: &[&str], env: &[(&str, &str)]) -> String {
    let mut c = p.testops();
    c.args([
        "graph",
        "-c",
        "config/experiments/t.yaml",
        "--format",
        format,
    ])
    .args(extra);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    normalize(&stdout_of(&out))
}

/// Node keys are content hashes: stable, but noise in a snapshot.
fn normalize(s: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    for ch in s.chars() {
        if ch.is_ascii_hexdigit() && !ch.is_ascii_uppercase() {
            run.push(ch);
            continue;
        }
        out.push_str(if run.len() == 64 { "[key]" } else { &run });
        run.clear();
        out.push(ch);
    }
    out.push_str(if run.len() == 64 { "[key]" } else { &run });
    out
}

#[test]
fn never_built() {
    let p = Project::new();
    insta::assert_snapshot!("never_built_text", graph(&p, "text", &[], &[]));
    insta::assert_snapshot!("never_built_dot", graph(&p, "dot", &[], &[]));
    insta::assert_snapshot!("never_built_json", graph(&p, "json", &[], &[]));
}

#[test]
fn config_op_version_and_input_changed() {
    let p = Project::new();
    p.build(&[]);
    // Rebuild only `scale` with another policy: `count` now sees changed inputs.
    p.testops()
        .args([
            "build",
            "scale",
            "-c",
            "config/experiments/t.yaml",
            "--set",
            "model.name=upper",
        ])
        .assert()
        .success();
    let args = [
        "--set",
        "model.name=upper",
        "--set",
        "analysis.bootstrap.iters=2000",
    ];
    let env = [("KVT_TESTOPS_COUNT_VERSION", "2")];
    insta::assert_snapshot!("changed_text", graph(&p, "text", &args, &env));
    insta::assert_snapshot!("changed_dot", graph(&p, "dot", &args, &env));
    insta::assert_snapshot!("changed_json", graph(&p, "json", &args, &env));
}

#[test]
fn output_missing_and_corrupt() {
    let p = Project::new();
    p.build(&[]);
    let find = |pred: &dyn Fn(&str) -> bool| {
        p.objects()
            .into_iter()
            .find(|o| std::fs::read_to_string(o).is_ok_and(|s| pred(&s)))
            .unwrap()
    };
    let report = find(&|s| s.starts_with("counts:"));
    let mut bytes = std::fs::read(&report).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&report, bytes).unwrap();
    insta::assert_snapshot!("corrupt_text", graph(&p, "text", &[], &[]));
    std::fs::remove_file(find(&|s| s.starts_with("the quick brown fox"))).unwrap();
    insta::assert_snapshot!("missing_text", graph(&p, "text", &[], &[]));
}

#[test]
fn external_input_changed_and_fresh() {
    let p = Project::new();
    p.build(&[]);
    insta::assert_snapshot!("fresh_text", graph(&p, "text", &[], &[]));
    p.write("input.txt", "another text\n");
    insta::assert_snapshot!("external_text", graph(&p, "text", &[], &[]));
}

/// A change deep in a section names its dotted key, with old → new values cut
/// to a readable width; the JSON form keeps the whole values.
#[test]
fn stale_reasons_name_dotted_keys_with_short_values() {
    let p = Project::new();
    p.copy_from_repo(&["pipelines/default.yaml", "config/experiments/sanity.yaml"]);
    let out = p
        .kvt()
        .args([
            "build",
            "report",
            "-q",
            "-c",
            "config/experiments/sanity.yaml",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let long = format!(
        "system={}",
        "You answer questions about a document. ".repeat(40)
    );
    let run = |format: &str| {
        let out = p
            .kvt()
            .args([
                "graph",
                "infer",
                "-c",
                "config/experiments/sanity.yaml",
                "--format",
                format,
            ])
            .args(["--set", &format!("prompt.{long}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        normalize(&stdout_of(&out))
    };
    let text = run("text");
    insta::assert_snapshot!("dotted_key_text", text);
    assert!(text.lines().all(|l| l.chars().count() < 200), "{text}");
    let json = run("json");
    assert!(json.contains("\"prompt.system\""), "{json}");
    assert!(
        json.contains(
            "You answer questions about a document. "
                .repeat(40)
                .trim_end()
        ),
        "the JSON keeps the whole value"
    );
}

/// Issue #29, item 6: after builds with 5000, 2000 and 5000 again (the last
/// one fresh from the cache), `kvt graph` with 3000 named 2000 as the
/// previous value. The last build's value is 5000.
#[test]
fn the_previous_value_is_the_last_builds_even_when_it_was_fresh() {
    let p = Project::new();
    for iters in ["5000", "2000", "5000"] {
        p.build(&["--set", &format!("analysis.bootstrap.iters={iters}")]);
    }
    let text = graph(&p, "text", &["--set", "analysis.bootstrap.iters=3000"], &[]);
    assert!(text.contains("5000 → 3000"), "{text}");
    assert!(!text.contains("2000 → 3000"), "{text}");
}
