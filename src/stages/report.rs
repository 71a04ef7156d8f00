//! `report`: `runs/<exp_group_id>/report.md` from a handlebars template
//! (`templates/report.md.hbs`, compiled in): the transition summary first, then
//! the per-bin table with CIs, the plots, failures by type, what was run and
//! provenance.

use crate::config::schema::{self, FULL};
use crate::engine::{canonical_json, OpContext};
use crate::llm::Failure;
use crate::stages::analyze::{BinStat, TransitionRow};
use crate::stages::explorer::Facts;
use crate::stages::plots::{budget_label, budget_order, setting, sort_budgets};
use crate::stages::NoTransport;
use crate::stats::{BinVerdict, TransitionStatus};
use crate::table;
use anyhow::{Context, Result};
use serde_json::{json, Value};

pub struct Report;

pub const TEMPLATE: &str = include_str!("../../templates/report.md.hbs");
pub const HTML: &str = include_str!("../../templates/report.html");

/// `report.html`: one self-contained file (no network, works from `file://`)
/// with the report's summary and every example with each cell's answer.
/// Where the example explorer's data goes in the page (a JSON string value,
/// replaced by the array when the file is composed).
const EXAMPLES_SLOT: &str = "\"__KVT_EXAMPLES__\"";

/// report.html's page: the analysis (small, changes with every analysis
/// setting) with a slot for the example explorer, whose data the
/// `explorer` stage makes once per change of the data or the responses. The
/// exported file is the page with the plots and the explorer in their slots
/// (`compose_export`).
pub fn html_page(ctx: &ReportContext, plots: &[&str]) -> String {
    let data = json!({
        "exp_group_id": ctx.exp_group_id,
        "meta": ctx.meta,
        "warnings": ctx.warnings,
        "bin_labels": ctx.bin_labels,
        "compact": ctx.compact,
        "transitions": ctx.transitions,
        "rows": ctx.rows,
        "ci_pct": ctx.ci_pct,
        "failure_labels": ctx.failure_labels,
        "failures": ctx.failures,
        "turns": ctx.turns,
        "examples": "__KVT_EXAMPLES__",
    });
    // `</` cannot appear inside the script element.
    let json = data.to_string().replace("</", "<\\/");
    // A slot per plot, in `plots` order: the SVGs the plots stage drew go in
    // when the file is composed (stored once, by the plots node).
    let plots: String = plots
        .iter()
        .map(|name| {
            format!("<figure class=\"plot\" id=\"plot-{name}\">{SVG_SLOT}<figcaption>{name}.svg</figcaption></figure>\n")
        })
        .collect();
    // The data goes in last: nothing it holds is read as a placeholder.
    HTML.replace("__KVT_PLOTS__", &plots)
        .replace("__KVT_DATA__", &json)
}

/// The figures report.html shows, in the order report.md has them.
pub const HTML_PLOTS: &[&str] = &[
    "acc_by_bin",
    "fail_by_bin",
    "latency_p50_by_bin",
    "delta_heatmap",
    "kl_by_bin",
    "gold_ll_drop_by_bin",
    "risk_coverage",
    "reliability",
];

/// Where a plot's SVG goes in the page.
const SVG_SLOT: &str = "__KVT_SVG__";

/// The whole report.html: the page with each plot's SVG in its slot (in
/// order; inline SVG needs no namespace declaration, and the page then names
/// no address at all), then the explorer in its slot.
pub fn compose_html(page: &str, explorer: &str, svgs: &[&str]) -> String {
    let mut page = page.to_string();
    for svg in svgs {
        let body = svg.find("<svg").map_or(*svg, |at| &svg[at..]);
        let body = body.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1);
        page = page.replacen(SVG_SLOT, &body, 1);
    }
    page.replacen(EXAMPLES_SLOT, explorer, 1)
}

fn f2(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.2}"))
}

fn ci(m: Option<f64>, lo: Option<f64>, hi: Option<f64>, signed: bool) -> String {
    match (m, lo, hi) {
        (Some(m), Some(lo), Some(hi)) if signed => format!("{m:+.2} [{lo:+.2}, {hi:+.2}]"),
        (Some(m), Some(lo), Some(hi)) => format!("{m:.2} [{lo:.2}, {hi:.2}]"),
        (Some(m), _, _) => format!("{m:.2}"),
        _ => "–".into(),
    }
}

/// A verdict's mark in the tables: ✓ safe, ✗ fails, ? insufficient, ∅
/// uninformative; none for the reference (and unavailable).
fn mark(v: BinVerdict) -> &'static str {
    match v {
        BinVerdict::Fails => " ✗",
        BinVerdict::Safe => " ✓",
        BinVerdict::Insufficient => " ?",
        BinVerdict::Uninformative => " ∅",
        BinVerdict::Reference | BinVerdict::Unavailable => "",
    }
}

pub fn human_bytes(b: f64) -> String {
    crate::engine::maintenance::human_bytes(b.max(0.0).round() as u64)
}

/// Each bin once, in order, with its label (`lo–hi`), from rows that name
/// their bin as (index, lo, hi).
fn bin_labels(rows: impl Iterator<Item = (i64, i64, i64)>) -> Vec<(i64, String)> {
    let mut bins: Vec<(i64, String)> = rows.map(|(i, lo, hi)| (i, format!("{lo}–{hi}"))).collect();
    bins.sort();
    bins.dedup();
    bins
}

/// The fidelity section: per cell and bin the KL to the full cache and the
/// gold log-likelihood drop with their verdict marks, how many verdicts each
/// metric decides, and the selective-prediction figures (test split).
pub fn fidelity_context(
    stats: &[BinStat],
    fid: &[crate::stages::fidelity::FidelityStat],
    selective: &[crate::stages::fidelity::SelectiveStat],
) -> Value {
    let available = fid.iter().any(|f| f.available);
    let bins = bin_labels(fid.iter().map(|f| (f.bin_idx, f.bin_lo, f.bin_hi)));
    let mut cells: Vec<(String, f64)> = fid.iter().map(|f| (f.policy.clone(), f.budget)).collect();
    cells.dedup();
    cells.sort_by(|a, b| {
        let (oa, ob) = (budget_order(a.1), budget_order(b.1));
        a.0.cmp(&b.0)
            .then(oa.0.cmp(&ob.0))
            .then(oa.1.total_cmp(&ob.1))
    });
    let rows: Vec<Value> = cells
        .iter()
        .filter(|(p, b)| {
            !fid.iter()
                .any(|f| &f.policy == p && f.budget == *b && f.verdict == BinVerdict::Reference)
        })
        .map(|(p, b)| {
            let cell = |bin: i64| {
                let get = |m: &str| fid.iter().find(|f| &f.policy == p && f.budget == *b && f.bin_idx == bin && f.metric == m);
                let part = |m: &str, name: &str| match get(m) {
                    Some(f) if f.available => format!(
                        "{name} {}{}",
                        f.mean.map_or("–".into(), |v| format!("{v:.2}")),
                        mark(f.verdict)
                    ),
                    _ => format!("{name} unavailable"),
                };
                format!("{} · {}", part("kl", "KL"), part("gold_ll_drop", "ΔLL"))
            };
            json!({"setting": setting(p, *b), "cells": bins.iter().map(|(i, _)| cell(*i)).collect::<Vec<_>>()})
        })
        .collect();
    let decided: Vec<Value> = crate::stages::fidelity::decided_counts(stats, fid)
        .into_iter()
        .map(|(m, d, of)| json!({"metric": m, "decided": d, "of": of}))
        .collect();
    let f3 = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.3}"));
    let ci3 = |m: Option<f64>, lo: Option<f64>, hi: Option<f64>| match (m, lo, hi) {
        (Some(m), Some(lo), Some(hi)) => format!("{m:+.3} [{lo:+.3}, {hi:+.3}]"),
        (Some(m), _, _) => format!("{m:+.3}"),
        _ => "–".into(),
    };
    let sel: Vec<Value> = cells
        .iter()
        .filter_map(|(p, b)| selective.iter().find(|s| &s.policy == p && s.budget == *b && s.bin_idx == -1))
        .map(|s| {
            json!({
                "setting": setting(&s.policy, s.budget),
                "n": format!("{} / {}", s.n_test, s.n_calibration),
                "augrc": if s.available { match (s.augrc, s.augrc_lo, s.augrc_hi) {
                    (Some(a), Some(l), Some(h)) => format!("{a:.3} [{l:.3}, {h:.3}]"),
                    (a, _, _) => f3(a),
                } } else { "unavailable".into() },
                "d_augrc": ci3(s.d_augrc, s.d_augrc_lo, s.d_augrc_hi),
                "cw": match (s.confidently_wrong, s.confidently_wrong_lo, s.confidently_wrong_hi) {
                    (Some(a), Some(l), Some(h)) => format!("{a:.2} [{l:.2}, {h:.2}]"),
                    (Some(a), _, _) => f3(Some(a)),
                    // No confidence keeps the full cache's calibration
                    // answers within the risk: nothing counts as confident.
                    (None, _, _) if s.available => "no threshold".into(),
                    (None, _, _) => "–".into(),
                },
                "d_cw": ci3(s.d_confidently_wrong, s.d_confidently_wrong_lo, s.d_confidently_wrong_hi),
                "risk80": f3(s.risk_at_cov_80),
                "cov10": f3(s.cov_at_risk_10),
                "calibration": format!("{} / {} / {}", f3(s.nll), f3(s.brier), f3(s.ece)),
            })
        })
        .collect();
    json!({
        "available": available,
        "bin_labels": bins.iter().map(|b| b.1.clone()).collect::<Vec<_>>(),
        "rows": rows,
        "decided": decided,
        "selective": sel,
        "selective_available": selective.iter().any(|s| s.available),
    })
}

/// The by-turn section (questions asked of one shared context): a row per
/// cell and turn, the full cache first, a column per length bin and one for
/// every bin, each `mean [CI] (n)`. Null when no example has a turn.
pub fn turns_context(stats: &[BinStat], turns: &[crate::stages::analyze::TurnStat]) -> Value {
    if turns.is_empty() {
        return Value::Null;
    }
    let mut bins = bin_labels(stats.iter().map(|s| (s.bin_idx, s.bin_lo, s.bin_hi)));
    bins.push((-1, "every bin".into()));
    let mut rows: Vec<(bool, String, (u8, f64), i64)> = turns
        .iter()
        .map(|t| {
            let full = t.policy == crate::config::schema::FULL && t.budget == 1.0;
            (!full, t.policy.clone(), budget_order(t.budget), t.turn)
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.0, &a.1, a.2 .0)
            .cmp(&(b.0, &b.1, b.2 .0))
            .then(a.2 .1.total_cmp(&b.2 .1))
            .then(a.3.cmp(&b.3))
    });
    rows.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1 && a.2 == b.2 && a.3 == b.3);
    let f2 = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.2}"));
    let rows: Vec<Value> = rows
        .iter()
        .map(|(_, policy, order, turn)| {
            let of = |t: &&crate::stages::analyze::TurnStat| {
                &t.policy == policy && budget_order(t.budget) == *order && t.turn == *turn
            };
            let budget = turns.iter().find(of).map_or(1.0, |t| t.budget);
            let label = if policy == crate::config::schema::FULL && budget == 1.0 {
                "full cache".to_string()
            } else {
                setting(policy, budget)
            };
            let cells: Vec<String> =
                bins.iter()
                    .map(|(b, _)| {
                        turns.iter().filter(of).find(|t| t.bin_idx == *b).map_or(
                            "–".into(),
                            |t| {
                                format!(
                                    "{} [{}, {}] ({})",
                                    f2(t.mean),
                                    f2(t.ci_lo),
                                    f2(t.ci_hi),
                                    t.n
                                )
                            },
                        )
                    })
                    .collect();
            json!({"setting": label, "turn": turn, "cells": cells})
        })
        .collect();
    json!({
        "bin_labels": bins.iter().map(|b| b.1.clone()).collect::<Vec<_>>(),
        "rows": rows,
    })
}

/// What `templates/report.md.hbs` and report.html read: one typed context
/// (the nested tables are rows of JSON made above it).
#[derive(serde::Serialize)]
pub struct ReportContext {
    pub exp_group_id: String,
    /// The manifest's dataset section, as prepared.
    pub dataset: Value,
    pub tokenizer: Value,
    /// "dataset / task · model M · metric X": report.html's subtitle.
    pub meta: String,
    pub bin_edges: String,
    pub n_examples: usize,
    pub n_bins: Value,
    pub model: String,
    pub policies: Vec<String>,
    pub budgets: Vec<String>,
    pub metric: String,
    pub delta: f64,
    pub iters: u32,
    pub seed: u64,
    pub ci_pct: String,
    pub ci_one_sided_pct: String,
    pub transitions: Vec<Value>,
    pub rows: Vec<Value>,
    pub warnings: Vec<String>,
    pub layer_note: Option<String>,
    pub flags: Vec<String>,
    pub bin_labels: Vec<String>,
    pub compact: Vec<Value>,
    pub floor: f64,
    pub failure_labels: Vec<&'static str>,
    pub failures: Vec<Value>,
    pub examples_of_failures: Vec<Value>,
    pub geometry: String,
    pub decoding: String,
    pub db_path: String,
    pub db_rows: String,
    pub kvt_version: &'static str,
    pub config_digest: String,
    /// The fidelity section ([`fidelity_context`]).
    pub fidelity: Value,
    /// Accuracy by turn ([`turns_context`]); null without turns.
    pub turns: Value,
    /// Every input node and its key.
    pub provenance: Vec<Value>,
    pub node_key: String,
}

/// Everything the template needs, as JSON.
pub fn context(
    u: &Uses,
    facts: &Facts,
    stats: &[BinStat],
    transitions: &[TransitionRow],
    db_rows: &Value,
) -> ReportContext {
    let analysis = &u.analysis;
    let exp = u.output.exp_group_id.clone();
    let metric = stats
        .iter()
        .map(|s| s.metric.clone())
        .find(|m| !m.is_empty())
        .unwrap_or_else(|| "score".into());
    let edges = facts.bin_edges.clone();
    let edge = |i: Option<i64>| -> String {
        i.and_then(|i| edges.get(i as usize + 1))
            .map_or("–".into(), |v| v.to_string())
    };
    let bin_label = |i: i64| {
        stats
            .iter()
            .find(|s| s.bin_idx == i)
            .map_or(i.to_string(), |s| format!("{}–{}", s.bin_lo, s.bin_hi))
    };
    let delta = analysis.transition.delta;
    let floor = crate::stages::analyze::effective_floor(&metric, analysis.transition.floor);
    let order = |p: &str, b: f64| {
        (
            p.to_string(),
            budget_order(b).0,
            (budget_order(b).1 * 1e9) as i64,
        )
    };
    // The full cache is the same cell for every plain policy: it is shown once.
    let is_full =
        |policy: &str, budget: f64, reference: f64| budget == reference && !policy.contains('+');
    let full_policy = transitions
        .iter()
        .find(|t| is_full(&t.policy, t.budget, t.reference_budget))
        .map(|t| t.policy.clone());
    let shown = |policy: &str, budget: f64, reference: f64| {
        !is_full(policy, budget, reference) || full_policy.as_deref() == Some(policy)
    };
    let label_of = |policy: &str, budget: f64, reference: f64| {
        if is_full(policy, budget, reference) {
            "full cache".to_string()
        } else {
            setting(policy, budget)
        }
    };
    let mut ts: Vec<&TransitionRow> = transitions
        .iter()
        .filter(|t| shown(&t.policy, t.budget, t.reference_budget))
        .collect();
    ts.sort_by_key(|t| {
        let full = is_full(&t.policy, t.budget, t.reference_budget);
        (!full, order(&t.policy, t.budget))
    });
    let transitions_ctx: Vec<Value> = ts
        .iter()
        .map(|t| {
            let first = t.t.first_failing_bin.map(bin_label).unwrap_or_default();
            let outcome = match t.t.status {
                TransitionStatus::Reference => "full cache (reference)".to_string(),
                TransitionStatus::Uninformative => format!(
                    "**uninformative**: the full cache scores below {floor} in every bin"
                ),
                TransitionStatus::Safe => format!("safe in every bin (loss < {delta} shown)"),
                TransitionStatus::InsufficientData => match t.t.n_needed {
                    Some(n) => format!(
                        "insufficient data: about {n} paired examples per bin would settle it"
                    ),
                    None => "insufficient data".to_string(),
                },
                TransitionStatus::FailsEveryLength => "**fails at every length**".to_string(),
                TransitionStatus::FailsFromShortest => {
                    // Only the bins decided failing are named: an undecided
                    // bin after them is not claimed.
                    let failing: Vec<String> = stats
                        .iter()
                        .filter(|s| s.policy == t.policy && s.budget == t.budget && s.verdict == BinVerdict::Fails)
                        .map(|s| bin_label(s.bin_idx))
                        .collect();
                    let bins_total = stats
                        .iter()
                        .filter(|s| s.policy == t.policy && s.budget == t.budget)
                        .count();
                    if failing.len() == bins_total {
                        "**fails from the shortest bin**".to_string()
                    } else {
                        format!(
                            "**fails** in {} tokens, the shortest bin shown (other bins undecided)",
                            failing.join(", ")
                        )
                    }
                }
                TransitionStatus::Transition => format!("**fails** from {first} tokens"),
                TransitionStatus::FailsAfterUnclear => {
                    format!("**fails** from {first} tokens (no shorter bin shown safe)")
                }
            };
            json!({
                "policy": if is_full(&t.policy, t.budget, t.reference_budget) { FULL.to_string() } else { t.policy.clone() },
                "budget": budget_label(t.budget), "outcome": outcome,
                "first_bin": t.t.first_failing_bin.map_or("–".into(), |b| format!("{b} ({})", bin_label(b))),
                "zone": match (t.t.zone_lo_tokens, t.t.zone_hi_tokens) {
                    (Some(a), Some(b)) if t.t.status == TransitionStatus::Transition => format!("{a}–{b}"),
                    _ => "–".into(),
                },
                "instability": f2(t.t.instability),
                "last_safe": edge(t.t.last_safe_bin),
            })
        })
        .collect();
    let mut sorted: Vec<&BinStat> = stats
        .iter()
        .filter(|s| shown(&s.policy, s.budget, s.reference_budget))
        .collect();
    sorted.sort_by_key(|s| {
        let full = is_full(&s.policy, s.budget, s.reference_budget);
        (!full, order(&s.policy, s.budget), s.bin_idx)
    });
    // The compact table: one row per cell, one column per bin.
    let bins = bin_labels(stats.iter().map(|s| (s.bin_idx, s.bin_lo, s.bin_hi)));
    let mut compact: Vec<Value> = Vec::new();
    for s in &sorted {
        let label = label_of(&s.policy, s.budget, s.reference_budget);
        if compact.last().map(|r: &Value| r["setting"] == json!(label)) != Some(true) {
            compact.push(
                json!({"setting": label, "cells": vec![Value::Null; bins.len()],
                "details": vec![""; bins.len()]}),
            );
        }
        let col = bins.iter().position(|b| b.0 == s.bin_idx).unwrap_or(0);
        // The first table stays narrow: the mean and the mark; the paired Δ
        // and its CI are in the detailed table (and on hover in HTML).
        let text = match s.mean {
            None => "–".to_string(),
            Some(m) => format!("{m:.2}{}", mark(s.verdict)),
        };
        let detail = match (s.delta, s.delta_lo, s.delta_hi) {
            (Some(d), Some(lo), Some(hi)) if s.verdict != BinVerdict::Reference => {
                format!("Δ {d:+.2} [{lo:+.2}, {hi:+.2}]")
            }
            _ => String::new(),
        };
        let last = compact.last_mut().expect("a row");
        last["cells"][col] = json!(text);
        last["details"][col] = json!(detail);
    }
    for r in &mut compact {
        if let Some(cells) = r["cells"].as_array_mut() {
            for c in cells.iter_mut().filter(|c| c.is_null()) {
                *c = json!("–");
            }
        }
    }
    let rows: Vec<Value> = sorted
        .iter()
        .map(|s| {
            json!({
                "setting": label_of(&s.policy, s.budget, s.reference_budget),
                "bin": format!("{}–{}", s.bin_lo, s.bin_hi),
                "n": s.n,
                "mean": ci(s.mean, s.ci_lo, s.ci_hi, false),
                "delta": if s.verdict == BinVerdict::Reference { "(reference)".into() } else { ci(s.delta, s.delta_lo, s.delta_hi, true) },
                "loss": match (s.loss, s.loss_ub) {
                    (Some(l), Some(u)) if s.verdict != BinVerdict::Reference => format!("{l:.2} (≤ {u:.2})"),
                    _ => "–".into(),
                },
                "verdict": s.verdict,
                "fail": match (s.fail_rate, s.fail_lo, s.fail_hi) {
                    (Some(r), Some(lo), Some(hi)) => format!("{}/{} = {r:.2} [{lo:.2}, {hi:.2}]", s.n_failed, s.n),
                    _ => "–".into(),
                },
                "latency": format!("{} / {}", f2(s.latency_p50_ms), f2(s.latency_p95_ms)),
                "ttft": f2(s.ttft_p50_ms),
                "retained": s.retained_tokens_mean.map_or("–".into(), |r| format!("{r:.0} of {:.0}", s.prompt_tokens_mean.unwrap_or(f64::NAN))),
                "answer": s.completion_tokens_mean.map_or("–".into(), |a| format!("{a:.1}")),
                "kv": s.kv_bytes_mean.map_or("–".into(), human_bytes),
                "rss": match (s.server_rss_peak_mib, s.kv_cache_usage_peak) {
                    (Some(m), Some(u)) => format!("{m:.0} MiB; KV cache {:.0} % used", u * 100.0),
                    (Some(m), None) => format!("{m:.0} MiB"),
                    (None, Some(u)) => format!("KV cache {:.0} % used", u * 100.0),
                    (None, None) => "–".into(),
                },
            })
        })
        .collect();
    // Warnings that change how the whole report reads.
    let mut warnings: Vec<String> = Vec::new();
    let full_rows: Vec<&&BinStat> = sorted
        .iter()
        .filter(|s| s.verdict == BinVerdict::Reference)
        .collect();
    let at_floor: Vec<&&&BinStat> = full_rows
        .iter()
        .filter(|s| s.mean.is_some_and(|m| m < floor))
        .collect();
    if !full_rows.is_empty() && at_floor.len() == full_rows.len() {
        warnings.push(format!(
            "**No verdict is possible: the full cache scores below {floor} in every bin.** The model (or the engine) cannot do this task at full cache, so nothing here says anything about KV budgets. Check the prompt, the metric and the model before reading further."
        ));
    } else if !at_floor.is_empty() {
        warnings.push(format!(
            "The full cache scores below {floor} in {} of {} bins ({}): those bins are uninformative.",
            at_floor.len(),
            full_rows.len(),
            at_floor.iter().map(|s| format!("{}–{}", s.bin_lo, s.bin_hi)).collect::<Vec<_>>().join(", ")
        ));
    }
    let chance = crate::stages::analyze::chance_level(&metric);
    if chance > 0.0 {
        warnings.push(format!(
            "`{metric}` scores {chance} by guessing (one of four options): a bin is uninformative when the full cache scores below {floor:.3}, `analysis.transition.floor` above chance."
        ));
    }
    if let Some(note) = &facts.metric_fit {
        warnings.push(note.clone());
    }
    if let Some(score) = facts.uniform_score {
        warnings.push(format!(
            "Every response of every cell scored {score:.2}: the metric cannot tell the budgets apart."
        ));
    }
    if facts.simulator && u.dataset.source != schema::Source::Synthetic {
        warnings.push("**These scores measure kvt's reference simulator, not a model.** Its reader only answers kvt's own synthetic key–value questions; on other data it scores 0 at any budget. Use a real engine (`engine.kind: native`, `openai` or `launch`).".to_string());
    }
    let n_per_bin = i64::from(u.sampling.n_per_bin);
    let mut flags: Vec<String> = Vec::new();
    let thin: Vec<String> = full_rows
        .iter()
        .filter(|s| s.n < n_per_bin)
        .map(|s| format!("{}–{} ({} of {n_per_bin})", s.bin_lo, s.bin_hi, s.n))
        .collect();
    if !thin.is_empty() {
        flags.push(format!(
            "Bins with fewer examples than `sampling.n_per_bin`: {}.",
            thin.join(", ")
        ));
    }
    // Prompts cut by `prompt.max_tokens`, per bin (each example counted once).
    let cut = &facts.cut;
    if !cut.is_empty() {
        flags.push(format!(
            "Prompts shortened by `prompt.max_tokens` (middle truncation): {}.",
            cut.iter()
                .map(|(b, n)| format!("{n} in {}", bin_label(*b)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let skipped = facts.n_skipped;
    if skipped > 0 {
        flags.push(format!(
            "{skipped} bad records were skipped (`dataset.on_bad_record: skip`)."
        ));
    }
    if facts.binning_scheme == "longbench_e" {
        flags.push(
            "Bins are LongBench-E's, by each record's `length` field (words, or characters for Chinese, as LongBench counts them), not by tokens; the last bin is open above."
                .to_string(),
        );
    } else if facts.binning_scheme == "length_class" {
        flags.push(
            "Bins are LongBench v2's length classes (short, medium, long), by each record's `length` field; their edges are in words (up to 32k, 128k, 2M), not tokens."
                .to_string(),
        );
    } else {
        flags.push(format!(
            "Bin lengths count each example's context in `{}` tokens (not the question, the system message or the template){}.",
            facts.tokenizer.as_str().unwrap_or("?"),
            if u.prompt.max_tokens.is_none() { "" } else { ", before middle truncation by `prompt.max_tokens`" }
        ));
    }
    let mut policies: Vec<String> = stats.iter().map(|s| s.policy.clone()).collect();
    policies.dedup();
    policies.sort();
    policies.dedup();
    let mut budgets: Vec<f64> = stats.iter().map(|s| s.budget).collect();
    sort_budgets(&mut budgets);
    budgets.dedup();
    let geom = &u.geometry;
    let config_digest = blake3::hash(&canonical_json(
        &serde_json::to_value(u).expect("the report's configuration serializes"),
    ))
    .to_hex()
    .to_string();
    let ci_level = analysis.bootstrap.ci;
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let meta = format!(
        "{} / {} · model {} · metric {metric}",
        text(&facts.dataset, "name"),
        text(&facts.dataset, "task"),
        u.model
    );
    ReportContext {
        exp_group_id: exp,
        dataset: facts.dataset.clone(),
        tokenizer: facts.tokenizer.clone(),
        meta,
        bin_edges: edges.to_string(),
        n_examples: facts.n_examples,
        n_bins: facts.n_bins.clone(),
        model: u.model.clone(),
        policies,
        budgets: budgets.iter().map(|b| budget_label(*b)).collect(),
        metric,
        delta: analysis.transition.delta,
        iters: analysis.bootstrap.iters,
        seed: analysis.bootstrap.seed,
        ci_pct: format!("{}", (ci_level * 100.0).round()),
        ci_one_sided_pct: format!("{}", (1.0 - (1.0 - ci_level) / 2.0) * 100.0),
        transitions: transitions_ctx,
        rows,
        warnings,
        layer_note: facts.layer_note.clone(),
        flags,
        bin_labels: bins.iter().map(|b| b.1.clone()).collect(),
        compact,
        floor,
        failure_labels: Failure::ALL.map(Failure::label).to_vec(),
        failures: facts.failures.clone(),
        examples_of_failures: facts.failure_examples.clone(),
        geometry: format!(
            "{} layers × {} KV heads × head dim {} × 2 (K, V) × {} bytes",
            geom.layers, geom.kv_heads, geom.head_dim, geom.bytes_per_elem
        ),
        decoding: String::from_utf8_lossy(&canonical_json(
            &serde_json::to_value(&u.decoding).expect("decoding serializes"),
        ))
        .to_string(),
        db_path: if u.db_path == "auto" {
            "kv_transition.sqlite".to_string()
        } else {
            u.db_path.clone()
        },
        db_rows: db_rows
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
        kvt_version: env!("CARGO_PKG_VERSION"),
        config_digest,
        fidelity: Value::Null,
        turns: Value::Null,
        provenance: Vec::new(),
        node_key: String::new(),
    }
}

pub fn render(ctx: &ReportContext) -> Result<String> {
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    hb.register_template_string("report", TEMPLATE)
        .context("the report template is invalid")?;
    Ok(hb.render("report", ctx)?)
}

/// What `report` reads, typed: it records the experiment's configuration,
/// so it takes these sections whole (its stage's `uses`, exactly). Written
/// back as the same JSON for the configuration's digest.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Uses {
    #[serde(rename = "output.exp_group_id")]
    pub exp: String,
    #[serde(rename = "db.path")]
    pub db_path: String,
    #[serde(rename = "model.name")]
    pub model: String,
    #[serde(rename = "model.kv_geometry")]
    pub geometry: schema::KvGeometry,
    pub dataset: schema::Dataset,
    #[serde(rename = "tokenizer.kind")]
    pub tokenizer_kind: schema::TokenizerKind,
    #[serde(rename = "tokenizer.name")]
    pub tokenizer_name: String,
    pub binning: schema::Binning,
    pub sampling: schema::Sampling,
    pub kv: schema::Kv,
    pub decoding: schema::Decoding,
    pub prompt: schema::Prompt,
    pub analysis: schema::Analysis,
    pub output: schema::Output,
}

impl crate::stages::Stage for Report {
    fn name(&self) -> &'static str {
        "report"
    }
    /// 9: the examples and responses come from the `explorer` stage.
    /// 10: the fidelity and selective-prediction tables.
    fn version(&self) -> u32 {
        // 11: the layer note and the metric-fit warning.
        // 12: report.html carries the CI table, the plots and the failures.
        // 13: mean answer length beside each bin's score.
        // 14: accuracy by turn; 15: in report.html too; 16: the
        // length-class flag.
        16
    }
    type Uses = Uses;
    type Transport = NoTransport;
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, _: Self::Transport) -> Result<()> {
        let u = uses;
        let exp = u.exp.clone();
        let facts: Facts = serde_json::from_slice(&ctx.input("explorer", "facts")?)?;
        let stats: Vec<BinStat> = table::read_owned(ctx.input("analyze", "bin_stats")?)?;
        let transitions: Vec<TransitionRow> =
            table::read_owned(ctx.input("analyze", "transition_summary")?)?;
        let db_rows: Value = serde_json::from_slice(&ctx.input("sqlite", "summary")?)?;
        let fid: Vec<crate::stages::fidelity::FidelityStat> =
            table::read_owned(ctx.input("analyze", "fidelity_stats")?)?;
        let selective: Vec<crate::stages::fidelity::SelectiveStat> =
            table::read_owned(ctx.input("analyze", "selective_stats")?)?;
        let mut c = context(&u, &facts, &stats, &transitions, &db_rows);
        c.fidelity = fidelity_context(&stats, &fid, &selective);
        let turns: Vec<crate::stages::analyze::TurnStat> =
            table::read_owned(ctx.input("analyze", "turn_stats")?)?;
        c.turns = turns_context(&stats, &turns);
        let mut prov: Vec<Value> = ctx
            .upstream
            .iter()
            .map(|u| json!({"node": u.node, "key": u.key.to_string()}))
            .chain(facts.provenance.iter().cloned())
            .collect();
        prov.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        c.provenance = prov;
        c.node_key = ctx.node_key.to_string();
        let md = render(&c)?;
        ctx.put("report", md.as_bytes())?;
        ctx.export("report", format!("runs/{exp}/report.md"));
        // The plots go in by reference, like the explorer: report.html's
        // page stays small in the cache.
        let mut overlays = vec!["explorer".to_string()];
        let mut plots = Vec::new();
        for name in HTML_PLOTS {
            if ctx
                .pass_through("plots", &format!("{name}.svg"), &format!("svg_{name}"))
                .is_ok()
            {
                overlays.push(format!("svg_{name}"));
                plots.push(*name);
            }
        }
        ctx.put("report_html", html_page(&c, &plots).as_bytes())?;
        ctx.pass_through("explorer", "explorer", "explorer")?;
        let overlays: Vec<&str> = overlays.iter().map(String::as_str).collect();
        ctx.export_composed("report_html", &overlays, format!("runs/{exp}/report.html"));
        Ok(())
    }
    fn compose_export(&self, file: &std::path::Path, overlays: &[Vec<u8>]) -> Result<()> {
        let [explorer, svgs @ ..] = overlays else {
            return Err(anyhow::anyhow!(
                "report.html composes the explorer and the plots, got no overlay"
            ));
        };
        let page = std::fs::read_to_string(file)?;
        anyhow::ensure!(
            page.contains(EXAMPLES_SLOT),
            "report.html's page has no slot for the example explorer"
        );
        let explorer = std::str::from_utf8(explorer)?;
        let svgs = svgs
            .iter()
            .map(|s| std::str::from_utf8(s))
            .collect::<std::result::Result<Vec<&str>, _>>()?;
        std::fs::write(file, compose_html(&page, explorer, &svgs))?;
        Ok(())
    }
}
