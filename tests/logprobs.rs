//! Token log-probabilities through the standard OpenAI fields, from a
//! loopback server (axum, in this test process): asked for with
//! `engine.logprobs`, recorded with each response, in SQLite and the
//! analysis; a server that returns none gives "unavailable", never zeros;
//! changing the split or a threshold rebuilds the analysis with no request.

mod common;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

struct St {
    /// Return `logprobs` when asked.
    gives: AtomicBool,
    requests: AtomicUsize,
    /// `(logprobs, top_logprobs)` of each request's body.
    asked: Mutex<Vec<(Value, Value)>>,
}

fn logprobs(k: usize, seed: usize) -> Value {
    // Two tokens, "4" and "2", with k alternatives each, made-up but valid.
    let lp = -((seed % 7) as f64) / 10.0 - 0.01;
    let top: Vec<Value> = (0..k)
        .map(|i| json!({"token": format!("t{i}"), "logprob": lp - i as f64}))
        .collect();
    json!({"content": [
        {"token": "4", "logprob": lp, "top_logprobs": top},
        {"token": "2", "logprob": lp / 2.0, "top_logprobs": top},
    ]})
}

async fn chat(State(st): State<Arc<St>>, body: String) -> Response {
    let v: Value = serde_json::from_str(&body).unwrap();
    let n = st.requests.fetch_add(1, Ordering::SeqCst);
    st.asked
        .lock()
        .unwrap()
        .push((v["logprobs"].clone(), v["top_logprobs"].clone()));
    let k = v["top_logprobs"].as_u64().unwrap_or(0) as usize;
    let give = st.gives.load(Ordering::SeqCst) && v["logprobs"] == json!(true);
    let mut choice = json!({"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"});
    if give {
        choice["logprobs"] = logprobs(k, n);
    }
    if v["stream"] == json!(true) {
        let mut last = json!({"index": 0, "delta": {"content": "2"}, "finish_reason": "stop"});
        if give {
            last["logprobs"] = logprobs(k, n);
        }
        let chunks = [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "4"}, "finish_reason": null}]}),
            json!({"choices": [last]}),
            json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}),
        ];
        let mut text: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
        text.push_str("data: [DONE]\n\n");
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from(text))
            .unwrap();
    }
    axum::Json(json!({"choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}))
        .into_response()
}

fn server(gives: bool) -> (String, Arc<St>, tokio::runtime::Runtime) {
    let st = Arc::new(St {
        gives: AtomicBool::new(gives),
        requests: AtomicUsize::new(0),
        asked: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat))
        .with_state(st.clone());
    let (addr, rt) = serve_router(app);
    (addr, st, rt)
}

const EXP: &str = "\
output: {exp_group_id: lp}
dataset: {lengths: [200, 300], per_length: 8}
binning: {n_bins: 2}
sampling: {n_per_bin: 8}
engine: {kind: openai, concurrency: 4, max_retries: 0, timeout_s: 5, logprobs: 3}
kv: {policies: [snapkv], budgets: [1.0, 0.5]}
analysis: {bootstrap: {iters: 50}}
";

fn build(p: &Project, addr: &str, stream: bool, extra: &[&str]) -> std::process::Output {
    let mut c = p.kvt();
    c.args(["build", "report", "-c", "config/experiments/lp.yaml"])
        .args(["--set", &format!("engine.base_url={addr}/v1")])
        .args(["--set", &format!("engine.stream={stream}")]);
    for e in extra {
        c.args(["--set", e]);
    }
    c.output().unwrap()
}

fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn logprobs_from_the_standard_fields_land_in_sqlite() {
    for stream in [false, true] {
        let (addr, st, _rt) = server(true);
        let p = Project::new();
        p.write("config/experiments/lp.yaml", EXP);
        let out = build(&p, &addr, stream, &[]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        // Asked through the standard fields, k = engine.logprobs.
        for (lp, top) in st.asked.lock().unwrap().iter() {
            assert_eq!((lp, top), (&json!(true), &json!(3)));
        }
        let db = rusqlite::Connection::open(p.path("runs/lp/kv_transition.sqlite")).unwrap();
        let responses = count(&db, "SELECT COUNT(*) FROM responses");
        assert_eq!(responses, 32);
        // Two tokens per answer, each with its top 3.
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM token_logprobs"),
            2 * responses
        );
        let top: String = db
            .query_row("SELECT top_logprobs FROM token_logprobs LIMIT 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<(String, f64)>>(&top)
                .unwrap()
                .len(),
            3
        );
        let lp: f64 = db
            .query_row(
                "SELECT logprob FROM token_logprobs WHERE position = 0 LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(lp < 0.0, "{lp}");
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM response_fidelity WHERE confidence_mean IS NOT NULL"
            ),
            responses
        );
        // Selective prediction is computed, on the test split.
        assert!(
            count(
                &db,
                "SELECT COUNT(*) FROM selective_stats WHERE available = 1 AND split = 'test'"
            ) > 0
        );
        // No gold or KL from an OpenAI server: those are unavailable.
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM fidelity_stats WHERE available = 1"
            ),
            0
        );
        let report = p.read("runs/lp/report.md");
        assert!(
            report.contains("Selective prediction and calibration (test split)"),
            "{report}"
        );
        assert!(report.contains("Unavailable for this engine"), "{report}");
    }
}

#[test]
fn a_server_without_logprobs_is_unavailable_not_zero() {
    let (addr, _st, _rt) = server(false);
    let p = Project::new();
    p.write("config/experiments/lp.yaml", EXP);
    let out = build(&p, &addr, false, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let db = rusqlite::Connection::open(p.path("runs/lp/kv_transition.sqlite")).unwrap();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM token_logprobs"), 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM response_fidelity"), 0);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM selective_stats WHERE available = 1"
        ),
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM selective_stats WHERE augrc IS NOT NULL"
        ),
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM fidelity_stats WHERE verdict = 'unavailable'"
        ),
        count(&db, "SELECT COUNT(*) FROM fidelity_stats")
    );
    let report = p.read("runs/lp/report.md");
    assert!(report.contains("Unavailable for this engine"), "{report}");
    assert!(
        !report.contains("Selective prediction and calibration"),
        "{report}"
    );
}

#[test]
fn changing_the_split_or_a_threshold_sends_no_request() {
    let (addr, st, _rt) = server(true);
    let p = Project::new();
    p.write("config/experiments/lp.yaml", EXP);
    let out = build(&p, &addr, false, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let sent = st.requests.load(Ordering::SeqCst);
    assert_eq!(sent, 32, "16 examples at two budgets");
    let db_path = p.path("runs/lp/kv_transition.sqlite");
    let n_cal = |p: &std::path::Path| {
        let db = rusqlite::Connection::open(p).unwrap();
        count(
            &db,
            "SELECT SUM(n_calibration) FROM selective_stats WHERE bin_idx = -1",
        )
    };
    let before = n_cal(&db_path);
    for change in [
        vec!["analysis.splits.calibration=0.25"],
        vec![
            "analysis.splits.calibration=0.25",
            "analysis.selective.confident_risk=0.3",
        ],
        vec![
            "analysis.splits.calibration=0.25",
            "analysis.selective.confident_risk=0.3",
            "analysis.fidelity.delta_nats=0.5",
            "analysis.selective.confidence=min",
        ],
    ] {
        let out = build(&p, &addr, false, &change);
        assert!(out.status.success(), "{}", stderr_of(&out));
        let built = built_nodes(&out);
        assert!(built.iter().any(|n| n == "analyze"), "{built:?}");
        assert!(
            !built
                .iter()
                .any(|n| n.starts_with("infer") || n.starts_with("score")),
            "{built:?}"
        );
    }
    assert_eq!(
        st.requests.load(Ordering::SeqCst),
        sent,
        "an analysis change sent requests"
    );
    assert_ne!(n_cal(&db_path), before);
}
