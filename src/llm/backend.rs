//! One trait for every way kvt gets answers: the reference simulator and the
//! native engine in process, and HTTP to a spawned `kvt serve`, a launched
//! server or any OpenAI-compatible URL (`llm::http::HttpBackend`). `infer`
//! builds requests, keeps the journal and telemetry, and picks a backend by
//! the typed `engine.kind`; a new engine is a new implementation here, not a
//! new branch in `infer`.

use super::Outcome;
use anyhow::Result;
use serde_json::Value;

/// One request as a backend sees it.
pub struct Query<'a> {
    /// The request's identity (the journal key; sent as `x-kvt-request-key`).
    pub key: &'a str,
    /// Chat messages (`role`, `content`).
    pub messages: &'a [Value],
    /// The question alone (the simulator's reader looks for it).
    pub question: &'a str,
    /// The OpenAI-compatible request body (HTTP backends).
    pub body: &'a Value,
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
