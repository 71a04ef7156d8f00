//! `score` (one node per policy × budget): scores every response against the
//! gold answers and labels failures with the taxonomy. The primary score of the
//! synthetic tasks is substring recall; EM and F1 are kept beside it.

use crate::data::{Example, Gold};
use crate::engine::OpContext;
use crate::llm::{Failure, Outcome};
use crate::metrics;
use crate::metrics::longbench as lb;
use crate::stages::infer::ResponseRow;
use crate::stages::prepare::Entry;
use crate::stages::NoTransport;
use crate::table;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub struct Score;

/// The metric named in reports for the built-in synthetic tasks.
pub const SYNTHETIC_METRIC: &str = "substring_recall";

/// kvt's own metrics beside LongBench's.
pub const OWN_METRICS: &[&str] = &[
    "substring_recall",
    "exact_match",
    "f1",
    "multiple_choice",
    "string_match_all",
    "string_match_part",
];

/// Metrics that score by token overlap: an option letter gold answer (`A`)
/// does not fit them (qa_f1 drops the article "a", so a correct "A" scores 0).
const TOKEN_METRICS: &[&str] = &["qa_f1_score", "qa_f1_zh_score", "f1", "rouge_score"];

/// A warning when the gold answers look like option labels but the metric
/// counts tokens: most examples' answers are `A`, `(B)`, `ACD`.
pub fn metric_fit_warning(metric: &str, examples: &[Example]) -> Option<String> {
    if !TOKEN_METRICS.contains(&metric) || examples.is_empty() {
        return None;
    }
    let labelled: Vec<&Example> = examples
        .iter()
        .filter(|e| !e.answers.is_empty() && e.answers.iter().all(|a| metrics::is_option_label(a)))
        .collect();
    (labelled.len() * 2 > examples.len()).then(|| {
        format!(
            "{} of {} examples have option letters as gold answers (e.g. `{}` in `{}`), but the metric is `{metric}`, which counts words: a correct `A` scores 0 there; set `dataset.metric: multiple_choice` (the chosen letter, exact match)",
            labelled.len(),
            examples.len(),
            labelled[0].answers[0],
            labelled[0].example_id
        )
    })
}

/// Every metric `dataset.metric` may name.
pub fn known_metrics() -> Vec<&'static str> {
    let mut v: Vec<&str> = OWN_METRICS.to_vec();
    for (_, m) in lb::TASKS {
        if !v.contains(m) {
            v.push(m);
        }
    }
    v
}

/// The metric a dataset is scored with.
pub fn metric_for(source: &str, task: &str, explicit: Option<&str>) -> Result<String> {
    if let Some(m) = explicit {
        if !known_metrics().contains(&m) {
            bail!(
                "config `dataset.metric`: `{m}` is unknown; use one of {}",
                known_metrics().join(", ")
            );
        }
        return Ok(m.to_string());
    }
    Ok(match source {
        "synthetic"
            if crate::data::ruler::is_task(task) || crate::data::synthetic::answers_all(task) =>
        {
            "string_match_all".to_string()
        }
        "synthetic" => SYNTHETIC_METRIC.to_string(),
        "longbench" => {
            let base = task.strip_suffix("_e").unwrap_or(task);
            lb::metric_of(base)
                .ok_or_else(|| {
                    anyhow!(
                        "config `dataset.task`: `{task}` is not a LongBench task; known: {}",
                        lb::task_names().join(", ")
                    )
                })?
                .to_string()
        }
        _ => "qa_f1_score".to_string(),
    })
}

/// One prediction's value under `metric` (best over golds).
pub fn value(
    metric: &str,
    task: &str,
    pred: &str,
    ex: &Gold,
    s: &metrics::Scores,
    code: lb::CodeSim,
) -> f64 {
    match metric {
        "substring_recall" => s.recall,
        "exact_match" => s.em,
        "f1" => s.f1,
        "multiple_choice" => ex
            .answers
            .iter()
            .map(|g| metrics::multiple_choice(pred, g))
            .fold(0.0, f64::max),
        "string_match_all" => metrics::string_match_all(pred, &ex.answers),
        "string_match_part" => metrics::string_match_part(pred, &ex.answers),
        m => {
            let base = task.strip_suffix("_e").unwrap_or(task);
            let classes: Vec<String> = ex
                .meta
                .get("all_classes")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default();
            lb::best_over_golds(m, base, pred, &ex.answers, &classes, code)
        }
    }
}

/// One scored request (also carries the telemetry the analysis needs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub example_id: String,
    pub bin_idx: i64,
    pub token_len: i64,
    pub policy: String,
    pub budget: f64,
    pub request_key: String,
    pub metric: String,
    /// The primary score in [0, 1] (failures score 0).
    pub score: f64,
    pub em: f64,
    pub f1: f64,
    pub recall: f64,
    pub failure: Option<Failure>,
    /// Prompt tokens before middle truncation (`prompt.max_tokens`), if cut.
    #[serde(default)]
    pub truncated_from: Option<u64>,
    /// The question's turn when several are asked of one context
    /// (`meta.context_turn`: 1, 2, …).
    #[serde(default)]
    pub turn: Option<i64>,
    /// The response's log-probability figures, as the analysis reads them.
    #[serde(flatten)]
    pub probs: Probs,
    /// The response and its telemetry, as the journal recorded it.
    #[serde(flatten)]
    pub response: Outcome,
}

/// A response's log-probability figures: none where the engine gave none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Probs {
    /// Mean log-probability of the answer's tokens (its confidence).
    #[serde(default)]
    pub conf_mean: Option<f64>,
    /// The smallest log-probability among them.
    #[serde(default)]
    pub conf_min: Option<f64>,
    /// The first gold answer's log-likelihood per token after this cell's prompt.
    #[serde(default)]
    pub gold_ll: Option<f64>,
    /// The best per-token log-likelihood over every gold answer.
    #[serde(default)]
    pub gold_ll_best: Option<f64>,
    /// Mean KL(full ‖ cell) per token of the full cache's answer (nats).
    #[serde(default)]
    pub kl_mean: Option<f64>,
    /// Share of the full cache's answer tokens that are this cell's top-1.
    #[serde(default)]
    pub top1_agree: Option<f64>,
    /// The first step where this cell's top-1 left the full cache's answer.
    #[serde(default)]
    pub first_divergence: Option<u32>,
}

impl Probs {
    pub fn of(o: &Outcome) -> Probs {
        let lps: Vec<f64> = o
            .logprobs
            .iter()
            .flatten()
            .map(|t| f64::from(t.logprob))
            .collect();
        let golds = o.gold_loglik.as_deref().unwrap_or(&[]);
        Probs {
            conf_mean: (!lps.is_empty()).then(|| lps.iter().sum::<f64>() / lps.len() as f64),
            conf_min: lps.iter().copied().reduce(f64::min),
            gold_ll: golds.first().map(|g| g.per_token()),
            gold_ll_best: golds.iter().map(|g| g.per_token()).reduce(f64::max),
            kl_mean: o.fidelity.as_ref().and_then(|f| f.mean_kl()),
            top1_agree: o.fidelity.as_ref().and_then(|f| f.agreement()),
            first_divergence: o.fidelity.as_ref().and_then(|f| f.first_divergence),
        }
    }
}

/// The columns of a score row the analysis reads (the response's text and
/// the remaining telemetry are never decoded for it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreCell {
    pub example_id: String,
    pub bin_idx: i64,
    pub policy: String,
    pub budget: f64,
    pub metric: String,
    pub score: f64,
    pub failure: Option<Failure>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub retained_tokens: Option<u64>,
    #[serde(default)]
    pub completion_tokens: Option<u64>,
    #[serde(default)]
    pub kv_bytes: Option<u64>,
    #[serde(default)]
    pub server_rss_kib: Option<u64>,
    #[serde(default)]
    pub kv_cache_usage: Option<f64>,
    // `Probs`' columns, named one by one so only the columns read are decoded.
    #[serde(default)]
    pub conf_mean: Option<f64>,
    #[serde(default)]
    pub conf_min: Option<f64>,
    #[serde(default)]
    pub gold_ll: Option<f64>,
    #[serde(default)]
    pub gold_ll_best: Option<f64>,
    #[serde(default)]
    pub kl_mean: Option<f64>,
    #[serde(default)]
    pub top1_agree: Option<f64>,
    #[serde(default)]
    pub turn: Option<i64>,
}

impl From<&ScoreRow> for ScoreCell {
    fn from(r: &ScoreRow) -> ScoreCell {
        ScoreCell {
            example_id: r.example_id.clone(),
            bin_idx: r.bin_idx,
            policy: r.policy.clone(),
            budget: r.budget,
            metric: r.metric.clone(),
            score: r.score,
            failure: r.failure,
            latency_ms: r.response.latency_ms,
            ttft_ms: r.response.ttft_ms,
            prompt_tokens: r.response.prompt_tokens,
            retained_tokens: r.response.retained_tokens,
            completion_tokens: r.response.completion_tokens,
            kv_bytes: r.response.kv_bytes,
            server_rss_kib: r.response.server_rss_kib,
            kv_cache_usage: r.response.kv_cache_usage,
            conf_mean: r.probs.conf_mean,
            conf_min: r.probs.conf_min,
            gold_ll: r.probs.gold_ll,
            gold_ll_best: r.probs.gold_ll_best,
            kl_mean: r.probs.kl_mean,
            top1_agree: r.probs.top1_agree,
            turn: r.turn,
        }
    }
}

/// Every `score` node's rows, whole ([`ScoreRow`]) or as a narrower view
/// ([`ScoreCell`]), for the stages that summarise them.
pub fn read_all<T: serde::de::DeserializeOwned>(ctx: &OpContext) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for up in ctx.upstream("score") {
        rows.extend(table::read_owned::<T>(ctx.read(up, "scores")?)?);
    }
    Ok(rows)
}

/// What `score` reads (its stage's `uses`, exactly).
#[derive(serde::Deserialize)]
pub struct Uses {
    #[serde(rename = "dataset.source")]
    source: crate::config::schema::Source,
    #[serde(rename = "dataset.task")]
    task: String,
    #[serde(rename = "dataset.metric")]
    metric: Option<String>,
    #[serde(rename = "metrics.code_sim")]
    code_sim: lb::CodeSim,
}

impl crate::stages::Stage for Score {
    fn name(&self) -> &'static str {
        "score"
    }
    /// 5: jieba splits non-Chinese runs as Python jieba does.
    /// 7: each row's turn (`meta.context_turn`).
    fn version(&self) -> u32 {
        7
    }
    type Uses = Uses;
    type Transport = NoTransport;
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, _: Self::Transport) -> Result<()> {
        let policy: String = ctx.item("policy")?;
        let budget: f64 = ctx.item("budget")?;
        let u = uses;
        let metric = metric_for(u.source.as_str(), &u.task, u.metric.as_deref())?;
        let examples: Vec<Gold> = table::read_owned(ctx.input("prepare", "examples")?)?;
        let entries: Vec<Entry> = table::read_owned(ctx.input("prepare", "manifest")?)?;
        let responses: Vec<ResponseRow> = table::read_owned(ctx.input("infer", "responses")?)?;
        let ex: BTreeMap<&str, &Gold> = examples
            .iter()
            .map(|e| (e.example_id.as_str(), e))
            .collect();
        let en: BTreeMap<&str, &Entry> =
            entries.iter().map(|e| (e.example_id.as_str(), e)).collect();
        let mut rows = Vec::with_capacity(responses.len());
        for r in responses {
            let id = r.example_id.as_str();
            let (e, entry) = ex
                .get(id)
                .zip(en.get(id))
                .ok_or_else(|| anyhow!("response for unknown example `{id}`"))?;
            let o = &r.outcome;
            let s = metrics::score(&o.text, &e.answers);
            let expect_number = e
                .answers
                .iter()
                .all(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_digit()));
            let failure = metrics::classify(
                o.error_kind,
                &o.text,
                o.finish_reason.as_deref(),
                expect_number,
            );
            let primary = if failure.is_some_and(|f| f != Failure::Truncated) {
                0.0
            } else {
                value(&metric, &u.task, &o.text, e, &s, u.code_sim)
            };
            rows.push(ScoreRow {
                example_id: r.example_id,
                bin_idx: entry.bin_idx,
                token_len: entry.token_len,
                policy: policy.clone(),
                budget,
                request_key: r.request_key,
                metric: metric.clone(),
                score: primary,
                em: s.em,
                f1: s.f1,
                recall: s.recall,
                failure,
                truncated_from: r.truncated_from,
                turn: e.meta.get(crate::data::TURN).and_then(|t| t.as_i64()),
                probs: Probs::of(&r.outcome),
                response: r.outcome,
            });
        }
        ctx.put("scores", &table::write(&rows)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `listcodes` is scored by the share of its codes the answer lists.
    #[test]
    fn listcodes_scores_the_share_of_codes_listed() {
        assert_eq!(
            metric_for("synthetic", "listcodes", None).unwrap(),
            "string_match_all"
        );
        assert_eq!(
            metric_for("synthetic", "needle", None).unwrap(),
            SYNTHETIC_METRIC
        );
        let bpe = crate::data::tokenize::encoding("cl100k_base").unwrap();
        let ex = &crate::data::synthetic::generate(bpe, "listcodes", 3, &[400], 1).unwrap()[0];
        let gold = Gold {
            example_id: ex.example_id.clone(),
            answers: ex.answers.clone(),
            meta: ex.meta.clone(),
        };
        let half = format!(
            "1. {}\n2. {}\n3. {}",
            gold.answers[0], gold.answers[1], gold.answers[2]
        );
        let s = metrics::score(&half, &gold.answers);
        let v = value(
            "string_match_all",
            "listcodes",
            &half,
            &gold,
            &s,
            lb::CodeSim::Difflib,
        );
        assert_eq!(v, 0.5);
    }
}
