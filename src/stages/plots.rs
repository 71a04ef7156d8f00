//! `plots`: `acc_by_bin` (one line per policy × budget, CI bands),
//! `fail_by_bin`, `latency_p50_by_bin` and `delta_heatmap` (paired delta to the
//! full cache), each as PNG and SVG, exported to `runs/<exp_group_id>/plots/`.

use crate::config::schema::FULL;
use crate::engine::OpContext;
use crate::render::plots::{self, Figure, HeatMap, LinePlot, Panel, Point, Series};
use crate::stages::analyze::BinStat;
use crate::stages::NoTransport;
use crate::stats::BinVerdict;
use crate::table;
use anyhow::Result;
use std::collections::BTreeMap;

pub struct Plots;

pub const PLOTS: &[&str] = &[
    "acc_by_bin",
    "fail_by_bin",
    "latency_p50_by_bin",
    "delta_heatmap",
];

/// Bin labels such as `256–512`.
pub fn bin_labels(stats: &[BinStat]) -> Vec<String> {
    let mut bins: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for s in stats {
        bins.insert(s.bin_idx, (s.bin_lo, s.bin_hi));
    }
    bins.values().map(|(lo, hi)| format!("{lo}–{hi}")).collect()
}

/// One order of budgets everywhere: the full cache, then fractions from the
/// largest down, then absolute budgets from the smallest up.
pub fn budget_order(budget: f64) -> (u8, f64) {
    if budget == 1.0 {
        (0, 0.0)
    } else if budget < 1.0 {
        (1, -budget)
    } else {
        (2, budget)
    }
}

/// Sorts budgets into [`budget_order`].
pub fn sort_budgets(b: &mut [f64]) {
    b.sort_by(|x, y| {
        let (a, c) = (budget_order(*x), budget_order(*y));
        a.0.cmp(&c.0).then(a.1.total_cmp(&c.1))
    });
}

/// A budget as people read it: `0.5` (a fraction) or `1024 tok` (absolute).
pub fn budget_label(budget: f64) -> String {
    if budget > 1.0 {
        format!("{} tok", budget.round() as i64)
    } else {
        format!("{budget:?}")
    }
}

/// Setting label: `snapkv @ 0.5`.
pub fn setting(policy: &str, budget: f64) -> String {
    format!("{policy} @ {}", budget_label(budget))
}

fn by_setting(stats: &[BinStat]) -> Vec<(String, Vec<&BinStat>)> {
    let mut m: BTreeMap<(String, u8, i64), Vec<&BinStat>> = BTreeMap::new();
    for s in stats {
        // Within a policy, budgets in the one order used everywhere.
        let (group, v) = budget_order(s.budget);
        m.entry((s.policy.clone(), group, (v * 1e6) as i64))
            .or_default()
            .push(s);
    }
    m.into_values()
        .map(|mut v| {
            v.sort_by_key(|s| s.bin_idx);
            (setting(&v[0].policy, v[0].budget), v)
        })
        .collect()
}

/// The policies that get a panel, sorted: every one but the plain full
/// cache, which runs once and is each panel's reference (it gets a panel of
/// its own only when it is all there is).
fn panel_policies<'a>(all: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut policies: Vec<&str> = all.collect();
    policies.sort();
    policies.dedup();
    if policies.len() > 1 {
        policies.retain(|p| *p != FULL);
    }
    policies
}

/// Says when a policy's score lines cannot show a budget effect: every
/// series at the floor, or all of them flat and equal.
fn panel_note(stats: &[BinStat], policy: &str, floor: f64) -> &'static str {
    let means: Vec<f64> = stats
        .iter()
        .filter(|s| s.policy == policy)
        .filter_map(|s| s.mean)
        .collect();
    if means.is_empty() {
        ""
    } else if means.iter().all(|m| *m < floor) {
        " (all at the floor)"
    } else if means.iter().all(|m| (*m - means[0]).abs() < 1e-9) {
        " (all flat, equal)"
    } else {
        ""
    }
}

/// A budget's colour, the same in every plot of every experiment: common
/// budgets have fixed places in the palette, others follow from their value.
pub fn budget_color(budget: f64) -> usize {
    const FIXED: [f64; 7] = [1.0, 0.5, 0.25, 0.2, 0.1, 0.75, 0.3];
    match FIXED.iter().position(|b| *b == budget) {
        Some(i) => i,
        // Absolute budgets: four dark colours by the power of two nearest them.
        None if budget > 1.0 => 7 + (budget.log2().round() as usize % 4),
        None => 11 + (budget.to_bits() % 89) as usize,
    }
}

pub fn figures(stats: &[BinStat], metric: &str, floor: f64) -> Vec<(&'static str, Figure)> {
    let labels = bin_labels(stats);
    let groups = by_setting(stats);
    // One panel per policy; one colour per budget, the same in every panel.
    let mut budgets: Vec<f64> = stats.iter().map(|s| s.budget).collect();
    sort_budgets(&mut budgets);
    budgets.dedup();
    let policies = panel_policies(stats.iter().map(|s| s.policy.as_str()));
    // The full cache runs once; every panel draws it as its reference line.
    let is_reference = |s: &BinStat| s.policy == FULL && s.budget == 1.0;
    // `scores`: the panel notes (flat, at the floor) speak of scores only.
    let lines = |scores: bool, f: &dyn Fn(&BinStat) -> Point| -> Vec<Panel> {
        policies
            .iter()
            .map(|p| Panel {
                title: format!(
                    "policy: {p}{}",
                    if scores {
                        panel_note(stats, p, floor)
                    } else {
                        ""
                    }
                ),
                series: groups
                    .iter()
                    .filter(|(_, v)| v[0].policy == *p || (is_reference(v[0]) && *p != FULL))
                    .map(|(_, v)| {
                        let rank = budgets.iter().position(|b| *b == v[0].budget).unwrap_or(0);
                        Series {
                            name: if is_reference(v[0]) {
                                "full cache".to_string()
                            } else {
                                format!("budget {}", budget_label(v[0].budget))
                            },
                            color: if is_reference(v[0]) {
                                plots::REFERENCE_COLOR
                            } else {
                                budget_color(v[0].budget)
                            },
                            marker: rank,
                            points: v.iter().map(|s| f(s)).collect(),
                        }
                    })
                    .collect(),
            })
            .collect()
    };
    let max_lat = stats
        .iter()
        .filter_map(|s| s.latency_p50_ms)
        .fold(0.0, f64::max);
    let full: Vec<&(String, Vec<&BinStat>)> = groups
        .iter()
        // Every compressed or quantised cell (a quantised full cache included).
        .filter(|(_, v)| v[0].budget != v[0].reference_budget || v[0].policy.contains('+'))
        .collect();
    vec![
        (
            "acc_by_bin",
            Figure::Lines(LinePlot {
                title: format!("Score ({metric}) by prompt length, 95% CI"),
                y_label: format!("mean {metric}"),
                x_label: None,
                x_labels: labels.clone(),
                y_range: (0.0, 1.0),
                panels: lines(true, &|s| Point {
                    y: s.mean,
                    band: s.ci_lo.zip(s.ci_hi),
                    flagged: s.verdict == BinVerdict::Fails,
                }),
            }),
        ),
        (
            "fail_by_bin",
            Figure::Lines(LinePlot {
                title: "Failure rate by prompt length (Wilson 95% CI)".into(),
                y_label: "failure rate".into(),
                x_label: None,
                x_labels: labels.clone(),
                y_range: (0.0, 1.0),
                panels: lines(false, &|s| Point {
                    y: s.fail_rate,
                    band: s.fail_lo.zip(s.fail_hi),
                    flagged: false,
                }),
            }),
        ),
        (
            "latency_p50_by_bin",
            Figure::Lines(LinePlot {
                title: "Median latency by prompt length".into(),
                y_label: "latency p50 (ms)".into(),
                x_label: None,
                x_labels: labels.clone(),
                y_range: (0.0, (max_lat * 1.15).max(1.0)),
                panels: lines(false, &|s| Point {
                    y: s.latency_p50_ms,
                    band: None,
                    flagged: false,
                }),
            }),
        ),
        (
            "delta_heatmap",
            Figure::Heat(HeatMap {
                title: format!("Paired delta of {metric} vs full cache"),
                row_labels: full.iter().map(|(n, _)| n.clone()).collect(),
                col_labels: labels,
                cells: full
                    .iter()
                    .map(|(_, v)| v.iter().map(|s| s.delta).collect())
                    .collect(),
                excludes_zero: full
                    .iter()
                    .map(|(_, v)| {
                        v.iter()
                            .map(|s| match (s.delta_lo, s.delta_hi) {
                                (Some(lo), Some(hi)) => lo > 0.0 || hi < 0.0,
                                _ => false,
                            })
                            .collect()
                    })
                    .collect(),
                limit: 1.0,
            }),
        ),
    ]
}

/// The log-probability figures, where the engine gave log-probabilities:
/// KL and gold log-likelihood drop by length bin (per policy, a line per
/// budget, 95 % CI bands, failing bins ringed), risk–coverage curves per
/// budget with CI bands, and a reliability diagram (test split).
pub fn fidelity_figures(
    fid: &[crate::stages::fidelity::FidelityStat],
    selective: &[crate::stages::fidelity::SelectiveStat],
) -> Vec<(&'static str, Figure)> {
    let mut out = Vec::new();
    let mut labels: Vec<(i64, String)> = fid
        .iter()
        .map(|f| (f.bin_idx, format!("{}–{}", f.bin_lo, f.bin_hi)))
        .collect();
    labels.sort();
    labels.dedup();
    let policies = panel_policies(fid.iter().map(|f| f.policy.as_str()));
    let mut budgets: Vec<f64> = fid.iter().map(|f| f.budget).collect();
    sort_budgets(&mut budgets);
    budgets.dedup();
    let rank = |b: f64| budgets.iter().position(|x| *x == b).unwrap_or(0);
    for (name, metric, title) in [
        (
            "kl_by_bin",
            "kl",
            "KL(full ‖ cell) per answer token by prompt length, 95% CI",
        ),
        (
            "gold_ll_drop_by_bin",
            "gold_ll_drop",
            "Drop in the gold answer's log-likelihood per token, 95% CI",
        ),
    ] {
        let rows: Vec<_> = fid
            .iter()
            .filter(|f| f.metric == metric && f.available)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let top = rows
            .iter()
            .filter_map(|f| f.ci_hi.or(f.mean))
            .fold(0.0f64, f64::max);
        let panels = policies
            .iter()
            .map(|p| Panel {
                title: format!("policy: {p}"),
                series: budgets
                    .iter()
                    .filter(|b| rows.iter().any(|f| f.policy == *p && f.budget == **b))
                    .map(|&b| Series {
                        name: format!("budget {}", budget_label(b)),
                        color: budget_color(b),
                        marker: rank(b),
                        points: labels
                            .iter()
                            .map(|(i, _)| {
                                let f = rows
                                    .iter()
                                    .find(|f| f.policy == *p && f.budget == b && f.bin_idx == *i);
                                Point {
                                    y: f.and_then(|f| f.mean),
                                    band: f.and_then(|f| f.ci_lo.zip(f.ci_hi)),
                                    flagged: f.is_some_and(|f| f.verdict == BinVerdict::Fails),
                                }
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .filter(|p: &Panel| !p.series.is_empty())
            .collect();
        out.push((
            name,
            Figure::Lines(LinePlot {
                title: title.into(),
                y_label: "nats per token".into(),
                x_label: None,
                x_labels: labels.iter().map(|l| l.1.clone()).collect(),
                y_range: (0.0, (top * 1.15).max(0.1)),
                panels,
            }),
        ));
    }
    let whole: Vec<_> = selective
        .iter()
        .filter(|s| s.bin_idx == -1 && s.available)
        .collect();
    if !whole.is_empty() {
        let panels =
            |pick: &dyn Fn(&crate::stages::fidelity::SelectiveStat) -> Vec<Point>| -> Vec<Panel> {
                // The full cache's curve first in every panel: the
                // reference each policy's curves are read against.
                let reference = whole
                    .iter()
                    .find(|s| s.policy == FULL && s.budget == 1.0)
                    .filter(|_| policies.iter().all(|p| *p != FULL));
                policies
                    .iter()
                    .map(|p| Panel {
                        title: format!("policy: {p} (test split)"),
                        series: reference
                            .into_iter()
                            .map(|s| Series {
                                name: "full cache".into(),
                                color: plots::REFERENCE_COLOR,
                                marker: rank(1.0),
                                points: pick(s),
                            })
                            .chain(
                                budgets
                                    .iter()
                                    .filter_map(|&b| {
                                        whole.iter().find(|s| s.policy == *p && s.budget == b)
                                    })
                                    .map(|s| Series {
                                        name: format!("budget {}", budget_label(s.budget)),
                                        color: budget_color(s.budget),
                                        marker: rank(s.budget),
                                        points: pick(s),
                                    }),
                            )
                            .collect(),
                    })
                    .filter(|p: &Panel| !p.series.is_empty())
                    .collect()
            };
        out.push((
            "risk_coverage",
            Figure::Lines(LinePlot {
                title: "Selective risk by coverage (most confident answers first), 95% CI".into(),
                y_label: "risk (share wrong)".into(),
                x_label: Some("coverage (share of answers kept)".into()),
                // Every other tick labelled: ten fit no narrow panel.
                x_labels: (1..=10)
                    .map(|d| {
                        if d % 2 == 0 {
                            format!("{:.1}", d as f64 / 10.0)
                        } else {
                            String::new()
                        }
                    })
                    .collect(),
                y_range: (0.0, 1.0),
                panels: panels(&|s| {
                    s.rc_curve
                        .iter()
                        .map(|r| Point {
                            y: r.get(1).copied(),
                            band: r.get(2).copied().zip(r.get(3).copied()),
                            flagged: false,
                        })
                        .collect()
                }),
            }),
        ));
        out.push((
            "reliability",
            Figure::Lines(LinePlot {
                title: "Reliability: accuracy by confidence exp(mean logprob), test split".into(),
                y_label: "accuracy".into(),
                x_label: Some("confidence".into()),
                // Each bin by where it starts, every other one labelled.
                x_labels: (0..10)
                    .map(|d| {
                        if d % 2 == 0 {
                            format!("{:.1}–", d as f64 / 10.0)
                        } else {
                            String::new()
                        }
                    })
                    .collect(),
                y_range: (0.0, 1.0),
                panels: panels(&|s| {
                    (0..10)
                        .map(|d| Point {
                            y: s.reliability
                                .iter()
                                .find(|r| (r[0] * 10.0).round() as i64 == d)
                                .map(|r| r[2]),
                            band: None,
                            flagged: false,
                        })
                        .collect()
                }),
            }),
        ));
    }
    out
}

/// What `plots` reads (its stage's `uses`, exactly).
#[derive(serde::Deserialize)]
pub struct Uses {
    #[serde(rename = "output.exp_group_id")]
    exp: String,
    #[serde(rename = "analysis.transition.floor")]
    floor: f64,
}

/// Figures already drawn, by their data: `memo/plots/<blake3 of the
/// figure>` names the PNG and SVG objects in the store.
struct Memo<'a> {
    dir: std::path::PathBuf,
    store: &'a crate::engine::store::ContentStore,
    version: u32,
}

impl Memo<'_> {
    fn entry(&self, fig: &plots::Figure) -> std::path::PathBuf {
        let key = format!("{} {} {fig:?}", env!("CARGO_PKG_VERSION"), self.version);
        self.dir.join(&blake3::hash(key.as_bytes()).to_hex()[..32])
    }

    /// The figure's (PNG, SVG) bytes, when it was drawn before and both
    /// objects are still in the store, intact.
    fn get(&self, fig: &plots::Figure) -> Option<(Vec<u8>, Vec<u8>)> {
        let text = std::fs::read_to_string(self.entry(fig)).ok()?;
        let (p, s) = text.trim().split_once(' ')?;
        let get = |hex: &str| self.store.get(&crate::engine::Digest::from_hex(hex)?).ok();
        Some((get(p)?, get(s)?))
    }

    /// Best effort: a memo that cannot be written only means drawing again.
    fn note(&self, fig: &plots::Figure, png: crate::engine::Digest, svg: crate::engine::Digest) {
        let line = format!("{png} {svg}\n");
        let _ =
            crate::engine::store::write_atomic_named(&self.dir, &self.entry(fig), line.as_bytes());
    }
}

impl crate::stages::Stage for Plots {
    fn name(&self) -> &'static str {
        "plots"
    }
    /// 6: the log-probability figures.
    fn version(&self) -> u32 {
        // 7: PNG text set by advance widths, bearings and kerning; the full
        // cache drawn in every policy's panel.
        // 8: panel notes (flat, at the floor) on score panels only.
        // 9: shorter notes; the full cache's line in black, and in every
        // risk–coverage and reliability panel; fewer tick labels there.
        9
    }
    type Uses = Uses;
    type Transport = NoTransport;
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, _: Self::Transport) -> Result<()> {
        let Uses { exp, floor } = uses;
        let stats: Vec<BinStat> = table::read_owned(ctx.input("analyze", "bin_stats")?)?;
        let metric = stats
            .iter()
            .map(|s| s.metric.clone())
            .find(|m| !m.is_empty())
            .unwrap_or_else(|| "score".into());
        // Figures are independent: rendered on all cores, stored in order.
        // A figure drawn before from the same data (an analysis change that
        // moves only some figures) is taken from the store instead.
        let fid: Vec<crate::stages::fidelity::FidelityStat> =
            table::read_owned(ctx.input("analyze", "fidelity_stats")?)?;
        let selective: Vec<crate::stages::fidelity::SelectiveStat> =
            table::read_owned(ctx.input("analyze", "selective_stats")?)?;
        let mut figs = figures(&stats, &metric, floor);
        figs.extend(fidelity_figures(&fid, &selective));
        let memo = Memo {
            dir: ctx.cache_root.join("v1").join("memo").join("plots"),
            store: ctx.store,
            version: self.version(),
        };
        let rendered = crate::engine::par_map(&figs, |(_, fig)| match memo.get(fig) {
            Some(done) => Ok((done, true)),
            None => plots::render(fig).map(|(png, svg)| ((png, svg.into_bytes()), false)),
        });
        for ((name, fig), r) in figs.iter().zip(rendered) {
            let ((png, svg), remembered) = r?;
            let (a, b) = (format!("{name}.png"), format!("{name}.svg"));
            let dp = ctx.put(&a, &png)?;
            let ds = ctx.put(&b, &svg)?;
            if !remembered {
                memo.note(fig, dp, ds);
            }
            ctx.export(&a, format!("runs/{exp}/plots/{a}"));
            ctx.export(&b, format!("runs/{exp}/plots/{b}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_drawn_before_comes_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::engine::store::ContentStore::new(dir.path());
        let memo = Memo {
            dir: dir.path().join("memo"),
            store: &store,
            version: 1,
        };
        let fig = |limit: f64| {
            plots::Figure::Heat(plots::HeatMap {
                title: "t".into(),
                row_labels: vec!["a".into()],
                col_labels: vec!["b".into()],
                cells: vec![vec![Some(0.25)]],
                excludes_zero: vec![vec![false]],
                limit,
            })
        };
        assert!(memo.get(&fig(1.0)).is_none(), "never drawn");
        let (png, svg) = plots::render(&fig(1.0)).unwrap();
        let (dp, ds) = (store.put(&png).unwrap(), store.put(svg.as_bytes()).unwrap());
        memo.note(&fig(1.0), dp, ds);
        assert_eq!(memo.get(&fig(1.0)), Some((png, svg.into_bytes())));
        // Other data: not the same figure.
        assert!(memo.get(&fig(0.5)).is_none());
        // An object gone from the store (a gc): drawn again.
        std::fs::remove_file(store.path_of(&dp)).unwrap();
        assert!(memo.get(&fig(1.0)).is_none());
    }

    /// Issue #29, item 1: the full cache runs once, so no policy has a 1.0
    /// cell of its own: each policy's panel draws the full cache as its
    /// reference line, the full cache gets no panel of its own, and the heat
    /// map has no row for it. Panel notes speak of scores only.
    #[test]
    fn each_panel_draws_the_one_full_cache_and_notes_only_scores() {
        let stat = |policy: &str, budget: f64, bin: i64, mean: f64| BinStat {
            policy: policy.into(),
            budget,
            bin_idx: bin,
            bin_lo: bin * 100,
            bin_hi: (bin + 1) * 100,
            n: 10,
            mean: Some(mean),
            reference_budget: 1.0,
            latency_p50_ms: Some(5.0),
            ..Default::default()
        };
        let mut stats = Vec::new();
        for bin in 0..2 {
            stats.push(stat("full", 1.0, bin, 1.0));
            stats.push(stat("snapkv", 0.5, bin, 0.5));
            stats.push(stat("snapkv", 0.2, bin, 0.5));
            stats.push(stat("streaming", 0.5, bin, 0.2 + 0.1 * bin as f64));
        }
        let figs = figures(&stats, "m", 0.1);
        let lines = |name: &str| match &figs.iter().find(|(n, _)| *n == name).unwrap().1 {
            plots::Figure::Lines(l) => l
                .panels
                .iter()
                .map(|p| {
                    (
                        p.title.clone(),
                        p.series.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>(),
            _ => panic!("{name} is a line plot"),
        };
        assert_eq!(
            lines("acc_by_bin"),
            [
                (
                    "policy: snapkv (all flat, equal)".to_string(),
                    vec![
                        "full cache".to_string(),
                        "budget 0.5".into(),
                        "budget 0.2".into()
                    ]
                ),
                (
                    "policy: streaming".to_string(),
                    vec!["full cache".to_string(), "budget 0.5".into()]
                ),
            ]
        );
        assert_eq!(lines("latency_p50_by_bin")[0].0, "policy: snapkv");
        // The reference line has a colour of its own, never a budget's (a
        // quantised full cache at 1.0 would look the same otherwise).
        let plots::Figure::Lines(acc) = &figs[0].1 else {
            panic!("a line plot")
        };
        assert_eq!(acc.panels[0].series[0].color, plots::REFERENCE_COLOR);
        assert_ne!(acc.panels[0].series[1].color, plots::REFERENCE_COLOR);
        let plots::Figure::Heat(h) = &figs.iter().find(|(n, _)| *n == "delta_heatmap").unwrap().1
        else {
            panic!("a heat map")
        };
        assert_eq!(
            h.row_labels,
            ["snapkv @ 0.5", "snapkv @ 0.2", "streaming @ 0.5"]
        );
    }

    #[test]
    fn one_budget_order_and_one_colour_per_budget() {
        let mut b = vec![0.2, 1024.0, 1.0, 0.5, 256.0];
        sort_budgets(&mut b);
        // Full first, fractions from large to small, then absolute from small to large.
        assert_eq!(b, vec![1.0, 0.5, 0.2, 256.0, 1024.0]);
        // A budget's colour does not depend on which other budgets an experiment has.
        assert_eq!(budget_color(0.5), 1);
        assert_ne!(budget_color(0.5), budget_color(0.25));
        assert_eq!(budget_color(1024.0), budget_color(1024.0));
    }
}
