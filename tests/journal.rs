//! Group commit of the request journal against a real build: a build killed
//! (SIGKILL) after responses arrived but before their batch was committed
//! loses exactly that batch; the rerun asks those requests once more and the
//! journal records every answer once.

mod common;
use axum::extract::State;
use axum::http::HeaderMap;
use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct St {
    /// While set, requests after the first `open` answered ones hang.
    hold: AtomicBool,
    open: usize,
    answered: AtomicUsize,
    attempts: Mutex<HashMap<String, usize>>,
}

async fn chat(State(st): State<Arc<St>>, headers: HeaderMap) -> axum::Json<serde_json::Value> {
    let key = headers
        .get("x-kvt-request-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    *st.attempts.lock().unwrap().entry(key).or_default() += 1;
    if st.hold.load(Ordering::SeqCst) && st.answered.load(Ordering::SeqCst) >= st.open {
        // A server that holds a request (not a wait of the test's): the
        // test kills kvt long before this ends.
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    st.answered.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1}
    }))
}

#[test]
fn a_build_killed_before_its_batch_commits_re_asks_that_batch_once_and_records_it_once() {
    let st = Arc::new(St {
        hold: AtomicBool::new(true),
        open: 6,
        answered: AtomicUsize::new(0),
        attempts: Mutex::new(HashMap::new()),
    });
    let (addr, _rt) = serve_router(
        axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(chat))
            .with_state(st.clone()),
    );
    let url = format!("{addr}/v1");

    let p = Project::new();
    p.write(
        "config/experiments/j.yaml",
        "output: {exp_group_id: j}
dataset: {lengths: [200], per_length: 12}
binning: {n_bins: 1}
sampling: {n_per_bin: 12}
engine: {kind: openai, concurrency: 2, timeout_s: 300}
kv: {policies: [snapkv], budgets: [1.0]}
analysis: {bootstrap: {iters: 20}}
",
    );
    let build = |batch: &str, batch_ms: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kvt"));
        c.current_dir(p.root())
            .env_remove("KVT_CACHE_DIR")
            .args(["build", "report", "-c", "config/experiments/j.yaml"])
            .args(["--set", &format!("engine.base_url={url}")])
            .env("KVT_JOURNAL_BATCH", batch)
            .env("KVT_JOURNAL_BATCH_MS", batch_ms);
        c
    };
    // Run 1: a batch that never fills; six answers arrive, then the server holds.
    let mut child = build("1000", "600000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // At concurrency 2 the 7th and 8th requests go out only once the 5th
    // and 6th answers reached kvt: their arrival is the signal.
    wait_until("six answers and the two requests after them", || {
        st.answered.load(Ordering::SeqCst) >= 6
            && st.attempts.lock().unwrap().values().sum::<usize>() >= 8
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let answered_first: Vec<String> = st.attempts.lock().unwrap().keys().cloned().collect();
    let journal = p.path("cache/v1/journal.sqlite");
    let rows = |sql: &str| -> i64 {
        rusqlite::Connection::open(&journal)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(
        rows("SELECT COUNT(*) FROM responses"),
        0,
        "the open batch was not committed"
    );

    // Run 2: default batching, the server answers everything.
    st.hold.store(false, Ordering::SeqCst);
    let out = build("64", "5").output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let attempts = st.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 12, "twelve distinct requests");
    for k in &answered_first {
        // Asked in run 1 (answered or held), asked once more in run 2.
        assert_eq!(attempts[k], 2, "{k}");
    }
    for (k, n) in &attempts {
        if !answered_first.contains(k) {
            assert_eq!(*n, 1, "{k}");
        }
    }
    // Recorded once each: one row per key, never updated twice.
    assert_eq!(rows("SELECT COUNT(*) FROM responses"), 12);
    assert_eq!(rows("SELECT MAX(attempts) FROM responses"), 1);
    let db = rusqlite::Connection::open(p.path("runs/j/kv_transition.sqlite")).unwrap();
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 12);
    // A third build asks nothing.
    let before: usize = st.attempts.lock().unwrap().values().sum();
    let out = build("64", "5").output().unwrap();
    assert!(out.status.success());
    assert_eq!(st.attempts.lock().unwrap().values().sum::<usize>(), before);
}
