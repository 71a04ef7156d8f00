//! `report`: `runs/<exp_group_id>/report.md` from a handlebars template
//! (`templates/report.md.hbs`, compiled in): the transition summary first, then
//! the per-bin table with CIs, the plots, failures by type, what was run and
//! provenance.

use crate::engine::{canonical_json, Op, OpContext};
use crate::metrics::FAILURE_LABELS;
use crate::stages::analyze::{BinStat, TransitionRow};
use crate::stages::plots::{budget_label, setting};
use crate::stages::score::ScoreRow;
use crate::table;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub struct Report;

pub const TEMPLATE: &str = include_str!("../../templates/report.md.hbs");

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

pub fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Everything the template needs, as JSON.
pub fn context(
    cfg: &BTreeMap<String, Value>,
    manifest: &Value,
    stats: &[BinStat],
    transitions: &[TransitionRow],
    scores: &[ScoreRow],
    db_rows: &Value,
) -> Value {
    let get = |k: &str| cfg.get(k).cloned().unwrap_or(Value::Null);
    let (analysis, output) = (get("analysis"), get("output"));
    let exp = output["exp_group_id"].as_str().unwrap_or("").to_string();
    let metric = stats
        .iter()
        .map(|s| s.metric.clone())
        .find(|m| !m.is_empty())
        .unwrap_or_else(|| "score".into());
    let edges = manifest["bin_edges"].clone();
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
    let transitions_ctx: Vec<Value> = transitions
        .iter()
        .map(|t| {
            let outcome = match t.t.status.as_str() {
                "detected" => "**fails**".to_string(),
                "not_detected" => "safe in every bin (no transition detected)".to_string(),
                "insufficient_data" => format!(
                    "insufficient data ({} bins with ≥ {} paired examples)",
                    t.t.bins_with_data,
                    crate::stats::MIN_N
                ),
                "reference" => "full cache (reference)".to_string(),
                other => other.to_string(),
            };
            json!({
                "policy": t.policy, "budget": budget_label(t.budget), "outcome": outcome,
                "first_bin": t.t.first_failing_bin.map_or("–".into(), |b| format!("{b} ({})", bin_label(b))),
                "zone": match (t.t.zone_lo_tokens, t.t.zone_hi_tokens) {
                    (Some(a), Some(b)) => format!("{a}–{b}"),
                    _ => "–".into(),
                },
                "instability": f2(t.t.instability),
                "last_safe": edge(t.t.last_safe_bin),
            })
        })
        .collect();
    let mut sorted: Vec<&BinStat> = stats.iter().collect();
    sorted.sort_by(|a, b| {
        (a.policy.as_str(), -a.budget, a.bin_idx)
            .partial_cmp(&(b.policy.as_str(), -b.budget, b.bin_idx))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let rows: Vec<Value> = sorted
        .iter()
        .map(|s| {
            json!({
                "setting": setting(&s.policy, s.budget),
                "bin": format!("{}–{}", s.bin_lo, s.bin_hi),
                "n": s.n,
                "mean": ci(s.mean, s.ci_lo, s.ci_hi, false),
                "delta": if s.budget == s.reference_budget { "(reference)".into() } else { ci(s.delta, s.delta_lo, s.delta_hi, true) },
                "fail": match (s.fail_rate, s.fail_lo, s.fail_hi) {
                    (Some(r), Some(lo), Some(hi)) => format!("{}/{} = {r:.2} [{lo:.2}, {hi:.2}]", s.n_failed, s.n),
                    _ => "–".into(),
                },
                "latency": format!("{} / {}", f2(s.latency_p50_ms), f2(s.latency_p95_ms)),
                "ttft": f2(s.ttft_p50_ms),
                "retained": s.retained_tokens_mean.map_or("–".into(), |r| format!("{r:.0} of {:.0}", s.prompt_tokens_mean.unwrap_or(f64::NAN))),
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
    // Failures by type, per setting.
    let mut by: BTreeMap<(String, i64), BTreeMap<&str, usize>> = BTreeMap::new();
    let mut examples: BTreeMap<&str, Value> = BTreeMap::new();
    for r in scores {
        if let Some(f) = &r.failure {
            let label = FAILURE_LABELS
                .iter()
                .find(|l| *l == f)
                .copied()
                .unwrap_or("ENGINE_ERROR");
            *by.entry((r.policy.clone(), -(r.budget * 1e6) as i64))
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
    let failures: Vec<Value> = by
        .iter()
        .map(|((p, b), m)| {
            let budget = -(*b as f64) / 1e6;
            json!({
                "setting": setting(p, budget),
                "counts": FAILURE_LABELS.iter().map(|l| m.get(l).copied().unwrap_or(0)).collect::<Vec<_>>(),
                "total": m.values().sum::<usize>(),
            })
        })
        .collect();
    let mut policies: Vec<String> = stats.iter().map(|s| s.policy.clone()).collect();
    policies.dedup();
    policies.sort();
    policies.dedup();
    let mut budgets: Vec<f64> = stats.iter().map(|s| s.budget).collect();
    budgets.sort_by(|a, b| b.total_cmp(a));
    budgets.dedup();
    let geom = &get("model.kv_geometry");
    let config_digest = blake3::hash(&canonical_json(&json!(cfg)))
        .to_hex()
        .to_string();
    let ci_level = analysis["bootstrap"]["ci"].as_f64().unwrap_or(0.95);
    json!({
        "exp_group_id": exp,
        "dataset": manifest["dataset"],
        "tokenizer": manifest["tokenizer"],
        "bin_edges": edges.to_string(),
        "n_examples": manifest["entries"].as_array().map_or(0, Vec::len),
        "n_bins": manifest["n_bins"],
        "model": get("model.name"),
        "policies": policies,
        "budgets": budgets.iter().map(|b| budget_label(*b)).collect::<Vec<_>>(),
        "metric": metric,
        "delta": analysis["transition"]["delta"],
        "iters": analysis["bootstrap"]["iters"],
        "seed": analysis["bootstrap"]["seed"],
        "ci_pct": format!("{}", (ci_level * 100.0).round()),
        "transitions": transitions_ctx,
        "rows": rows,
        "failure_labels": FAILURE_LABELS,
        "failures": failures,
        "examples_of_failures": examples.into_values().collect::<Vec<_>>(),
        "geometry": format!("{} layers × {} KV heads × head dim {} × 2 (K, V) × {} bytes",
            geom["layers"], geom["kv_heads"], geom["head_dim"], geom["bytes_per_elem"]),
        "decoding": String::from_utf8_lossy(&canonical_json(&get("decoding"))),
        "db_path": if get("db.path") == json!("auto") { "kv_transition.sqlite".to_string() } else { get("db.path").as_str().unwrap_or("").to_string() },
        "db_rows": db_rows.as_object().map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        "kvt_version": env!("CARGO_PKG_VERSION"),
        "config_digest": config_digest,
    })
}

pub fn render(ctx: &Value) -> Result<String> {
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    hb.register_template_string("report", TEMPLATE)
        .context("the report template is invalid")?;
    Ok(hb.render("report", ctx)?)
}

impl Op for Report {
    fn name(&self) -> &'static str {
        "report"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()> {
        let exp: String = ctx.get("output.exp_group_id")?;
        let manifest: Value = serde_json::from_slice(&ctx.input("prepare", "manifest_json")?)?;
        let stats: Vec<BinStat> = table::read(&ctx.input("analyze", "bin_stats")?)?;
        let transitions: Vec<TransitionRow> =
            table::read(&ctx.input("analyze", "transition_summary")?)?;
        let scores = crate::stages::score::read_all(ctx)?;
        let db_rows: Value = serde_json::from_slice(&ctx.input("sqlite", "summary")?)?;
        let mut c = context(
            ctx.key.config,
            &manifest,
            &stats,
            &transitions,
            &scores,
            &db_rows,
        );
        let mut prov: Vec<Value> = ctx
            .upstream
            .iter()
            .map(|u| json!({"node": u.node, "key": u.key.to_string()}))
            .collect();
        prov.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        c["provenance"] = json!(prov);
        c["node_key"] = json!(ctx.node_key.to_string());
        let md = render(&c)?;
        ctx.put("report", md.as_bytes())?;
        ctx.export("report", format!("runs/{exp}/report.md"));
        Ok(())
    }
}
