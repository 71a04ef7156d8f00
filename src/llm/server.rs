//! `kvt serve`: the reference engine behind an OpenAI-compatible HTTP API.
//!
//! * `POST /v1/chat/completions`, streaming (server-sent events, with a usage
//!   chunk when `stream_options.include_usage` is set) and not;
//! * `POST /v1/completions` (plain text completions, streaming and not);
//! * `POST /tokenize`, `GET /v1/models`, `GET /health`.
//!
//! Policy and budget come from the request's `kvt` field
//! (`{"policy": "snapkv", "budget": 0.5, ...}`) or from the server's flags. The
//! question is read from the last line of the last user message that starts
//! with `Question:`. Responses carry `kvt.retained_tokens`.
//!
//! With `--request-log`, every answer is appended to the log with its request
//! key (`x-kvt-request-key`), and a request whose key is already there — sent
//! again after the client crashed — is replayed from it, not answered twice.

use super::backend::{CellOptions, InProcess, Query, Shape};
use super::QUESTION_MARKER;
use super::{reference, KvParams};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Server settings (the `kvt serve` flags).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub model: String,
    pub defaults: KvParams,
    /// Artificial delay before each answer (for tests and demos of slow servers).
    pub delay_ms: u64,
    /// Appends one JSON line per answered request (request key, status).
    pub request_log: Option<std::path::PathBuf>,
    /// Exit when standard input closes: a parent that dies takes the server with it.
    pub exit_on_stdin_eof: bool,
    /// A GGUF file: answer with the native engine instead of the simulator.
    pub model_file: Option<std::path::PathBuf>,
    pub prefill_cache_mib: usize,
    /// Native engine: weights in f32, dequantised at load.
    pub dequantize: bool,
    /// Requests to `/v1/*` and `/tokenize` must carry `Authorization:
    /// Bearer <key>` (as llama-server's and vLLM's `--api-key`).
    pub api_key: Option<String>,
}

struct AppState {
    opts: ServeOptions,
    served: AtomicU64,
    log: Option<Mutex<std::fs::File>>,
    /// Answers by request key (from `x-kvt-request-key`), loaded from the
    /// request log at start: a request sent again after a crash is replayed,
    /// not answered twice.
    replay: Mutex<std::collections::HashMap<String, reference::RefAnswer>>,
    /// What answers: the build's own in-process backends, one per request's cell.
    engine: InProcess,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let body = json!({"error": {"message": msg.into(), "type": "invalid_request_error"}});
    (status, Json(body)).into_response()
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        // The content-parts form: [{"type": "text", "text": "..."}].
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Renders messages into one prompt and finds the question.
pub fn render(messages: &[Value]) -> Result<(String, String), String> {
    if messages.is_empty() {
        return Err("`messages` is empty".into());
    }
    let mut prompt = String::new();
    let mut last_user = String::new();
    for m in messages {
        let content = text_of(m.get("content").unwrap_or(&Value::Null));
        let role = m.get("role").and_then(Value::as_str);
        if role == Some("user") || role == Some(crate::llm::native::tokenizer::COMPLETION_ROLE) {
            last_user = content.clone();
        }
        if !prompt.is_empty() {
            prompt.push_str("\n\n");
        }
        prompt.push_str(&content);
    }
    let question = last_user
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(QUESTION_MARKER))
        .map(|q| q.trim().to_string())
        .unwrap_or_else(|| last_user.lines().last().unwrap_or("").trim().to_string());
    Ok((prompt, question))
}

fn params_for(body: &Value, defaults: &KvParams) -> Result<KvParams, String> {
    let p = merged_params(body, defaults, &[])?;
    p.check().map_err(|e| e.to_string())?;
    Ok(p)
}

/// `defaults` with the fields the request's `kvt` object names; a field that
/// is not a parameter (`also` lists optional ones) is refused by name.
fn merged_params(body: &Value, defaults: &KvParams, also: &[&str]) -> Result<KvParams, String> {
    let Some(k) = body.get("kvt") else {
        return Ok(defaults.clone());
    };
    let mut merged = serde_json::to_value(defaults).expect("params serialize");
    let obj = k.as_object().ok_or("`kvt` must be an object")?;
    for (key, v) in obj {
        if merged.get(key).is_none() && !also.contains(&key.as_str()) {
            return Err(format!("unknown field `kvt.{key}`"));
        }
        merged[key] = v.clone();
    }
    serde_json::from_value(merged).map_err(|e| format!("`kvt`: {e}"))
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer_http(st, headers, body, false).await
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer_http(st, headers, body, true).await
}

/// Both APIs: chat (`messages`) and plain completions (`prompt`).
async fn answer_http(st: Arc<AppState>, headers: HeaderMap, body: Body, plain: bool) -> Response {
    let bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")),
    };
    let from_prompt;
    let messages = if plain {
        let Some(p) = body.get("prompt").and_then(Value::as_str) else {
            return error(StatusCode::BAD_REQUEST, "missing `prompt`");
        };
        // A plain completion: the prompt as it stands (no chat template on
        // the native engine).
        from_prompt =
            vec![json!({"role": crate::llm::native::tokenizer::COMPLETION_ROLE, "content": p})];
        &from_prompt
    } else {
        let Some(m) = body.get("messages").and_then(Value::as_array) else {
            return error(StatusCode::BAD_REQUEST, "missing `messages`");
        };
        m
    };
    let (_, question) = match render(messages) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let params = match &st.engine {
        InProcess::Reference => params_for(&body, &st.opts.defaults),
        InProcess::Native(_) => native_params_for(&body, &st.opts.defaults),
    };
    let params = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let max_new = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(256) as usize;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&st.opts.model)
        .to_string();
    if st.opts.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(st.opts.delay_ms)).await;
    }
    let key = headers
        .get("x-kvt-request-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let replayed = (!key.is_empty())
        .then(|| st.replay.lock().ok()?.get(&key).cloned())
        .flatten();
    let is_replay = replayed.is_some();
    let ans = match replayed {
        Some(a) => a,
        None => {
            let engine = st.engine.clone();
            let cohort = body.get("kvt_cohort").cloned();
            let record_kept = body
                .get("kvt_record_kept")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let extras = NativeExtras::of(&body);
            // The conversation as sent, each content as its text.
            let conversation: Vec<Value> = messages
                .iter()
                .map(|m| {
                    let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
                    json!({"role": role, "content": text_of(m.get("content").unwrap_or(&Value::Null))})
                })
                .collect();
            let computed = tokio::task::spawn_blocking(move || {
                answer_through_backend(
                    &engine,
                    &conversation,
                    &question,
                    &params,
                    cohort,
                    record_kept,
                    max_new,
                    extras,
                )
            })
            .await;
            match computed {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("{e:#}")),
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
    };
    let n = st.served.fetch_add(1, Ordering::Relaxed);
    if let Some(log) = &st.log {
        let line = if is_replay {
            json!({"request_key": key, "stream": stream, "replay": true})
        } else {
            json!({"request_key": key, "stream": stream, "answer": ans})
        };
        // One write per line: several servers may append to one log (O_APPEND).
        if let Ok(mut f) = log.lock() {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
        if !is_replay && !key.is_empty() {
            if let Ok(mut r) = st.replay.lock() {
                r.insert(key.clone(), ans.clone());
            }
        }
    }
    let id = format!("kvt-{n}");
    let usage = json!({
        "prompt_tokens": ans.prompt_tokens,
        "completion_tokens": ans.completion_tokens,
        "total_tokens": ans.prompt_tokens + ans.completion_tokens,
    });
    let engine = st.engine.name();
    let mut kvt = json!({"retained_tokens": ans.retained_tokens, "policy": st_policy(&body, &st), "engine": engine});
    if let Some(n) = &ans.native {
        kvt["native"] = json!(n);
    }
    // Log-probabilities where the engine has them (the native engine); the
    // simulator has none and the field is left out, as servers do.
    let lps = ans
        .native
        .as_ref()
        .and_then(|n| n.logprobs.as_deref())
        .map(logprobs_json);
    if !stream {
        let mut choice = if plain {
            json!({"index": 0, "text": ans.text, "finish_reason": ans.finish_reason})
        } else {
            json!({"index": 0, "message": {"role": "assistant", "content": ans.text},
                   "finish_reason": ans.finish_reason})
        };
        if let Some(l) = &lps {
            choice["logprobs"] = l.clone();
        }
        let object = if plain {
            "text_completion"
        } else {
            "chat.completion"
        };
        return Json(json!({
            "id": id, "object": object, "created": 0, "model": model,
            "choices": [choice], "usage": usage, "kvt": kvt,
        }))
        .into_response();
    }
    // Stream the answer word by word, then the finish chunk, then usage.
    let chunk = |delta: Value, finish: Value| {
        let c = if plain {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            json!({"id": id, "object": "text_completion", "created": 0, "model": model,
                   "choices": [{"index": 0, "text": text, "finish_reason": finish}]})
        } else {
            json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        c.to_string()
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let mut piece = String::new();
    for ch in ans.text.chars() {
        piece.push(ch);
        if ch == ' ' {
            events.push(chunk(json!({"content": piece}), Value::Null));
            piece.clear();
        }
    }
    if !piece.is_empty() {
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    let mut last: Value =
        serde_json::from_str(&chunk(json!({}), json!(ans.finish_reason))).expect("a chunk is JSON");
    if let Some(l) = &lps {
        last["choices"][0]["logprobs"] = l.clone();
    }
    events.push(last.to_string());
    if include_usage {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [], "usage": usage, "kvt": kvt});
        events.push(c.to_string());
    } else {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [], "kvt": kvt});
        events.push(c.to_string());
    }
    events.push("[DONE]".to_string());
    // axum frames the events (`data: …` and the blank line) and sets the headers.
    let stream = futures_util::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, std::convert::Infallible>(Event::default().data(e))),
    );
    let mut resp = Sse::new(stream).into_response();
    resp.headers_mut().insert(
        "cache-control",
        axum::http::HeaderValue::from_static("no-cache"),
    );
    resp
}

/// The native engine's parameters: the simulator's, plus β, the compression
/// mode, compression while decoding and the precision scores are compared at.
fn native_params_for(body: &Value, defaults: &KvParams) -> Result<KvParams, String> {
    let p = merged_params(
        body,
        defaults,
        &["beta", "compress", "decode", "score_dtype"],
    )?;
    p.native_cell().map_err(|e| e.to_string())?;
    if !(p.budget.is_finite() && p.budget > 0.0) {
        return Err(format!("KV budget {} is not positive", p.budget));
    }
    Ok(p)
}

/// What a request asks of the native engine beyond its answer: top-k
/// log-probabilities (the standard `logprobs` / `top_logprobs` fields), gold
/// answers to teacher-force (`kvt_golds`) and the full cache's answer
/// teacher-forced under the cell (`kvt_fidelity`).
struct NativeExtras {
    logprobs: usize,
    golds: Vec<String>,
    fidelity: bool,
    /// `kvt_history`: the earlier turns' user messages (`multi_turn`).
    history: Vec<String>,
}

impl NativeExtras {
    fn of(body: &Value) -> NativeExtras {
        // Chat asks with `logprobs: true` and `top_logprobs: K`, the
        // completions API with `logprobs: K`.
        let k = match body.get("logprobs") {
            Some(Value::Bool(true)) => body
                .get("top_logprobs")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1),
            Some(v) => v.as_u64().unwrap_or(0),
            None => 0,
        };
        NativeExtras {
            logprobs: k.min(20) as usize,
            golds: body
                .get("kvt_golds")
                .and_then(|g| serde_json::from_value(g.clone()).ok())
                .unwrap_or_default(),
            fidelity: body.get("kvt_fidelity").and_then(Value::as_bool) == Some(true),
            history: body
                .get("kvt_history")
                .and_then(|g| serde_json::from_value(g.clone()).ok())
                .unwrap_or_default(),
        }
    }
}

/// The standard `logprobs` object of a choice (`content`: one entry per token).
fn logprobs_json(lps: &[crate::llm::TokenLogprob]) -> Value {
    json!({"content": lps.iter().map(|t| json!({
        "token": t.token, "logprob": t.logprob,
        "top_logprobs": t.top.iter().map(|(tok, lp)| json!({"token": tok, "logprob": lp})).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()})
}

/// One request answered by the backend `kvt build` would use for the same
/// cell ([`InProcess::backend`]), as the request log keeps it.
#[allow(clippy::too_many_arguments)]
fn answer_through_backend(
    engine: &InProcess,
    conversation: &[Value],
    question: &str,
    params: &KvParams,
    cohort: Option<Value>,
    record_kept: bool,
    max_new: usize,
    extras: NativeExtras,
) -> anyhow::Result<reference::RefAnswer> {
    let cohort: Vec<KvParams> = match cohort {
        Some(c) => serde_json::from_value(c).map_err(|e| anyhow::anyhow!("`kvt_cohort`: {e}"))?,
        None => Vec::new(),
    };
    let backend = engine.backend(
        params,
        CellOptions {
            max_new_tokens: max_new,
            cohort,
            record_kept,
            logprobs: extras.logprobs,
            fidelity: extras.fidelity,
        },
    )?;
    let shape = Shape {
        system: String::new(),
        completions: false,
        base: Value::Null,
        extra: Default::default(),
        head: Default::default(),
    };
    let a = backend.answer_one(&Query {
        key: "",
        user: "",
        question,
        golds: &extras.golds,
        shape: &shape,
        conversation: Some(conversation),
        history: &extras.history,
    })?;
    let o = a.outcome;
    if let Some(e) = o.error {
        anyhow::bail!("{e}");
    }
    Ok(reference::RefAnswer {
        text: o.text,
        finish_reason: o.finish_reason.unwrap_or_default(),
        prompt_tokens: o.prompt_tokens.unwrap_or(0) as usize,
        completion_tokens: o.completion_tokens.unwrap_or(0) as usize,
        retained_tokens: o.retained_tokens.unwrap_or(0) as usize,
        native: a.native,
    })
}

fn st_policy(body: &Value, st: &AppState) -> String {
    body.pointer("/kvt/policy")
        .and_then(Value::as_str)
        .unwrap_or(&st.opts.defaults.policy)
        .to_string()
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": st.opts.model, "object": "model", "created": 0, "owned_by": "kvt"}
    ]}))
}

/// `POST /tokenize` with `{"content": TEXT}` (llama.cpp) or `{"prompt": TEXT}`
/// (vLLM): the model's tokens (cl100k_base for the simulator).
async fn tokenize(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let bytes = match axum::body::to_bytes(body, 256 << 20).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")),
    };
    let Some(text) = v
        .get("content")
        .or_else(|| v.get("prompt"))
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return error(StatusCode::BAD_REQUEST, "missing `content` (or `prompt`)");
    };
    let engine = st.engine.clone();
    let toks = tokio::task::spawn_blocking(move || match engine {
        InProcess::Native(e) => e.tokenize(&text),
        InProcess::Reference => {
            crate::data::tokenize::encoding("cl100k_base").map(|b| b.encode_ordinary(&text))
        }
    })
    .await;
    match toks {
        Ok(Ok(t)) => Json(json!({"count": t.len(), "tokens": t})).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Prometheus text: requests served and, for the native engine, prefills
/// (computed and shared), tokens and the last answer's KV bytes.
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut out = format!(
        "# TYPE kvt_requests_served counter\nkvt_requests_served {}\n",
        st.served.load(Ordering::Relaxed)
    );
    if let InProcess::Native(e) = &st.engine {
        let c = &e.counters;
        for (name, v) in [
            ("kvt_native_prefills", c.prefills.load(Ordering::Relaxed)),
            (
                "kvt_native_prefills_reused",
                c.prefills_reused.load(Ordering::Relaxed),
            ),
            (
                "kvt_native_prefill_tokens",
                c.prefill_tokens.load(Ordering::Relaxed),
            ),
            (
                "kvt_native_decode_tokens",
                c.decode_tokens.load(Ordering::Relaxed),
            ),
            ("kvt_native_answers", c.answers.load(Ordering::Relaxed)),
        ] {
            out.push_str(&format!("# TYPE {name} counter\n{name} {v}\n"));
        }
        out.push_str(&format!(
            "# TYPE kvt_native_kv_bytes gauge\nkvt_native_kv_bytes {}\n",
            c.kv_bytes_last.load(Ordering::Relaxed)
        ));
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "served": st.served.load(Ordering::Relaxed)}))
}

/// The HTTP app (also used in-process by tests).
pub fn router(opts: ServeOptions) -> anyhow::Result<Router> {
    let log = match &opts.request_log {
        Some(p) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| anyhow::anyhow!("opening request log {}: {e}", p.display()))?,
        )),
        None => None,
    };
    // Answers already in the log are replayed, not recomputed.
    let mut replay = std::collections::HashMap::new();
    if let Some(p) = &opts.request_log {
        for line in std::fs::read_to_string(p).unwrap_or_default().lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let (Some(k), Some(a)) = (v["request_key"].as_str(), v.get("answer")) {
                if let Ok(a) = serde_json::from_value::<reference::RefAnswer>(a.clone()) {
                    replay.insert(k.to_string(), a);
                }
            }
        }
    }
    let engine = match &opts.model_file {
        Some(f) => InProcess::Native(crate::llm::native::NativeEngine::shared(
            f,
            opts.prefill_cache_mib,
            opts.dequantize,
        )?),
        None => InProcess::Reference,
    };
    let api_key = opts.api_key.clone();
    let st = Arc::new(AppState {
        opts,
        served: AtomicU64::new(0),
        log,
        replay: Mutex::new(replay),
        engine,
    });
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/tokenize", post(tokenize))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let api_key = api_key.clone();
                async move {
                    let guarded = req.uri().path().starts_with("/v1/") || req.uri().path() == "/tokenize";
                    if let (Some(k), true) = (&api_key, guarded) {
                        let sent = req
                            .headers()
                            .get(axum::http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok());
                        if sent.and_then(|s| s.strip_prefix("Bearer ")) != Some(k.as_str()) {
                            return error(
                                StatusCode::UNAUTHORIZED,
                                "this server needs `Authorization: Bearer <key>` (kvt: set `engine.api_key_env`)",
                            );
                        }
                    }
                    next.run(req).await
                }
            },
        ))
        .with_state(st))
}

/// Runs the server until Ctrl-C (or standard input closes, if asked).
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    if opts.model_file.is_none() {
        opts.defaults.check()?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", opts.host, opts.port)
            .parse()
            .map_err(|e| anyhow::anyhow!("`--host {}`: {e}", opts.host))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr()?;
        let exit_on_eof = opts.exit_on_stdin_eof;
        let app = router(opts)?;
        // The first line of stdout is the address: a parent reads it to find the port.
        println!("kvt serve: listening on http://{local}");
        std::io::stdout().flush()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        if exit_on_eof {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                use std::io::Read;
                while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
                let _ = tx.send(());
            });
        } else {
            drop(tx);
        }
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                r = rx => if r.is_err() { std::future::pending::<()>().await },
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_is_the_last_question_line_of_the_last_user_message() {
        let msgs = vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "Doc text\nQuestion: What is X?\nAnswer:"}),
        ];
        let (prompt, q) = render(&msgs).unwrap();
        assert_eq!(q, "What is X?");
        assert!(prompt.starts_with("Be brief.\n\nDoc text"));
        assert!(render(&[]).is_err());
    }

    #[test]
    fn request_fields_override_server_defaults() {
        let d = KvParams::for_test("full", 1.0);
        let p = params_for(&json!({"kvt": {"policy": "snapkv", "budget": 0.2}}), &d).unwrap();
        assert_eq!((p.policy.as_str(), p.budget, p.window), ("snapkv", 0.2, 32));
        assert!(params_for(&json!({"kvt": {"polcy": "x"}}), &d)
            .unwrap_err()
            .contains("kvt.polcy"));
        assert!(params_for(&json!({"kvt": {"policy": "lru"}}), &d).is_err());
        // The native engine's: omitted fields take the defaults, its own two
        // are allowed, and a field that is no parameter is named.
        let p =
            native_params_for(&json!({"kvt": {"policy": "snapkv+q8_0", "beta": 5.0}}), &d).unwrap();
        assert_eq!(
            (p.policy.as_str(), p.beta, p.window),
            ("snapkv+q8_0", Some(5.0), d.window)
        );
        let e = native_params_for(&json!({"kvt": {"policy": "full", "quant": "q8_0"}}), &d)
            .unwrap_err();
        assert!(e.contains("`kvt.quant`"), "{e}");
        // The compression mode is one typed value: an unknown one is refused
        // (it used to mean `context` silently).
        let p = native_params_for(&json!({"kvt": {"compress": "prompt"}}), &d).unwrap();
        assert_eq!(p.compress, Some(crate::config::schema::Compress::Prompt));
        // Written as the string it was, so request identity is unchanged.
        assert_eq!(serde_json::to_value(&p).unwrap()["compress"], "prompt");
        let e = native_params_for(&json!({"kvt": {"compress": "question"}}), &d).unwrap_err();
        assert!(e.contains("question"), "{e}");
    }
}
