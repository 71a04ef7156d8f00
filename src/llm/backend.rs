//! One trait for every way kvt gets answers: the reference simulator and the
//! native engine in process, and HTTP to a spawned `kvt serve`, a launched
//! server or any OpenAI-compatible URL (`llm::http::HttpBackend`). `infer`
//! builds requests, keeps the journal and telemetry, and picks a backend by
//! the typed `engine.kind`; a new engine is a new implementation here, not a
//! new branch in `infer`.

use super::Outcome;
use anyhow::Result;
use serde_json::Value;

/// What every request of a node shares: the system prompt, the API and the
/// body fields around the messages. A request's JSON is built from it when
/// the request is sent, so a node holds each prompt once, as text.
#[derive(Debug, Clone)]
pub struct Shape {
    pub system: String,
    /// `completions`: one `prompt` string instead of chat `messages`.
    pub completions: bool,
    /// The body without `messages`/`prompt` and without `extra`.
    pub base: Value,
    /// `engine.extra_body`, applied last (it may override anything).
    pub extra: std::collections::BTreeMap<String, Value>,
}

/// One request as a backend sees it.
pub struct Query<'a> {
    /// The request's identity (the journal key; sent as `x-kvt-request-key`).
    pub key: &'a str,
    /// The user turn (the filled, possibly truncated, template).
    pub user: &'a str,
    /// The question alone (the simulator's reader looks for it).
    pub question: &'a str,
    pub shape: &'a Shape,
}

impl Query<'_> {
    /// Chat messages (`role`, `content`): the system turn, then the user's.
    pub fn messages(&self) -> Vec<Value> {
        messages(&self.shape.system, self.user)
    }

    /// The OpenAI-compatible request body (HTTP backends).
    pub fn body(&self) -> Value {
        let mut body = self.shape.base.clone();
        if self.shape.completions {
            body["prompt"] = Value::String(format!("{}\n\n{}", self.shape.system, self.user));
        } else {
            body["messages"] = Value::Array(self.messages());
        }
        for (k, v) in &self.shape.extra {
            body[k] = v.clone();
        }
        body
    }
}

/// The two chat turns kvt sends (and hashes into request keys).
pub fn messages(system: &str, user: &str) -> Vec<Value> {
    vec![
        serde_json::json!({"role": "system", "content": system}),
        serde_json::json!({"role": "user", "content": user}),
    ]
}

/// Called once per answer as it arrives, so a crash loses at most the
/// answers in flight.
pub type Record<'a> = dyn Fn(&str, &Outcome) -> Result<()> + Sync + 'a;

pub trait Backend: Send + Sync {
    /// Answers `queries` with up to `concurrency` in flight, calling `record`
    /// for each; stops starting new ones once `cancelled()` is true. A failed
    /// request is an `Outcome` with an error kind, not an `Err`: `Err` means
    /// the backend itself cannot go on (a server that never came up, a
    /// journal that cannot be written).
    fn answer_all(
        &self,
        queries: &[Query<'_>],
        concurrency: usize,
        cancelled: &(dyn Fn() -> bool + Sync),
        record: &Record<'_>,
    ) -> Result<()>;
}

/// Chat messages as (role, text) pairs.
pub fn chat_pairs(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or("user").to_string(),
                m["content"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}
