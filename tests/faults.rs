//! The OpenAI-compatible client against a fault-injection server (axum, in
//! this test process): 429 with and without Retry-After, 500, 503, timeouts,
//! dropped connections, malformed JSON, streams cut in the middle, empty
//! choices. For each: the right number of attempts, the right failure label,
//! a finished run, and no lost responses.

mod common;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    RateLimited,
    RateLimitedRetryAfter,
    Status500,
    Status503,
    Timeout,
    Dropped,
    BadJson,
    CutStream,
    EmptyChoices,
    /// A 3 MiB body (above a 1 MiB `engine.max_response_mib`).
    Huge,
    /// A correct event stream (CRLF separators) sent one byte per chunk.
    ByteChunks,
    /// 307 to another address (reqwest would follow it; the direct path does not).
    Redirect,
}

struct Fs {
    fault: Fault,
    /// Failing attempts per key before a success (transient faults).
    fail_times: usize,
    /// While set, keys starting with 0–7 never succeed.
    persistent: AtomicBool,
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
    auth: Mutex<Vec<String>>,
    /// Which client sent each attempt: reqwest adds `accept: */*`, kvt's
    /// direct HTTP/1.1 path for plain `http://` sends no `accept`.
    clients: Mutex<std::collections::HashSet<&'static str>>,
}

fn ok_body(stream: bool) -> Response {
    if stream {
        let chunks = [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "4"}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "2"}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}),
        ];
        let mut text: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
        text.push_str("data: [DONE]\n\n");
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(text))
            .unwrap();
    }
    axum::Json(json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2}
    }))
    .into_response()
}

async fn chat(State(st): State<Arc<Fs>>, headers: HeaderMap, body: String) -> Response {
    let key = headers
        .get("x-kvt-request-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        st.auth.lock().unwrap().push(a.to_string());
    }
    st.clients
        .lock()
        .unwrap()
        .insert(if headers.contains_key("accept") {
            "reqwest"
        } else {
            "direct"
        });
    let stream = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["stream"].as_bool())
        .unwrap_or(false);
    let n = {
        let mut m = st.attempts.lock().unwrap();
        let v = m.entry(key.clone()).or_default();
        v.push(Instant::now());
        v.len()
    };
    let doomed = st.persistent.load(Ordering::SeqCst)
        && key
            .as_bytes()
            .first()
            .is_some_and(|c| b"01234567".contains(c));
    if n > st.fail_times && !doomed {
        return ok_body(stream);
    }
    match st.fault {
        Fault::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response(),
        Fault::Redirect => Response::builder()
            .status(307)
            .header("location", "http://127.0.0.1:9/v1/chat/completions")
            .body(Body::empty())
            .unwrap(),
        Fault::RateLimitedRetryAfter => Response::builder()
            .status(429)
            .header("retry-after", "1")
            .body(Body::from("slow down"))
            .unwrap(),
        Fault::Status500 => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Fault::Status503 => (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response(),
        Fault::Timeout => {
            // A server slower than the client's timeout (not a wait of the
            // test's): what is tested is kvt giving up on it.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            ok_body(stream)
        }
        Fault::Dropped => {
            // Headers go out, then the body fails: the connection is cut.
            let s = futures_util::stream::iter(vec![
                Ok::<_, std::io::Error>("{\"choices\": [".to_string()),
                Err(std::io::Error::other("dropped")),
            ]);
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(s))
                .unwrap()
        }
        Fault::BadJson => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from("{\"choices\": [oops"))
            .unwrap(),
        Fault::CutStream => Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(
                "data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"4\"}}]}\n\n",
            ))
            .unwrap(),
        Fault::EmptyChoices => axum::Json(json!({"choices": []})).into_response(),
        Fault::ByteChunks => {
            let chunks = [
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "4"}, "finish_reason": null}]}),
                json!({"choices": [{"index": 0, "delta": {"content": "2"}, "finish_reason": "stop"}]}),
                json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}),
            ];
            let mut text: String = chunks
                .iter()
                .map(|c| format!("data: {c}\r\n\r\n"))
                .collect();
            text.push_str("data: [DONE]\r\n\r\n");
            let bytes: Vec<Result<Vec<u8>, std::io::Error>> =
                text.into_bytes().into_iter().map(|b| Ok(vec![b])).collect();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(futures_util::stream::iter(bytes)))
                .unwrap()
        }
        Fault::Huge => {
            let chunk = "x".repeat(64 * 1024);
            let s = futures_util::stream::iter(
                (0..48).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
            );
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(s))
                .unwrap()
        }
    }
}

struct FaultServer {
    addr: String,
    st: Arc<Fs>,
    _rt: tokio::runtime::Runtime,
}

impl FaultServer {
    fn start(fault: Fault, fail_times: usize) -> FaultServer {
        let st = Arc::new(Fs {
            fault,
            fail_times,
            persistent: AtomicBool::new(false),
            attempts: Mutex::new(HashMap::new()),
            auth: Mutex::new(Vec::new()),
            clients: Mutex::new(Default::default()),
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(chat))
            .route(
                "/metrics",
                axum::routing::get(|| async {
                    "# HELP x\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.42\n"
                }),
            )
            .with_state(st.clone());
        let (addr, rt) = serve_router(app);
        FaultServer { addr, st, _rt: rt }
    }
    fn attempts(&self) -> HashMap<String, Vec<Instant>> {
        self.st.attempts.lock().unwrap().clone()
    }
}

const EXP: &str = "\
output: {exp_group_id: f}
dataset: {lengths: [200, 300], per_length: 8}
binning: {n_bins: 2}
sampling: {n_per_bin: 8}
engine: {kind: openai, concurrency: 8, max_retries: 2, timeout_s: 0.5}
kv: {policies: [snapkv], budgets: [1.0]}
analysis: {bootstrap: {iters: 50}}
";
const N: usize = 16;

fn build(p: &Project, s: &FaultServer, stream: bool) -> std::process::Output {
    build_via(p, s, stream, "direct")
}

/// `client`: "direct" (the default for plain http://) or "reqwest" (`KVT_HTTP_CLIENT`).
fn build_via(p: &Project, s: &FaultServer, stream: bool, client: &str) -> std::process::Output {
    p.kvt()
        .env("KVT_HTTP_CLIENT", client)
        .args(["build", "report", "-c", "config/experiments/f.yaml"])
        .args(["--set", &format!("engine.base_url={}/v1", s.addr)])
        .args(["--set", &format!("engine.stream={stream}")])
        .env("KVT_BACKOFF_MS", "5")
        .output()
        .unwrap()
}

fn failures(p: &Project) -> HashMap<String, i64> {
    let c = rusqlite::Connection::open(p.path("runs/f/kv_transition.sqlite")).unwrap();
    let mut st = c
        .prepare("SELECT error_type, COUNT(*) FROM failures GROUP BY error_type")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn responses(p: &Project) -> i64 {
    let c = rusqlite::Connection::open(p.path("runs/f/kv_transition.sqlite")).unwrap();
    c.query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))
        .unwrap()
}

/// Transient: every request fails twice, then succeeds on its third attempt.
/// Persistent: requests whose key starts with 0–7 fail every attempt; the run
/// finishes with them labelled, and the next build (server healthy) retries
/// only them.
fn check(fault: Fault, label: &str, stream: bool) {
    check_via(fault, label, stream, "direct")
}

fn check_via(fault: Fault, label: &str, stream: bool, client: &'static str) {
    let build = |p: &Project, s: &FaultServer, stream: bool| {
        let out = build_via(p, s, stream, client);
        let used = s.st.clients.lock().unwrap().clone();
        assert_eq!(used, [client].into(), "{fault:?}: sent by {used:?}");
        out
    };
    let p = Project::new();
    p.write("config/experiments/f.yaml", EXP);
    let s = FaultServer::start(fault, 2);
    let out = build(&p, &s, stream);
    assert!(out.status.success(), "{fault:?}: {}", stderr_of(&out));
    let a = s.attempts();
    assert_eq!(a.len(), N, "{fault:?}");
    assert!(
        a.values().all(|v| v.len() == 3),
        "{fault:?}: attempts {:?}",
        a.values().map(Vec::len).collect::<Vec<_>>()
    );
    assert!(failures(&p).is_empty(), "{fault:?}: {:?}", failures(&p));
    assert_eq!(responses(&p), N as i64);
    if fault == Fault::RateLimitedRetryAfter {
        for v in a.values() {
            assert!(
                v[1] - v[0] >= Duration::from_millis(950),
                "Retry-After not honoured"
            );
        }
    }

    let p = Project::new();
    p.write("config/experiments/f.yaml", EXP);
    let s = FaultServer::start(fault, 0);
    s.st.persistent.store(true, Ordering::SeqCst);
    let out = build(&p, &s, stream);
    assert!(out.status.success(), "{fault:?}: {}", stderr_of(&out));
    let a = s.attempts();
    let doomed: Vec<&String> = a
        .keys()
        .filter(|k| b"01234567".contains(&k.as_bytes()[0]))
        .collect();
    assert!(
        !doomed.is_empty() && doomed.len() < N,
        "fixture: {} doomed",
        doomed.len()
    );
    for k in &doomed {
        assert_eq!(a[*k].len(), 3, "{fault:?}: 1 attempt + 2 retries");
    }
    let f = failures(&p);
    assert_eq!(
        f.get(label).copied(),
        Some(doomed.len() as i64),
        "{fault:?}: {f:?}"
    );
    assert!(
        stderr_of(&out).contains("retried on the next build"),
        "{}",
        stderr_of(&out)
    );
    assert!(p.read("runs/f/report.md").contains(label));
    // The server recovers; the next build sends only the failed requests.
    s.st.persistent.store(false, Ordering::SeqCst);
    let out = build(&p, &s, stream);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let b = s.attempts();
    for (k, v) in &b {
        let expect = if doomed.contains(&k) { 4 } else { 1 };
        assert_eq!(v.len(), expect, "{fault:?}: key {k}");
    }
    assert!(failures(&p).is_empty(), "{:?}", failures(&p));
    assert_eq!(responses(&p), N as i64);
    // And then nothing is left to do.
    let out = build(&p, &s, stream);
    assert!(out.status.success());
    assert_eq!(
        s.attempts().values().map(Vec::len).sum::<usize>(),
        b.values().map(Vec::len).sum::<usize>()
    );
}

#[test]
fn rate_limited() {
    check(Fault::RateLimited, "RATE_LIMITED", false);
}

#[test]
fn rate_limited_with_retry_after() {
    check(Fault::RateLimitedRetryAfter, "RATE_LIMITED", false);
}

#[test]
fn server_errors() {
    check(Fault::Status500, "ENGINE_ERROR", false);
    check(Fault::Status503, "ENGINE_ERROR", true);
}

#[test]
fn timeouts() {
    check(Fault::Timeout, "TIMEOUT", false);
}

#[test]
fn dropped_connections() {
    check(Fault::Dropped, "ENGINE_ERROR", false);
}

/// The same faults through reqwest, the client for https:// and proxied
/// endpoints (forced here with `KVT_HTTP_CLIENT=reqwest`).
#[test]
fn faults_through_reqwest() {
    check_via(Fault::Dropped, "ENGINE_ERROR", false, "reqwest");
    check_via(Fault::Timeout, "TIMEOUT", false, "reqwest");
    check_via(
        Fault::RateLimitedRetryAfter,
        "RATE_LIMITED",
        false,
        "reqwest",
    );
    check_via(Fault::CutStream, "ENGINE_ERROR", true, "reqwest");
}

/// A redirect on a plain-http endpoint is not followed: a transient
/// failure naming where it points, asked again like any other.
#[test]
fn redirects_are_named_and_retried() {
    check(Fault::Redirect, "ENGINE_ERROR", false);
    let p = Project::new();
    p.write("config/experiments/f.yaml", EXP);
    let s = FaultServer::start(Fault::Redirect, 100);
    let out = build(&p, &s, false);
    assert_eq!(out.status.code(), Some(1), "every request failed");
    let err = stderr_of(&out);
    assert!(
        err.contains("redirects to `http://127.0.0.1:9/v1/chat/completions`")
            && err.contains("engine.base_url"),
        "{err}"
    );
}

#[test]
fn malformed_json() {
    check(Fault::BadJson, "ENGINE_ERROR", false);
}

#[test]
fn streams_cut_in_the_middle() {
    check(Fault::CutStream, "ENGINE_ERROR", true);
}

#[test]
fn empty_choices() {
    check(Fault::EmptyChoices, "ENGINE_ERROR", false);
}

#[test]
fn the_api_key_reaches_the_server_and_nothing_else() {
    const SENTINEL: &str = "sk-kvt-sentinel-7f3a9c1e5b";
    let p = Project::new();
    p.write("config/experiments/f.yaml", EXP);
    let s = FaultServer::start(Fault::Status500, 1);
    let out = p
        .kvt()
        .args(["build", "report", "-vv", "-c", "config/experiments/f.yaml"])
        .args(["--set", &format!("engine.base_url={}/v1", s.addr)])
        .args(["--set", "engine.api_key_env=KVT_TEST_KEY"])
        .env("KVT_TEST_KEY", SENTINEL)
        .env("KVT_BACKOFF_MS", "5")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let auth = s.st.auth.lock().unwrap().clone();
    assert!(!auth.is_empty() && auth.iter().all(|a| a == &format!("Bearer {SENTINEL}")));
    // Not in the logs, the cache (store, records, journal), the SQLite file or the report.
    assert!(!stderr_of(&out).contains(SENTINEL) && !stdout_of(&out).contains(SENTINEL));
    let resolved = p
        .kvt()
        .args([
            "resolve",
            "--print-config",
            "-c",
            "config/experiments/f.yaml",
        ])
        .env("KVT_TEST_KEY", SENTINEL)
        .output()
        .unwrap();
    assert!(!stdout_of(&resolved).contains(SENTINEL));
    let files = assert_secret_nowhere(p.root(), SENTINEL);
    assert!(files > 20, "searched {files} files");
}

#[test]
fn requests_per_minute_pace_the_run_and_429s_still_finish() {
    let p = Project::new();
    p.write("config/experiments/f.yaml", EXP);
    let s = FaultServer::start(Fault::RateLimited, 1);
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/f.yaml"])
        .args(["--set", &format!("engine.base_url={}/v1", s.addr)])
        .args(["--set", "engine.rpm=1200", "--set", "engine.max_retries=3"])
        .env("KVT_BACKOFF_MS", "5")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let a = s.attempts();
    let mut all: Vec<Instant> = a.values().flatten().copied().collect();
    all.sort();
    // 32 attempts (16 × 429 then success) at 20 per second: at least ~1.5 s.
    assert_eq!(all.len(), 2 * N);
    let span = *all.last().unwrap() - all[0];
    assert!(span >= Duration::from_millis(1450), "{span:?}");
    assert!(failures(&p).is_empty());
    // The stub's /metrics reports 42 % KV-cache usage: it reaches the telemetry and the report.
    let c = rusqlite::Connection::open(p.path("runs/f/kv_transition.sqlite")).unwrap();
    let u: f64 = c
        .query_row("SELECT MAX(kv_cache_usage) FROM telemetry", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!((u - 0.42).abs() < 1e-9, "{u}");
    assert!(p.read("runs/f/report.md").contains("KV cache 42 % used"));
}

#[test]
fn a_response_above_the_size_limit_is_an_engine_error() {
    let p = Project::new();
    p.write("config/experiments/f.yaml", EXP);
    let s = FaultServer::start(Fault::Huge, usize::MAX);
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/f.yaml"])
        .args(["--set", &format!("engine.base_url={}/v1", s.addr)])
        .args(["--set", "engine.max_response_mib=1"])
        .env("KVT_BACKOFF_MS", "5")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Labelled, and not retried: a server that sends too much will again.
    assert_eq!(failures(&p).get("ENGINE_ERROR").copied(), Some(N as i64));
    assert!(s.attempts().values().all(|v| v.len() == 1));
}

/// The stream reader scans each byte once; an event separator split across
/// chunks (here every byte is its own chunk) is still found.
#[test]
fn an_event_stream_in_one_byte_chunks_is_read_whole() {
    let p = Project::new();
    p.write("config/experiments/f.yaml", EXP);
    let s = FaultServer::start(Fault::ByteChunks, usize::MAX);
    let out = build(&p, &s, true);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(failures(&p).is_empty(), "{:?}", failures(&p));
    assert_eq!(responses(&p), N as i64);
    let c = rusqlite::Connection::open(p.path("runs/f/kv_transition.sqlite")).unwrap();
    let texts: Vec<String> = c
        .prepare("SELECT text FROM responses")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(texts.iter().all(|t| t == "42"), "{texts:?}");
}

/// Issue #26, finding 5: the full cache's request (one key for every
/// policy) was sent by each infer node that needed it when it failed
/// transiently: 10 attempts with `max_retries: 4`, and two different
/// outcomes for one key in one build. Now one node sends it; the other takes
/// its outcome, even a failure (the next build retries it). The default
/// pipeline runs the full cache once (`kv.cells`), so two nodes share a key
/// only in a pipeline that crosses policies and budgets itself, as this one.
#[test]
fn regression_a_key_shared_by_two_infer_nodes_is_sent_by_one() {
    let p = Project::new();
    let cross = kvt::cli::EMBEDDED_PIPELINE.replace(
        "cells: kv.cells\n",
        "foreach: {policy: kv.policies, budget: kv.budgets}\n",
    );
    assert_eq!(cross.matches("foreach").count(), 2, "{cross}");
    p.write("pipelines/cross.yaml", &cross);
    p.write(
        "config/experiments/f.yaml",
        &format!(
            "pipeline: cross\n{}",
            EXP.replace(
                "policies: [snapkv], budgets: [1.0]",
                "policies: [snapkv, streaming], budgets: [1.0, 0.5]",
            )
        ),
    );
    // Keys starting 0–7 fail every attempt; the rest succeed at once.
    let s = FaultServer::start(Fault::Status500, 0);
    s.st.persistent.store(true, Ordering::SeqCst);
    let max_retries = 1;
    let out = p
        .kvt()
        .args([
            "build",
            "report",
            "-j",
            "2",
            "-c",
            "config/experiments/f.yaml",
        ])
        .args(["--set", &format!("engine.base_url={}/v1", s.addr)])
        .args(["--set", &format!("engine.max_retries={max_retries}")])
        .env("KVT_BACKOFF_MS", "5")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let attempts = s.attempts();
    let most = attempts.values().map(Vec::len).max().unwrap();
    assert!(
        most <= max_retries + 1,
        "a key was sent {most} times (max_retries {max_retries})"
    );
    assert!(
        attempts.values().any(|a| a.len() == max_retries + 1),
        "no key failed through its retries: the test lost its point"
    );
    let c = rusqlite::Connection::open(p.path("runs/f/kv_transition.sqlite")).unwrap();
    let shared: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM (SELECT request_key FROM requests
             GROUP BY request_key HAVING COUNT(DISTINCT run_id) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(shared as usize, N, "the full cache's keys are shared");
    let split: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM (SELECT q.request_key FROM requests q JOIN responses r USING (request_id)
             GROUP BY q.request_key
             HAVING COUNT(DISTINCT COALESCE(r.error, '') || '|' || r.text) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(split, 0, "keys with two outcomes in one build");
}

/// Issue #29, item 6: when every request fails because nothing answers,
/// the error names the address the requests went to.
#[test]
fn an_unreachable_server_is_named_by_its_url() {
    let p = Project::new();
    p.write("config/experiments/f.yaml", EXP);
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/f.yaml"])
        .args(["--set", &format!("engine.base_url={url}")])
        .args(["--set", "engine.max_retries=0"])
        .env("KVT_BACKOFF_MS", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("is the server at `{url}` up?")),
        "{err}"
    );
}
