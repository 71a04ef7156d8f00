//! `analyze`: per (policy, budget, length bin) — n, mean score with a seeded
//! bootstrap CI, the paired delta to the same policy's full-cache budget with a
//! paired-bootstrap CI, the failure rate with a Wilson interval, latency p50 /
//! p95, time-to-first-token p50, mean retained tokens and analytic KV memory —
//! and transition detection per (policy, budget). Writes `bin_stats` and
//! `transition_summary` as Parquet tables.

use crate::config::schema::{Analysis, KvGeometry, FULL};
use crate::data::SplitMix64;
use crate::engine::OpContext;
use crate::llm::reference::kv_bytes;
use crate::stages::prepare::Bin;
use crate::stages::score::ScoreCell;
use crate::stages::NoTransport;
use crate::stats::{self, BinEvidence, BinVerdict};
use crate::table;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub struct Analyze;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BinStat {
    pub policy: String,
    pub budget: f64,
    pub bin_idx: i64,
    pub bin_lo: i64,
    pub bin_hi: i64,
    pub n: i64,
    pub metric: String,
    pub mean: Option<f64>,
    pub ci_lo: Option<f64>,
    pub ci_hi: Option<f64>,
    /// The budget the delta is taken against (the policy's full cache).
    pub reference_budget: f64,
    pub n_paired: i64,
    pub delta: Option<f64>,
    pub delta_lo: Option<f64>,
    pub delta_hi: Option<f64>,
    /// Mean loss against the full cache (per example `max(0, ref − cell)`) and
    /// its one-sided upper bound: a bin is safe only when the bound is below δ.
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub loss_ub: Option<f64>,
    /// One-sided lower bound on the mean net loss (`ref − cell`): a bin
    /// fails only when it lies above δ (`stats::net_loss_lower`).
    #[serde(default)]
    pub net_loss_lb: Option<f64>,
    /// Mean gain against the full cache (per example `max(0, cell − ref)`).
    #[serde(default)]
    pub gain: Option<f64>,
    /// The full cache's mean on the paired examples.
    #[serde(default)]
    pub reference_mean: Option<f64>,
    /// Reference, uninformative, fails, safe or insufficient (written as
    /// those words).
    #[serde(default)]
    pub verdict: BinVerdict,
    pub n_failed: i64,
    pub fail_rate: Option<f64>,
    pub fail_lo: Option<f64>,
    pub fail_hi: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub prompt_tokens_mean: Option<f64>,
    pub retained_tokens_mean: Option<f64>,
    /// Mean answer length (generated tokens): compression can make answers
    /// longer (reasoning traces) or cut them short.
    #[serde(default)]
    pub completion_tokens_mean: Option<f64>,
    pub kv_bytes_mean: Option<f64>,
    /// Peak resident memory of a launched server while answering this cell (MiB).
    #[serde(default)]
    pub server_rss_peak_mib: Option<f64>,
    /// Peak KV-cache usage (0–1) the server reported while answering this cell.
    #[serde(default)]
    pub kv_cache_usage_peak: Option<f64>,
}

/// One cell's score on one turn of the questions asked of a shared context,
/// in one length bin (`bin_idx` −1: every bin).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TurnStat {
    pub policy: String,
    pub budget: f64,
    pub bin_idx: i64,
    pub turn: i64,
    pub n: i64,
    pub mean: Option<f64>,
    pub ci_lo: Option<f64>,
    pub ci_hi: Option<f64>,
}

/// Accuracy by turn (examples with `meta.context_turn`), per cell and bin and over
/// every bin, each with its interval (Wilson for right/wrong scores, else a
/// seeded bootstrap). Empty when no example has a turn.
pub fn turn_stats(scores: &[ScoreCell], a: &Analysis) -> Vec<TurnStat> {
    let mut groups: BTreeMap<(String, u64, i64, i64), Vec<f64>> = BTreeMap::new();
    for r in scores {
        let Some(turn) = r.turn else { continue };
        for bin in [r.bin_idx, -1] {
            groups
                .entry((r.policy.clone(), r.budget.to_bits(), bin, turn))
                .or_default()
                .push(r.score);
        }
    }
    groups
        .into_iter()
        .map(|((policy, budget, bin_idx, turn), vals)| {
            let budget = f64::from_bits(budget);
            let label = format!("turn/{policy}/{budget}/{bin_idx}/{turn}");
            let (lo, hi) = stats::mean_ci(
                &vals,
                a.bootstrap.iters as usize,
                a.bootstrap.ci,
                &mut SplitMix64::for_cell(a.bootstrap.seed, &label),
            );
            let mean = stats::mean(&vals);
            // Wilson's bounds at 0 or 1 may land a rounding error inside.
            TurnStat {
                policy,
                budget,
                bin_idx,
                turn,
                n: vals.len() as i64,
                mean: opt(mean),
                ci_lo: opt(lo.min(mean)),
                ci_hi: opt(hi.max(mean)),
            }
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionRow {
    pub policy: String,
    pub budget: f64,
    pub reference_budget: f64,
    pub delta_threshold: f64,
    #[serde(flatten)]
    pub t: stats::Transition,
}

/// Chance accuracy of a metric, when guessing scores above 0: a
/// `multiple_choice` answer picks one of four options (A–D).
pub fn chance_level(metric: &str) -> f64 {
    if metric == "multiple_choice" {
        0.25
    } else {
        0.0
    }
}

/// The "uninformative" floor for a metric: `floor` above chance, on the
/// scale from chance to 1 (plain `floor` for metrics where guessing scores
/// 0; 0.25 + 0.1 × 0.75 = 0.325 for four options at the default 0.1).
pub fn effective_floor(metric: &str, floor: f64) -> f64 {
    let c = chance_level(metric);
    c + floor * (1.0 - c)
}

fn opt(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The whole analysis as a pure function (also used by benchmarks).
pub fn analyze(
    bins: &[Bin],
    scores: &[ScoreCell],
    a: &Analysis,
    geom: &KvGeometry,
) -> Result<(Vec<BinStat>, Vec<TransitionRow>)> {
    if !(a.bootstrap.ci > 0.0 && a.bootstrap.ci < 1.0) {
        bail!(
            "config `analysis.bootstrap.ci` must be in (0, 1), got {}",
            a.bootstrap.ci
        );
    }
    let iters = a.bootstrap.iters as usize;
    // (policy, budget bits) → rows; budgets keyed by their bits for exact grouping.
    let mut cells: BTreeMap<(String, u64), Vec<&ScoreCell>> = BTreeMap::new();
    for r in scores {
        cells
            .entry((r.policy.clone(), r.budget.to_bits()))
            .or_default()
            .push(r);
    }
    let mut policies: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (p, b) in cells.keys() {
        policies
            .entry(p.clone())
            .or_default()
            .push(f64::from_bits(*b));
    }
    let edges: Vec<i64> = bins
        .iter()
        .map(|b| b.lo)
        .chain(bins.last().map(|b| b.hi))
        .collect();

    struct Job<'a> {
        policy: String,
        budget: f64,
        reference: f64,
        bin: &'a Bin,
        rows: Vec<&'a ScoreCell>,
        reference_rows: BTreeMap<&'a str, f64>,
    }
    let mut jobs: Vec<Job> = Vec::new();
    for (policy, budgets) in &policies {
        // Every cell is measured against the one full cache (`full` at 1.0,
        // which the sweep always runs). Without it (a hand-made pipeline or
        // older scores): the policy's own largest budget, 1.0 if present.
        let own = budgets.iter().copied().fold(f64::MIN, f64::max);
        let own = if budgets.contains(&1.0) { 1.0 } else { own };
        let full = (FULL.to_string(), 1f64.to_bits());
        let (reference, ref_rows) = match cells.get(&full) {
            Some(rows) => (1.0, rows),
            None => (own, &cells[&(policy.clone(), own.to_bits())]),
        };
        for &budget in budgets {
            let rows = &cells[&(policy.clone(), budget.to_bits())];
            for bin in bins {
                jobs.push(Job {
                    policy: policy.clone(),
                    budget,
                    reference,
                    bin,
                    rows: rows
                        .iter()
                        .copied()
                        .filter(|r| r.bin_idx == bin.bin_idx)
                        .collect(),
                    reference_rows: ref_rows
                        .iter()
                        .filter(|r| r.bin_idx == bin.bin_idx)
                        .map(|r| (r.example_id.as_str(), r.score))
                        .collect(),
                });
            }
        }
    }
    // One draw of resamples per bin, shared by its cells (paired design):
    // sized for the bin's reference examples.
    let shared: BTreeMap<i64, stats::SharedResamples> = bins
        .iter()
        .filter_map(|b| {
            let n = jobs
                .iter()
                .find(|j| j.bin.bin_idx == b.bin_idx)
                .map(|j| j.reference_rows.len())?;
            Some((
                b.bin_idx,
                stats::SharedResamples::draw(
                    n,
                    iters,
                    &SplitMix64::for_cell(a.bootstrap.seed, &format!("delta-bin/{}", b.bin_idx)),
                ),
            ))
        })
        .collect();
    // Pair by example (only examples answered at both budgets), in
    // example order, so every cell of the bin lines up with its resamples.
    let pair = |j: &Job| -> (Vec<f64>, Vec<f64>) {
        let mut pairs: Vec<(&str, f64, f64)> = j
            .rows
            .iter()
            .filter_map(|r| {
                j.reference_rows
                    .get(r.example_id.as_str())
                    .map(|x| (r.example_id.as_str(), *x, r.score))
            })
            .collect();
        pairs.sort_by(|x, y| x.0.cmp(y.0));
        pairs.iter().map(|p| (p.1, p.2)).unzip()
    };
    let paired: Vec<(Vec<f64>, Vec<f64>)> = jobs.iter().map(pair).collect();
    // Each bin's delta intervals in one pass over its shared resamples, the
    // bins spread over the cores.
    let mut by_bin: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, j) in jobs.iter().enumerate() {
        if shared
            .get(&j.bin.bin_idx)
            .is_some_and(|res| res.n == paired[i].0.len())
        {
            by_bin.entry(j.bin.bin_idx).or_default().push(i);
        }
    }
    let groups: Vec<(i64, Vec<usize>)> = by_bin.into_iter().collect();
    let diffs: Vec<Vec<f64>> = paired
        .iter()
        .map(|(ra, rb)| ra.iter().zip(rb).map(|(x, y)| y - x).collect())
        .collect();
    // A cell whose every row is paired and whose scores are not right/wrong
    // (those get Wilson intervals) is resampled with its bin's draws too
    // (its scores in example order): its mean's interval comes from the same
    // pass as the bin's deltas.
    let whole = |i: usize| {
        let b = &paired[i].1;
        b.len() == jobs[i].rows.len() && !b.iter().all(|&v| v == 0.0 || v == 1.0)
    };
    type Cis = (BTreeMap<usize, (f64, f64)>, BTreeMap<usize, (f64, f64)>);
    // Bin by bin; each bin's resamples are split over the cores.
    let mut cis: Cis = Default::default();
    for (bin, idx) in &groups {
        let means: Vec<usize> = idx.iter().copied().filter(|&i| whole(i)).collect();
        let ds: Vec<&[f64]> = idx
            .iter()
            .map(|&i| diffs[i].as_slice())
            .chain(means.iter().map(|&i| paired[i].1.as_slice()))
            .collect();
        let got = shared[bin].mean_cis(&ds, a.bootstrap.ci);
        let (d, m) = got.split_at(idx.len());
        cis.0.extend(idx.iter().copied().zip(d.iter().copied()));
        cis.1.extend(means.iter().copied().zip(m.iter().copied()));
    }
    let (delta_cis, mean_cis) = cis;
    let run = |(i, j): (usize, &Job)| -> BinStat {
        let label = format!("{}/{}/{}", j.policy, j.budget, j.bin.bin_idx);
        let seed = a.bootstrap.seed;
        let vals: Vec<f64> = j.rows.iter().map(|r| r.score).collect();
        let n = vals.len();
        let (lo, hi) = match mean_cis.get(&i) {
            Some(&ci) => ci,
            None => stats::mean_ci(
                &vals,
                iters,
                a.bootstrap.ci,
                &mut SplitMix64::for_cell(seed, &format!("mean/{label}")),
            ),
        };
        let (ra, rb) = &paired[i];
        let ev = match delta_cis.get(&i) {
            Some(&delta_ci) => stats::bin_evidence_with(ra, rb, a.bootstrap.ci, delta_ci),
            None => stats::bin_evidence(
                ra,
                rb,
                iters,
                a.bootstrap.ci,
                &mut SplitMix64::for_cell(seed, &format!("delta/{label}")),
            ),
        };
        let d = stats::mean(rb) - stats::mean(ra);
        let (dlo, dhi) = (ev.lo, ev.hi);
        let is_reference = j.budget == j.reference && !j.policy.contains('+');
        let metric = j.rows.first().map(|r| r.metric.as_str()).unwrap_or("");
        let verdict = if is_reference {
            BinVerdict::Reference
        } else {
            stats::verdict(
                &ev,
                a.transition.delta,
                effective_floor(metric, a.transition.floor),
            )
        };
        let failed = j.rows.iter().filter(|r| r.failure.is_some()).count();
        let (flo, fhi) = stats::wilson(failed, n, a.bootstrap.ci);
        let lat = sorted(j.rows.iter().map(|r| r.latency_ms).collect());
        let ttft = sorted(j.rows.iter().filter_map(|r| r.ttft_ms).collect());
        let mean_of = |v: Vec<f64>| opt(stats::mean(&v));
        let retained: Vec<f64> = j
            .rows
            .iter()
            .filter_map(|r| r.retained_tokens.map(|x| x as f64))
            .collect();
        let kv: Vec<f64> = j
            .rows
            .iter()
            .filter_map(|r| {
                // Measured bytes where the engine reports them (native), else the estimate.
                r.kv_bytes
                    .map(|b| b as f64)
                    .or_else(|| r.retained_tokens.map(|x| kv_bytes(x, geom) as f64))
            })
            .collect();
        BinStat {
            policy: j.policy.clone(),
            budget: j.budget,
            bin_idx: j.bin.bin_idx,
            bin_lo: j.bin.lo,
            bin_hi: j.bin.hi,
            n: n as i64,
            metric: j.rows.first().map(|r| r.metric.clone()).unwrap_or_default(),
            mean: opt(stats::mean(&vals)),
            ci_lo: opt(lo),
            ci_hi: opt(hi),
            reference_budget: j.reference,
            n_paired: ra.len() as i64,
            delta: opt(d),
            delta_lo: opt(dlo),
            delta_hi: opt(dhi),
            loss: opt(ev.loss),
            loss_ub: (ev.n > 0).then_some(ev.loss_ub),
            net_loss_lb: opt(ev.net_loss_lb),
            gain: opt(ev.gain),
            reference_mean: opt(ev.reference_mean),
            verdict,
            n_failed: failed as i64,
            fail_rate: (n > 0).then(|| failed as f64 / n as f64),
            fail_lo: opt(flo),
            fail_hi: opt(fhi),
            latency_p50_ms: opt(stats::percentile(&lat, 0.5)),
            latency_p95_ms: opt(stats::percentile(&lat, 0.95)),
            ttft_p50_ms: opt(stats::percentile(&ttft, 0.5)),
            prompt_tokens_mean: mean_of(
                j.rows
                    .iter()
                    .filter_map(|r| r.prompt_tokens.map(|x| x as f64))
                    .collect(),
            ),
            retained_tokens_mean: mean_of(retained),
            completion_tokens_mean: mean_of(
                j.rows
                    .iter()
                    .filter_map(|r| r.completion_tokens.map(|x| x as f64))
                    .collect(),
            ),
            kv_bytes_mean: mean_of(kv),
            server_rss_peak_mib: j
                .rows
                .iter()
                .filter_map(|r| r.server_rss_kib)
                .max()
                .map(|k| k as f64 / 1024.0),
            kv_cache_usage_peak: j
                .rows
                .iter()
                .filter_map(|r| r.kv_cache_usage)
                .reduce(f64::max),
        }
    };
    // Cells are independent: spread them over the cores. Seeds come from the
    // cell label, so the result does not depend on the split.
    let numbered: Vec<(usize, &Job)> = jobs.iter().enumerate().collect();
    let stats_rows: Vec<BinStat> = crate::engine::par_map(&numbered, |&ij| run(ij));

    let mut transitions = Vec::new();
    for (policy, budgets) in &policies {
        for &budget in budgets {
            let mine: Vec<&BinStat> = stats_rows
                .iter()
                .filter(|s| &s.policy == policy && s.budget == budget)
                .collect();
            let per_bin: Vec<BinEvidence> = mine
                .iter()
                .map(|s| BinEvidence {
                    n: s.n_paired as usize,
                    lo: s.delta_lo.unwrap_or(f64::NAN),
                    hi: s.delta_hi.unwrap_or(f64::NAN),
                    loss: s.loss.unwrap_or(f64::NAN),
                    loss_ub: s.loss_ub.unwrap_or(1.0),
                    net_loss_lb: s.net_loss_lb.unwrap_or(f64::NEG_INFINITY),
                    gain: s.gain.unwrap_or(f64::NAN),
                    reference_mean: s.reference_mean.unwrap_or(f64::NAN),
                })
                .collect();
            let reference = mine.first().map_or(1.0, |s| s.reference_budget);
            let metric = mine
                .iter()
                .map(|s| s.metric.as_str())
                .find(|m| !m.is_empty());
            let mut t = stats::summarize(
                &per_bin,
                &edges,
                a.transition.delta,
                effective_floor(metric.unwrap_or(""), a.transition.floor),
                a.bootstrap.ci,
            );
            if budget == reference && !policy.contains('+') {
                t.status = stats::TransitionStatus::Reference;
            }
            transitions.push(TransitionRow {
                policy: policy.clone(),
                budget,
                reference_budget: reference,
                delta_threshold: a.transition.delta,
                t,
            });
        }
    }
    Ok((stats_rows, transitions))
}

/// What `analyze` reads (its stage's `uses`, exactly).
#[derive(serde::Deserialize)]
pub struct Uses {
    analysis: Analysis,
    #[serde(rename = "model.kv_geometry")]
    geometry: KvGeometry,
}

impl crate::stages::Stage for Analyze {
    fn name(&self) -> &'static str {
        "analyze"
    }
    fn version(&self) -> u32 {
        // 4: one reference for every cell, `full` at 1.0 (fidelity too).
        // 5: mean answer length per cell and bin.
        // 6: accuracy by turn (`turn_stats`).
        6
    }
    type Uses = Uses;
    type Transport = NoTransport;
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, _: Self::Transport) -> Result<()> {
        let Uses {
            analysis: a,
            geometry: geom,
        } = uses;
        let bins: Vec<Bin> = table::read_owned(ctx.input("prepare", "bins")?)?;
        let scores = crate::stages::score::read_all::<ScoreCell>(ctx)?;
        let (bin_stats, transitions) = analyze(&bins, &scores, &a, &geom)?;
        let (fid, selective) = crate::stages::fidelity::fidelity(&bins, &scores, &a);
        ctx.put("bin_stats", &table::write(&bin_stats)?)?;
        ctx.put("transition_summary", &table::write(&transitions)?)?;
        ctx.put("fidelity_stats", &table::write(&fid)?)?;
        ctx.put("selective_stats", &table::write(&selective)?)?;
        ctx.put("turn_stats", &table::write(&turn_stats(&scores, &a))?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::{Bootstrap, Transition};

    /// The analysis settings with this bootstrap, δ and floor 0.1.
    fn analysis(iters: u32, seed: u64, ci: f64) -> Analysis {
        Analysis {
            bootstrap: Bootstrap { iters, seed, ci },
            transition: Transition {
                delta: 0.1,
                floor: 0.1,
            },
            fidelity: Default::default(),
            splits: Default::default(),
            selective: Default::default(),
        }
    }

    #[test]
    fn turn_stats_give_each_turn_its_mean_and_interval_per_bin_and_overall() {
        let mut scores = Vec::new();
        for (i, turn) in (0..30).flat_map(|i| (1..=3).map(move |t| (i, t))) {
            scores.push(ScoreCell {
                example_id: format!("g{i:02}-q{turn}"),
                bin_idx: i64::from(i >= 15),
                policy: "snapkv".into(),
                budget: 0.5,
                metric: "substring_recall".into(),
                // Turn 1 always right, turn 3 right one time in three.
                score: f64::from(turn == 1 || (turn == 2 && i % 2 == 0) || i % 3 == 0),
                turn: Some(turn),
                ..Default::default()
            });
        }
        // A row without a turn is left out.
        scores.push(ScoreCell {
            example_id: "solo".into(),
            policy: "snapkv".into(),
            budget: 0.5,
            score: 1.0,
            ..Default::default()
        });
        let a = analysis(200, 1, 0.95);
        let t = turn_stats(&scores, &a);
        // 3 turns × (2 bins + every bin).
        assert_eq!(t.len(), 9);
        let all = |turn| {
            t.iter()
                .find(|s| s.bin_idx == -1 && s.turn == turn)
                .unwrap()
        };
        assert_eq!(all(1).n, 30);
        assert_eq!(all(1).mean, Some(1.0));
        assert_eq!(all(3).mean, Some(10.0 / 30.0));
        for s in &t {
            let (m, lo, hi) = (s.mean.unwrap(), s.ci_lo.unwrap(), s.ci_hi.unwrap());
            assert!(lo <= m && m <= hi && hi - lo < 1.0, "{s:?}");
        }
        assert!(all(3).ci_hi.unwrap() < all(1).ci_lo.unwrap());
        assert!(turn_stats(&scores[90..], &a).is_empty());
    }

    #[test]
    fn graded_scores_take_their_mean_interval_from_the_bins_shared_draws() {
        let bins: Vec<Bin> = (0..2)
            .map(|b| Bin {
                bin_idx: b,
                lo: b * 100,
                hi: (b + 1) * 100,
                n_available: 40,
                n_selected: 40,
            })
            .collect();
        let mut rng = SplitMix64::new(3);
        let mut scores = Vec::new();
        for budget in [1.0, 0.5] {
            for b in 0..2 {
                for i in 0..40 {
                    // The 0.5 cell of bin 1 lacks one example: not every row
                    // pairs, so its interval is drawn on its own.
                    if budget == 0.5 && b == 1 && i == 7 {
                        continue;
                    }
                    scores.push(ScoreCell {
                        example_id: format!("e{b}-{i:02}"),
                        bin_idx: b,
                        policy: "snapkv".into(),
                        budget,
                        metric: "qa_f1".into(),
                        score: (rng.unit() * budget * 4.0).round() / 4.0,
                        ..Default::default()
                    });
                }
            }
        }
        let a = analysis(500, 11, 0.9);
        let geom = KvGeometry {
            layers: 2,
            kv_heads: 1,
            head_dim: 8,
            bytes_per_elem: 2,
        };
        let (stats_rows, _) = analyze(&bins, &scores, &a, &geom).unwrap();
        let (again, _) = analyze(&bins, &scores, &a, &geom).unwrap();
        assert_eq!(
            serde_json::to_string(&stats_rows).unwrap(),
            serde_json::to_string(&again).unwrap()
        );
        let cell = |budget: f64, b: i64| -> Vec<f64> {
            let mut v: Vec<(&str, f64)> = scores
                .iter()
                .filter(|s| s.budget == budget && s.bin_idx == b)
                .map(|s| (s.example_id.as_str(), s.score))
                .collect();
            v.sort_by(|x, y| x.0.cmp(y.0));
            v.into_iter().map(|x| x.1).collect()
        };
        for s in &stats_rows {
            let (lo, hi, mean) = (s.ci_lo.unwrap(), s.ci_hi.unwrap(), s.mean.unwrap());
            assert!(lo < hi && lo <= mean && mean <= hi, "{s:?}");
            let vals = cell(s.budget, s.bin_idx);
            let want = if s.budget == 0.5 && s.bin_idx == 1 {
                stats::mean_ci(
                    &vals,
                    500,
                    0.9,
                    &mut SplitMix64::for_cell(11, &format!("mean/snapkv/0.5/{}", s.bin_idx)),
                )
            } else {
                let draws = stats::SharedResamples::draw(
                    40,
                    500,
                    &SplitMix64::for_cell(11, &format!("delta-bin/{}", s.bin_idx)),
                );
                draws.mean_ci(&vals, 0.9)
            };
            assert_eq!((lo, hi), want, "{s:?}");
        }
    }
}
