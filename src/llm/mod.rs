//! Talking to language models: the reference engine (an in-process simulator of
//! KV eviction), `kvt serve` (that engine behind an OpenAI-compatible HTTP API),
//! the OpenAI-compatible client, and the request journal that makes inference
//! resumable.

pub mod backend;
pub mod client;
pub mod direct;
pub mod http;
pub mod journal;
pub mod launcher;
pub mod limits;
pub mod metrics_scrape;
pub mod native;
pub mod reference;
pub mod server;
pub mod spawned;

use serde::{Deserialize, Serialize};

/// The outcome of one request, as recorded in the journal and the `responses`
/// artifact (fields that hold nothing are left out of both: they read back
/// as none). `error_kind` uses the failure taxonomy's transport labels
/// (TIMEOUT, RATE_LIMITED, ENGINE_ERROR); `is_final` is false for transient
/// failures, which the next build retries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// Tokens whose KV entries survived eviction, when the server reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_tokens: Option<u64>,
    pub latency_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    pub retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The replica that answered, when there are several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Resident memory of a server kvt launched, when this response arrived (KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_rss_kib: Option<u64>,
    /// The server's KV-cache usage (0–1) from its `/metrics`, when this response arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
    /// Peak memory the server reports for this answer (`kvt.peak_memory_bytes`;
    /// scripts/kvpress_server.py: the GPU's peak allocation, or its peak RSS
    /// on a CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_peak_bytes: Option<u64>,
    /// Server-reported prompt-processing and generation times (llama.cpp's `timings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_prompt_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_predicted_ms: Option<f64>,
    /// Native engine: KV entries kept per layer (summed over KV heads), before decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_kept_per_layer: Option<Vec<u64>>,
    /// Native engine: KV entries kept over all layers and heads, and what the
    /// full cache holds for the same span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_kept_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_full_total: Option<u64>,
    /// Native engine: bytes of the kept keys and values in the cache's format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bytes: Option<u64>,
    /// Native engine: prefill and decode time (ms) and whether the prefill was shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_reused: Option<bool>,
    /// Which of kvt's own engines answered (`reference` — the simulator — or
    /// `native`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Native engine with `engine.record_kept`: kept positions `[layer][kv head][..]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_positions: Option<Vec<Vec<Vec<u32>>>>,
    /// Native engine with `engine.record_kept`: the compressed span's tokens
    /// and the share of (layer, KV head) pairs that kept each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_share: Option<Vec<(String, f32)>>,
    pub is_final: bool,
}

/// A policy as written in `kv.policies`: an eviction policy, optionally with a
/// KV quantisation (`snapkv+q8_0`, `full+q4_0`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicySpec {
    pub policy: native::policy::Policy,
    pub quant: native::quant::KvQuant,
}

impl PolicySpec {
    pub fn parse(s: &str) -> Result<PolicySpec, String> {
        let (base, q) = match s.split_once('+') {
            Some((b, q)) => (b, Some(q)),
            None => (s, None),
        };
        let policy = native::policy::Policy::parse(base).ok_or_else(|| {
            format!(
                "unknown policy `{base}`; known: {}",
                native::policy::POLICY_NAMES.join(", ")
            )
        })?;
        let quant = match q {
            None => native::quant::KvQuant::F16,
            Some(q) => native::quant::KvQuant::parse(q).ok_or_else(|| {
                format!("unknown KV quantisation `{q}` in `{s}`; use q8_0 or q4_0")
            })?,
        };
        Ok(PolicySpec { policy, quant })
    }
    /// True when the reference simulator implements it.
    pub fn reference_can_run(&self) -> bool {
        self.quant == native::quant::KvQuant::F16
            && reference::POLICIES.contains(&self.policy_name())
    }
    pub fn policy_name(&self) -> &'static str {
        native::policy::POLICY_NAMES
            .iter()
            .copied()
            .find(|n| native::policy::Policy::parse(n) == Some(self.policy))
            .expect("every policy has a name")
    }
}

/// The question line the reference engine looks for in the last user message.
pub const QUESTION_MARKER: &str = "Question:";
