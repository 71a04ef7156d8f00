//! Talking to language models: the reference engine (an in-process simulator of
//! KV eviction), `kvt serve` (that engine behind an OpenAI-compatible HTTP API),
//! the OpenAI-compatible client, and the request journal that makes inference
//! resumable.

pub mod backend;
pub mod client;
pub mod direct;
pub mod http;
pub mod journal;
pub mod kv_params;
pub mod launcher;
pub mod limits;
pub mod metrics_scrape;
pub mod native;
pub mod reference;
pub mod server;
pub mod spawned;

pub use kv_params::KvParams;
use serde::{Deserialize, Serialize};

/// The failure taxonomy: every failed request gets exactly one label, written
/// as its upper-case name (`ENGINE_ERROR`) in the journal, the tables, the
/// SQLite file and the report. A name kvt does not know (from another
/// version's journal) reads as `EngineError`, as it always has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "&'static str")]
pub enum Failure {
    EmptyOutput,
    Truncated,
    FormatError,
    Refusal,
    Timeout,
    EngineError,
    RateLimited,
    Abstained,
}

impl Failure {
    /// Every label, in the order of the report's failure table.
    pub const ALL: [Failure; 8] = [
        Failure::EmptyOutput,
        Failure::Truncated,
        Failure::FormatError,
        Failure::Refusal,
        Failure::Timeout,
        Failure::EngineError,
        Failure::RateLimited,
        Failure::Abstained,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Failure::EmptyOutput => "EMPTY_OUTPUT",
            Failure::Truncated => "TRUNCATED",
            Failure::FormatError => "FORMAT_ERROR",
            Failure::Refusal => "REFUSAL",
            Failure::Timeout => "TIMEOUT",
            Failure::EngineError => "ENGINE_ERROR",
            Failure::RateLimited => "RATE_LIMITED",
            Failure::Abstained => "ABSTAINED",
        }
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::ALL
            .into_iter()
            .find(|f| f.label() == s)
            .unwrap_or(Failure::EngineError)
    }
}

impl From<Failure> for &'static str {
    fn from(f: Failure) -> &'static str {
        f.label()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

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
    pub error_kind: Option<Failure>,
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
    /// Native engine: the layers whose cache the policy shrank (sliding-window
    /// layers keep their window and are never among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_compressed_layers: Option<Vec<u32>>,
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
    /// Native engine with `kv.decode`: entries a head in the largest global
    /// layer when decoding starts and after each generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_decode_entries: Option<Vec<u32>>,
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
    /// Per generated token: its log-probability and the top-k alternatives
    /// (`engine.logprobs`), from engines that give them (the native engine;
    /// OpenAI-compatible servers through `logprobs`/`top_logprobs`). None:
    /// not asked for, or the engine gave none ("unavailable", never zeros).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// The gold answers' log-likelihood, teacher-forced after this cell's
    /// (compressed) prompt, one per gold, in the dataset's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold_loglik: Option<Vec<GoldLikelihood>>,
    /// Fidelity to the full cache: the full cache's own greedy answer
    /// teacher-forced under this cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fidelity: Option<Fidelity>,
    pub is_final: bool,
}

/// One generated token's log-probability (natural log) and its top-k.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    #[serde(rename = "t")]
    pub token: String,
    #[serde(rename = "lp")]
    pub logprob: f32,
    /// The k most likely tokens at this step (token, logprob), best first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(String, f32)>,
}

/// A gold answer's log-likelihood: summed over its tokens (nats), and how
/// many tokens it has.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GoldLikelihood {
    pub total: f64,
    pub tokens: u32,
}

impl GoldLikelihood {
    pub fn per_token(&self) -> f64 {
        self.total / f64::from(self.tokens.max(1))
    }
}

/// The full cache's greedy answer teacher-forced under a cell, per token:
/// KL(full ‖ cell) in nats, whether the cell's top-1 token is the full
/// cache's, and the first step where it is not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    pub kl: Vec<f32>,
    pub top1_agree: Vec<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_divergence: Option<u32>,
    /// How the KL was computed: `exact` (over the whole vocabulary).
    pub basis: String,
}

impl Fidelity {
    pub fn mean_kl(&self) -> Option<f64> {
        (!self.kl.is_empty())
            .then(|| self.kl.iter().map(|&x| f64::from(x)).sum::<f64>() / self.kl.len() as f64)
    }
    pub fn agreement(&self) -> Option<f64> {
        (!self.top1_agree.is_empty()).then(|| {
            self.top1_agree.iter().filter(|&&a| a).count() as f64 / self.top1_agree.len() as f64
        })
    }
}

/// Log-softmax of logits (natural log), computed in f64 for the sum.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| f64::from(v - max).exp()).sum();
    let lse = max as f64 + sum.ln();
    x.iter().map(|&v| (f64::from(v) - lse) as f32).collect()
}

/// KL(p ‖ q) in nats from two log-probability vectors over the same support.
pub fn kl_divergence(lp: &[f32], lq: &[f32]) -> f64 {
    lp.iter()
        .zip(lq)
        .map(|(&a, &b)| {
            let p = f64::from(a).exp();
            if p == 0.0 {
                0.0
            } else {
                p * (f64::from(a) - f64::from(b))
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// The log-likelihood of a continuation from its teacher-forced steps: the
/// sum over `ids` of each step's log-probability of that token.
pub fn continuation_loglik(steps: &[Vec<f32>], ids: &[u32]) -> f64 {
    steps
        .iter()
        .zip(ids)
        .map(|(lp, &t)| f64::from(lp[t as usize]))
        .sum()
}

/// The `k` largest entries of `lp` as (index, value), best first (ties to the
/// lower index).
pub fn top_k(lp: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in lp.iter().enumerate() {
        if idx.len() < k || v > idx[idx.len() - 1].1 {
            let at = idx.partition_point(|&(_, w)| w >= v);
            idx.insert(at, (i, v));
            idx.truncate(k);
        }
    }
    idx
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
            && reference::policies().contains(&self.policy_name())
    }
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }
}

/// The question line the reference engine looks for in the last user message.
pub const QUESTION_MARKER: &str = "Question:";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_and_log_softmax_by_hand() {
        // softmax([0, ln 3]) = [1/4, 3/4].
        let lp = log_softmax(&[0.0, 3f32.ln()]);
        assert!((lp[0] - 0.25f32.ln()).abs() < 1e-6 && (lp[1] - 0.75f32.ln()).abs() < 1e-6);
        // KL([1/2, 1/2] ‖ [1/4, 3/4]) = ½ ln 2 + ½ ln(2/3) = 0.1438410.
        let p = [0.5f32.ln(), 0.5f32.ln()];
        let kl = kl_divergence(&p, &lp);
        assert!((kl - 0.143_841_04).abs() < 1e-6, "{kl}");
        // A distribution against itself: exactly 0.
        assert_eq!(kl_divergence(&lp, &lp), 0.0);
        // KL([1, 0] ‖ [0.9, 0.1]) = ln(1/0.9).
        let kl = kl_divergence(&[0.0, f32::NEG_INFINITY], &[0.9f32.ln(), 0.1f32.ln()]);
        assert!((kl - (1.0f64 / 0.9).ln()).abs() < 1e-6, "{kl}");
        assert_eq!(
            top_k(&[0.1, 0.5, 0.5, -1.0, 0.7], 3),
            vec![(4, 0.7), (1, 0.5), (2, 0.5)]
        );
        let g = GoldLikelihood {
            total: -3.0,
            tokens: 2,
        };
        assert_eq!(g.per_token(), -1.5);
    }
}
