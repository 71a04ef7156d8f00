//! Talking to language models: the reference engine (an in-process simulator of
//! KV eviction), `kvt serve` (that engine behind an OpenAI-compatible HTTP API),
//! the OpenAI-compatible client, and the request journal that makes inference
//! resumable.

pub mod client;
pub mod journal;
pub mod launcher;
pub mod limits;
pub mod metrics_scrape;
pub mod reference;
pub mod server;

use serde::{Deserialize, Serialize};

/// The outcome of one request, as recorded in the journal and the `responses`
/// artifact. `error_kind` uses the failure taxonomy's transport labels
/// (TIMEOUT, RATE_LIMITED, ENGINE_ERROR); `is_final` is false for transient
/// failures, which the next build retries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub text: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Tokens whose KV entries survived eviction, when the server reports it.
    pub retained_tokens: Option<u64>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub retries: u32,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub http_status: Option<u16>,
    /// The replica that answered, when there are several.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Resident memory of a server kvt launched, when this response arrived (KiB).
    #[serde(default)]
    pub server_rss_kib: Option<u64>,
    /// The server's KV-cache usage (0–1) from its `/metrics`, when this response arrived.
    #[serde(default)]
    pub kv_cache_usage: Option<f64>,
    /// Server-reported prompt-processing and generation times (llama.cpp's `timings`).
    #[serde(default)]
    pub server_prompt_ms: Option<f64>,
    #[serde(default)]
    pub server_predicted_ms: Option<f64>,
    pub is_final: bool,
}

/// The question line the reference engine looks for in the last user message.
pub const QUESTION_MARKER: &str = "Question:";
