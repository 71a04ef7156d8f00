//! Statistics: seeded percentile bootstrap (and its paired form for deltas
//! between budgets), Wilson intervals for failure rates, percentiles, and
//! transition detection. The generator is kvt's SplitMix64, seeded per cell
//! from the config seed and the cell's label, so a seed gives the same
//! intervals forever and on any number of threads.

use crate::data::SplitMix64;
use serde::{Deserialize, Serialize};

/// Percentile with linear interpolation between order statistics (numpy's
/// default). `sorted` must be sorted; `q` in [0, 1].
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// Bootstrap means of `values`: `iters` resamples with replacement.
pub fn bootstrap_means(values: &[f64], iters: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let n = values.len();
    if n == 0 {
        return vec![];
    }
    let nn = n as u64;
    let mut out = Vec::with_capacity(iters);
    let idx = |r: u64| ((r * nn) >> 32) as usize;
    for _ in 0..iters {
        // Two indices per 64-bit draw (Lemire's multiply-shift on 32-bit
        // halves), four partial sums so the additions do not wait on each other.
        let mut acc = [0.0f64; 4];
        let mut i = 0;
        while i + 4 <= n {
            let (r1, r2) = (rng.next_u64(), rng.next_u64());
            acc[0] += values[idx(r1 & 0xFFFF_FFFF)];
            acc[1] += values[idx(r1 >> 32)];
            acc[2] += values[idx(r2 & 0xFFFF_FFFF)];
            acc[3] += values[idx(r2 >> 32)];
            i += 4;
        }
        while i < n {
            acc[0] += values[idx(rng.next_u64() & 0xFFFF_FFFF)];
            i += 1;
        }
        let sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        out.push(sum / n as f64);
    }
    out
}

/// Percentile bootstrap CI of the mean at level `ci` (e.g. 0.95).
pub fn bootstrap_ci(values: &[f64], iters: usize, ci: f64, rng: &mut SplitMix64) -> (f64, f64) {
    let mut m = bootstrap_means(values, iters, rng);
    if m.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    m.sort_by(f64::total_cmp);
    let a = (1.0 - ci) / 2.0;
    (percentile(&m, a), percentile(&m, 1.0 - a))
}

/// Paired bootstrap CI of mean(b − a): examples are resampled, and each
/// resampled example contributes both of its scores.
pub fn paired_delta_ci(
    a: &[f64],
    b: &[f64],
    iters: usize,
    ci: f64,
    rng: &mut SplitMix64,
) -> (f64, f64, f64) {
    assert_eq!(a.len(), b.len(), "paired samples must align");
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let (lo, hi) = bootstrap_ci(&d, iters, ci, rng);
    (mean(&d), lo, hi)
}

/// The standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9).
#[allow(clippy::excessive_precision)]
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.383577518672690e+02,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-03,
        3.224671290700398e-01,
        2.445134137142996e+00,
        3.754408661907416e+00,
    ];
    let pl = 0.02425;
    if p < pl {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - pl {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// Wilson score interval for `k` successes in `n` trials at level `ci`.
pub fn wilson(k: usize, n: usize, ci: f64) -> (f64, f64) {
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let z = normal_quantile(1.0 - (1.0 - ci) / 2.0);
    let (n, p) = (n as f64, k as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// The paired delta of one bin, as transition detection sees it.
#[derive(Debug, Clone, Copy)]
pub struct BinDelta {
    pub n: usize,
    pub lo: f64,
    pub hi: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// `detected`, `not_detected` or `insufficient_data`.
    pub status: String,
    pub first_failing_bin: Option<i64>,
    pub last_safe_bin: Option<i64>,
    /// The zone (tokens) where the budget stops being safe: (zone_lo, zone_hi].
    pub zone_lo_tokens: Option<i64>,
    pub zone_hi_tokens: Option<i64>,
    /// Mean width of the paired-delta CIs over bins with data: high = unstable.
    pub instability: Option<f64>,
    pub bins_with_data: i64,
}

/// Minimum examples in a bin for its delta to count.
pub const MIN_N: usize = 3;

/// Finds the first bin whose paired-delta CI lies entirely below −`delta`.
/// `bins[i]` is `None` when bin i has no paired data; `edges` has one more
/// element than `bins`.
pub fn detect_transition(bins: &[Option<BinDelta>], edges: &[i64], delta: f64) -> Transition {
    let usable: Vec<(usize, BinDelta)> = bins
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            b.filter(|b| b.n >= MIN_N && b.lo.is_finite())
                .map(|b| (i, b))
        })
        .collect();
    let instability = (!usable.is_empty())
        .then(|| usable.iter().map(|(_, b)| b.hi - b.lo).sum::<f64>() / usable.len() as f64);
    let mut t = Transition {
        status: "insufficient_data".into(),
        first_failing_bin: None,
        last_safe_bin: None,
        zone_lo_tokens: None,
        zone_hi_tokens: None,
        instability,
        bins_with_data: usable.len() as i64,
    };
    if usable.len() < 2 {
        return t;
    }
    let Some(&(f, _)) = usable.iter().find(|(_, b)| b.hi < -delta) else {
        t.status = "not_detected".into();
        return t;
    };
    t.status = "detected".into();
    t.first_failing_bin = Some(f as i64);
    let safe = usable
        .iter()
        .filter(|(i, b)| *i < f && b.lo > -delta)
        .map(|(i, _)| *i)
        .next_back();
    t.last_safe_bin = safe.map(|s| s as i64);
    t.zone_lo_tokens = Some(match safe {
        Some(s) => edges[s + 1],
        None => edges[0],
    });
    t.zone_hi_tokens = Some(edges[f + 1]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert!((percentile(&v, 0.5) - 2.5).abs() < 1e-12);
        // numpy.percentile([1,2,3,4], 25) == 1.75
        assert!((percentile(&v, 0.25) - 1.75).abs() < 1e-12);
    }

    #[test]
    fn wilson_against_hand_computed_values() {
        // k=5, n=10, z=1.959964: centre 0.5, half-width 0.263414 (worked by hand).
        let (lo, hi) = wilson(5, 10, 0.95);
        assert!(
            (lo - 0.236593).abs() < 1e-5 && (hi - 0.763407).abs() < 1e-5,
            "{lo} {hi}"
        );
        // k=0, n=10: upper bound z²/(n+z²) = 3.841459/13.841459 = 0.277533.
        let (lo, hi) = wilson(0, 10, 0.95);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.277533).abs() < 1e-5);
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-6);
        assert!((normal_quantile(0.005) + 2.575829).abs() < 1e-6);
    }

    #[test]
    fn bootstrap_is_seeded_and_matches_the_normal_approximation() {
        // 100 Bernoulli values with p = 0.5: the CI of the mean should be about
        // 0.5 ± 1.96·sqrt(0.25/100) = 0.5 ± 0.098.
        let v: Vec<f64> = (0..100).map(|i| (i % 2) as f64).collect();
        let (lo, hi) = bootstrap_ci(&v, 20000, 0.95, &mut SplitMix64::new(1));
        assert!(
            (lo - 0.402).abs() < 0.015 && (hi - 0.598).abs() < 0.015,
            "{lo} {hi}"
        );
        let again = bootstrap_ci(&v, 20000, 0.95, &mut SplitMix64::new(1));
        assert_eq!((lo, hi), again);
        // Constant data: a zero-width interval at the constant.
        let (lo, hi) = bootstrap_ci(&[0.7; 9], 100, 0.95, &mut SplitMix64::new(2));
        assert!((lo - 0.7).abs() < 1e-12 && (hi - 0.7).abs() < 1e-12);
        // Two values: means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4.
        let m = bootstrap_means(&[0.0, 1.0], 40000, &mut SplitMix64::new(3));
        let half = m.iter().filter(|&&x| x == 0.5).count() as f64 / m.len() as f64;
        assert!((half - 0.5).abs() < 0.01, "{half}");
    }

    #[test]
    fn paired_resampling_cancels_shared_example_difficulty() {
        // b is a plus a constant 0.1: every paired resample gives exactly 0.1,
        // though a and b vary a lot across examples.
        let a: Vec<f64> = (0..50).map(|i| (i % 7) as f64 / 7.0).collect();
        let b: Vec<f64> = a.iter().map(|x| x + 0.1).collect();
        let (d, lo, hi) = paired_delta_ci(&a, &b, 1000, 0.95, &mut SplitMix64::new(4));
        assert!((d - 0.1).abs() < 1e-12 && (lo - 0.1).abs() < 1e-12 && (hi - 0.1).abs() < 1e-12);
    }

    fn bd(lo: f64, hi: f64) -> Option<BinDelta> {
        Some(BinDelta { n: 10, lo, hi })
    }

    #[test]
    fn transition_found_in_the_right_bin() {
        let edges = [0, 100, 200, 300, 400];
        let bins = [
            bd(-0.05, 0.02),
            bd(-0.08, 0.0),
            bd(-0.6, -0.3),
            bd(-0.9, -0.5),
        ];
        let t = detect_transition(&bins, &edges, 0.1);
        assert_eq!(t.status, "detected");
        assert_eq!(t.first_failing_bin, Some(2));
        assert_eq!(t.last_safe_bin, Some(1));
        assert_eq!((t.zone_lo_tokens, t.zone_hi_tokens), (Some(200), Some(300)));
        let w = (0.07 + 0.08 + 0.3 + 0.4) / 4.0;
        assert!((t.instability.unwrap() - w).abs() < 1e-12);
    }

    #[test]
    fn no_drop_is_not_detected_and_little_data_is_insufficient() {
        let edges = [0, 100, 200, 300];
        let t = detect_transition(
            &[bd(-0.05, 0.0), bd(-0.15, 0.05), bd(-0.2, 0.0)],
            &edges,
            0.1,
        );
        assert_eq!(t.status, "not_detected");
        assert_eq!(t.first_failing_bin, None);
        let t = detect_transition(&[bd(-0.9, -0.5), None, None], &edges, 0.1);
        assert_eq!(t.status, "insufficient_data");
        let few = Some(BinDelta {
            n: 2,
            lo: -1.0,
            hi: -0.9,
        });
        let t = detect_transition(&[few, few, few], &edges, 0.1);
        assert_eq!(
            (t.status.as_str(), t.bins_with_data),
            ("insufficient_data", 0)
        );
        // A drop already in the first bin: no safe bin, zone starts at the first edge.
        let t = detect_transition(&[bd(-0.9, -0.5), bd(-0.9, -0.5), None], &edges, 0.1);
        assert_eq!(
            (t.last_safe_bin, t.zone_lo_tokens, t.zone_hi_tokens),
            (None, Some(0), Some(100))
        );
    }
}
