//! The analysis of log-probabilities (part of `analyze`): per length bin and
//! cell, the drop in the gold answer's log-likelihood and the KL to the full
//! cache with paired-bootstrap CIs and verdicts (`stats::selective::
//! continuous_verdict`); per cell, selective prediction and calibration on
//! the test split with thresholds chosen on the calibration split. Written
//! as `fidelity_stats` and `selective_stats`; a metric whose engine gave no
//! log-probabilities is a row marked unavailable, never a number.

use crate::config::schema::{Analysis, ConfidenceKind, FULL};
use crate::data::SplitMix64;
use crate::stages::prepare::Bin;
use crate::stages::score::ScoreCell;
use crate::stats::selective::{self as sel, Scored};
use crate::stats::{self, BinVerdict};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One continuous metric in one (cell, bin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FidelityStat {
    pub policy: String,
    pub budget: f64,
    pub bin_idx: i64,
    pub bin_lo: i64,
    pub bin_hi: i64,
    /// `gold_ll_drop` (full − cell, nats per gold token) or `kl` (KL(full ‖
    /// cell) per token of the full cache's answer).
    pub metric: String,
    /// False when the engine gave no log-probabilities for this cell.
    pub available: bool,
    pub n: i64,
    /// Mean loss (nats per token) and its paired-bootstrap CI.
    pub mean: Option<f64>,
    pub ci_lo: Option<f64>,
    pub ci_hi: Option<f64>,
    /// One-sided Student-t bounds on the mean loss (the verdict's evidence):
    /// the lower at the CI's one-sided level, the upper at the stricter
    /// level "safe" uses (`stats::selective::safe_level`).
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    /// Share of the full cache's answer tokens the cell ranks first (KL rows).
    pub top1_agree: Option<f64>,
    /// Reference, unavailable, fails, safe or insufficient (written as
    /// those words).
    pub verdict: BinVerdict,
}

/// Selective prediction and calibration of one cell (over every bin:
/// `bin_idx` −1) or of one bin of it. Every figure is from the test split;
/// the thresholds come from the calibration split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SelectiveStat {
    pub policy: String,
    pub budget: f64,
    pub bin_idx: i64,
    pub available: bool,
    /// `test`: where these figures come from.
    pub split: String,
    pub n_test: i64,
    pub n_calibration: i64,
    pub accuracy: Option<f64>,
    pub augrc: Option<f64>,
    pub augrc_lo: Option<f64>,
    pub augrc_hi: Option<f64>,
    /// Selective risk on test at the thresholds giving coverage 0.5 … 0.9
    /// on calibration.
    pub risk_at_cov_50: Option<f64>,
    pub risk_at_cov_60: Option<f64>,
    pub risk_at_cov_70: Option<f64>,
    pub risk_at_cov_80: Option<f64>,
    pub risk_at_cov_90: Option<f64>,
    /// Test coverage at the thresholds reaching risk 0.01 … 0.10 on calibration.
    pub cov_at_risk_01: Option<f64>,
    pub cov_at_risk_02: Option<f64>,
    pub cov_at_risk_05: Option<f64>,
    pub cov_at_risk_10: Option<f64>,
    pub nll: Option<f64>,
    pub brier: Option<f64>,
    pub ece: Option<f64>,
    /// The confidence threshold chosen on the full cache's calibration answers.
    pub confident_threshold: Option<f64>,
    /// Wrong answers at or above that threshold, share of test answers.
    pub confidently_wrong: Option<f64>,
    pub confidently_wrong_lo: Option<f64>,
    pub confidently_wrong_hi: Option<f64>,
    /// Paired differences against the full cache on the same test examples.
    pub d_augrc: Option<f64>,
    pub d_augrc_lo: Option<f64>,
    pub d_augrc_hi: Option<f64>,
    pub d_confidently_wrong: Option<f64>,
    pub d_confidently_wrong_lo: Option<f64>,
    pub d_confidently_wrong_hi: Option<f64>,
    /// The test answers' risk–coverage curve at coverage 0.1, 0.2, … 1.0:
    /// `[coverage, selective risk, CI low, CI high]`.
    #[serde(default)]
    pub rc_curve: Vec<Vec<f64>>,
    /// The reliability diagram on test: per tenth of exp(confidence) that
    /// holds answers, `[bin start, mean exp(confidence), accuracy, answers]`.
    #[serde(default)]
    pub reliability: Vec<Vec<f64>>,
}

fn opt(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The full-cache rows every cell is compared with: a plain policy at
/// budget 1.0 (every plain policy's 1.0 is the same request), else the
/// largest budget of the cell's own policy.
fn reference_of<'a>(
    cells: &'a BTreeMap<(String, u64), Vec<&'a ScoreCell>>,
    policy: &str,
) -> Option<(&'a str, f64)> {
    let plain = cells
        .keys()
        .find(|(p, b)| !p.contains('+') && f64::from_bits(*b) == 1.0);
    if let Some((p, b)) = plain {
        return Some((p.as_str(), f64::from_bits(*b)));
    }
    cells
        .keys()
        .filter(|(p, _)| p == policy)
        .map(|(p, b)| (p.as_str(), f64::from_bits(*b)))
        .max_by(|x, y| x.1.total_cmp(&y.1))
}

/// Percentile CI of `stat` over paired resamples of `n` examples.
fn boot(
    n: usize,
    iters: usize,
    ci: f64,
    label: &str,
    seed: u64,
    stat: impl Fn(&[usize]) -> f64,
) -> (f64, f64) {
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = SplitMix64::for_cell(seed, label);
    let mut idx = vec![0usize; n];
    let mut vals: Vec<f64> = (0..iters)
        .map(|_| {
            for i in idx.iter_mut() {
                *i = rng.below(n as u64) as usize;
            }
            stat(&idx)
        })
        .filter(|v| v.is_finite())
        .collect();
    if vals.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    vals.sort_by(f64::total_cmp);
    let a = (1.0 - ci) / 2.0;
    (
        stats::percentile(&vals, a),
        stats::percentile(&vals, 1.0 - a),
    )
}

/// Both tables from the scored responses.
pub fn fidelity(
    bins: &[Bin],
    scores: &[ScoreCell],
    a: &Analysis,
) -> (Vec<FidelityStat>, Vec<SelectiveStat>) {
    let mut cells: BTreeMap<(String, u64), Vec<&ScoreCell>> = BTreeMap::new();
    for r in scores {
        cells
            .entry((r.policy.clone(), r.budget.to_bits()))
            .or_default()
            .push(r);
    }
    for rows in cells.values_mut() {
        rows.sort_by(|x, y| x.example_id.cmp(&y.example_id));
    }
    let conf = 1.0 - (1.0 - a.bootstrap.ci) / 2.0;
    let iters = a.bootstrap.iters as usize;
    let seed = a.bootstrap.seed;
    let delta = a.fidelity.delta_nats;
    let confidence = |r: &ScoreCell| match a.selective.confidence {
        ConfidenceKind::Mean => r.conf_mean,
        ConfidenceKind::Min => r.conf_min,
    };
    let scored = |r: &ScoreCell| {
        confidence(r).map(|c| Scored {
            confidence: c,
            correct: r.score >= 0.5,
        })
    };
    let calib =
        |r: &ScoreCell| sel::is_calibration(&r.example_id, a.splits.calibration, a.splits.seed);
    let mut fid = Vec::new();
    let mut selective = Vec::new();
    for ((policy, bits), rows) in &cells {
        let budget = f64::from_bits(*bits);
        let Some((rp, rb)) = reference_of(&cells, policy) else {
            continue;
        };
        let reference = &cells[&(rp.to_string(), rb.to_bits())];
        // The reference cell itself, and any plain policy at 1.0 (it keeps
        // everything: the full cache, one request), are not compared.
        let is_reference =
            (rp == policy && rb == budget) || (!policy.contains('+') && budget == 1.0);
        let ref_by_id: BTreeMap<&str, &ScoreCell> = reference
            .iter()
            .map(|r| (r.example_id.as_str(), *r))
            .collect();
        for bin in bins {
            let mine: Vec<&ScoreCell> = rows
                .iter()
                .copied()
                .filter(|r| r.bin_idx == bin.bin_idx)
                .collect();
            // Gold log-likelihood drop, paired by example.
            let drops: Vec<f64> = mine
                .iter()
                .filter_map(|r| Some(ref_by_id.get(r.example_id.as_str())?.gold_ll? - r.gold_ll?))
                .collect();
            let kls: Vec<f64> = mine.iter().filter_map(|r| r.kl_mean).collect();
            let agree: Vec<f64> = mine.iter().filter_map(|r| r.top1_agree).collect();
            for (metric, vals) in [("gold_ll_drop", &drops), ("kl", &kls)] {
                let label = format!("fidelity/{metric}/{policy}/{budget}/{}", bin.bin_idx);
                let (lo, hi) = boot(vals.len(), iters, a.bootstrap.ci, &label, seed, |idx| {
                    idx.iter().map(|&i| vals[i]).sum::<f64>() / idx.len() as f64
                });
                let bounds = sel::t_bounds(vals, conf)
                    .zip(sel::t_bounds(vals, sel::safe_level(conf)))
                    .map(|(fails, safe)| (fails.0, safe.1));
                let verdict = if vals.is_empty() {
                    BinVerdict::Unavailable
                } else if is_reference {
                    BinVerdict::Reference
                } else {
                    sel::continuous_verdict(vals, delta, conf)
                };
                fid.push(FidelityStat {
                    policy: policy.clone(),
                    budget,
                    bin_idx: bin.bin_idx,
                    bin_lo: bin.lo,
                    bin_hi: bin.hi,
                    metric: metric.into(),
                    available: !vals.is_empty(),
                    n: vals.len() as i64,
                    mean: opt(stats::mean(vals)),
                    ci_lo: opt(lo),
                    ci_hi: opt(hi),
                    lower: bounds.map(|b| b.0),
                    upper: bounds.map(|b| b.1),
                    top1_agree: (metric == "kl").then(|| opt(stats::mean(&agree))).flatten(),
                    verdict,
                });
            }
        }
        // Selective prediction: the whole cell, then each bin.
        let threshold = {
            let cal: Vec<Scored> = reference
                .iter()
                .filter(|r| calib(r))
                .filter_map(|r| scored(r))
                .collect();
            sel::threshold_for_risk(&cal, a.selective.confident_risk)
        };
        let scopes = std::iter::once(-1).chain(bins.iter().map(|b| b.bin_idx));
        for scope in scopes {
            let in_scope = |r: &&&ScoreCell| scope < 0 || r.bin_idx == scope;
            let cal: Vec<Scored> = rows
                .iter()
                .filter(in_scope)
                .filter(|r| calib(r))
                .filter_map(|r| scored(r))
                .collect();
            // Test rows paired with the full cache's (same examples).
            let test_pairs: Vec<(Scored, Option<Scored>)> = rows
                .iter()
                .filter(in_scope)
                .filter(|r| !calib(r))
                .filter_map(|r| {
                    Some((
                        scored(r)?,
                        ref_by_id.get(r.example_id.as_str()).and_then(|f| scored(f)),
                    ))
                })
                .collect();
            let test: Vec<Scored> = test_pairs.iter().map(|p| p.0).collect();
            let mut st = SelectiveStat {
                policy: policy.clone(),
                budget,
                bin_idx: scope,
                available: !test.is_empty(),
                split: "test".into(),
                n_test: test.len() as i64,
                n_calibration: cal.len() as i64,
                ..Default::default()
            };
            if !test.is_empty() {
                let label = format!("selective/{policy}/{budget}/{scope}");
                st.accuracy =
                    Some(test.iter().filter(|s| s.correct).count() as f64 / test.len() as f64);
                st.augrc = opt(sel::augrc(&test));
                let pick = |idx: &[usize]| idx.iter().map(|&i| test[i]).collect::<Vec<_>>();
                let (lo, hi) = boot(
                    test.len(),
                    iters,
                    a.bootstrap.ci,
                    &format!("{label}/augrc"),
                    seed,
                    |idx| sel::augrc(&pick(idx)),
                );
                (st.augrc_lo, st.augrc_hi) = (opt(lo), opt(hi));
                let at_cov = |c: f64| {
                    sel::threshold_for_coverage(&cal, c)
                        .and_then(|t| opt(sel::apply_threshold(&test, t).1))
                };
                st.risk_at_cov_50 = at_cov(0.5);
                st.risk_at_cov_60 = at_cov(0.6);
                st.risk_at_cov_70 = at_cov(0.7);
                st.risk_at_cov_80 = at_cov(0.8);
                st.risk_at_cov_90 = at_cov(0.9);
                let at_risk = |r: f64| {
                    Some(
                        sel::threshold_for_risk(&cal, r)
                            .map_or(0.0, |t| sel::apply_threshold(&test, t).0),
                    )
                };
                if !cal.is_empty() {
                    st.cov_at_risk_01 = at_risk(0.01);
                    st.cov_at_risk_02 = at_risk(0.02);
                    st.cov_at_risk_05 = at_risk(0.05);
                    st.cov_at_risk_10 = at_risk(0.10);
                }
                let risk_at = |x: &[Scored], c: f64| {
                    let rc = sel::risk_coverage(x);
                    let k = ((c * rc.len() as f64).ceil() as usize).clamp(1, rc.len());
                    rc[k - 1].1
                };
                st.rc_curve = (1..=10)
                    .map(|d| {
                        let c = d as f64 / 10.0;
                        let (lo, hi) = boot(
                            test.len(),
                            iters,
                            a.bootstrap.ci,
                            &format!("{label}/rc/{d}"),
                            seed,
                            |idx| risk_at(&pick(idx), c),
                        );
                        vec![c, risk_at(&test, c), lo, hi]
                    })
                    .collect();
                st.reliability = sel::reliability(&test, 10)
                    .into_iter()
                    .map(|(p, acc, k)| vec![((p * 10.0).floor().min(9.0)) / 10.0, p, acc, k as f64])
                    .collect();
                let (nll, brier, ece) = sel::calibration(&test, 10);
                (st.nll, st.brier, st.ece) = (opt(nll), opt(brier), opt(ece));
                if let Some(t) = threshold {
                    st.confident_threshold = Some(t);
                    st.confidently_wrong = Some(sel::confidently_wrong(&test, t));
                    let (lo, hi) = boot(
                        test.len(),
                        iters,
                        a.bootstrap.ci,
                        &format!("{label}/cw"),
                        seed,
                        |idx| sel::confidently_wrong(&pick(idx), t),
                    );
                    (st.confidently_wrong_lo, st.confidently_wrong_hi) = (opt(lo), opt(hi));
                }
                // Paired differences against the full cache.
                let paired: Vec<(Scored, Scored)> = test_pairs
                    .iter()
                    .filter_map(|(c, f)| Some((*c, (*f)?)))
                    .collect();
                if !is_reference && !paired.is_empty() {
                    let cells_of = |idx: &[usize]| -> (Vec<Scored>, Vec<Scored>) {
                        idx.iter().map(|&i| paired[i]).unzip()
                    };
                    let all: Vec<usize> = (0..paired.len()).collect();
                    let d_augrc = |idx: &[usize]| {
                        let (c, f) = cells_of(idx);
                        sel::augrc(&c) - sel::augrc(&f)
                    };
                    st.d_augrc = opt(d_augrc(&all));
                    let (lo, hi) = boot(
                        paired.len(),
                        iters,
                        a.bootstrap.ci,
                        &format!("{label}/d_augrc"),
                        seed,
                        d_augrc,
                    );
                    (st.d_augrc_lo, st.d_augrc_hi) = (opt(lo), opt(hi));
                    if let Some(t) = threshold {
                        let d_cw = |idx: &[usize]| {
                            let (c, f) = cells_of(idx);
                            sel::confidently_wrong(&c, t) - sel::confidently_wrong(&f, t)
                        };
                        st.d_confidently_wrong = opt(d_cw(&all));
                        let (lo, hi) = boot(
                            paired.len(),
                            iters,
                            a.bootstrap.ci,
                            &format!("{label}/d_cw"),
                            seed,
                            d_cw,
                        );
                        (st.d_confidently_wrong_lo, st.d_confidently_wrong_hi) = (opt(lo), opt(hi));
                    }
                }
            }
            selective.push(st);
        }
    }
    (fid, selective)
}

/// How many (cell, bin) verdicts each metric decides (safe or fails):
/// accuracy's from `bin_stats`, the continuous ones from `fidelity_stats`.
/// Counted over the cells that differ from the full cache: the full cache
/// itself and `full` at a smaller budget (the same request under another
/// name, trivially "safe" on a continuous metric) are left out.
pub fn decided_counts(
    accuracy: &[crate::stages::analyze::BinStat],
    fid: &[FidelityStat],
) -> Vec<(String, usize, usize)> {
    let counted =
        |policy: &str, verdict: BinVerdict| verdict != BinVerdict::Reference && policy != FULL;
    let acc: Vec<_> = accuracy
        .iter()
        .filter(|s| counted(&s.policy, s.verdict))
        .collect();
    let mut out = vec![(
        "accuracy".to_string(),
        acc.iter().filter(|s| s.verdict.decided()).count(),
        acc.len(),
    )];
    for m in ["gold_ll_drop", "kl"] {
        let rows: Vec<&FidelityStat> = fid
            .iter()
            .filter(|f| f.metric == m && f.available && counted(&f.policy, f.verdict))
            .collect();
        out.push((
            m.to_string(),
            rows.iter().filter(|f| f.verdict.decided()).count(),
            rows.len(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::{Bootstrap, Transition};

    fn analysis(share: f64) -> Analysis {
        Analysis {
            bootstrap: Bootstrap {
                iters: 200,
                seed: 1,
                ci: 0.95,
            },
            transition: Transition {
                delta: 0.1,
                floor: 0.1,
            },
            fidelity: Default::default(),
            splits: crate::config::schema::Splits {
                calibration: share,
                seed: 3,
            },
            selective: Default::default(),
        }
    }

    fn rows(test_labels_flipped: bool) -> Vec<ScoreCell> {
        let mut out = Vec::new();
        for (policy, budget) in [("snapkv", 1.0), ("snapkv", 0.5)] {
            for i in 0..60 {
                let id = format!("ex-{i:03}");
                let cal = sel::is_calibration(&id, 0.5, 3);
                let conf = -(i as f64) / 60.0;
                let mut right = i % 3 != 0;
                if test_labels_flipped && !cal {
                    right = !right;
                }
                out.push(ScoreCell {
                    example_id: id,
                    bin_idx: i64::from(i >= 30),
                    policy: policy.into(),
                    budget,
                    metric: "substring_recall".into(),
                    score: f64::from(u8::from(right)),
                    conf_mean: Some(conf - if budget < 1.0 { 0.2 } else { 0.0 }),
                    gold_ll: Some(-0.5 - if budget < 1.0 { 1.0 } else { 0.0 }),
                    kl_mean: Some(if budget < 1.0 {
                        0.8 + (i % 5) as f64 * 0.01
                    } else {
                        0.0
                    }),
                    top1_agree: Some(if budget < 1.0 { 0.5 } else { 1.0 }),
                    ..Default::default()
                });
            }
        }
        out
    }

    fn bins() -> Vec<Bin> {
        (0..2)
            .map(|b| Bin {
                bin_idx: b,
                lo: b * 100,
                hi: (b + 1) * 100,
                n_available: 30,
                n_selected: 30,
            })
            .collect()
    }

    /// Issue #29, item 1: with the full cache run once as `full`, a policy's
    /// only budget (0.5) is its largest, and it was taken for the reference:
    /// no fidelity verdict and no Δ for every unquantised cell.
    #[test]
    fn a_policy_without_a_budget_of_one_is_compared_with_full() {
        let rows: Vec<ScoreCell> = rows(false)
            .into_iter()
            .map(|mut r| {
                if r.budget == 1.0 {
                    r.policy = "full".into();
                }
                r
            })
            .collect();
        let (fid, sel_rows) = fidelity(&bins(), &rows, &analysis(0.5));
        let kl = fid
            .iter()
            .find(|f| f.policy == "snapkv" && f.metric == "kl" && f.bin_idx == 0)
            .unwrap();
        assert_eq!(kl.verdict, BinVerdict::Fails);
        let full = fid
            .iter()
            .find(|f| f.policy == "full" && f.metric == "kl" && f.bin_idx == 0)
            .unwrap();
        assert_eq!(full.verdict, BinVerdict::Reference);
        let whole = sel_rows
            .iter()
            .find(|s| s.policy == "snapkv" && s.bin_idx == -1)
            .unwrap();
        assert!(whole.d_augrc.is_some());
    }

    #[test]
    fn thresholds_never_see_the_test_split() {
        let (_, a) = fidelity(&bins(), &rows(false), &analysis(0.5));
        let (_, b) = fidelity(&bins(), &rows(true), &analysis(0.5));
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.confident_threshold, y.confident_threshold, "{x:?}");
            assert_eq!(x.n_calibration, y.n_calibration);
        }
        // The labels did change what is reported on test.
        assert!(a.iter().zip(&b).any(|(x, y)| x.accuracy != y.accuracy));
        assert!(a.iter().all(|s| s.split == "test"));
    }

    #[test]
    fn a_large_loss_fails_and_the_full_cache_is_the_reference() {
        let (fid, sel_rows) = fidelity(&bins(), &rows(false), &analysis(0.5));
        let get = |b: f64, m: &str| {
            fid.iter()
                .find(|f| f.budget == b && f.metric == m && f.bin_idx == 0)
                .unwrap()
        };
        assert_eq!(get(1.0, "kl").verdict, BinVerdict::Reference);
        assert_eq!(get(1.0, "kl").mean, Some(0.0));
        assert_eq!(get(0.5, "kl").verdict, BinVerdict::Fails);
        assert_eq!(get(0.5, "gold_ll_drop").verdict, BinVerdict::Fails);
        assert!((get(0.5, "gold_ll_drop").mean.unwrap() - 1.0).abs() < 1e-12);
        let whole = sel_rows
            .iter()
            .find(|s| s.budget == 0.5 && s.bin_idx == -1)
            .unwrap();
        assert!(whole.d_augrc.is_some() && whole.augrc.is_some());
        // Another plain policy's full budget is the same full cache: a
        // reference too, never a "safe" verdict of its own.
        let mut two = rows(false);
        let extra: Vec<ScoreCell> = two
            .iter()
            .filter(|r| r.budget == 1.0)
            .map(|r| ScoreCell {
                policy: "streaming".into(),
                ..r.clone()
            })
            .collect();
        two.extend(extra);
        let (fid2, _) = fidelity(&bins(), &two, &analysis(0.5));
        assert!(fid2
            .iter()
            .filter(|f| f.budget == 1.0)
            .all(|f| f.verdict == BinVerdict::Reference));
        // No log-probabilities: unavailable, never a number.
        let bare: Vec<ScoreCell> = rows(false)
            .into_iter()
            .map(|mut r| {
                r.conf_mean = None;
                r.gold_ll = None;
                r.kl_mean = None;
                r
            })
            .collect();
        let (fid, sel_rows) = fidelity(&bins(), &bare, &analysis(0.5));
        assert!(fid
            .iter()
            .all(|f| !f.available && f.verdict == BinVerdict::Unavailable && f.mean.is_none()));
        assert!(sel_rows.iter().all(|s| !s.available && s.augrc.is_none()));
    }
}
