//! The whole pipeline through the real `kvt` binary: `kvt serve` started for
//! the run, a real HTTP round trip per request, real Parquet artifacts, a real
//! SQLite file. The server logs every answered request, so the tests count
//! requests where they arrive.

mod common;
use common::*;
use std::collections::HashMap;

const SMALL: &str = "\
output:
  exp_group_id: small
dataset:
  lengths: [256, 1024]
  per_length: 6
binning:
  n_bins: 2
  edges: [0, 600, 2000]
sampling:
  n_per_bin: 6
engine:
  kind: serve
  concurrency: 2
kv:
  policies: [streaming, snapkv]
  budgets: [1.0, 0.3]
analysis:
  bootstrap:
    iters: 200
";

/// 12 examples × (one full-cache request shared by both policies + one per
/// policy at 0.3).
const UNIQUE_REQUESTS: usize = 36;

fn small_project() -> Project {
    let p = Project::new();
    p.write("config/experiments/small.yaml", SMALL);
    p
}

fn build(p: &Project, args: &[&str]) -> std::process::Output {
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/small.yaml"])
        .args(args)
        .env("KVT_SERVE_REQUEST_LOG", p.path("requests.log"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    out
}

/// Request key → times the server answered it (replays not counted).
fn served(p: &Project) -> HashMap<String, usize> {
    log_counts(p, false)
}

/// Request key → times the server replayed a recorded answer for it.
fn replayed(p: &Project) -> HashMap<String, usize> {
    log_counts(p, true)
}

fn log_counts(p: &Project, replays: bool) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in std::fs::read_to_string(p.path("requests.log"))
        .unwrap_or_default()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["replay"].as_bool().unwrap_or(false) == replays {
            *m.entry(v["request_key"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    m
}

fn db(p: &Project) -> rusqlite::Connection {
    rusqlite::Connection::open(p.path("runs/small/kv_transition.sqlite")).unwrap()
}

fn count(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn report_end_to_end_then_nothing_then_analysis_only() {
    let p = small_project();
    let out = build(&p, &[]);
    assert_eq!(built_nodes(&out).len(), 13, "{}", stderr_of(&out));
    let s = served(&p);
    assert_eq!(s.len(), UNIQUE_REQUESTS);
    assert!(s.values().all(|&n| n == 1), "a request was sent twice");

    assert!(p.manifest("synthetic__needle").contains("bin_edges"));
    for f in [
        "runs/small/report.md",
        "runs/small/report.html",
        "runs/small/kv_transition.sqlite",
    ] {
        assert!(p.path(f).exists(), "{f} missing");
    }
    for plot in [
        "acc_by_bin",
        "fail_by_bin",
        "latency_p50_by_bin",
        "delta_heatmap",
    ] {
        let png = std::fs::read(p.path(&format!("runs/small/plots/{plot}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(p
            .read(&format!("runs/small/plots/{plot}.svg"))
            .contains("<svg"));
    }
    let report = p.read("runs/small/report.md");
    // Issue #31: each cell's mean answer length beside its score, in the
    // detailed table (the simulator's answers are a few tokens long).
    let header = report
        .lines()
        .find(|l| l.starts_with("| setting | bin (tokens) |"))
        .unwrap_or_else(|| panic!("no detailed table in\n{report}"));
    let col = header
        .split('|')
        .position(|c| c.trim() == "answer tokens (mean)")
        .unwrap_or_else(|| panic!("no answer column in {header}"));
    let detailed: Vec<&str> = report
        .lines()
        .skip_while(|l| *l != header)
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(detailed.len() >= 6, "{report}");
    for line in &detailed {
        let cell = line.split('|').nth(col).unwrap().trim();
        let mean: f64 = cell
            .parse()
            .unwrap_or_else(|_| panic!("`{cell}` in {line}"));
        assert!(mean > 0.0 && mean <= 32.0, "{line}");
    }
    let row = |setting: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("| {setting} |")))
            .unwrap_or_else(|| panic!("no row for {setting} in\n{report}"))
            .to_string()
    };
    // Streaming eviction at 30 % loses needles outside its window; SnapKV
    // keeps them. But 4–5 losses of 6 are not yet evidence of a loss above δ
    // at the level "safe" needs (a bound on the net loss, not a bootstrap
    // that collapses at small n): the report asks for more examples.
    assert!(
        row("streaming | 0.3").contains("insufficient data"),
        "{report}"
    );
    assert!(!row("streaming | 0.3").contains("fails"), "{report}");
    // Six of six right is not evidence of safety: it asks for more examples.
    assert!(
        row("snapkv | 0.3").contains("insufficient data: about 36 paired examples per bin"),
        "{report}"
    );
    // Wilson, not a zero-width bootstrap interval, for 6 of 6.
    assert!(
        row("snapkv @ 0.3 | 0–600").contains("1.00 [0.61, 1.00]"),
        "{report}"
    );
    // The report's opening, as a reader sees it.
    let glance = &report
        [report.find("## At a glance").unwrap()..report.find("## Score by length bin").unwrap()];
    insta::assert_snapshot!("report_at_a_glance", glance);
    // The full cache appears once, first.
    assert_eq!(
        report
            .matches("| full | 1.0 | full cache (reference)")
            .count(),
        1,
        "{report}"
    );
    assert!(!report.contains("| snapkv @ 1.0 |"), "{report}");
    // The compact table: one column per bin, marks on the cells.
    assert!(
        report.contains("| setting | 0–600 | 600–2000 |"),
        "{report}"
    );
    assert!(row("streaming @ 0.3").contains(" ? |"), "{report}");
    // The evicted needle makes the reader abstain: labelled as such.
    assert!(report.contains("## Provenance") && report.contains("ABSTAINED"));
    let c = db(&p);
    assert!(
        count(
            &c,
            "SELECT COUNT(*) FROM failures WHERE error_type = 'ABSTAINED'"
        ) > 0
    );
    drop(c);

    // Again: nothing runs, nothing is sent.
    let out = build(&p, &[]);
    assert!(built_nodes(&out).is_empty(), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("0 built, 13 fresh"));
    assert_eq!(served(&p).values().sum::<usize>(), UNIQUE_REQUESTS);

    // Analysis change: only the analysis and its sinks rerun; zero requests.
    // (Plots rerun because the intervals change; had `bin_stats` come out
    // byte-identical, early cutoff would have kept them.)
    let out = build(&p, &["--set", "analysis.bootstrap.iters=20"]);
    assert_eq!(
        built_nodes(&out),
        strs(&["analyze", "plots", "report", "sqlite"]),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(served(&p).values().sum::<usize>(), UNIQUE_REQUESTS);

    // Transport is not identity: the in-process engine instead of a server reruns nothing.
    let out = build(
        &p,
        &[
            "--set",
            "analysis.bootstrap.iters=20",
            "--set",
            "engine.kind=reference",
        ],
    );
    assert!(built_nodes(&out).is_empty(), "{}", stderr_of(&out));
}

#[test]
fn sqlite_sink_schema_and_row_counts() {
    let p = small_project();
    build(&p, &[]);
    let c = db(&p);
    let mut tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    tables.sort();
    let mut want = strs(kvt::stages::sqlite::TABLES);
    want.sort();
    assert_eq!(tables, want);
    for t in [
        "examples",
        "manifest_entries",
        "runs",
        "requests",
        "responses",
        "telemetry",
        "failures",
        "scores",
        "bin_stats",
        "transition_summary",
    ] {
        let fks = count(
            &c,
            &format!("SELECT COUNT(*) FROM pragma_foreign_key_list('{t}')"),
        );
        assert!(fks > 0, "{t} has no foreign key");
    }
    assert_eq!(
        count(&c, "SELECT COUNT(*) FROM pragma_foreign_key_check"),
        0
    );

    let manifest: serde_json::Value =
        serde_json::from_str(&p.manifest("synthetic__needle")).unwrap();
    let n = manifest["entries"].as_array().unwrap().len() as i64;
    assert_eq!(n, 12);
    assert_eq!(count(&c, "SELECT COUNT(*) FROM examples"), n);
    assert_eq!(count(&c, "SELECT COUNT(*) FROM manifest_entries"), n);
    assert_eq!(count(&c, "SELECT COUNT(*) FROM bins"), 2);
    assert_eq!(count(&c, "SELECT COUNT(*) FROM runs"), 3);
    for t in ["requests", "responses", "telemetry", "scores"] {
        assert_eq!(
            count(&c, &format!("SELECT COUNT(*) FROM {t}")),
            3 * n,
            "{t}"
        );
    }
    assert_eq!(count(&c, "SELECT COUNT(*) FROM bin_stats"), 3 * 2);
    assert_eq!(count(&c, "SELECT COUNT(*) FROM transition_summary"), 3);
    // Every answer without a number is a FORMAT_ERROR failure, and only those.
    assert_eq!(
        count(&c, "SELECT COUNT(*) FROM failures"),
        count(
            &c,
            "SELECT COUNT(*) FROM responses WHERE text NOT GLOB '*[0-9]*'"
        )
    );
    assert!(count(&c, "SELECT COUNT(*) FROM failures") > 0);
    // bin_stats agree with the scores they summarise.
    let mean: f64 = c
        .query_row(
            "SELECT mean FROM bin_stats WHERE run_id = 'streaming@0.3' AND bin_idx = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let direct: f64 = c
        .query_row(
            "SELECT AVG(s.score) FROM scores s JOIN requests q USING (request_id)
             JOIN manifest_entries m ON m.example_id = q.example_id
             WHERE q.run_id = 'streaming@0.3' AND m.bin_idx = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!((mean - direct).abs() < 1e-12);
}

#[test]
fn in_process_and_served_engines_answer_alike() {
    let a = small_project();
    build(&a, &["--set", "engine.kind=reference"]);
    assert!(served(&a).is_empty(), "the in-process engine used a server");
    let b = small_project();
    build(&b, &[]);
    let q = "SELECT request_id, text FROM responses ORDER BY request_id";
    let rows = |c: &rusqlite::Connection| -> Vec<(String, String)> {
        c.prepare(q)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let (ra, rb) = (rows(&db(&a)), rows(&db(&b)));
    assert_eq!(ra.len(), 36);
    assert_eq!(ra, rb);
    // The plain completions API, streamed and not, gives the same answers.
    for stream in ["true", "false"] {
        let c = small_project();
        build(
            &c,
            &[
                "--set",
                "engine.api=completions",
                "--set",
                &format!("engine.stream={stream}"),
            ],
        );
        assert_eq!(rows(&db(&c)), ra, "completions, stream={stream}");
    }
}

#[test]
fn killed_during_infer_resumes_with_nothing_lost() {
    let p = small_project();
    let log = p.path("requests.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvt"))
        .args(["build", "report", "-c", "config/experiments/small.yaml"])
        .current_dir(p.root())
        .env("KVT_SERVE_REQUEST_LOG", &log)
        .env("KVT_SERVE_DELAY_MS", "60")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("eight answered requests", || served(&p).len() >= 8);
    child.kill().unwrap(); // SIGKILL: no cleanup runs in kvt.
    child.wait().unwrap();
    let before = served(&p);
    assert!(
        before.len() < UNIQUE_REQUESTS,
        "killed too late to test anything"
    );

    let out = build(&p, &[]);
    assert!(stderr_of(&out).contains("0 failed"));
    let after = served(&p);
    // Every request answered exactly once. Requests in flight at the kill
    // (at most the concurrency per running node) were sent again and replayed
    // by the server from its log; the journal kept one answer each.
    assert_eq!(after.len(), UNIQUE_REQUESTS);
    assert!(after.values().all(|&n| n == 1), "{after:?}");
    let again = replayed(&p);
    assert!(
        again.len() <= 4,
        "{} requests re-sent after the kill",
        again.len()
    );
    // The journal holds one final answer per request; the sink one row per request.
    let j = rusqlite::Connection::open(p.path("cache/v1/journal.sqlite")).unwrap();
    assert_eq!(
        count(&j, "SELECT COUNT(*) FROM responses WHERE is_final = 1"),
        UNIQUE_REQUESTS as i64
    );
    assert_eq!(count(&db(&p), "SELECT COUNT(*) FROM responses"), 36);
}

#[test]
fn unreachable_server_fails_the_stage_with_exit_1_and_keeps_nothing_half_done() {
    let p = small_project();
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/small.yaml"])
        .args([
            "--set",
            "engine.kind=openai",
            "--set",
            "engine.base_url=http://127.0.0.1:9/v1",
        ])
        .args([
            "--set",
            "engine.max_retries=1",
            "--set",
            "engine.timeout_s=2",
        ])
        .env("KVT_BACKOFF_MS", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("stage `infer[") && err.contains("connection error"),
        "{err}"
    );
    assert!(err.contains("run the build again"), "{err}");
    assert!(!p.path("runs/small/report.md").exists());
    // The server is back (kvt starts its own): the next build sends every
    // request once and finishes.
    build(&p, &[]);
    let s = served(&p);
    assert_eq!(s.len(), UNIQUE_REQUESTS);
    assert!(s.values().all(|&n| n == 1));
    assert!(p.path("runs/small/report.md").exists());
    // Missing base_url for an openai engine is a configuration error: exit 2.
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/small.yaml"])
        .args(["--set", "engine.kind=openai"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("engine.base_url"));
}

#[test]
fn a_rejected_request_is_final_recorded_and_not_resent() {
    let p = small_project();
    // The server rejects this policy with HTTP 400: a deterministic failure.
    let bad = ["--set", "engine.extra_body={kvt: {policy: lru}}"];
    let out = build(&p, &bad);
    assert!(stderr_of(&out).contains("0 failed"), "{}", stderr_of(&out));
    let c = db(&p);
    let n = count(
        &c,
        "SELECT COUNT(*) FROM failures WHERE error_type = 'ENGINE_ERROR'",
    );
    assert_eq!(n, 36, "every request should be an ENGINE_ERROR");
    let detail: String = c
        .query_row("SELECT detail FROM failures LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert!(
        detail.contains("HTTP 400") && detail.contains("lru"),
        "{detail}"
    );
    assert!(p.read("runs/small/report.md").contains("ENGINE_ERROR"));
    // Final answers are not sent again.
    let out = build(&p, &bad);
    assert!(built_nodes(&out).is_empty());
    assert!(
        served(&p).is_empty(),
        "rejected requests are not logged as answered"
    );
}

#[test]
fn lifecycle_commands_are_build_targets() {
    let p = small_project();
    let run = |cmd: &str| {
        let out = p
            .kvt()
            .args([
                cmd,
                "-c",
                "config/experiments/small.yaml",
                "--set",
                "engine.kind=reference",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {}", stderr_of(&out));
        built_nodes(&out)
    };
    assert_eq!(run("prepare"), strs(&["prepare"]));
    assert_eq!(
        run("run").len(),
        3,
        "three infer nodes: the full cache once"
    );
    assert_eq!(run("score").len(), 3);
    assert_eq!(run("analyze"), strs(&["analyze"]));
    assert_eq!(
        run("report"),
        strs(&["explorer", "plots", "report", "sqlite", "sqlite_base"])
    );
    assert!(run("all").is_empty());
    let out = p
        .kvt()
        .args(["run", "infer", "-c", "config/experiments/small.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn replicas_share_the_load_and_survive_losing_one() {
    let p = small_project();
    let (la, lb) = (p.path("a.log"), p.path("b.log"));
    let a = Served::start(&["--delay-ms", "40", "--request-log", la.to_str().unwrap()]);
    let b = Served::start(&["--delay-ms", "40", "--request-log", lb.to_str().unwrap()]);
    let lines = |f: &std::path::Path| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kvt"))
        .args(["build", "report", "-c", "config/experiments/small.yaml"])
        .args([
            "--set",
            "engine.kind=openai",
            "--set",
            "engine.concurrency=4",
        ])
        .args(["--set", &format!("engine.base_url={}/v1", a.addr)])
        .args(["--set", &format!("engine.replicas=[{}/v1]", b.addr)])
        .current_dir(p.root())
        .env("KVT_BACKOFF_MS", "20")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("four requests at replica A", || lines(&la) >= 4);
    drop(a); // replica A dies mid-run
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let (na, nb) = (lines(&la), lines(&lb));
    assert!(na >= 4 && nb > na, "load: a {na}, b {nb}");
    assert!(na + nb >= UNIQUE_REQUESTS);
    let j = rusqlite::Connection::open(p.path("cache/v1/journal.sqlite")).unwrap();
    assert_eq!(
        count(&j, "SELECT COUNT(*) FROM responses WHERE is_final = 1"),
        UNIQUE_REQUESTS as i64
    );
    assert_eq!(
        count(&db(&p), "SELECT COUNT(*) FROM failures"),
        count(
            &db(&p),
            "SELECT COUNT(*) FROM responses WHERE text NOT GLOB '*[0-9]*'"
        )
    );
    assert_eq!(count(&db(&p), "SELECT COUNT(*) FROM responses"), 36);
    // Telemetry names the replica that answered each request.
    assert_eq!(
        count(
            &db(&p),
            "SELECT COUNT(DISTINCT endpoint) FROM telemetry WHERE endpoint IS NOT NULL"
        ),
        2
    );
    drop(b);
}

/// A QA file the reference simulator cannot read: the full cache scores 0, and
/// the report must say the run is uninformative, never "safe".
#[test]
fn reference_engine_on_real_looking_qa_is_uninformative_never_safe() {
    let p = Project::new();
    let mut lines = String::new();
    let filler =
        "The committee met on Tuesday and discussed the budget for the coming year at length. ";
    for i in 0..24 {
        let ctx = format!(
            "{}Dr. Alvarez presented the findings of study {i}, which showed that the new treatment reduced symptoms in {} percent of patients. {}",
            filler.repeat(5 + i * 2),
            40 + i,
            filler.repeat(3)
        );
        let rec = serde_json::json!({
            "id": format!("q{i}"),
            "question": format!("By how much did the treatment in study {i} reduce symptoms?"),
            "context": ctx,
            "answers": [format!("{} percent", 40 + i)],
        });
        lines.push_str(&rec.to_string());
        lines.push('\n');
    }
    p.write("data/qa.jsonl", &lines);
    p.write(
        "config/experiments/qa.yaml",
        "output: {exp_group_id: qa}
dataset:
  name: qa
  task: qa
  source: file
  path: data/qa.jsonl
  fields: {id: id, question: question, context: context, answers: answers, meta: []}
binning: {n_bins: 2}
sampling: {n_per_bin: 12}
engine: {kind: reference}
kv: {policies: [snapkv], budgets: [1.0, 0.5]}
prompt: {max_tokens: 150}
analysis: {bootstrap: {iters: 200}}
",
    );
    let out = p
        .kvt()
        .args(["validate", "-c", "config/experiments/qa.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("scores measure the simulator, not a model"),
        "{}",
        stderr_of(&out)
    );
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/qa.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report = p.read("runs/qa/report.md");
    assert!(report.contains("No verdict is possible"), "{report}");
    assert!(
        report.contains("measure kvt's reference simulator, not a model"),
        "{report}"
    );
    let row = report
        .lines()
        .find(|l| l.starts_with("| snapkv | 0.5 |"))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(row.contains("**uninformative**"), "{row}");
    assert!(!report.contains("safe in every bin"), "{report}");
    // Thin or altered data is flagged: the long contexts lost their middle.
    assert!(
        report.contains("Prompts shortened by `prompt.max_tokens`"),
        "{report}"
    );
}

/// Request identity is the model, not the transport: the simulator in process
/// and behind `kvt serve` is one model (nothing re-runs), while an `openai`
/// server with the same `model.name` is another (its answers never mix with
/// the simulator's).
#[test]
fn request_identity_is_the_model_not_the_transport() {
    let p = small_project();
    build(&p, &[]);
    let journal = || -> i64 {
        let db = rusqlite::Connection::open(p.path("cache/v1/journal.sqlite")).unwrap();
        db.query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(journal(), UNIQUE_REQUESTS as i64);
    // Same simulator, in process: every node fresh, no request.
    let out = build(&p, &["--set", "engine.kind=reference"]);
    assert!(built_nodes(&out).is_empty(), "{}", stderr_of(&out));
    assert_eq!(journal(), UNIQUE_REQUESTS as i64);
    // A server kvt does not control, same model name: new requests, new answers.
    let server = Served::start(&[]);
    let out = build(
        &p,
        &[
            "--set",
            "engine.kind=openai",
            "--set",
            &format!("engine.base_url={}/v1", server.addr),
        ],
    );
    let infer_built = built_nodes(&out)
        .iter()
        .filter(|n| n.starts_with("infer["))
        .count();
    assert_eq!(infer_built, 3, "{}", stderr_of(&out));
    assert_eq!(journal(), 2 * UNIQUE_REQUESTS as i64);
}

/// Every object in the store: path → (size, inode, mtime).
fn objects_with_identity(
    p: &Project,
) -> HashMap<std::path::PathBuf, (u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    p.objects()
        .into_iter()
        .map(|o| {
            let m = std::fs::metadata(&o).unwrap();
            (o, (m.len(), m.ino(), m.modified().unwrap()))
        })
        .collect()
}

#[test]
fn an_analysis_change_leaves_the_sinks_data_part_alone_and_barely_grows_the_cache() {
    let p = Project::new();
    // Mid-size: 400 examples × 6 cells, answered in process.
    p.write(
        "config/experiments/mid.yaml",
        "output: {exp_group_id: mid}
dataset: {lengths: [300, 600, 900, 1200], per_length: 100}
binning: {n_bins: 4, edges: [0, 450, 750, 1050, 1500]}
sampling: {n_per_bin: 100}
engine: {kind: reference}
kv: {policies: [streaming, snapkv], budgets: [1.0, 0.5, 0.3]}
analysis: {bootstrap: {iters: 200}}
",
    );
    let run = |args: &[&str]| {
        let out = p
            .kvt()
            .args(["build", "report", "-c", "config/experiments/mid.yaml"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        built_nodes(&out)
    };
    run(&[]);
    let db_path = p.path("runs/mid/kv_transition.sqlite");
    let db_size = std::fs::metadata(&db_path).unwrap().len();
    let before = objects_with_identity(&p);
    // The base database is the largest object; remember its identity.
    let (base_path, base_id) = before
        .iter()
        .max_by_key(|(_, (size, _, _))| *size)
        .map(|(p, id)| (p.clone(), *id))
        .unwrap();
    assert!(
        base_id.0 > db_size / 2,
        "the base holds most of the database"
    );

    use std::os::unix::fs::MetadataExt;
    let db_inode = std::fs::metadata(&db_path).unwrap().ino();
    let built = run(&["--set", "analysis.bootstrap.iters=300"]);
    assert!(built.contains(&"sqlite".to_string()), "{built:?}");
    assert!(!built.contains(&"sqlite_base".to_string()), "{built:?}");
    // The report's data part (examples and responses) is not redone either.
    assert!(!built.contains(&"explorer".to_string()), "{built:?}");
    // The exported database was updated in place: the same file, not a copy.
    assert_eq!(std::fs::metadata(&db_path).unwrap().ino(), db_inode);
    let after = objects_with_identity(&p);
    // Not rewritten: the same file, same inode, same modification time.
    assert_eq!(after.get(&base_path), Some(&base_id));
    for (path, id) in &before {
        assert_eq!(
            after.get(path),
            Some(id),
            "{} was rewritten",
            path.display()
        );
    }
    let grown: u64 = after
        .iter()
        .filter(|(path, _)| !before.contains_key(*path))
        .map(|(_, (size, _, _))| size)
        .sum();
    // New objects: the analysis, plots, report.md and report.html's page,
    // and the sink's small overlay; never a second copy of the database, nor
    // of report.html's example explorer (the same bytes, kept once).
    assert!(
        grown < 256 * 1024 && grown * 20 < db_size,
        "the cache grew by {grown} bytes for a {db_size}-byte database"
    );
    let html = p.read("runs/mid/report.html");
    assert!(html.contains("\"examples\":[{") && !html.contains("__KVT_EXAMPLES__"));
    // The exported database is whole and carries the new analysis.
    let c = rusqlite::Connection::open(&db_path).unwrap();
    let config: String = c
        .query_row("SELECT config_json FROM experiments", [], |r| r.get(0))
        .unwrap();
    assert!(config.contains("\"iters\":300"), "{config}");
    for (table, n) in [("examples", 400), ("requests", 2000), ("scores", 2000)] {
        let got: i64 = c
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(got, n, "{table}");
    }
    let bins: i64 = c
        .query_row("SELECT COUNT(*) FROM bin_stats", [], |r| r.get(0))
        .unwrap();
    assert_eq!(bins, 4 * 5);
    let fk: i64 = c
        .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(fk, 0);
    drop(c);

    // A database the user changed is not patched: it is rebuilt from the
    // base (a new file) with the analysis tables in.
    let c = rusqlite::Connection::open(&db_path).unwrap();
    c.execute_batch("CREATE TABLE mine (x); DELETE FROM bin_stats;")
        .unwrap();
    drop(c);
    let built = run(&["--set", "analysis.bootstrap.iters=250"]);
    assert!(built.contains(&"sqlite".to_string()), "{built:?}");
    assert_ne!(std::fs::metadata(&db_path).unwrap().ino(), db_inode);
    let c = rusqlite::Connection::open(&db_path).unwrap();
    let mine: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'mine'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(mine, 0);
    let bins: i64 = c
        .query_row("SELECT COUNT(*) FROM bin_stats", [], |r| r.get(0))
        .unwrap();
    assert_eq!(bins, 4 * 5);
    let config: String = c
        .query_row("SELECT config_json FROM experiments", [], |r| r.get(0))
        .unwrap();
    assert!(config.contains("\"iters\":250"), "{config}");
}

/// #26: `kvt build … 2>&1 | head -1` exited 101, a panic on the closed
/// pipe. With both of its outputs closed before it writes, a build goes on,
/// records everything and exits 0.
#[test]
fn regression_a_closed_stdout_and_stderr_never_panic() {
    let p = small_project();
    // The command, both of its outputs closed before it writes anything.
    let closed = |args: &[&str]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvt"))
            .current_dir(p.root())
            .env_remove("KVT_LOG")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        drop(child.stderr.take());
        child.wait().unwrap()
    };
    let status = closed(&[
        "build",
        "report",
        "-v",
        "-c",
        "config/experiments/small.yaml",
    ]);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(p.path("runs/small/report.md").exists());
    // And a command that prints to stdout (`kvt graph`) as well.
    let status = closed(&["graph", "-c", "config/experiments/small.yaml"]);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Issue #29, item 5: a long run that is not on a terminal said "built
/// prepare" and then nothing for minutes. Each sending node now logs how
/// many requests are answered, the rate and an estimate of the time left.
#[test]
fn a_slow_engine_off_a_terminal_logs_progress_with_counts_and_time_left() {
    let p = Project::new();
    p.write(
        "config/experiments/slow.yaml",
        "output: {exp_group_id: slow}\ndataset: {lengths: [256], per_length: 12}\n\
         binning: {n_bins: 1}\nsampling: {n_per_bin: 12}\n\
         engine: {kind: openai, concurrency: 1}\nkv: {policies: [streaming], budgets: [1.0]}\n\
         analysis: {bootstrap: {iters: 50}}\n",
    );
    let server = Served::start(&["--delay-ms", "120"]);
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/slow.yaml"])
        .args(["--set", &format!("engine.base_url={}/v1", server.addr)])
        .env("KVT_PROGRESS_SECS", "0.3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("answered (") && l.contains("of 12"))
        .collect();
    assert!(lines.len() >= 2, "{err}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("left") && l.contains("/s)")),
        "{err}"
    );
    // Under --quiet, nothing.
    let out = p
        .kvt()
        .args([
            "-q",
            "build",
            "report",
            "-c",
            "config/experiments/slow.yaml",
        ])
        .args(["--set", &format!("engine.base_url={}/v1", server.addr)])
        .args(["--force", "infer", "--set", "engine.label=again"])
        .env("KVT_PROGRESS_SECS", "0.3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        !stderr_of(&out).contains("answered ("),
        "{}",
        stderr_of(&out)
    );
}

/// A metric that scores answers holding the gold verbatim low is named in
/// the report, with the metric that fits: a server that answers with the
/// whole document (the needle inside it) scores about 0 on word F1 and 1 on
/// substring recall. Under substring recall there is no such warning.
#[test]
fn a_misfitting_metric_is_named_in_the_report() {
    use axum::{routing::post, Json};
    use serde_json::{json, Value};
    let echo = axum::Router::new().route(
        "/v1/chat/completions",
        post(|Json(body): Json<Value>| async move {
            let said = body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_string();
            Json(json!({"choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": said}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}))
        }),
    );
    let (addr, _rt) = serve_router(echo);
    let p = Project::new();
    p.write(
        "config/experiments/fit.yaml",
        "output: {exp_group_id: fit}\ndataset: {lengths: [256], per_length: 6}\n\
         binning: {n_bins: 1}\nsampling: {n_per_bin: 6}\n\
         engine: {kind: openai, concurrency: 2}\n\
         kv: {policies: [streaming], budgets: [1.0, 0.5]}\n\
         analysis: {bootstrap: {iters: 50}}\n",
    );
    let build = |metric: &str| {
        let out = p
            .kvt()
            .args(["build", "report", "-c", "config/experiments/fit.yaml", "-q"])
            .args(["--set", &format!("dataset.metric={metric}")])
            .args(["--set", &format!("engine.base_url={addr}/v1")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        std::fs::read_to_string(p.path("runs/fit/report.md")).unwrap()
    };
    let report = build("qa_f1_score");
    assert!(
        report.contains("`qa_f1_score` gave less than 0.5")
            && report
                .contains("of the full cache's 6 answers that contain the gold answer verbatim")
            && report.contains("`dataset.metric: substring_recall`"),
        "{report}"
    );
    assert!(!build("substring_recall").contains("gave less than 0.5"));
}

/// Issue #31, item 1, on the simulator behind `kvt serve`: contexts asked
/// three questions each (`multiquestion`) are sampled whole and the report
/// (report.md and report.html) shows each cell's score by turn and bin;
/// `multi_turn` sends each later turn with its earlier ones.
#[test]
fn questions_about_one_context_are_reported_by_turn() {
    let p = small_project();
    let out = build(
        &p,
        &[
            "--set",
            "dataset.task=multiquestion",
            "--set",
            "kv.compress=multi_turn",
        ],
    );
    let c = db(&p);
    // 6 contexts per bin, each with its three questions.
    assert_eq!(count(&c, "SELECT COUNT(*) FROM examples"), 36);
    assert_eq!(
        count(
            &c,
            "SELECT COUNT(*) FROM examples WHERE json_extract(meta_json, '$.context_turn') = 3"
        ),
        12
    );
    let report = p.read("runs/small/report.md");
    let section = &report[report
        .find("## Score by turn")
        .unwrap_or_else(|| panic!("no by-turn section: {}", stderr_of(&out)))..];
    let section = &section[..section.find("## Plots").unwrap()];
    for turn in 1..=3 {
        let row = format!("| snapkv @ 0.3 | {turn} |");
        let line = section
            .lines()
            .find(|l| l.starts_with(&row))
            .unwrap_or_else(|| panic!("no `{row}` in {section}"));
        // Two bins of six questions and every bin's twelve.
        assert_eq!(line.matches(" (6) |").count(), 2, "{line}");
        assert!(line.ends_with(" (12) |"), "{line}");
    }
    assert!(section.contains("| full cache | 1 |"), "{section}");
    let html = p.read("runs/small/report.html");
    assert!(
        html.contains("\"turns\":{\"bin_labels\""),
        "report.html lacks the turns"
    );
    assert!(html.contains("Score by turn"));
    // Without turns the section is absent.
    let plain = small_project();
    build(&plain, &[]);
    assert!(!plain.read("runs/small/report.md").contains("Score by turn"));
    assert!(plain
        .read("runs/small/report.html")
        .contains("\"turns\":null"));
}
