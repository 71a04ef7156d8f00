//! Eviction policies on real attention: each scorer turns one layer's
//! observations (keys, attention statistics from the prefill) into a score per
//! KV head and position; the `n_kept` highest stay, per KV head, ties to the
//! lower position. Definitions follow `KV_POLICIES.md` (kvpress and the papers).
//! Pure functions on plain arrays, so each policy is tested on hand-made
//! attention without a model.

use serde::{Deserialize, Serialize};

/// The eviction policies the native engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    Full,
    Streaming,
    Snapkv,
    Pyramidkv,
    H2o,
    Tova,
    Knorm,
    Random,
}

/// The one list of policies: each with its name in configs and requests and
/// whether kvt's reference simulator runs it too (the native engine runs all).
const POLICIES: [(Policy, &str, bool); 8] = [
    (Policy::Full, "full", true),
    (Policy::Streaming, "streaming", true),
    (Policy::Snapkv, "snapkv", true),
    (Policy::Pyramidkv, "pyramidkv", false),
    (Policy::H2o, "h2o", true),
    (Policy::Tova, "tova", false),
    (Policy::Knorm, "knorm", false),
    (Policy::Random, "random", true),
];

/// Every policy's name, in the list's order.
pub const POLICY_NAMES: [&str; POLICIES.len()] = {
    let mut names = [""; POLICIES.len()];
    let mut i = 0;
    while i < POLICIES.len() {
        names[i] = POLICIES[i].1;
        i += 1;
    }
    names
};

impl Policy {
    pub fn parse(s: &str) -> Option<Policy> {
        POLICIES.iter().find(|p| p.1 == s).map(|p| p.0)
    }
    pub fn name(self) -> &'static str {
        POLICIES
            .iter()
            .find(|p| p.0 == self)
            .map(|p| p.1)
            .expect("every policy is in the list")
    }
}

/// The policies kvt's reference simulator runs, by name.
pub fn simulated_names() -> Vec<&'static str> {
    POLICIES.iter().filter(|p| p.2).map(|p| p.1).collect()
}

/// Policy parameters (kvpress's defaults in `KvParams`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyParams {
    pub policy: Policy,
    /// ≤ 1.0: the fraction kept; > 1.0: tokens kept.
    pub budget: f64,
    pub sinks: usize,
    pub window: usize,
    pub kernel: usize,
    pub beta: f64,
    pub seed: u64,
    /// The precision scores are compared at before the kept set is chosen.
    pub score_dtype: crate::config::schema::ScoreDtype,
}

/// What the prefill saw in one layer, for `k_len` cached positions.
pub struct LayerObservation<'a> {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub k_len: usize,
    /// Keys after RoPE, `[n_kv_head][key_rows][head_dim]`: the first `k_len`
    /// rows of each head are scored (a prefill's cache may hold more).
    pub keys: &'a [f32],
    pub key_rows: usize,
    /// Mean softmax attention of the last `window` queries, `[n_head][k_len]`.
    pub window_mean: &'a [f32],
    /// The observation window those queries span.
    pub window: usize,
    /// Softmax attention of the last query, `[n_head][k_len]`.
    pub last_query: &'a [f32],
    /// Attention received by each position, summed over every prefill query,
    /// `[n_head][k_len]`.
    pub received: &'a [f32],
}

/// Positions kept for a prompt of `k_len` tokens (kvpress: `max(1, floor(k_len ×
/// budget))`; an absolute budget keeps `min(k_len, tokens)`).
pub fn n_kept(k_len: usize, budget: f64) -> usize {
    if budget > 1.0 {
        (budget as usize).min(k_len)
    } else {
        ((k_len as f64 * budget).floor() as usize).clamp(1, k_len.max(1))
    }
}

/// PyramidKV's per-layer count for layer `layer` of `n_layers` (falls back to
/// SnapKV's count when the pyramid's bounds do not hold).
pub fn pyramid_n_kept(k_len: usize, p: &PolicyParams, layer: usize, n_layers: usize) -> usize {
    let flat = n_kept(k_len, p.budget);
    let window = p.window as f64;
    let cap = window + flat as f64;
    let mut min = (cap - window) / p.beta;
    let mut max = 2.0 * (cap - window) - min;
    if max >= k_len as f64 - window {
        max = k_len as f64 - window;
        min = 2.0 * (cap - window) - max;
    }
    if !(k_len as f64 >= max && max >= min && min >= window) || n_layers < 2 {
        return flat;
    }
    let n = max - layer as f64 * (max - min) / (n_layers - 1) as f64;
    (n.round() as usize).clamp(1, k_len)
}

/// Which positions each KV head keeps, sorted: `[n_kv_head][n_kept]`.
pub fn select(
    obs: &LayerObservation,
    p: &PolicyParams,
    layer: usize,
    n_layers: usize,
) -> Vec<Vec<usize>> {
    let k_len = obs.k_len;
    let keep = match p.policy {
        Policy::Pyramidkv => pyramid_n_kept(k_len, p, layer, n_layers),
        _ => n_kept(k_len, p.budget),
    };
    if p.policy == Policy::Full || keep >= k_len {
        return vec![(0..k_len).collect(); obs.n_kv_head];
    }
    let mut scores = scores(obs, p, layer);
    for row in &mut scores {
        round_scores(row, p.score_dtype);
    }
    scores.iter().map(|s| top_positions(s, keep)).collect()
}

/// Rounds scores to the precision they are compared at (to nearest, ties
/// to even, as a cast to bf16 or f16 does).
pub fn round_scores(row: &mut [f32], dtype: crate::config::schema::ScoreDtype) {
    use crate::config::schema::ScoreDtype;
    match dtype {
        ScoreDtype::F32 => {}
        ScoreDtype::Bf16 => row
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        ScoreDtype::F16 => row
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
    }
}

/// The `k` highest scores' positions, ties to the lower position, sorted.
pub fn top_positions(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Scores `[n_kv_head][k_len]` (higher = kept).
pub fn scores(obs: &LayerObservation, p: &PolicyParams, layer: usize) -> Vec<Vec<f32>> {
    let (h, kv, n) = (obs.n_head, obs.n_kv_head, obs.k_len);
    let group = h / kv;
    // Averages a per-query-head score `[h][n]` over each KV head's group.
    let per_group = |per_head: &[Vec<f32>]| -> Vec<Vec<f32>> {
        let len = per_head.first().map_or(0, Vec::len);
        (0..kv)
            .map(|g| {
                (0..len)
                    .map(|j| {
                        (0..group).map(|i| per_head[g * group + i][j]).sum::<f32>() / group as f32
                    })
                    .collect()
            })
            .collect()
    };
    match p.policy {
        Policy::Full => vec![vec![1.0; n]; kv],
        Policy::Streaming => {
            let keep = n_kept(n, p.budget);
            let sinks = p.sinks.min(keep);
            let pruned = n - keep;
            let row: Vec<f32> = (0..n)
                .map(|j| {
                    if j >= sinks && j < sinks + pruned {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect();
            vec![row; kv]
        }
        Policy::Snapkv | Policy::Pyramidkv => {
            let w = obs.window.min(n);
            let before = n - w;
            let per_head: Vec<Vec<f32>> = (0..h)
                .map(|hh| avg_pool(&obs.window_mean[hh * n..hh * n + before], p.kernel))
                .collect();
            let mut g = per_group(&per_head);
            for row in &mut g {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let max = if max.is_finite() { max } else { 1.0 };
                row.extend(std::iter::repeat_n(max, w));
            }
            g
        }
        Policy::H2o => {
            let per_head: Vec<Vec<f32>> = (0..h)
                .map(|hh| {
                    (0..n)
                        .map(|j| obs.received[hh * n + j] / (n - j) as f32)
                        .collect()
                })
                .collect();
            per_group(&per_head)
        }
        Policy::Tova => {
            let mut row = vec![0f32; n];
            for hh in 0..h {
                let a = &obs.last_query[hh * n..(hh + 1) * n];
                for (r, x) in row.iter_mut().zip(a) {
                    *r += x / h as f32;
                }
            }
            row[n - 1] = f32::INFINITY;
            vec![row; kv]
        }
        Policy::Knorm => (0..kv)
            .map(|g| {
                (0..n)
                    .map(|j| {
                        let k = &obs.keys[(g * obs.key_rows + j) * obs.head_dim..][..obs.head_dim];
                        -k.iter().map(|x| x * x).sum::<f32>().sqrt()
                    })
                    .collect()
            })
            .collect(),
        Policy::Random => (0..kv)
            .map(|g| {
                let mut rng = crate::data::SplitMix64::new(
                    p.seed ^ ((layer as u64) << 32) ^ ((g as u64) << 16),
                );
                (0..n).map(|_| (rng.next_u64() >> 40) as f32).collect()
            })
            .collect(),
    }
}

/// 1-D average pooling, stride 1, padding `kernel / 2` counted as zeros
/// (PyTorch's `avg_pool1d` default), so the output has the input's length for odd kernels.
fn avg_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    if kernel <= 1 {
        return x.to_vec();
    }
    let pad = kernel / 2;
    let n = x.len();
    let out_len = (n + 2 * pad + 1).saturating_sub(kernel);
    (0..out_len.min(n))
        .map(|i| {
            let lo = i as isize - pad as isize;
            (lo..lo + kernel as isize)
                .filter(|&j| j >= 0 && (j as usize) < n)
                .map(|j| x[j as usize])
                .sum::<f32>()
                / kernel as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one list: names round-trip, are the serde names request identity
    /// holds, and the simulator's subset is the one it always had.
    #[test]
    fn every_policy_has_one_name_everywhere() {
        for name in POLICY_NAMES {
            let p = Policy::parse(name).unwrap();
            assert_eq!(p.name(), name);
            assert_eq!(serde_json::to_value(p).unwrap(), name);
        }
        assert_eq!(Policy::parse("lru"), None);
        assert_eq!(
            simulated_names(),
            ["full", "streaming", "snapkv", "h2o", "random"]
        );
    }

    fn params(policy: Policy, budget: f64) -> PolicyParams {
        PolicyParams {
            policy,
            budget,
            sinks: 2,
            window: 2,
            kernel: 1,
            beta: 20.0,
            seed: 7,
            score_dtype: crate::config::schema::ScoreDtype::F32,
        }
    }

    /// Two query heads sharing one KV head, 8 positions, head dim 2.
    struct Fixture {
        keys: Vec<f32>,
        window_mean: Vec<f32>,
        last_query: Vec<f32>,
        received: Vec<f32>,
    }

    fn fixture() -> Fixture {
        // Key norms: position 3 and 6 are the smallest.
        let norms = [5.0, 4.0, 3.0, 0.5, 2.0, 6.0, 0.1, 1.0];
        let keys = norms.iter().flat_map(|&n| [n, 0.0]).collect();
        // Window of 2 queries (positions 6 and 7), rows over 8 keys.
        // Head 0 looks at position 1; head 1 at position 4; both a little at 2.
        let h0 = [
            [0.0, 0.6, 0.1, 0.0, 0.0, 0.0, 0.3, 0.0],
            [0.0, 0.5, 0.1, 0.0, 0.0, 0.0, 0.2, 0.2],
        ];
        let h1 = [
            [0.0, 0.0, 0.1, 0.0, 0.7, 0.0, 0.2, 0.0],
            [0.0, 0.0, 0.1, 0.0, 0.5, 0.0, 0.2, 0.2],
        ];
        let window_mean = [h0, h1]
            .iter()
            .flat_map(|rows| (0..8).map(move |j| (rows[0][j] + rows[1][j]) / 2.0))
            .collect();
        let last_query = [h0[1], h1[1]].iter().flatten().copied().collect();
        // Received attention summed over queries; divided by (8 − j) it favours 0 and 5.
        let received = [
            [8.0, 2.1, 1.2, 1.0, 0.8, 3.0, 0.4, 0.2],
            [8.0, 2.1, 1.2, 1.0, 0.8, 3.0, 0.4, 0.2],
        ]
        .iter()
        .flatten()
        .copied()
        .collect();
        Fixture {
            keys,
            window_mean,
            last_query,
            received,
        }
    }

    fn obs(f: &Fixture) -> LayerObservation<'_> {
        LayerObservation {
            n_head: 2,
            n_kv_head: 1,
            head_dim: 2,
            k_len: 8,
            keys: &f.keys,
            key_rows: 8,
            window_mean: &f.window_mean,
            window: 2,
            last_query: &f.last_query,
            received: &f.received,
        }
    }

    #[test]
    fn budgets_follow_kvpress_counts() {
        assert_eq!(n_kept(10, 0.5), 5);
        assert_eq!(n_kept(10, 0.25), 2);
        assert_eq!(n_kept(3, 0.1), 1);
        assert_eq!(n_kept(100, 16.0), 16);
        assert_eq!(n_kept(10, 64.0), 10);
    }

    #[test]
    fn streaming_keeps_sinks_and_the_most_recent() {
        let f = fixture();
        let kept = select(&obs(&f), &params(Policy::Streaming, 0.5), 0, 1);
        assert_eq!(kept, vec![vec![0, 1, 6, 7]]);
    }

    #[test]
    fn snapkv_averages_the_window_and_the_group_and_keeps_the_window() {
        let f = fixture();
        // Mean over 2 queries, then over 2 heads: pos1 = (0.55 + 0)/2, pos4 = (0 + 0.6)/2,
        // pos2 = 0.1; the window (6, 7) always stays. Budget 4 → window + 4 and 1.
        let kept = select(&obs(&f), &params(Policy::Snapkv, 0.5), 0, 1);
        assert_eq!(kept, vec![vec![1, 4, 6, 7]]);
        // With pooling (kernel 3, zero padding) position 3, between the peaks at 1..2
        // and 4, wins: (0.1 + 0 + 0.3) / 3 beats (0.275 + 0.1 + 0) / 3.
        let mut p = params(Policy::Snapkv, 3.0);
        p.kernel = 3;
        let kept = select(&obs(&f), &p, 0, 1);
        assert_eq!(kept, vec![vec![3, 6, 7]]);
    }

    #[test]
    fn gqa_keeps_per_kv_head_when_heads_do_not_share() {
        let f = fixture();
        let o = LayerObservation {
            n_kv_head: 2,
            keys: &[f.keys.clone(), f.keys.clone()].concat(),
            ..obs(&f)
        };
        // Each query head is its own group: head 0 keeps 1, head 1 keeps 4.
        let kept = select(&o, &params(Policy::Snapkv, 3.0), 0, 1);
        assert_eq!(kept, vec![vec![1, 6, 7], vec![4, 6, 7]]);
    }

    #[test]
    fn h2o_normalises_by_the_queries_that_see_each_position() {
        let f = fixture();
        // received / (8 − j): 1.0, 0.3, 0.2, 0.2, 0.2, 1.0, 0.2, 0.2 → 0, 5, then 1.
        let kept = select(&obs(&f), &params(Policy::H2o, 3.0), 0, 1);
        assert_eq!(kept, vec![vec![0, 1, 5]]);
    }

    #[test]
    fn tova_uses_the_last_query_over_all_heads_and_keeps_the_last_position() {
        let f = fixture();
        // Last query: head 0 [.5 at 1, .2 at 6, .2 at 7], head 1 [.5 at 4, ...]; mean .25 at 1 and 4.
        let kept = select(&obs(&f), &params(Policy::Tova, 3.0), 0, 1);
        assert_eq!(kept, vec![vec![1, 4, 7]]);
    }

    #[test]
    fn knorm_keeps_the_smallest_keys() {
        let f = fixture();
        let kept = select(&obs(&f), &params(Policy::Knorm, 3.0), 0, 1);
        assert_eq!(kept, vec![vec![3, 6, 7]]);
    }

    /// Issue #31, item 4: where scores tie exactly, the kept set is the
    /// lower positions, the same on every run (kvpress's `topk` leaves the
    /// choice to the kernel; `scripts/kvpress_server.py` now breaks ties as
    /// here, checked by `tests/kvpress.rs`).
    #[test]
    fn exact_ties_keep_the_lower_positions_on_every_run() {
        let tied = [0.5, 1.0, 1.0, 0.2, 1.0, 1.0, 0.5, 0.5];
        assert_eq!(top_positions(&tied, 3), vec![1, 2, 4]);
        assert_eq!(top_positions(&tied, 5), vec![0, 1, 2, 4, 5]);
        assert_eq!(top_positions(&[0.0; 6], 2), vec![0, 1]);
        // Key norms that tie (equal keys, as a bf16 model gives often):
        // knorm keeps the first of them, run after run.
        let mut f = fixture();
        f.keys = [1.0f32, 0.0].repeat(8);
        let first = select(&obs(&f), &params(Policy::Knorm, 3.0), 0, 1);
        assert_eq!(first, vec![vec![0, 1, 2]]);
        for _ in 0..20 {
            assert_eq!(select(&obs(&f), &params(Policy::Knorm, 3.0), 0, 1), first);
        }
    }

    /// `kv.score_dtype`: key norms that differ only in their last bits
    /// (the same key rotated to two positions) tie once rounded to bf16, and
    /// the tie keeps the lower positions; in f32 the rounding noise decides.
    #[test]
    fn bf16_scores_turn_near_ties_into_ties_kept_by_position() {
        use crate::config::schema::ScoreDtype;
        let mut row = [1.0f32, 1.000_000_1, 0.999_999_9, 1.5, 1.000_000_2];
        let near = row;
        round_scores(&mut row, ScoreDtype::Bf16);
        assert_eq!(row, [1.0, 1.0, 1.0, 1.5, 1.0]);
        assert_eq!(top_positions(&near, 3), vec![1, 3, 4]);
        assert_eq!(top_positions(&row, 3), vec![0, 1, 3]);
        let mut h = [1.0f32, 1.000_3, 65_519.0];
        round_scores(&mut h, ScoreDtype::F16);
        assert_eq!(h, [1.0, 1.0, 65_504.0]);
        // Through `select`: knorm over keys whose norms differ by rounding
        // noise keeps the first ones once scores are bf16.
        let mut f = fixture();
        f.keys = (0..8)
            .flat_map(|i| [1.0f32 + (i % 3) as f32 * 1e-7, 0.0])
            .collect();
        let mut p = params(Policy::Knorm, 3.0);
        let f32_kept = select(&obs(&f), &p, 0, 1);
        p.score_dtype = ScoreDtype::Bf16;
        let bf16_kept = select(&obs(&f), &p, 0, 1);
        assert_eq!(bf16_kept, vec![vec![0, 1, 2]]);
        assert_ne!(f32_kept, bf16_kept, "in f32 the noise chose");
    }

    #[test]
    fn random_is_seeded_and_full_keeps_all() {
        let f = fixture();
        let a = select(&obs(&f), &params(Policy::Random, 0.5), 3, 30);
        let b = select(&obs(&f), &params(Policy::Random, 0.5), 3, 30);
        assert_eq!(a, b);
        assert_eq!(a[0].len(), 4);
        let mut p = params(Policy::Random, 0.5);
        p.seed = 8;
        let others: Vec<_> = (0..8)
            .map(|s| {
                p.seed = s;
                select(&obs(&f), &p, 3, 30)
            })
            .collect();
        assert!(others.iter().any(|o| o != &a), "seeds change the sample");
        let all = select(&obs(&f), &params(Policy::Full, 0.1), 0, 1);
        assert_eq!(all, vec![(0..8).collect::<Vec<_>>()]);
    }

    #[test]
    fn pyramid_layer_counts_descend_from_max_to_min() {
        // k_len 1000, budget 0.2, window 64, β 20: cap = 264, min = 10 → below the
        // window, so the pyramid's bounds fail and every layer keeps SnapKV's 200.
        let mut p = params(Policy::Pyramidkv, 0.2);
        p.window = 64;
        assert_eq!(pyramid_n_kept(1000, &p, 0, 30), 200);
        // With β 2: min = 100, max = 300; layers keep 300 … 100, summing to 30 × 200.
        p.beta = 2.0;
        let counts: Vec<usize> = (0..30).map(|l| pyramid_n_kept(1000, &p, l, 30)).collect();
        assert_eq!(counts[0], 300);
        assert_eq!(counts[29], 100);
        assert!(counts.windows(2).all(|w| w[0] >= w[1]));
        let total: usize = counts.iter().sum();
        assert!((5990..=6010).contains(&total), "{total}");
    }

    #[test]
    fn avg_pool_pads_with_zeros() {
        assert_eq!(avg_pool(&[3.0, 0.0, 0.0, 3.0], 3), vec![1.0, 1.0, 1.0, 1.0]);
    }
}
