//! `explorer`: what the report shows of the examples and the scored
//! responses, computed once per change of them (never per analysis change):
//!
//! * `explorer`: report.html's example explorer (every example with each
//!   cell's answer, as JSON for the page's slot);
//! * `facts`: the dataset, tokenizer and bin edges from the manifest, and
//!   what the responses say overall (whether every response scored alike,
//!   whether the reference simulator answered, prompts cut per bin, failures
//!   by type per setting with one example of each).
//!
//! `report` reads these instead of the manifest and every score table.

use crate::engine::OpContext;
use crate::llm::backend::InProcess;
use crate::llm::Failure;
use crate::stages::plots::{budget_label, budget_order, setting};
use crate::stages::prepare::Bin;
use crate::stages::score::ScoreRow;
use crate::stages::NoTransport;
use crate::table;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub struct Explorer;

/// The report's facts about the data and the responses.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Facts {
    pub dataset: Value,
    pub tokenizer: Value,
    pub bin_edges: Value,
    pub n_examples: usize,
    pub n_bins: Value,
    pub n_skipped: i64,
    pub binning_scheme: Value,
    /// The one score every response of every cell got, when there are two
    /// or more responses and they all agree.
    pub uniform_score: Option<f64>,
    /// Some response came from kvt's reference simulator.
    pub simulator: bool,
    /// Examples whose prompt `prompt.max_tokens` cut, per bin (each once).
    pub cut: BTreeMap<i64, usize>,
    /// Failures by type per setting: `{setting, counts, total}`.
    pub failures: Vec<Value>,
    /// The first failure of each type: `{label, setting, example_id, detail}`.
    pub failure_examples: Vec<Value>,
    /// The metric scores low answers that hold the gold answer verbatim, as
    /// a sentence for the report naming a better-fitting metric.
    #[serde(default)]
    pub metric_fit: Option<String>,
    /// Native engine: which layers eviction reached, when not all of them
    /// (sliding-window models), as a sentence for the report.
    #[serde(default)]
    pub layer_note: Option<String>,
    /// The nodes these facts come from (`{node, key}`), for the report's
    /// provenance.
    #[serde(default)]
    pub provenance: Vec<Value>,
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// What this stage reads of `manifest.json`: its header fields and each
/// example's text. The entries are only counted, and no JSON tree of the
/// whole file is built (at 100,000 examples that tree took a gigabyte).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ManifestView {
    #[serde(default)]
    pub dataset: Value,
    #[serde(default)]
    pub tokenizer: Value,
    #[serde(default)]
    pub bin_edges: Value,
    #[serde(default)]
    pub n_bins: Value,
    #[serde(default)]
    pub binning_scheme: Value,
    #[serde(default)]
    entries: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    examples: Vec<ExampleText>,
}

#[derive(Debug, serde::Deserialize)]
struct ExampleText {
    example_id: String,
    #[serde(default)]
    question: String,
    #[serde(default)]
    context: String,
    #[serde(default)]
    answers: Value,
}

/// The facts from the manifest and every score row.
pub fn facts(manifest: &ManifestView, scores: &[ScoreRow]) -> Facts {
    let uniform_score = scores.first().and_then(|first| {
        (scores.len() > 1 && scores.iter().all(|r| r.score == first.score)).then_some(first.score)
    });
    let simulator = scores
        .iter()
        .any(|r| r.response.engine.as_deref() == Some(InProcess::Reference.name()));
    let layer_note = scores.iter().find_map(|r| {
        let (layers, per) = (
            r.response.kv_compressed_layers.as_ref()?,
            r.response.kv_kept_per_layer.as_ref()?,
        );
        (!layers.is_empty() && layers.len() < per.len()).then(|| layer_sentence(layers, per.len()))
    });
    let mut cut: BTreeMap<i64, usize> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in scores.iter().filter(|r| r.truncated_from.is_some()) {
        if seen.insert(r.example_id.as_str()) {
            *cut.entry(r.bin_idx).or_default() += 1;
        }
    }
    // Keyed in the one budget order of every table: (policy, group, value).
    let mut by: BTreeMap<(String, u8, i64, u64), BTreeMap<&str, usize>> = BTreeMap::new();
    let mut examples: BTreeMap<&str, Value> = BTreeMap::new();
    for r in scores {
        if let Some(f) = r.failure {
            let label = f.label();
            let (group, value) = budget_order(r.budget);
            *by.entry((
                r.policy.clone(),
                group,
                (value * 1e6) as i64,
                r.budget.to_bits(),
            ))
            .or_default()
            .entry(label)
            .or_default() += 1;
            examples.entry(label).or_insert_with(|| {
                let detail = r
                    .response
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("answered “{}”", r.response.text));
                json!({"label": label, "setting": setting(&r.policy, r.budget),
                       "example_id": r.example_id, "detail": cell(&detail)})
            });
        }
    }
    let failures = by
        .iter()
        .map(|((p, _, _, b), m)| {
            let budget = f64::from_bits(*b);
            json!({
                "setting": setting(p, budget),
                "counts": Failure::ALL.iter().map(|f| m.get(f.label()).copied().unwrap_or(0)).collect::<Vec<_>>(),
                "total": m.values().sum::<usize>(),
            })
        })
        .collect();
    Facts {
        dataset: manifest.dataset.clone(),
        tokenizer: manifest.tokenizer.clone(),
        bin_edges: manifest.bin_edges.clone(),
        n_examples: manifest.entries.len(),
        n_bins: manifest.n_bins.clone(),
        n_skipped: manifest.dataset["n_skipped_records"].as_i64().unwrap_or(0),
        binning_scheme: manifest.binning_scheme.clone(),
        uniform_score,
        simulator,
        cut,
        failures,
        failure_examples: examples.into_values().collect(),
        metric_fit: metric_fit(scores),
        layer_note,
        provenance: Vec::new(),
    }
}

/// Answers of the full cache (every policy's budget 1.0, no quantisation)
/// that contain a gold answer verbatim (substring recall 1) yet score below
/// 0.5 under the primary metric: when they are at least a fifth of such
/// answers (and three or more), the metric, not the model, is what a low
/// score measures — F1 and ROUGE divide by the answer's length.
fn metric_fit(scores: &[ScoreRow]) -> Option<String> {
    let metric = scores.first()?.metric.clone();
    if matches!(metric.as_str(), "substring_recall" | "exact_match") {
        return None;
    }
    let found: Vec<&ScoreRow> = scores
        .iter()
        .filter(|r| r.budget == 1.0 && !r.policy.contains('+') && r.recall >= 1.0)
        .collect();
    let low: Vec<&&ScoreRow> = found.iter().filter(|r| r.score < 0.5).collect();
    if low.len() < 3 || low.len() * 5 < found.len() {
        return None;
    }
    let mean = low.iter().map(|r| r.score).sum::<f64>() / low.len() as f64;
    Some(format!(
        "`{metric}` gave less than 0.5 (mean {mean:.2}) to {} of the full cache's {} answers that contain the gold answer verbatim: \
         the answers are longer than the golds, and `{metric}` counts every extra word against them. \
         Low scores here may measure the metric, not the model; `dataset.metric: substring_recall` \
         scores whether the gold answer is in the answer.",
        low.len(),
        found.len()
    ))
}

/// "Eviction shrinks 3 of 18 layers (5, 11, 17); …" for a model whose other
/// layers attend to a sliding window and keep it.
fn layer_sentence(compressed: &[u32], total: usize) -> String {
    let list = compressed
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "Eviction shrinks the cache of {} of the model's {total} layers (layers {list}, counted from 0); \
         the other {} attend to a sliding window, keep it whole, and are the same in every cell.",
        compressed.len(),
        total - compressed.len()
    )
}

/// Runs of tokens kept by most (layer, KV head) pairs or evicted by most:
/// `[text, kept]` pairs, so a page can mark what survived.
fn spans(share: &[(String, f32)]) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    for (text, s) in share {
        let kept = *s >= 0.5;
        match out.last_mut() {
            Some(last) if last.1 == kept => last.0.push_str(text),
            _ => out.push((text.clone(), kept)),
        }
    }
    out
}

/// One example of the explorer, as the page reads it (fields in the order
/// the page's JSON has always had them: alphabetical).
#[derive(Serialize)]
struct ExplorerExample<'a> {
    answers: &'a Value,
    bin: String,
    cells: Vec<ExplorerCell<'a>>,
    /// The whole context, when the page can carry every example's.
    context: Option<&'a str>,
    example_id: &'a str,
    excerpt: String,
    /// Where a gold answer sits in `excerpt`: [start, end) in UTF-16 code
    /// units, as the page's JavaScript indexes strings.
    excerpt_mark: Option<(usize, usize)>,
    tokens: i64,
}

/// The most context bytes report.html embeds (all examples together).
const MAX_EMBEDDED_CONTEXT: usize = 16 << 20;

/// Characters of context shown on each side of the answer (or at each end).
const EXCERPT_SIDE: usize = 300;

/// Where the first gold answer found in `context` lies (byte range): exact
/// first, then ignoring ASCII case.
fn answer_span(context: &str, answers: &Value) -> Option<(usize, usize)> {
    let mut golds: Vec<&str> = Vec::new();
    let mut stack = vec![answers];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if !s.trim().is_empty() => golds.push(s.trim()),
            Value::Array(a) => stack.extend(a.iter().rev()),
            _ => {}
        }
    }
    let lower = context.to_ascii_lowercase();
    golds
        .iter()
        .find_map(|g| context.find(g).map(|at| (at, at + g.len())))
        .or_else(|| {
            golds.iter().find_map(|g| {
                lower
                    .find(&g.to_ascii_lowercase())
                    .map(|at| (at, at + g.len()))
            })
        })
}

/// An example's excerpt: centred on where a gold answer lies in the context
/// (the needle of a synthetic task), else its start and end; then the
/// question. With the answer's place in the excerpt.
fn excerpt(e: &ExampleText) -> (String, Option<(usize, usize)>) {
    let c = e.context.as_str();
    let question = format!("\n\nQuestion: {}", e.question);
    let back = |at: usize, n: usize| -> usize {
        c[..at]
            .char_indices()
            .rev()
            .nth(n.saturating_sub(1))
            .map_or(0, |(i, _)| i)
    };
    let fwd = |at: usize, n: usize| -> usize {
        c[at..]
            .char_indices()
            .nth(n)
            .map_or(c.len(), |(i, _)| at + i)
    };
    if let Some((s, t)) = answer_span(c, &e.answers) {
        let (from, to) = (back(s, EXCERPT_SIDE), fwd(t, EXCERPT_SIDE));
        let lead = if from > 0 { "… " } else { "" };
        let trail = if to < c.len() { " …" } else { "" };
        let text = format!("{lead}{}{trail}{question}", &c[from..to]);
        let units = |x: &str| x.encode_utf16().count();
        let start = units(lead) + units(&c[from..s]);
        return (text, Some((start, start + units(&c[s..t]))));
    }
    let n = c.chars().count();
    let body = if n > 2 * EXCERPT_SIDE {
        let head = fwd(0, EXCERPT_SIDE);
        let tail = back(c.len(), EXCERPT_SIDE);
        format!("{} … {}", &c[..head], &c[tail..])
    } else {
        c.to_string()
    };
    (format!("{body}{question}"), None)
}

#[derive(Serialize)]
struct ExplorerCell<'a> {
    answer: &'a str,
    budget: String,
    failure: Option<Failure>,
    kept: String,
    policy: &'a str,
    score: f64,
    setting: String,
    spans: Option<Vec<(String, bool)>>,
    /// The gold answer's log-likelihood per token under this cell.
    gold_ll: Option<f64>,
    /// Mean KL(full ‖ cell) per token of the full cache's answer.
    kl: Option<f64>,
    /// Where this cell's answer left the full cache's: (the tokens both
    /// chose, the rest), when the engine gave the tokens.
    diverged: Option<(String, String)>,
}

/// A cell's answer cut where its top-1 first left the full cache's answer
/// (greedy answers agree token for token up to there).
fn divergence(o: &crate::llm::Outcome) -> Option<(String, String)> {
    let at = o.fidelity.as_ref()?.first_divergence? as usize;
    let toks = o.logprobs.as_ref()?;
    let at = at.min(toks.len());
    let join =
        |t: &[crate::llm::TokenLogprob]| t.iter().map(|t| t.token.as_str()).collect::<String>();
    Some((join(&toks[..at]), join(&toks[at..])))
}

/// The example explorer's data: every example with each cell's answer, as
/// JSON safe inside a script element.
pub fn explorer(manifest: &ManifestView, scores: &[ScoreRow], bins: &[Bin]) -> String {
    let mut by_example: BTreeMap<&str, Vec<&ScoreRow>> = BTreeMap::new();
    for r in scores {
        by_example.entry(r.example_id.as_str()).or_default().push(r);
    }
    let label = |i: i64| {
        bins.iter()
            .find(|b| b.bin_idx == i)
            .map_or(i.to_string(), |b| format!("{}–{}", b.lo, b.hi))
    };
    // The full contexts travel with the page while they stay small enough
    // for a browser; beyond that the page points to the SQLite file.
    let total: usize = manifest.examples.iter().map(|e| e.context.len()).sum();
    let with_context = total <= MAX_EMBEDDED_CONTEXT;
    let order = |r: &ScoreRow| {
        let (group, value) = budget_order(r.budget);
        (r.policy.clone(), group, (value * 1e9) as i64)
    };
    let examples: Vec<ExplorerExample<'_>> = manifest
        .examples
        .iter()
        .filter_map(|e| {
            let id = e.example_id.as_str();
            let rows = by_example.get(id)?;
            let first = rows.first()?;
            let mut rows = rows.clone();
            rows.sort_by_key(|r| order(r));
            let ex = excerpt(e);
            Some(ExplorerExample {
                answers: &e.answers,
                bin: label(first.bin_idx),
                cells: rows
                    .iter()
                    .map(|r| ExplorerCell {
                        answer: &r.response.text,
                        budget: budget_label(r.budget),
                        failure: r.failure,
                        kept: match (r.response.kv_kept_total, r.response.kv_full_total) {
                            (Some(k), Some(f)) if f > 0 => {
                                format!("{k} of {f} entries ({:.0} %)", 100.0 * k as f64 / f as f64)
                            }
                            _ => String::new(),
                        },
                        policy: &r.policy,
                        score: r.score,
                        setting: setting(&r.policy, r.budget),
                        spans: r.response.kept_share.as_ref().map(|v| spans(v)),
                        gold_ll: r.probs.gold_ll,
                        kl: r.probs.kl_mean,
                        diverged: divergence(&r.response),
                    })
                    .collect(),
                context: with_context.then_some(e.context.as_str()),
                example_id: id,
                excerpt: ex.0,
                excerpt_mark: ex.1,
                tokens: first.token_len,
            })
        })
        .collect();
    // `</` cannot appear inside the script element.
    serde_json::to_string(&examples)
        .expect("explorer rows serialize")
        .replace("</", "<\\/")
}

/// `explorer` reads no configuration: everything comes from its inputs.
#[derive(serde::Deserialize)]
pub struct Uses {}

impl crate::stages::Stage for Explorer {
    fn name(&self) -> &'static str {
        "explorer"
    }
    fn version(&self) -> u32 {
        // 2: facts name the layers eviction reached and a misfitting metric.
        // 3: excerpts centre on the gold answer; the full context travels.
        3
    }
    type Uses = Uses;
    type Transport = NoTransport;
    fn run(&self, ctx: &mut OpContext, _: Self::Uses, _: Self::Transport) -> Result<()> {
        let manifest: ManifestView =
            serde_json::from_slice(&ctx.input("prepare", "manifest_json")?)?;
        let bins: Vec<Bin> = table::read_owned(ctx.input("prepare", "bins")?)?;
        let scores = crate::stages::score::read_all::<ScoreRow>(ctx)?;
        ctx.put("explorer", explorer(&manifest, &scores, &bins).as_bytes())?;
        let mut facts = facts(&manifest, &scores);
        facts.provenance = ctx
            .upstream
            .iter()
            .map(|u| json!({"node": u.node, "key": u.key.to_string()}))
            .collect();
        ctx.put("facts", serde_json::to_string_pretty(&facts)?.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, budget: f64, text: &str, score: f64) -> ScoreRow {
        ScoreRow {
            example_id: "e1".into(),
            bin_idx: 0,
            token_len: 700,
            policy: policy.into(),
            budget,
            request_key: format!("k-{policy}-{budget}"),
            metric: "substring_recall".into(),
            score,
            em: score,
            f1: score,
            recall: score,
            failure: (score == 0.0).then_some(crate::llm::Failure::FormatError),
            truncated_from: None,
            turn: None,
            probs: Default::default(),
            response: crate::llm::Outcome {
                text: text.into(),
                kv_kept_total: Some(50),
                kv_full_total: Some(200),
                is_final: true,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_metric_that_scores_verbatim_answers_low_is_named_with_a_better_fit() {
        let with = |score: f64, recall: f64, policy: &str, budget: f64| {
            let mut r = row(policy, budget, "…in 1999 by the river", score);
            r.metric = "qa_f1_score".into();
            r.recall = recall;
            r
        };
        // Four full-cache answers hold the gold; three score low.
        let mut rows: Vec<ScoreRow> = [0.06, 0.1, 0.2, 0.9]
            .iter()
            .map(|&s| with(s, 1.0, "full", 1.0))
            .collect();
        // Compressed cells and misses do not count.
        rows.push(with(0.0, 1.0, "snapkv", 0.5));
        rows.push(with(0.0, 0.0, "full", 1.0));
        let note = super::metric_fit(&rows).expect("a note");
        assert!(note.contains("3 of the full cache's 4 answers"), "{note}");
        assert!(
            note.contains("`qa_f1_score`") && note.contains("substring_recall"),
            "{note}"
        );
        // Two low ones are not enough; neither is a low share.
        assert!(super::metric_fit(&rows[2..]).is_none());
        let mut many = rows.clone();
        many.extend((0..12).map(|_| with(1.0, 1.0, "full", 1.0)));
        assert!(super::metric_fit(&many).is_none());
        // Containment metrics never warn.
        let mut own = rows.clone();
        own.iter_mut()
            .for_each(|r| r.metric = "substring_recall".into());
        assert!(super::metric_fit(&own).is_none());
    }

    #[test]
    fn failures_list_budgets_in_the_one_order_of_every_table() {
        let rows: Vec<ScoreRow> = [1024.0, 0.2, 0.5, 1.0, 64.0]
            .iter()
            .map(|&b| row("snapkv", b, "no", 0.0))
            .collect();
        let manifest: ManifestView = serde_json::from_value(json!({
            "dataset": {}, "tokenizer": {}, "bin_edges": [0, 10], "n_bins": 1,
            "binning_scheme": "fixed", "entries": []
        }))
        .unwrap();
        let f = facts(&manifest, &rows);
        let order: Vec<&str> = f
            .failures
            .iter()
            .map(|x| x["setting"].as_str().unwrap())
            .collect();
        assert_eq!(
            order,
            [
                "snapkv @ 1.0",
                "snapkv @ 0.5",
                "snapkv @ 0.2",
                "snapkv @ 64 tok",
                "snapkv @ 1024 tok"
            ]
        );
    }

    #[test]
    fn the_layer_sentence_names_the_compressed_layers_and_the_rest() {
        let s = super::layer_sentence(&[5, 11, 17], 18);
        assert!(
            s.contains("3 of the model's 18 layers (layers 5, 11, 17"),
            "{s}"
        );
        assert!(s.contains("the other 15 attend to a sliding window"), "{s}");
    }

    #[test]
    fn the_excerpt_centres_on_the_gold_answer_and_marks_it() {
        // The needle deep in a long context, with multi-byte filler before it.
        let context = format!(
            "{}The code for Velo is 918273. {}",
            "é".repeat(2000),
            "b".repeat(2000)
        );
        let e = ExampleText {
            example_id: "e".into(),
            question: "What is the code?".into(),
            context,
            answers: json!(["918273"]),
        };
        let (text, mark) = excerpt(&e);
        let (s, t) = mark.unwrap();
        let units: Vec<u16> = text.encode_utf16().collect();
        assert_eq!(String::from_utf16(&units[s..t]).unwrap(), "918273");
        assert!(text.starts_with("… é"), "{text}");
        assert!(text.contains("The code for Velo is 918273. b"), "{text}");
        assert!(
            text.ends_with(" …\n\nQuestion: What is the code?"),
            "{text}"
        );
        assert_eq!(
            text.chars().filter(|c| *c == 'é').count(),
            EXCERPT_SIDE - 21
        );
        // Found ignoring case; nested answer lists are searched too.
        let e2 = ExampleText {
            answers: json!([["VELO"]]),
            ..e
        };
        let (text, mark) = excerpt(&e2);
        let (s, t) = mark.unwrap();
        let units: Vec<u16> = text.encode_utf16().collect();
        assert_eq!(String::from_utf16(&units[s..t]).unwrap(), "Velo");
    }

    #[test]
    fn the_explorer_reads_a_manifest_view_and_writes_each_examples_cells() {
        // A manifest as prepare writes it, with fields the view skips.
        let context = format!("{}{}", "a".repeat(400), "z".repeat(400));
        let manifest = json!({
            "dataset": {"name": "d", "n_skipped_records": 3},
            "tokenizer": "cl100k_base", "bin_edges": [0, 1000], "n_bins": 1,
            "binning_scheme": "edges",
            "entries": [{"example_id": "e1", "bin_idx": 0}, {"example_id": "e2", "bin_idx": 0}],
            "examples": [
                {"example_id": "e1", "question": "Where </script>?", "context": context,
                 "answers": ["x"], "meta": {"k": 1}},
                {"example_id": "e2", "question": "q", "context": "c", "answers": ["y"], "meta": {}},
            ],
            "something_else": {"big": [1, 2, 3]},
        });
        let view: ManifestView = serde_json::from_value(manifest).unwrap();
        let bins = [Bin {
            bin_idx: 0,
            lo: 0,
            hi: 1000,
            n_available: 2,
            n_selected: 2,
        }];
        let scores = [row("snapkv", 0.5, "x", 1.0), row("full", 1.0, "x", 1.0)];
        let text = explorer(&view, &scores, &bins);
        assert!(
            !text.contains("</"),
            "`</` is escaped inside the script element"
        );
        let got: Value = serde_json::from_str(&text).unwrap();
        // e2 has no scores: it is not shown.
        assert_eq!(got.as_array().unwrap().len(), 1);
        let e = &got[0];
        assert_eq!(e["example_id"], "e1");
        assert_eq!(e["bin"], "0–1000");
        assert_eq!(e["tokens"], 700);
        assert_eq!(e["answers"], json!(["x"]));
        let excerpt = e["excerpt"].as_str().unwrap();
        assert_eq!(
            excerpt,
            format!(
                "{} … {}\n\nQuestion: Where </script>?",
                "a".repeat(300),
                "z".repeat(300)
            )
        );
        let cells = e["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 2);
        for c in cells {
            assert_eq!(c["kept"], "50 of 200 entries (25 %)");
            assert_eq!(c["answer"], "x");
            assert_eq!(c["failure"], Value::Null);
            assert_eq!(c["spans"], Value::Null);
        }
        // The page's JSON keeps its keys in alphabetical order.
        assert!(
            text.starts_with(
                r#"[{"answers":["x"],"bin":"0–1000","cells":[{"answer":"x","budget":"#
            ),
            "{text}"
        );
        assert!(text.contains(r#""example_id":"e1","excerpt":"#), "{text}");
        let f = facts(&view, &scores);
        assert_eq!(f.n_examples, 2);
        assert_eq!(f.n_skipped, 3);
        assert_eq!(f.tokenizer, json!("cl100k_base"));
        assert_eq!(f.uniform_score, Some(1.0));
    }
}
