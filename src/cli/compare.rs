//! `kvt compare A B`: two experiments side by side. Each side is a config
//! file or the `output.exp_group_id` of one in `config/experiments/`; its
//! scores come from the cache (built first with `--build`). Cells present in
//! both (same policy, budget and bin range) are paired by example, and the
//! mean difference B − A gets a paired bootstrap interval; cells in only one
//! side are listed.

use crate::config::LoadedConfig;
use crate::data::SplitMix64;
use crate::engine::{self, NodeState, OpRegistry};
use crate::stages::plots::{budget_label, budget_order};
use crate::stages::prepare::Bin;
use crate::stages::score::ScoreCell;
use crate::stats;
use crate::table;
use crate::KvtError;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One side of a comparison, loaded from the cache.
pub struct Side {
    pub name: String,
    pub config: PathBuf,
    pub loaded: LoadedConfig,
    /// (policy, budget bits, bin range) → example id → score.
    pub cells: BTreeMap<CellKey, BTreeMap<String, f64>>,
    pub metric: String,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct CellKey {
    pub policy: String,
    /// Budgets in report order (fractions from largest, then token counts).
    pub order: (u8, i64),
    pub budget_bits: u64,
    pub lo: i64,
    pub hi: i64,
}

/// A config file path, or the exp_group_id of a config in config/experiments/.
pub fn resolve(arg: &str, root: &Path) -> Result<PathBuf> {
    let p = PathBuf::from(arg);
    if p.is_file() {
        return Ok(p);
    }
    let dir = root.join("config/experiments");
    let mut known = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            if !matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let v: serde_json::Value = serde_saphyr::from_str(&text).unwrap_or_default();
            let id = v["output"]["exp_group_id"].as_str().map(str::to_string);
            let stem = f.file_stem().and_then(|s| s.to_str()).map(str::to_string);
            if id.as_deref() == Some(arg) || (id.is_none() && stem.as_deref() == Some(arg)) {
                return Ok(f.strip_prefix(root).map(Path::to_path_buf).unwrap_or(f));
            }
            known.extend(id.or(stem));
        }
    }
    Err(KvtError::usage(format!(
        "`{arg}` is neither a config file nor the exp_group_id of a config in config/experiments/ (known: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    ))
    .into())
}

/// Reads one side's score rows and bins from its fresh `score` and
/// `prepare` nodes; a stale node is a usage error naming the build to run.
pub fn load_side(
    name: &str,
    config: &Path,
    loaded: LoadedConfig,
    registry: &OpRegistry,
) -> Result<Side> {
    let (plan, ws) = super::plan_for(
        &loaded,
        registry,
        &["score".to_string()],
        super::RemoteArg::Optional,
    )?;
    let reports = engine::explain(&ws, &plan, &|_| false)?;
    let mut bins: Vec<Bin> = Vec::new();
    let mut rows: Vec<ScoreCell> = Vec::new();
    let mut stale = 0;
    for r in &reports {
        let spec = &plan.graph[r.index];
        let NodeState::Fresh(rec) = &r.state else {
            stale += 1;
            continue;
        };
        let read = |artifact: &str| -> Result<Vec<u8>> {
            let out = rec
                .output(artifact)
                .with_context(|| format!("`{}` has no artifact `{artifact}`", spec.id))?;
            Ok(ws.store.get(&out.digest)?)
        };
        match spec.stage.as_str() {
            "prepare" => bins = table::read(&read("bins")?)?,
            "score" => rows.extend(table::read::<ScoreCell>(&read("scores")?)?),
            _ => {}
        }
    }
    if stale > 0 {
        return Err(KvtError::usage(format!(
            "{name} ({}): {stale} node(s) up to `score` are not built; run `kvt build score -c {}` first (it may send requests), or pass --build",
            config.display(),
            config.display()
        ))
        .into());
    }
    let range = |i: i64| {
        bins.iter()
            .find(|b| b.bin_idx == i)
            .map_or((i, i), |b| (b.lo, b.hi))
    };
    let mut cells: BTreeMap<CellKey, BTreeMap<String, f64>> = BTreeMap::new();
    let mut metric = String::new();
    for r in rows {
        let (lo, hi) = range(r.bin_idx);
        let (group, value) = budget_order(r.budget);
        let key = CellKey {
            policy: r.policy.clone(),
            order: (group, (value * 1e9) as i64),
            budget_bits: r.budget.to_bits(),
            lo,
            hi,
        };
        if metric.is_empty() {
            metric = r.metric.clone();
        }
        cells.entry(key).or_default().insert(r.example_id, r.score);
    }
    Ok(Side {
        name: name.to_string(),
        config: config.to_path_buf(),
        loaded,
        cells,
        metric,
    })
}

/// One paired cell of the comparison.
pub struct Row {
    pub key: CellKey,
    pub n: usize,
    pub mean_a: f64,
    pub mean_b: f64,
    /// Each side's mean with its interval (Wilson for 0/1 scores, else a
    /// bootstrap).
    pub ci_a: (f64, f64),
    pub ci_b: (f64, f64),
    /// Share of the paired examples on which both sides scored the same
    /// (for right/wrong scores: right exactly when the other is right).
    pub agree: f64,
    pub delta: f64,
    pub lo: f64,
    pub hi: f64,
}

pub struct Comparison {
    pub rows: Vec<Row>,
    pub only_a: Vec<CellKey>,
    pub only_b: Vec<CellKey>,
    /// Cells in both sides with no example in common.
    pub unpaired: Vec<CellKey>,
    pub iters: usize,
    pub seed: u64,
    pub ci: f64,
}

/// Pairs the cells of `a` and `b` by example; B − A with a paired
/// bootstrap interval (A's `analysis.bootstrap` settings).
pub fn compare(a: &Side, b: &Side) -> Comparison {
    let boot = &a.loaded.config.analysis.bootstrap;
    let (iters, seed, ci) = (boot.iters as usize, boot.seed, boot.ci);
    let keys_a: BTreeSet<&CellKey> = a.cells.keys().collect();
    let keys_b: BTreeSet<&CellKey> = b.cells.keys().collect();
    let mut rows = Vec::new();
    let mut unpaired = Vec::new();
    for key in keys_a.intersection(&keys_b) {
        let (ca, cb) = (&a.cells[*key], &b.cells[*key]);
        // Example order (BTreeMap), so the draws do not depend on row order.
        let (xa, xb): (Vec<f64>, Vec<f64>) = ca
            .iter()
            .filter_map(|(id, sa)| cb.get(id).map(|sb| (*sa, *sb)))
            .unzip();
        if xa.is_empty() {
            unpaired.push((*key).clone());
            continue;
        }
        let label = format!(
            "compare/{}/{}/{}-{}",
            key.policy,
            f64::from_bits(key.budget_bits),
            key.lo,
            key.hi
        );
        let (delta, lo, hi) =
            stats::paired_delta_ci(&xa, &xb, iters, ci, &mut SplitMix64::for_cell(seed, &label));
        let mut rng = SplitMix64::for_cell(seed, &format!("{label}/sides"));
        let ci_a = stats::mean_ci(&xa, iters, ci, &mut rng);
        let ci_b = stats::mean_ci(&xb, iters, ci, &mut rng);
        let same = xa.iter().zip(&xb).filter(|(p, q)| p == q).count();
        rows.push(Row {
            key: (*key).clone(),
            n: xa.len(),
            mean_a: stats::mean(&xa),
            mean_b: stats::mean(&xb),
            ci_a,
            ci_b,
            agree: same as f64 / xa.len() as f64,
            delta,
            lo,
            hi,
        });
    }
    Comparison {
        rows,
        only_a: keys_a.difference(&keys_b).map(|k| (*k).clone()).collect(),
        only_b: keys_b.difference(&keys_a).map(|k| (*k).clone()).collect(),
        unpaired,
        iters,
        seed,
        ci,
    }
}

fn cell_name(k: &CellKey) -> String {
    format!(
        "{} {} · {}–{}",
        k.policy,
        budget_label(f64::from_bits(k.budget_bits)),
        k.lo,
        k.hi
    )
}

fn verdict(r: &Row) -> &'static str {
    if r.lo > 0.0 {
        "B higher"
    } else if r.hi < 0.0 {
        "A higher"
    } else {
        ""
    }
}

/// The comparison as Markdown (also printed).
pub fn markdown(a: &Side, b: &Side, c: &Comparison) -> String {
    let pct = (c.ci * 100.0).round();
    let mut s = format!(
        "# kvt compare: {} vs {}\n\n- A: `{}` ({})\n- B: `{}` ({})\n- metric: {}\n\n",
        a.name,
        b.name,
        a.name,
        a.config.display(),
        b.name,
        b.config.display(),
        if a.metric == b.metric || b.metric.is_empty() {
            a.metric.clone()
        } else {
            format!(
                "{} (A) and {} (B): the scores are not alike",
                a.metric, b.metric
            )
        },
    );
    s.push_str(&format!(
        "Cells present in both are paired by example. A and B: each side's mean with a {pct:.0} % interval (Wilson for right/wrong scores, else a bootstrap); agree: the share of examples both sides scored alike; Δ = B − A, with a {pct:.0} % paired bootstrap interval ({} resamples, seed {}).\n\n",
        c.iters, c.seed
    ));
    s.push_str(&format!(
        "| policy | budget | bin | n | A [{pct:.0} % CI] | B [{pct:.0} % CI] | agree | Δ (B − A) [{pct:.0} % CI] | |\n|---|---|---|---|---|---|---|---|---|\n"
    ));
    for r in &c.rows {
        s.push_str(&format!(
            "| {} | {} | {}–{} | {} | {:.2} [{:.2}, {:.2}] | {:.2} [{:.2}, {:.2}] | {:.0} % | {:+.2} [{:+.2}, {:+.2}] | {} |\n",
            r.key.policy,
            budget_label(f64::from_bits(r.key.budget_bits)),
            r.key.lo,
            r.key.hi,
            r.n,
            r.mean_a,
            r.ci_a.0,
            r.ci_a.1,
            r.mean_b,
            r.ci_b.0,
            r.ci_b.1,
            r.agree * 100.0,
            r.delta,
            r.lo,
            r.hi,
            verdict(r)
        ));
    }
    if c.rows.is_empty() {
        s.push_str("| – | – | – | 0 | – | – | – | – | |\n");
    }
    let list = |title: &str, keys: &[CellKey]| -> String {
        if keys.is_empty() {
            return String::new();
        }
        format!(
            "\n{title} ({}): {}.\n",
            keys.len(),
            keys.iter().map(cell_name).collect::<Vec<_>>().join("; ")
        )
    };
    s.push_str(&list("Cells only in A", &c.only_a));
    s.push_str(&list("Cells only in B", &c.only_b));
    s.push_str(&list("Cells in both without a common example", &c.unpaired));
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The comparison as one self-contained HTML page.
pub fn html(a: &Side, b: &Side, c: &Comparison) -> String {
    let pct = (c.ci * 100.0).round();
    let mut rows = String::new();
    for r in &c.rows {
        let v = verdict(r);
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}–{}</td><td>{}</td><td>{:.2} [{:.2}, {:.2}]</td><td>{:.2} [{:.2}, {:.2}]</td><td>{:.0} %</td><td class=\"{}\">{:+.2} [{:+.2}, {:+.2}]</td><td>{}</td></tr>\n",
            esc(&r.key.policy),
            esc(&budget_label(f64::from_bits(r.key.budget_bits))),
            r.key.lo,
            r.key.hi,
            r.n,
            r.mean_a,
            r.ci_a.0,
            r.ci_a.1,
            r.mean_b,
            r.ci_b.0,
            r.ci_b.1,
            r.agree * 100.0,
            match v { "B higher" => "up", "A higher" => "down", _ => "" },
            r.delta,
            r.lo,
            r.hi,
            v
        ));
    }
    let list = |title: &str, keys: &[CellKey]| -> String {
        if keys.is_empty() {
            return String::new();
        }
        format!(
            "<p>{title} ({}): {}.</p>\n",
            keys.len(),
            esc(&keys.iter().map(cell_name).collect::<Vec<_>>().join("; "))
        )
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>kvt compare: {an} vs {bn}</title>\n<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:72em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child,th:first-child{{text-align:left}}.up{{background:#e6f4ea}}.down{{background:#fce8e6}}</style></head><body>\n<h1>kvt compare: {an} vs {bn}</h1>\n<ul><li>A: <code>{an}</code> ({ac})</li><li>B: <code>{bn}</code> ({bc})</li><li>metric: {metric}</li></ul>\n<p>Cells present in both are paired by example. A and B: each side's mean with a {pct:.0} % interval (Wilson for right/wrong scores, else a bootstrap); agree: the share of examples both sides scored alike; Δ = B − A, with a {pct:.0} % paired bootstrap interval ({iters} resamples, seed {seed}).</p>\n<table><thead><tr><th>policy</th><th>budget</th><th>bin</th><th>n</th><th>A [{pct:.0} % CI]</th><th>B [{pct:.0} % CI]</th><th>agree</th><th>Δ (B − A) [{pct:.0} % CI]</th><th></th></tr></thead><tbody>\n{rows}</tbody></table>\n{oa}{ob}{un}</body></html>\n",
        an = esc(&a.name),
        bn = esc(&b.name),
        ac = esc(&a.config.display().to_string()),
        bc = esc(&b.config.display().to_string()),
        metric = esc(&a.metric),
        iters = c.iters,
        seed = c.seed,
        oa = list("Cells only in A", &c.only_a),
        ob = list("Cells only in B", &c.only_b),
        un = list("Cells in both without a common example", &c.unpaired),
    )
}
