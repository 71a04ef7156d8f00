//! The KV parameters of one cell as every engine receives them: the
//! simulator in process, the native engine (as its `Cell`), and servers in a
//! request's `kvt` field. Shared by every engine, so it lives in the LLM
//! layer, not in any one engine's file.

use super::reference::policies;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Policy parameters. `budget` ≤ 1.0 is a fraction of the prompt's tokens;
/// above 1.0 it is an absolute number of tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvParams {
    pub policy: String,
    pub budget: f64,
    pub sink_tokens: u32,
    pub window: u32,
    pub pool_kernel: u32,
    pub seed: u64,
    /// Native engine only (absent from the simulator's request identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<crate::config::schema::Compress>,
    /// Compression while the answer is generated (`kv.decode`; native engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<crate::config::schema::DecodeCompression>,
    /// The precision scores are compared at (`kv.score_dtype`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_dtype: Option<crate::config::schema::ScoreDtype>,
}

impl KvParams {
    pub fn check(&self) -> Result<()> {
        if !policies().contains(&self.policy.as_str()) {
            bail!(
                "unknown KV policy `{}`; choose one of: {}",
                self.policy,
                policies().join(", ")
            );
        }
        self.check_budget()
    }

    /// The budget alone (for servers that know their own policies).
    pub fn check_budget(&self) -> Result<()> {
        if self.budget.is_nan() || self.budget <= 0.0 || !self.budget.is_finite() {
            bail!(
                "KV budget {} is not positive: use a fraction in (0, 1] or a token count",
                self.budget
            );
        }
        Ok(())
    }
    /// True when the policy keeps every token (full cache or budget ≥ 100 %)
    /// and nothing is quantised.
    pub fn is_full(&self) -> bool {
        !self.policy.contains('+') && (self.policy == "full" || self.budget == 1.0)
    }
    /// The native engine's cell for these parameters (the full cache is one
    /// cell whatever policy names it).
    pub fn native_cell(&self) -> Result<crate::llm::native::Cell> {
        use crate::llm::native::{policy::Policy, Cell};
        let spec = crate::llm::PolicySpec::parse(&self.policy).map_err(anyhow::Error::msg)?;
        let exact = spec.policy == Policy::Full || self.budget == 1.0;
        Ok(Cell {
            policy: if exact { Policy::Full } else { spec.policy },
            budget: if exact { 1.0 } else { self.budget },
            quant: spec.quant,
            sinks: self.sink_tokens as usize,
            window: self.window as usize,
            kernel: self.pool_kernel as usize,
            beta: self.beta.unwrap_or(20.0),
            seed: self.seed,
            compress: self.compress.unwrap_or_default(),
            decode: self.decode.clone(),
            score_dtype: self
                .score_dtype
                .unwrap_or(crate::config::schema::ScoreDtype::F32),
        })
    }
    /// Tokens kept for a prompt of `n` tokens.
    pub fn capacity(&self, n: usize) -> usize {
        if self.is_full() {
            return n;
        }
        let k = if self.budget <= 1.0 {
            (self.budget * n as f64).ceil() as usize
        } else {
            self.budget as usize
        };
        k.min(n)
    }
}

#[cfg(test)]
impl KvParams {
    /// A cell with `config/default.yaml`'s parameters (sinks 4, window 32,
    /// kernel 7, seed 0), for tests.
    pub fn for_test(policy: &str, budget: f64) -> KvParams {
        KvParams {
            policy: policy.into(),
            budget,
            sink_tokens: 4,
            window: 32,
            pool_kernel: 7,
            seed: 0,
            beta: None,
            compress: None,
            decode: None,
            score_dtype: None,
        }
    }
}
