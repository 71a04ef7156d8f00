//! The `prepare` stage through the real `kvt` binary on the embedded default.

mod common;
use common::*;

fn demo_project() -> Project {
    let p = Project::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    p.write(
        "config/experiments/demo.yaml",
        &std::fs::read_to_string(repo.join("config/experiments/demo.yaml")).unwrap(),
    );
    p
}

#[test]
fn prepare_writes_a_binned_manifest_and_is_incremental() {
    let p = demo_project();
    let out = p
        .kvt()
        .args(["build", "prepare", "-c", "config/experiments/demo.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("1 built"));
    let m: serde_json::Value = serde_json::from_str(&p.manifest("synthetic__needle")).unwrap();
    let edges = m["bin_edges"].as_array().unwrap();
    assert_eq!(edges.len(), 6);
    let entries = m["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 200, "5 bins x 40 per bin");
    for b in 0..5 {
        assert_eq!(entries.iter().filter(|e| e["bin_idx"] == b).count(), 40);
    }
    assert_eq!(m["examples"].as_array().unwrap().len(), 200);
    // Unchanged: nothing runs. Changed sampling: prepare reruns, deterministically.
    let out = p
        .kvt()
        .args(["prepare", "-c", "config/experiments/demo.yaml"])
        .output()
        .unwrap();
    assert!(
        stderr_of(&out).contains("0 built, 1 fresh"),
        "{}",
        stderr_of(&out)
    );
    let out = p
        .kvt()
        .args([
            "build",
            "prepare",
            "-c",
            "config/experiments/demo.yaml",
            "--set",
            "sampling.n_per_bin=2",
        ])
        .output()
        .unwrap();
    assert!(stderr_of(&out).contains("1 built"));
    let m2: serde_json::Value = serde_json::from_str(&p.manifest("synthetic__needle")).unwrap();
    assert_eq!(m2["entries"].as_array().unwrap().len(), 10);
}

#[test]
fn prepare_errors_name_the_config_key_and_exit_1() {
    let p = demo_project();
    let out = p
        .kvt()
        .args([
            "build",
            "-c",
            "config/experiments/demo.yaml",
            "--set",
            "dataset.task=nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("stage `prepare`") && err.contains("dataset.task") && err.contains("nope"),
        "{err}"
    );
}

#[test]
fn an_invalid_utf8_line_and_empty_answers_are_bad_records_with_their_line() {
    let p = Project::new();
    let good = |i: usize| {
        format!(
            "{{\"id\": \"e{i}\", \"question\": \"Which?\", \"context\": \"{}\", \"answers\": [\"yes\"]}}\n",
            "word ".repeat(40 + i)
        )
    };
    let mut bytes: Vec<u8> = Vec::new();
    for i in 0..4 {
        bytes.extend(good(i).as_bytes());
    }
    bytes.extend(b"{\"id\": \"bad\", \"question\": \"\xff\xfe\", \"context\": \"c\", \"answers\": [\"a\"]}\n");
    bytes.extend(
        b"{\"id\": \"none\", \"question\": \"q\", \"context\": \"c c\", \"answers\": []}\n",
    );
    for i in 4..8 {
        bytes.extend(good(i).as_bytes());
    }
    std::fs::create_dir_all(p.path("data")).unwrap();
    std::fs::write(p.path("data/set.jsonl"), bytes).unwrap();
    p.write(
        "config/experiments/file.yaml",
        "output: {exp_group_id: file}
dataset:
  name: mine
  task: set
  source: file
  path: data/set.jsonl
  fields: {id: id, question: question, context: context, answers: answers, meta: []}
binning: {n_bins: 2}
sampling: {n_per_bin: 4}
",
    );
    let run = |extra: &[&str]| {
        p.kvt()
            .args(["build", "prepare", "-c", "config/experiments/file.yaml"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("set.jsonl:5") && err.contains("UTF-8"),
        "{err}"
    );
    let out = run(&["--set", "dataset.on_bad_record=skip"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let m: serde_json::Value = serde_json::from_str(&p.manifest("mine__set")).unwrap();
    assert_eq!(m["dataset"]["n_loaded"], 8, "{}", m["dataset"]);
    assert_eq!(m["dataset"]["n_skipped_records"], 2, "{}", m["dataset"]);
}

/// LongEval-style topic retrieval records: the question is inside `prompt`,
/// the answer is the first of a `topics` list. Mapped with `question: null`
/// and `answers: topics[0]`, each prompt is sent once (not as context and
/// again as question), and the answer comes from the indexed path.
#[test]
fn context_only_records_with_indexed_answers_send_each_field_once() {
    let p = Project::new();
    let mut text = String::new();
    for i in 0..8 {
        let rec = serde_json::json!({
            "prompt": format!("{} Which topic did we discuss first? Answer with the topic only.",
                "We talked about tides, then ferries, then lighthouses. ".repeat(20 + 10 * i)),
            "topics": [format!("topic-{i}"), "ferries", "lighthouses"],
            "num_topics": 3,
        });
        text.push_str(&format!("{rec}\n"));
    }
    p.write("data/topics.jsonl", &text);
    p.write(
        "config/experiments/topics.yaml",
        "output: {exp_group_id: topics}
dataset:
  name: longeval
  task: topics
  source: file
  path: data/topics.jsonl
  metric: substring_recall
  fields: {id: null, question: null, context: prompt, answers: \"topics[0]\", meta: [num_topics]}
binning: {n_bins: 2}
sampling: {n_per_bin: 4}
engine: {kind: reference}
kv: {policies: [streaming], budgets: [1.0]}
prompt: {template: \"{context}\"}
analysis: {bootstrap: {iters: 50}}
",
    );
    let out = p
        .kvt()
        .args(["build", "sqlite", "-c", "config/experiments/topics.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let m: serde_json::Value = serde_json::from_str(&p.manifest("longeval__topics")).unwrap();
    let examples = m["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 8);
    for e in examples {
        assert_eq!(e["question"], "");
        let id = e["example_id"].as_str().unwrap();
        let n: usize = id.rsplit('-').next().unwrap().parse().unwrap();
        assert_eq!(e["answers"][0], format!("topic-{}", n - 1), "{e}");
    }
    // What was sent is about what was binned: the prompt once, not twice.
    let db = rusqlite::Connection::open(p.path("runs/topics/kv_transition.sqlite")).unwrap();
    let pairs: Vec<(i64, i64)> = db
        .prepare(
            "SELECT t.prompt_tokens, e.token_len FROM telemetry t
             JOIN requests q USING (request_id) JOIN manifest_entries e USING (example_id)",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(pairs.len(), 8);
    for (sent, binned) in pairs {
        assert!(
            (sent as f64) < 1.15 * binned as f64 + 40.0,
            "sent {sent} tokens for a {binned}-token record"
        );
    }
}

#[test]
fn the_ruler_experiment_builds_on_the_reference_engine_and_scores_string_match_all() {
    let p = Project::new();
    p.copy_from_repo(&["config/experiments/ruler.yaml"]);
    for task in ["niah_multivalue", "vt_2x3", "fwe"] {
        let out = p
            .kvt()
            .args(["build", "sqlite", "-c", "config/experiments/ruler.yaml"])
            .args(["--set", &format!("dataset.task={task}")])
            .args(["--set", &format!("output.exp_group_id=r-{task}")])
            .args(["--set", "dataset.lengths=[400, 800]"])
            .args(["--set", "dataset.per_length=3"])
            .args(["--set", "binning.n_bins=2"])
            .args(["--set", "binning.edges=[0, 600, 1200]"])
            .args(["--set", "sampling.n_per_bin=3"])
            .args(["--set", "analysis.bootstrap.iters=20"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{task}: {}", stderr_of(&out));
        let db = rusqlite::Connection::open(p.path(&format!("runs/r-{task}/kv_transition.sqlite")))
            .unwrap();
        let (metric, n, full): (String, i64, f64) = db
            .query_row(
                "SELECT s.metric, COUNT(*), AVG(s.score) FROM scores s
                 JOIN requests q USING (request_id) JOIN runs r USING (run_id)
                 WHERE r.budget = 1.0 GROUP BY s.metric",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(metric, "string_match_all", "{task}");
        // Six examples at the full cache (run once), every one answered in full.
        assert_eq!(n, 6, "{task}");
        assert_eq!(full, 1.0, "{task}: the reference reader at full cache");
    }
}

#[test]
fn longbench_e_bins_go_by_each_records_length_field() {
    let p = Project::new();
    let mut text = String::new();
    // `length` as LongBench-E has it (words), independent of the context's tokens.
    for (i, len) in [100, 3999, 4000, 7999, 8000, 15000, 2500]
        .iter()
        .enumerate()
    {
        let rec = serde_json::json!({
            "_id": format!("r{i}"), "input": "Which colour?", "context": "The door is green. ".repeat(5),
            "answers": ["green"], "length": len,
        });
        text.push_str(&format!("{rec}\n"));
    }
    p.write("data/e.jsonl", &text);
    p.write(
        "config/experiments/e.yaml",
        "output: {exp_group_id: e}
dataset: {name: lbe, task: qa, source: file, path: data/e.jsonl}
binning: {scheme: longbench_e}
sampling: {n_per_bin: 10}
",
    );
    let out = p
        .kvt()
        .args(["build", "prepare", "-c", "config/experiments/e.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let m: serde_json::Value = serde_json::from_str(&p.manifest("lbe__qa")).unwrap();
    assert_eq!(m["bin_edges"], serde_json::json!([0, 4000, 8000, 15000]));
    assert_eq!(m["binning_scheme"], "longbench_e");
    let bin = |id: &str| {
        m["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["example_id"] == id)
            .unwrap()["bin_idx"]
            .as_i64()
            .unwrap()
    };
    let want = [0, 0, 1, 1, 2, 2, 0];
    for (i, b) in want.iter().enumerate() {
        assert_eq!(bin(&format!("r{i}")), *b, "r{i}");
    }
    // Other bucket starts, and a record without `length`.
    let out = p
        .kvt()
        .args(["build", "prepare", "-c", "config/experiments/e.yaml"])
        .args(["--set", "binning.edges=[0, 2000, 4000, 8000, 16000]"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(p.manifest_dirs("lbe__qa").len(), 2);
    let m: serde_json::Value = serde_json::from_str(&p.manifest("lbe__qa")).unwrap();
    assert_eq!(
        m["bin_edges"],
        serde_json::json!([0, 2000, 4000, 8000, 16000, 16001])
    );
    let counts: Vec<i64> = (0..5)
        .map(|b| {
            m["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["bin_idx"] == b)
                .count() as i64
        })
        .collect();
    assert_eq!(counts, vec![1, 2, 2, 2, 0]);
    let out = p
        .kvt()
        .args(["build", "prepare", "-c", "config/experiments/e.yaml"])
        .args(["--set", "dataset.fields.meta=[]"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("no numeric `length`") && stderr_of(&out).contains("r0"),
        "{}",
        stderr_of(&out)
    );
    let out = p
        .kvt()
        .args(["build", "prepare", "-c", "config/experiments/e.yaml"])
        .args(["--set", "binning.edges=[100, 4000]"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
}
