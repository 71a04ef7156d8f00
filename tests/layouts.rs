//! Public long-context sets in their published layouts (small fixtures
//! written here): BAMBOO's paper QA (options, letter answers, one file per
//! length) and alternative-answer QA (no separate question), L-Eval (lists of
//! instructions and outputs), LongChat's LongEval line retrieval (a numeric
//! answer). Each loads with the README's mapping through a real build against
//! an OpenAI-compatible server on loopback that records every prompt and
//! answers from a key, so the test sees what was sent and how it scored.

mod common;
use axum::extract::State;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

struct Recorder {
    prompts: Mutex<Vec<String>>,
    /// Marker in the prompt (`[[rec-N]]`) → the answer to give.
    answers: HashMap<String, String>,
}

async fn chat(State(st): State<Arc<Recorder>>, body: String) -> axum::Json<Value> {
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    let user = v["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let answer = user
        .split("[[")
        .nth(1)
        .and_then(|r| r.split("]]").next())
        .and_then(|marker| st.answers.get(marker))
        .cloned()
        .unwrap_or_else(|| "I do not know.".into());
    st.prompts.lock().unwrap().push(user);
    axum::Json(json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 3}
    }))
}

struct Server {
    url: String,
    st: Arc<Recorder>,
    _rt: tokio::runtime::Runtime,
}

fn serve(answers: &[(&str, &str)]) -> Server {
    let st = Arc::new(Recorder {
        prompts: Mutex::new(Vec::new()),
        answers: answers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    });
    let (addr, rt) = serve_router(
        axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(chat))
            .with_state(st.clone()),
    );
    Server {
        url: format!("{addr}/v1"),
        st,
        _rt: rt,
    }
}

/// Builds the experiment against the server; returns (example id → score,
/// example id → meta) from the SQLite sink.
fn build(p: &Project, s: &Server, name: &str) -> (HashMap<String, f64>, HashMap<String, Value>) {
    build_with(p, s, name, name, &[])
}

/// [`build`] with more `--set` arguments, for an experiment whose file
/// names another engine; `exp` is its `output.exp_group_id`.
fn build_with(
    p: &Project,
    s: &Server,
    name: &str,
    exp: &str,
    sets: &[&str],
) -> (HashMap<String, f64>, HashMap<String, Value>) {
    let mut c = p.kvt();
    c.args([
        "build",
        "sqlite",
        "-c",
        &format!("config/experiments/{name}.yaml"),
    ])
    .args(["--set", &format!("engine.base_url={}", s.url)]);
    for set in sets {
        c.args(["--set", set]);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let db =
        rusqlite::Connection::open(p.path(&format!("runs/{exp}/kv_transition.sqlite"))).unwrap();
    let scores = db
        .prepare("SELECT q.example_id, s.score FROM scores s JOIN requests q USING (request_id)")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let meta = db
        .prepare("SELECT example_id, meta_json FROM examples")
        .unwrap()
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .map(|(id, m)| (id, serde_json::from_str(&m).unwrap()))
        .collect();
    (scores, meta)
}

fn experiment(name: &str, dataset: &str, template: &str) -> String {
    format!(
        "output: {{exp_group_id: {name}}}
dataset:
{dataset}
binning: {{n_bins: 1}}
sampling: {{n_per_bin: 50}}
engine: {{kind: openai, concurrency: 2}}
kv: {{policies: [streaming], budgets: [1.0]}}
prompt: {{template: {template:?}}}
analysis: {{bootstrap: {{iters: 20}}}}
"
    )
}

fn filler(n: usize) -> String {
    "The committee met again and discussed the budget at length. ".repeat(n)
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn bamboo_paper_qa_shows_options_and_scores_letters_over_a_glob_of_files() {
    let p = Project::new();
    let mut answers = Vec::new();
    for (file, n0) in [("paperqa_4k", 0), ("paperqa_16k", 3)] {
        let mut text = String::new();
        for i in n0..n0 + 3 {
            let gold = ["A", "B", "C"][i % 3];
            let rec = json!({
                "question": format!("Which method did study {i} use?"),
                "evidence": "   ",
                "options": [format!("A. Method alpha-{i}."), format!("B. Method beta-{i}."),
                            format!("C. Method gamma-{i}."), format!("D. Method delta-{i}.")],
                "answer": gold,
                "content": format!("[[rec-{i}]]\n{}", filler(20 + 5 * i)),
            });
            text.push_str(&format!("{rec}\n"));
        }
        p.write(&format!("data/bamboo/{file}.jsonl"), &text);
    }
    // The model names the right letter with its text for records 0-3, a
    // wrong one for 4 and 5.
    let replies: Vec<String> = (0..6)
        .map(|i| match i {
            0 => "A. Method alpha-0.".to_string(),
            1 => "(B)".to_string(),
            2 => "Answer: C".to_string(),
            3 => "A".to_string(),
            _ => "D. Method delta.".to_string(),
        })
        .collect();
    for (i, r) in replies.iter().enumerate() {
        answers.push((format!("rec-{i}"), r.clone()));
    }
    let answers: Vec<(&str, &str)> = answers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let s = serve(&answers);
    let dataset = "  name: bamboo
  task: paperqa
  source: file
  path: \"data/bamboo/paperqa_*.jsonl\"
  metric: multiple_choice
  fields:
    id: null
    question: question
    context: content
    answers: answer
    meta: [evidence]
    extra: {options: options}";
    let template =
        "{context}\n\nQuestion: {question}\n{options}\nAnswer with the letter of the right option.";
    p.write(
        "config/experiments/paperqa.yaml",
        &experiment("paperqa", dataset, template),
    );
    let (scores, meta) = build(&p, &s, "paperqa");
    assert_eq!(scores.len(), 6, "{scores:?}");
    // Records without an id are numbered by their own file.
    let want = [
        ("paperqa_4k-1", 1.0),
        ("paperqa_4k-2", 1.0),
        ("paperqa_4k-3", 1.0),
        ("paperqa_16k-1", 1.0),
        ("paperqa_16k-2", 0.0),
        ("paperqa_16k-3", 0.0),
    ];
    for (id, score) in want {
        assert_eq!(scores.get(id), Some(&score), "{id}: {scores:?}");
    }
    assert_eq!(
        meta["paperqa_16k-2"]["source_record"],
        "paperqa_16k.jsonl:2"
    );
    let prompts = s.st.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), 6);
    for prompt in &prompts {
        let i: usize = prompt[6..7].parse().unwrap();
        for letter in ["A", "B", "C", "D"] {
            let opt = format!(
                "{letter}. Method {}-{i}.",
                ["alpha", "beta", "gamma", "delta"][(letter.as_bytes()[0] - b'A') as usize]
            );
            assert_eq!(count(prompt, &opt), 1, "option `{opt}` once in: {prompt}");
        }
        assert_eq!(count(prompt, "Which method did study"), 1, "{prompt}");
        assert_eq!(count(prompt, "[[rec-"), 1, "{prompt}");
    }

    // Under a word-overlap metric the letters are a mismatch: `validate` says so.
    let out = p
        .kvt()
        .args(["validate", "-c", "config/experiments/paperqa.yaml"])
        .args(["--set", &format!("engine.base_url={}", s.url)])
        .args(["--set", "dataset.metric=qa_f1_score"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("warning:") && err.contains("6 of 6") && err.contains("multiple_choice"),
        "{err}"
    );
    let out = p
        .kvt()
        .args(["validate", "-c", "config/experiments/paperqa.yaml"])
        .args(["--set", &format!("engine.base_url={}", s.url)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        !stderr_of(&out).contains("multiple_choice"),
        "no warning when it fits"
    );
}

#[test]
fn bamboo_alt_qa_and_longeval_lines_are_context_only_with_number_answers() {
    let p = Project::new();
    // BAMBOO altqa: the instruction and question sit inside `content`; one file per length.
    for (file, n0) in [("altqa_4k", 0), ("altqa_16k", 2)] {
        let mut text = String::new();
        for i in n0..n0 + 2 {
            let rec = json!({
                "content": format!("Answer with a number.\n\nDocument:\n[[alt-{i}]] {}\n\nQuestion:\nIn which year did event {i} happen?\n", filler(15 + 10 * i)),
                "answer": format!("{}", 1960 + i),
            });
            text.push_str(&format!("{rec}\n"));
        }
        p.write(&format!("data/bamboo/{file}.jsonl"), &text);
    }
    // LongEval lines: the register value is a JSON number.
    let mut text = String::new();
    for i in 0..3 {
        let rec = json!({
            "prompt": format!("[[line-{i}]] line swift-otter: REGISTER_CONTENT is <{}>\n{}\nWhat is the REGISTER_CONTENT in line swift-otter?", 24000 + i, filler(10 + 10 * i)),
            "correct_line": format!("line swift-otter: REGISTER_CONTENT is <{}>", 24000 + i),
            "expected_number": 24000 + i,
            "num_lines": 200,
        });
        text.push_str(&format!("{rec}\n"));
    }
    p.write("data/longeval/lines.jsonl", &text);
    let mut answers: Vec<(String, String)> = (0..4)
        .map(|i| (format!("alt-{i}"), format!("It happened in {}.", 1960 + i)))
        .collect();
    answers.extend((0..3).map(|i| (format!("line-{i}"), format!("<{}>", 24000 + i))));
    answers[3].1 = "It happened in 1999.".into();
    let answers: Vec<(&str, &str)> = answers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let s = serve(&answers);
    let alt = "  name: bamboo
  task: altqa
  source: file
  path: [data/bamboo/altqa_4k.jsonl, data/bamboo/altqa_16k.jsonl]
  metric: substring_recall
  fields: {id: null, question: null, context: content, answers: answer, meta: []}";
    p.write(
        "config/experiments/altqa.yaml",
        &experiment("altqa", alt, "{context}"),
    );
    let (scores, meta) = build(&p, &s, "altqa");
    let want = [
        ("altqa_4k-1", 1.0),
        ("altqa_4k-2", 1.0),
        ("altqa_16k-1", 1.0),
        ("altqa_16k-2", 0.0),
    ];
    for (id, score) in want {
        assert_eq!(scores.get(id), Some(&score), "{id}: {scores:?}");
    }
    assert_eq!(meta["altqa_16k-1"]["source_record"], "altqa_16k.jsonl:1");
    let lines = "  name: longeval
  task: lines
  source: file
  path: data/longeval/lines.jsonl
  fields: {id: null, question: null, context: prompt, answers: expected_number, meta: [num_lines]}";
    p.write(
        "config/experiments/lines.yaml",
        &experiment("lines", lines, "{context}"),
    );
    let (scores, meta) = build(&p, &s, "lines");
    assert_eq!(scores.len(), 3);
    for i in 1..=3 {
        // qa_f1_score (the default for files): "<24000>" against the number 24000.
        assert_eq!(scores[&format!("lines-{i}")], 1.0, "{scores:?}");
        assert_eq!(meta[&format!("lines-{i}")]["num_lines"], 200);
    }
    // Context-only: each prompt holds its record's text once, nothing else doubled.
    let prompts = s.st.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), 7);
    for prompt in &prompts {
        assert_eq!(count(prompt, "[["), 1, "{prompt}");
        assert!(
            count(prompt, "In which year") + count(prompt, "What is the REGISTER_CONTENT") == 1,
            "{prompt}"
        );
    }
}

#[test]
fn l_eval_instructions_and_outputs_are_read_by_list_position() {
    let p = Project::new();
    let mut text = String::new();
    for i in 0..4 {
        let rec = json!({
            "input": format!("[[doc-{i}]] {}", filler(12 + 6 * i)),
            "instructions": [format!("Which room is mentioned in section {i}?"), "An unused second question?"],
            "outputs": [format!("the blue room {i}"), "unused"],
            "source": "fixture",
            "evaluation": "f1",
        });
        text.push_str(&format!("{rec}\n"));
    }
    p.write("data/leval/rooms.jsonl", &text);
    let s = serve(&[
        ("doc-0", "The blue room 0."),
        ("doc-1", "the blue room 1"),
        ("doc-2", "The red room."),
        ("doc-3", "blue room 3"),
    ]);
    let ds = "  name: leval
  task: rooms
  source: file
  path: data/leval/rooms.jsonl
  fields: {id: null, question: \"instructions[0]\", context: input, answers: \"outputs[0]\", meta: [source, evaluation]}";
    p.write(
        "config/experiments/leval.yaml",
        &experiment("leval", ds, "{context}\n\nQuestion: {question}\nAnswer:"),
    );
    let (scores, meta) = build(&p, &s, "leval");
    // qa_f1_score: articles dropped, so "The blue room 0." = "the blue room 0" → 1;
    // "The red room." vs "the blue room 2" → {room} shared: P 1/2, R 1/3 → 0.4;
    // "blue room 3" → 1.
    assert_eq!(scores["rooms-1"], 1.0);
    assert_eq!(scores["rooms-2"], 1.0);
    assert!((scores["rooms-3"] - 0.4).abs() < 1e-9, "{scores:?}");
    assert_eq!(scores["rooms-4"], 1.0);
    assert_eq!(meta["rooms-2"]["evaluation"], "f1");
    for prompt in s.st.prompts.lock().unwrap().iter() {
        assert_eq!(count(prompt, "Which room is mentioned"), 1, "{prompt}");
        assert_eq!(count(prompt, "An unused second question"), 0, "{prompt}");
    }
}

#[test]
fn a_glob_matching_nothing_or_a_list_for_longbench_exits_2() {
    let p = Project::new();
    p.write(
        "data/x/a.jsonl",
        "{\"context\": \"c\", \"answers\": [\"a\"]}\n",
    );
    for (name, ds, needle) in [
        (
            "noglob",
            "  source: file\n  path: \"data/x/*.parquet\"",
            "`data/x/*.parquet` matches no file",
        ),
        (
            "lblist",
            "  source: longbench\n  task: hotpotqa\n  path: [data/x/a.jsonl, data/x/a.jsonl]",
            "a list of files is for `dataset.source: file`",
        ),
        (
            "emptylist",
            "  source: file\n  path: []",
            "the list is empty",
        ),
    ] {
        p.write(
            &format!("config/experiments/{name}.yaml"),
            &format!("output: {{exp_group_id: {name}}}\ndataset:\n{ds}\n"),
        );
        let out = p
            .kvt()
            .args([
                "build",
                "prepare",
                "-c",
                &format!("config/experiments/{name}.yaml"),
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr_of(&out));
        let err = stderr_of(&out);
        assert!(
            err.contains("dataset.path") && err.contains(needle),
            "{name}: {err}"
        );
    }
}

/// The repository's LongBench v2 experiment on a fixture in LongBench v2's
/// layout (one JSON array: `_id`, `domain`, `sub_domain`, `difficulty`,
/// `length`, `question`, `choice_A`…`choice_D`, `answer`, `context`).
fn longbench_v2_project() -> Project {
    let p = Project::new();
    let repo = repo_root();
    p.write(
        "config/experiments/longbench-v2.yaml",
        &std::fs::read_to_string(repo.join("config/experiments/longbench-v2.yaml")).unwrap(),
    );
    p.write(
        "data/raw/longbench_v2/data.json",
        &std::fs::read_to_string(repo.join("tests/fixtures/longbench_v2/data.json")).unwrap(),
    );
    p
}

/// `kvt build TARGET` of the LongBench v2 experiment as its file says (the
/// reference engine), with `--set` for each of `sets`.
fn build_longbench_v2(p: &Project, target: &str, sets: &[&str]) -> std::process::Output {
    let mut c = p.kvt();
    c.args([
        "build",
        target,
        "-c",
        "config/experiments/longbench-v2.yaml",
    ]);
    for set in sets {
        c.args(["--set", set]);
    }
    c.output().unwrap()
}

/// Issue #31, item 3: LongBench v2's `data.json` read record by record, the
/// four choices in the prompt, answers scored by the letter they name, and
/// the difficulty and length class kept in each example's meta.
#[test]
fn longbench_v2_shows_four_choices_and_scores_letters() {
    let p = longbench_v2_project();
    let s = serve(&[
        ("rec-0", "The correct answer is (C)"),
        ("rec-1", "(B)"),
        ("rec-2", "The correct answer is (A)."),
        ("rec-3", "A"),
        (
            "rec-4",
            "The correct answer is (B) because the client owns it.",
        ),
        ("rec-5", "D"),
    ]);
    let (scores, meta) = build_with(
        &p,
        &s,
        "longbench-v2",
        "longbench_v2",
        &[
            "engine.kind=openai",
            "kv.policies=[streaming]",
            "kv.budgets=[1.0]",
            "analysis.bootstrap.iters=20",
        ],
    );
    let want = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0];
    for (i, w) in want.iter().enumerate() {
        let id = format!("lbv2-{i:03}");
        assert_eq!(scores.get(&id), Some(w), "{id}: {scores:?}");
    }
    let db = rusqlite::Connection::open(p.path("runs/longbench_v2/kv_transition.sqlite")).unwrap();
    let metric: String = db
        .query_row("SELECT DISTINCT metric FROM scores", [], |r| r.get(0))
        .unwrap();
    assert_eq!(metric, "multiple_choice");
    let meta = &meta["lbv2-004"];
    assert_eq!(meta["difficulty"], "hard");
    assert_eq!(meta["length"], "long");
    assert_eq!(meta["sub_domain"], "Code repo QA");
    assert_eq!(meta["source_record"], "data.json:record 5");
    let prompts = s.st.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), 6);
    let p0 = prompts.iter().find(|p| p.contains("[[rec-0]]")).unwrap();
    assert!(
        p0.contains("Question: Which harbour did the survey ship leave from?\n(A) Northgate\n(B) Eastmoor\n(C) Westfall\n(D) Southmere\n"),
        "{p0}"
    );
}

/// Issue #31, item 3: the same fixture builds end to end on the reference
/// engine (which cannot read such questions: every letter it gives scores
/// 0 against the gold letters, and the report says the scores measure the
/// simulator).
#[test]
fn longbench_v2_builds_end_to_end_on_the_reference_engine() {
    let p = longbench_v2_project();
    let out = build_longbench_v2(&p, "report", &["analysis.bootstrap.iters=20"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report = p.read("runs/longbench_v2/report.md");
    assert!(report.contains("multiple_choice"), "{report}");
    assert!(
        report.contains("reference simulator, not a model"),
        "{report}"
    );
    let db = rusqlite::Connection::open(p.path("runs/longbench_v2/kv_transition.sqlite")).unwrap();
    let (n, metric): (i64, String) = db
        .query_row("SELECT COUNT(*), MAX(metric) FROM scores", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    // Six questions × (the full cache + two policies at two budgets).
    assert_eq!((n, metric.as_str()), (6 * 5, "multiple_choice"));
}

/// Issue #31, item 1: records sharing a context id (`dataset.fields.group`)
/// are one context's questions: turns numbered in file order (records of
/// groups interleaved), sampled by whole groups, each question sent with
/// its context; a group whose contexts differ is refused by name.
#[test]
fn grouped_records_are_turns_of_one_context_sampled_whole() {
    let p = Project::new();
    let doc = |g: &str| format!("Report {g}. {} [[rec-{g}]]", filler(20));
    let mut lines = Vec::new();
    for (g, q, a) in [
        ("A", "Who wrote it?", "Ann"),
        ("B", "Who wrote it?", "Bo"),
        ("A", "When?", "May"),
        ("C", "Who wrote it?", "Cy"),
        ("A", "Where?", "Leeds"),
        ("B", "When?", "June"),
        ("C", "When?", "July"),
    ] {
        lines.push(
            json!({"doc": g, "text": doc(g), "q": q, "gold": [a], "id": format!("{g}-{q}")})
                .to_string(),
        );
    }
    p.write("data/grouped.jsonl", &(lines.join("\n") + "\n"));
    p.write(
        "config/experiments/grouped.yaml",
        &experiment(
            "grouped",
            "  source: file\n  path: data/grouped.jsonl\n  task: grouped\n  metric: substring_recall\n  fields: {id: id, question: q, context: text, answers: gold, meta: [], group: doc}",
            "{context}\n\nQuestion: {question}\nAnswer:",
        ),
    );
    let s = serve(&[("rec-A", "Ann"), ("rec-B", "June"), ("rec-C", "Cy")]);
    let (scores, meta) = build_with(&p, &s, "grouped", "grouped", &["sampling.n_per_bin=2"]);
    // Two whole groups of three, out of A (3 questions), B (2) and C (2).
    let groups: std::collections::BTreeSet<&str> = meta
        .values()
        .map(|m| m["context_group"].as_str().unwrap())
        .collect();
    assert_eq!(groups.len(), 2, "{meta:?}");
    for g in &groups {
        let want = if *g == "A" { 3 } else { 2 };
        let turns: Vec<i64> = {
            let mut t: Vec<i64> = meta
                .values()
                .filter(|m| m["context_group"] == *g)
                .map(|m| m["context_turn"].as_i64().unwrap())
                .collect();
            t.sort();
            t
        };
        assert_eq!(turns, (1..=want).collect::<Vec<_>>(), "group {g}");
    }
    if groups.contains("A") {
        assert_eq!(meta["A-Where?"]["context_turn"], 3);
        assert_eq!(scores["A-Who wrote it?"], 1.0);
        assert_eq!(scores["A-When?"], 0.0);
    }
    let prompts = s.st.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), meta.len());
    // A group whose records disagree on the context is no group.
    lines.push(
        json!({"doc": "A", "text": "another text", "q": "Why?", "gold": ["x"], "id": "A-Why?"})
            .to_string(),
    );
    p.write("data/grouped.jsonl", &(lines.join("\n") + "\n"));
    let out = p
        .kvt()
        .args(["build", "sqlite", "-c", "config/experiments/grouped.yaml"])
        .args(["--set", &format!("engine.base_url={}", s.url)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("dataset.fields.group")
            && err.contains("`A-Who wrote it?`")
            && err.contains("`A-Why?`"),
        "{err}"
    );
}

/// Issue #31, item 3: LongBench v2 binned by its own length classes
/// (`binning.scheme: length_class`: short, medium, long), each example in
/// its class's bin; a record without a class is refused by name (exit 2).
#[test]
fn longbench_v2_bins_by_its_length_classes() {
    let p = longbench_v2_project();
    let out = build_longbench_v2(
        &p,
        "report",
        &["binning.scheme=length_class", "analysis.bootstrap.iters=20"],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report = p.read("runs/longbench_v2/report.md");
    assert!(
        report.contains("Bins are LongBench v2's length classes"),
        "{report}"
    );
    let db = rusqlite::Connection::open(p.path("runs/longbench_v2/kv_transition.sqlite")).unwrap();
    let bins: Vec<(i64, i64, i64, i64)> = db
        .prepare("SELECT bin_idx, lo, hi, n_selected FROM bins ORDER BY bin_idx")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        bins,
        [
            (0, 0, 32_000, 2),
            (1, 32_000, 128_000, 2),
            (2, 128_000, 2_000_000, 2)
        ]
    );
    let classes: Vec<(String, i64)> = db
        .prepare(
            "SELECT DISTINCT json_extract(e.meta_json, '$.length'), m.bin_idx
             FROM examples e JOIN manifest_entries m USING (example_id)
             ORDER BY m.bin_idx",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        classes,
        [
            ("short".to_string(), 0),
            ("medium".into(), 1),
            ("long".into(), 2)
        ]
    );
    // Without the `length` field in meta there is nothing to bin by.
    let out = build_longbench_v2(
        &p,
        "sqlite",
        &[
            "binning.scheme=length_class",
            "dataset.fields.meta=[domain]",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("length class") && err.contains("dataset.fields.meta"),
        "{err}"
    );
}
