//! The native engine as a [`crate::llm::backend::Backend`], in process: one
//! request at a time (the engine parallelises inside a forward pass), every
//! answer taken from the prompt's shared prefill when the cohort has run it.

use super::{Cell, NativeEngine, NativeRequest};
use crate::llm::backend::{chat_pairs, Answer, Backend, Query, Record};
use crate::llm::Outcome;
use anyhow::Result;
use std::sync::Arc;

pub struct NativeBackend {
    pub engine: Arc<NativeEngine>,
    pub cell: Cell,
    /// Every cell of the experiment, answered from one prefill.
    pub cohort: Vec<Cell>,
    pub record_kept: bool,
    pub max_new_tokens: usize,
    pub logprobs: usize,
    pub fidelity: bool,
}

impl Backend for NativeBackend {
    fn answer_all(
        &self,
        queries: &[Query<'_>],
        _concurrency: usize,
        cancelled: &(dyn Fn() -> bool + Sync),
        record: &Record<'_>,
    ) -> Result<()> {
        for q in queries {
            if cancelled() {
                break;
            }
            let t0 = std::time::Instant::now();
            let o = match self.answer_one(q) {
                Ok(a) => a.outcome,
                Err(e) => Outcome {
                    error_kind: Some(crate::llm::Failure::EngineError),
                    error: Some(format!("{e:#}")),
                    latency_ms: t0.elapsed().as_secs_f64() * 1000.0,
                    is_final: true,
                    ..Default::default()
                },
            };
            record(q.key, &o)?;
        }
        Ok(())
    }

    /// The engine's whole answer; an engine error is an `Err` here (a
    /// failed outcome in [`Backend::answer_all`]).
    fn answer_one(&self, q: &Query<'_>) -> Result<Answer> {
        let req = NativeRequest {
            messages: chat_pairs(&q.messages()),
            max_new_tokens: self.max_new_tokens,
            cell: self.cell.clone(),
            record_kept: self.record_kept,
            cohort: self.cohort.clone(),
            logprobs: self.logprobs,
            golds: q.golds.to_vec(),
            fidelity: self.fidelity,
            history: q.history_messages().iter().map(|m| chat_pairs(m)).collect(),
        };
        let a = self.engine.answer(&req)?;
        Ok(Answer {
            outcome: super::outcome(&a),
            native: Some(a),
        })
    }
}
