//! `kvt serve`: the reference engine over a real OpenAI-compatible HTTP API.

mod common;
use common::*;
use serde_json::{json, Value};

fn chat(policy: &str, budget: f64, stream: bool) -> String {
    let filler = "The ferry crossed the estuary twice an hour. ".repeat(80);
    json!({
        "model": "kvt-reference",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": format!(
                "Archive note: the access code assigned to Velo is 918273. {filler}\nQuestion: What is the access code assigned to Velo?\nAnswer:")}
        ],
        "max_tokens": 16,
        "stream": stream,
        "stream_options": {"include_usage": true},
        "kvt": {"policy": policy, "budget": budget}
    })
    .to_string()
}

#[test]
fn health_models_and_chat_completions() {
    let s = Served::start(&["--model", "ref-test"]);
    let (st, body) = http(&s.addr, "GET", "/health", None);
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let (st, body) = http(&s.addr, "GET", "/v1/models", None);
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["data"][0]["id"],
        "ref-test"
    );

    // Non-streaming: full cache finds the needle at the start of the prompt.
    let (st, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat("full", 1.0, false)),
    );
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "918273");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 500);
    assert_eq!(v["kvt"]["retained_tokens"].as_u64().unwrap(), prompt_tokens);

    // Streaming eviction at 20 % loses it; SnapKV keeps it.
    let (_, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat("streaming", 0.2, false)),
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("918273"));
    assert!(v["kvt"]["retained_tokens"].as_u64().unwrap() < prompt_tokens / 4);

    // Streaming response: SSE chunks, a usage chunk, [DONE].
    let (st, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat("snapkv", 0.2, true)),
    );
    assert_eq!(st, 200);
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let mut text = String::new();
    let mut usage = None;
    for d in &datas[..datas.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(text, "918273");
    assert_eq!(
        usage.unwrap()["prompt_tokens"].as_u64(),
        Some(prompt_tokens)
    );
}

#[test]
fn an_api_key_is_required_where_given_and_health_stays_open() {
    let s = Served::start(&["--api-key", "k-serve-test-1"]);
    let body = chat("full", 1.0, false);
    let (st, out) = http(&s.addr, "POST", "/v1/chat/completions", Some(&body));
    assert_eq!(st, 401, "{out}");
    assert!(out.contains("engine.api_key_env"), "{out}");
    let (st, _) = http_with(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        &["Authorization: Bearer wrong"],
    );
    assert_eq!(st, 401);
    let (st, out) = http_with(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        &["Authorization: Bearer k-serve-test-1"],
    );
    assert_eq!(st, 200, "{out}");
    assert_eq!(http(&s.addr, "GET", "/health", None).0, 200);
}

#[test]
fn plain_completions() {
    let s = Served::start(&[]);
    let filler = "The ferry crossed the estuary twice an hour. ".repeat(40);
    let body = json!({
        "prompt": format!("Archive note: the access code assigned to Velo is 918273. {filler}\nQuestion: What is the access code assigned to Velo?\nAnswer:"),
        "max_tokens": 16
    })
    .to_string();
    let (st, out) = http(&s.addr, "POST", "/v1/completions", Some(&body));
    assert_eq!(st, 200, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "918273");
    let (st, out) = http(
        &s.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"messages": []}"#),
    );
    assert_eq!(st, 400);
    assert!(out.contains("prompt"));
}

#[test]
fn bad_requests_get_400_with_a_reason() {
    let s = Served::start(&[]);
    let (st, body) = http(&s.addr, "POST", "/v1/chat/completions", Some("{not json"));
    assert_eq!(st, 400);
    assert!(body.contains("not JSON"), "{body}");
    let (st, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        Some(r#"{"model": "x"}"#),
    );
    assert_eq!(st, 400);
    assert!(body.contains("messages"), "{body}");
    let bad = chat("lru", 0.5, false);
    let (st, body) = http(&s.addr, "POST", "/v1/chat/completions", Some(&bad));
    assert_eq!(st, 400);
    assert!(body.contains("unknown KV policy `lru`"), "{body}");
}

#[test]
fn serve_rejects_a_bad_default_policy_with_exit_2() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvt"))
        .args(["serve", "--port", "0", "--policy", "lru"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("unknown KV policy"));
}
