//! Statistics: seeded percentile bootstrap (and its paired form for deltas
//! between budgets), Wilson intervals for failure rates, percentiles, and
//! transition detection. The generator is kvt's SplitMix64, seeded per cell
//! from the config seed and the cell's label, so a seed gives the same
//! intervals forever and on any number of threads.

pub mod selective;
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
    resample_means(values, iters, rng)
}

/// The resampling loop for any summable value: integers for right/wrong
/// differences, floats otherwise; the same draws either way. Each
/// resample's sum goes to `sink`.
fn resample_sums<T>(values: &[T], iters: usize, rng: &mut SplitMix64, mut sink: impl FnMut(T))
where
    T: Copy + Default + std::ops::AddAssign + std::ops::Add<Output = T>,
{
    let n = values.len();
    if n == 0 {
        return;
    }
    let nn = n as u64;
    let idx = |r: u64| ((r * nn) >> 32) as usize;
    for _ in 0..iters {
        // Two indices per 64-bit draw (Lemire's multiply-shift on 32-bit
        // halves), four partial sums so the additions do not wait on each other.
        let mut acc = [T::default(); 4];
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
        sink((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
}

fn resample_means(values: &[f64], iters: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let mut out = Vec::with_capacity(iters);
    let n = values.len() as f64;
    resample_sums(values, iters, rng, |s| out.push(s / n));
    out
}

/// `percentile` of unsorted values, by selection instead of a full sort
/// (the same value).
fn select_percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let (_, x, right) = v.select_nth_unstable_by(lo, f64::total_cmp);
    let x_lo = *x;
    let x_hi = if hi == lo {
        x_lo
    } else {
        right.iter().copied().fold(f64::INFINITY, f64::min)
    };
    x_lo + (x_hi - x_lo) * (pos - lo as f64)
}

/// The percentile interval at level `ci` of unsorted resample means.
fn percentile_ci(means: &mut [f64], ci: f64) -> (f64, f64) {
    let a = (1.0 - ci) / 2.0;
    (
        select_percentile(means, a),
        select_percentile(means, 1.0 - a),
    )
}

/// The percentile interval of resample means `sum / n` whose integer sums
/// were counted in `hist` (`hist[k]` resamples summed to `k + offset`): the
/// same values as sorting the means, in time linear in the buckets.
fn histogram_ci(hist: &[u32], offset: i64, n: usize, ci: f64) -> (f64, f64) {
    let total: u64 = hist.iter().map(|&c| c as u64).sum();
    if total == 0 {
        return (f64::NAN, f64::NAN);
    }
    // The k-th smallest mean (0-based).
    let kth = |k: u64| -> f64 {
        let mut seen = 0u64;
        for (b, &c) in hist.iter().enumerate() {
            seen += c as u64;
            if seen > k {
                return (b as i64 + offset) as f64 / n as f64;
            }
        }
        f64::NAN
    };
    let at = |q: f64| {
        let pos = q.clamp(0.0, 1.0) * (total - 1) as f64;
        let (lo, hi) = (pos.floor() as u64, pos.ceil() as u64);
        let (x_lo, x_hi) = (kth(lo), kth(hi));
        x_lo + (x_hi - x_lo) * (pos - lo as f64)
    };
    let a = (1.0 - ci) / 2.0;
    (at(a), at(1.0 - a))
}

/// Percentile bootstrap CI of the mean at level `ci` (e.g. 0.95).
pub fn bootstrap_ci(values: &[f64], iters: usize, ci: f64, rng: &mut SplitMix64) -> (f64, f64) {
    let mut m = bootstrap_means(values, iters, rng);
    if m.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    percentile_ci(&mut m, ci)
}

/// Paired bootstrap CI of mean(b − a): examples are resampled, and each
/// resampled example contributes both of its scores.
/// A mean's interval: Wilson for right/wrong scores (the percentile
/// bootstrap collapses to a point at 0 % and 100 %), else a percentile
/// bootstrap drawn from `rng`.
pub fn mean_ci(values: &[f64], iters: usize, ci: f64, rng: &mut SplitMix64) -> (f64, f64) {
    let binary = !values.is_empty() && values.iter().all(|&v| v == 0.0 || v == 1.0);
    if binary {
        wilson(
            values.iter().filter(|&&v| v == 1.0).count(),
            values.len(),
            ci,
        )
    } else {
        bootstrap_ci(values, iters, ci, rng)
    }
}

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

/// One-sided upper confidence bound (level `conf`) for a binomial proportion
/// with `k` successes in `n` trials (Clopper–Pearson: the `p` at which seeing
/// `k` or fewer has probability `1 − conf`). For scores in [0, 1] the summed
/// score, rounded up, stands in for `k`: the binomial is the most spread-out
/// distribution on [0, 1] with a given mean, so the bound stays conservative.
pub fn clopper_pearson_upper(k: f64, n: usize, conf: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let k = (k - 1e-9).ceil().max(0.0) as usize;
    if k >= n {
        return 1.0;
    }
    let alpha = 1.0 - conf;
    // P(X ≤ k) falls as p grows: bisect for P(X ≤ k) = alpha. For p at or
    // above k/n (the whole search) the pmf rises up to i = k, so the sum is
    // the last term times 1 + the ratios of the earlier ones to it, each at
    // most 1: one exp and two logs per evaluation.
    let ln_choose: f64 = (0..k).map(|i| ((n - i) as f64 / (i + 1) as f64).ln()).sum();
    let cdf = |p: f64| -> f64 {
        let q = 1.0 - p;
        let log_last = ln_choose + k as f64 * p.ln() + (n - k) as f64 * q.ln();
        let r = q / p;
        let (mut t, mut sum) = (1.0, 1.0);
        for i in (1..=k).rev() {
            t *= i as f64 / (n - i + 1) as f64 * r;
            sum += t;
        }
        (log_last + sum.ln()).exp()
    };
    let (mut lo, mut hi) = (k as f64 / n as f64, 1.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// One-sided lower confidence bound (level `conf`) for a binomial proportion
/// with `k` successes in `n` trials (Clopper–Pearson). For scores in [0, 1]
/// the summed score, rounded down, stands in for `k` (conservative, as for
/// [`clopper_pearson_upper`]).
pub fn clopper_pearson_lower(k: f64, n: usize, conf: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let k = (k + 1e-9).floor().clamp(0.0, n as f64);
    1.0 - clopper_pearson_upper(n as f64 - k, n, conf)
}

/// A one-sided lower bound (level `conf`) on the mean *net* loss of paired
/// scores in [0, 1], per example `ref − cell`: the lower bound of the mean
/// loss (`max(0, ref − cell)`) less the upper bound of the mean gain
/// (`max(0, cell − ref)`), each at level `1 − (1 − conf)/2` (Bonferroni), so
/// the difference holds at `conf`. Exact for right/wrong scores, conservative
/// for graded ones; it never collapses to a point at small n as a percentile
/// bootstrap does (3 losses of 3 give a bound below 0).
pub fn net_loss_lower(losses: f64, gains: f64, n: usize, conf: f64) -> f64 {
    if n == 0 {
        return f64::NEG_INFINITY;
    }
    let each = 1.0 - (1.0 - conf) / 2.0;
    clopper_pearson_lower(losses, n, each) - clopper_pearson_upper(gains, n, each)
}

/// What a budget shows in one length bin, compared with the full cache on the
/// same examples.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BinEvidence {
    /// Paired examples (answered by both cells).
    pub n: usize,
    /// Paired-bootstrap CI of the delta (cell − reference).
    pub lo: f64,
    pub hi: f64,
    /// One-sided upper bound on the mean loss: per example `max(0, ref − cell)`.
    pub loss_ub: f64,
    /// The observed mean loss.
    pub loss: f64,
    /// One-sided lower bound on the mean net loss (`ref − cell`, gains
    /// offsetting losses): a bin fails only when it lies above δ.
    pub net_loss_lb: f64,
    /// The observed mean gain (per example `max(0, cell − ref)`).
    pub gain: f64,
    /// The full cache's mean in this bin.
    pub reference_mean: f64,
}

/// The verdict for one cell in one bin, as the tables, the SQLite file and
/// the report carry it (serialized as its snake-case name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinVerdict {
    /// The full cache itself: what every cell is compared with.
    Reference,
    /// The full cache itself scores below the floor: nothing to lose.
    Uninformative,
    /// The net loss's lower bound lies above δ (as strong as "safe").
    Fails,
    /// The loss's upper bound is below δ: evidence that at most δ is lost.
    Safe,
    /// Neither: more examples would settle it.
    #[default]
    Insufficient,
    /// The engine gave nothing to judge (a fidelity metric without
    /// log-probabilities).
    Unavailable,
}

impl BinVerdict {
    pub fn name(self) -> &'static str {
        match self {
            BinVerdict::Reference => "reference",
            BinVerdict::Uninformative => "uninformative",
            BinVerdict::Fails => "fails",
            BinVerdict::Safe => "safe",
            BinVerdict::Insufficient => "insufficient",
            BinVerdict::Unavailable => "unavailable",
        }
    }
    /// Safe or fails: the evidence settled it.
    pub fn decided(self) -> bool {
        matches!(self, BinVerdict::Safe | BinVerdict::Fails)
    }
}

/// Minimum paired examples in a bin for any verdict but `insufficient`.
pub const MIN_N: usize = 3;

/// Evidence for one bin from paired scores (`a` reference, `b` cell).
/// One set of bootstrap resamples of `n` examples, shared by every cell of a
/// length bin: the paired design resamples examples, and the same examples
/// sit in every cell of the bin, so every cell sees the same draws. The
/// indices are regenerated from the bin's generator rather than stored:
/// drawing them (SplitMix64, two per 64-bit draw) is cheaper than reading
/// millions of stored indices back from memory.
pub struct SharedResamples {
    pub n: usize,
    iters: usize,
    rng: SplitMix64,
}

impl SharedResamples {
    pub fn draw(n: usize, iters: usize, rng: &SplitMix64) -> Self {
        SharedResamples {
            n,
            iters,
            rng: rng.clone(),
        }
    }

    /// Generator draws one resample of `n` takes in `resample_sums`: two
    /// per four indices, one per index left over.
    fn draws_per_iter(&self) -> u64 {
        (self.n / 4 * 2 + self.n % 4) as u64
    }

    /// Runs `f(rng, iters)` over consecutive ranges of the resamples, one
    /// per core, each generator moved ahead to its range's first draw: the
    /// same draws as one pass, in order. Small jobs run as one part.
    fn in_parts<T: Send>(&self, f: impl Fn(SplitMix64, usize) -> T + Sync) -> Vec<T> {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let parts = if self.n * self.iters < 1 << 18 {
            1
        } else {
            cores.min(self.iters).max(1)
        };
        let range = |p: usize| (self.iters * p / parts, self.iters * (p + 1) / parts);
        let start = |p: usize| {
            let mut rng = self.rng.clone();
            rng.skip(range(p).0 as u64 * self.draws_per_iter());
            rng
        };
        // Part 0 runs here; with one part nothing is spawned.
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = (1..parts)
                .map(|p| {
                    let (a, b) = range(p);
                    let rng = start(p);
                    s.spawn(move || f(rng, b - a))
                })
                .collect();
            let mut out = vec![f(start(0), range(0).1)];
            out.extend(hs.into_iter().map(|h| h.join().expect("bootstrap part")));
            out
        })
    }

    /// Percentile CI of the mean of `d` over these resamples. Values that
    /// are all −1, 0 or 1 (paired differences of right/wrong scores) are
    /// summed as integers, with the same draws and the same result.
    pub fn mean_ci(&self, d: &[f64], ci: f64) -> (f64, f64) {
        assert_eq!(d.len(), self.n, "resamples drawn for another sample size");
        let counts = d.iter().all(|&x| x == 0.0 || x == 1.0 || x == -1.0);
        if counts {
            let n = d.len();
            // Every resample of a constant sample has that mean exactly
            // (the full cache against itself): nothing to draw.
            if n > 0 && d.iter().all(|&x| x == d[0]) {
                return (d[0], d[0]);
            }
            // Sums lie in [-n, n]: counted into buckets, never sorted.
            let small: Vec<i32> = d.iter().map(|&x| x as i32).collect();
            let hist = sum_hists(self.in_parts(|mut rng, iters| {
                let mut hist = vec![0u32; 2 * n + 1];
                resample_sums(&small, iters, &mut rng, |s| {
                    hist[(s + n as i32) as usize] += 1
                });
                vec![hist]
            }));
            return histogram_ci(&hist[0], -(n as i64), n, ci);
        }
        let mut means: Vec<f64> = self
            .in_parts(|mut rng, iters| bootstrap_means(d, iters, &mut rng))
            .concat();
        if means.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        percentile_ci(&mut means, ci)
    }
}

/// Histograms of several parts, added bucket by bucket.
fn sum_hists(parts: Vec<Vec<Vec<u32>>>) -> Vec<Vec<u32>> {
    let mut it = parts.into_iter();
    let mut total = it.next().unwrap_or_default();
    for part in it {
        for (t, h) in total.iter_mut().zip(part) {
            for (a, b) in t.iter_mut().zip(h) {
                *a += b;
            }
        }
    }
    total
}

impl SharedResamples {
    /// [`SharedResamples::mean_ci`] of several samples at once (the cells
    /// of one bin). Right/wrong differences are resampled in one pass: each
    /// drawn index adds that example's value to every cell's sum, so the
    /// draws are made once for the bin instead of once per cell. The same
    /// draws, the same sums, the same intervals as one cell at a time.
    pub fn mean_cis(&self, ds: &[&[f64]], ci: f64) -> Vec<(f64, f64)> {
        let n = self.n;
        let mut out: Vec<Option<(f64, f64)>> = vec![None; ds.len()];
        let mut fused: Vec<usize> = Vec::new();
        for (i, d) in ds.iter().enumerate() {
            let counts = d.iter().all(|&x| x == 0.0 || x == 1.0 || x == -1.0);
            let constant = !d.is_empty() && d.iter().all(|&x| x == d[0]);
            if counts && !constant && d.len() == n {
                fused.push(i);
            } else {
                out[i] = Some(self.mean_ci(d, ci));
            }
        }
        // Eight cells per pass: one drawn index adds a row of eight values
        // (one or two vector additions).
        const LANES: usize = 8;
        for group in fused.chunks(LANES) {
            let mut table = vec![[0i32; LANES]; n];
            for (c, &i) in group.iter().enumerate() {
                for (row, &x) in table.iter_mut().zip(ds[i]) {
                    row[c] = x as i32;
                }
            }
            let nn = n as u64;
            let idx = |r: u64| ((r * nn) >> 32) as usize;
            let add = |acc: &mut [i32; LANES], row: &[i32; LANES]| {
                for c in 0..LANES {
                    acc[c] += row[c];
                }
            };
            let table = &table;
            let hists = sum_hists(self.in_parts(|mut rng, iters| {
                let mut hists = vec![vec![0u32; 2 * n + 1]; group.len()];
                for _ in 0..iters {
                    let mut acc = [0i32; LANES];
                    // The index sequence of `resample_sums`.
                    let mut i = 0;
                    while i + 4 <= n {
                        let (r1, r2) = (rng.next_u64(), rng.next_u64());
                        add(&mut acc, &table[idx(r1 & 0xFFFF_FFFF)]);
                        add(&mut acc, &table[idx(r1 >> 32)]);
                        add(&mut acc, &table[idx(r2 & 0xFFFF_FFFF)]);
                        add(&mut acc, &table[idx(r2 >> 32)]);
                        i += 4;
                    }
                    while i < n {
                        add(&mut acc, &table[idx(rng.next_u64() & 0xFFFF_FFFF)]);
                        i += 1;
                    }
                    for (h, &a) in hists.iter_mut().zip(&acc) {
                        h[(a + n as i32) as usize] += 1;
                    }
                }
                hists
            }));
            for (c, &i) in group.iter().enumerate() {
                out[i] = Some(histogram_ci(&hists[c], -(n as i64), n, ci));
            }
        }
        out.into_iter()
            .map(|x| x.unwrap_or((f64::NAN, f64::NAN)))
            .collect()
    }
}

/// A bin's evidence from paired scores whose delta interval is already
/// known (from [`SharedResamples::mean_cis`]).
pub fn bin_evidence_with(a: &[f64], b: &[f64], ci: f64, delta_ci: (f64, f64)) -> BinEvidence {
    evidence(a, b, ci, |_| delta_ci)
}

/// [`bin_evidence`] with the bin's shared resamples (`a` and `b` aligned
/// with the examples they were drawn for).
pub fn bin_evidence_shared(a: &[f64], b: &[f64], res: &SharedResamples, ci: f64) -> BinEvidence {
    evidence(a, b, ci, |d| res.mean_ci(d, ci))
}

pub fn bin_evidence(
    a: &[f64],
    b: &[f64],
    iters: usize,
    ci: f64,
    rng: &mut SplitMix64,
) -> BinEvidence {
    evidence(a, b, ci, |d| bootstrap_ci(d, iters, ci, rng))
}

/// A bin's evidence from paired scores, with `delta_ci` giving the CI of the
/// mean of the differences b − a.
fn evidence(
    a: &[f64],
    b: &[f64],
    ci: f64,
    delta_ci: impl FnOnce(&[f64]) -> (f64, f64),
) -> BinEvidence {
    let n = a.len();
    if n == 0 {
        return BinEvidence {
            lo: f64::NAN,
            hi: f64::NAN,
            loss_ub: 1.0,
            loss: f64::NAN,
            net_loss_lb: f64::NEG_INFINITY,
            gain: f64::NAN,
            reference_mean: f64::NAN,
            ..Default::default()
        };
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let (lo, hi) = delta_ci(&d);
    let losses: f64 = a.iter().zip(b).map(|(x, y)| (x - y).max(0.0)).sum();
    let gains: f64 = a.iter().zip(b).map(|(x, y)| (y - x).max(0.0)).sum();
    let conf = 1.0 - (1.0 - ci) / 2.0;
    BinEvidence {
        n,
        lo,
        hi,
        loss_ub: clopper_pearson_upper(losses, n, conf),
        loss: losses / n as f64,
        net_loss_lb: net_loss_lower(losses, gains, n, conf),
        gain: gains / n as f64,
        reference_mean: mean(a),
    }
}

/// Judges one bin: uninformative when the full cache scores below `floor`
/// (from any number of examples);
/// fails when the net loss's lower bound lies above `delta`; safe only when
/// the loss's upper bound lies below `delta` (both one-sided bounds at the
/// same level); otherwise insufficient. The bootstrap CI of the delta is
/// shown, never decided on: at small n it collapses to a point.
pub fn verdict(e: &BinEvidence, delta: f64, floor: f64) -> BinVerdict {
    // A full cache at the floor says so from any number of examples, as the
    // report's warning does: the marks and the warning agree.
    if e.n > 0 && e.reference_mean < floor {
        return BinVerdict::Uninformative;
    }
    if e.n < MIN_N {
        return BinVerdict::Insufficient;
    }
    if e.net_loss_lb > delta {
        return BinVerdict::Fails;
    }
    if e.loss_ub < delta {
        return BinVerdict::Safe;
    }
    BinVerdict::Insufficient
}

/// The smallest n from [`MIN_N`] at which `ok` holds, for an `ok` that stays
/// true once it holds (doubling, then bisection); None past 2^20.
fn smallest_n(ok: impl Fn(usize) -> bool) -> Option<usize> {
    let mut hi = MIN_N;
    while !ok(hi) {
        hi *= 2;
        if hi > 1 << 20 {
            return None;
        }
    }
    let mut lo = hi / 2;
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if ok(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// The paired examples per bin that would show a bin failing at these loss
/// and gain rates (the smallest n whose net-loss bound rises above `delta`),
/// if any would.
pub fn n_to_show_fails(loss: f64, gain: f64, delta: f64, ci: f64) -> Option<usize> {
    if !(loss.is_finite() && gain.is_finite() && loss - gain > delta) {
        return None;
    }
    let conf = 1.0 - (1.0 - ci) / 2.0;
    let ok = |n: usize| net_loss_lower(loss * n as f64, gain * n as f64, n, conf) > delta;
    smallest_n(ok)
}

/// The paired examples per bin that would show a bin safe at this loss rate
/// (the smallest n whose loss bound falls below `delta`), if any would.
pub fn n_to_show_safe(loss: f64, delta: f64, ci: f64) -> Option<usize> {
    if !(loss.is_finite() && loss < delta) {
        return None;
    }
    let conf = 1.0 - (1.0 - ci) / 2.0;
    let ok = |n: usize| clopper_pearson_upper(loss * n as f64, n, conf) < delta;
    smallest_n(ok)
}

/// A budget's outcome over its length bins, as the tables, the SQLite file
/// and the report carry it (serialized as its snake-case name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionStatus {
    /// The full cache itself.
    Reference,
    /// The full cache scores below the floor in every bin with data.
    Uninformative,
    /// Shown safe in every bin.
    Safe,
    /// Some bin is undecided and none fails.
    #[default]
    InsufficientData,
    /// Every informative bin fails.
    FailsEveryLength,
    /// The shortest informative bin fails already.
    FailsFromShortest,
    /// A bin shown safe, then a failing one: the transition zone.
    Transition,
    /// A failing bin with no bin before it shown safe.
    FailsAfterUnclear,
}

impl TransitionStatus {
    /// The name the tables and the SQLite file store.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Uninformative => "uninformative",
            Self::Safe => "safe",
            Self::InsufficientData => "insufficient_data",
            Self::FailsEveryLength => "fails_every_length",
            Self::FailsFromShortest => "fails_from_shortest",
            Self::Transition => "transition",
            Self::FailsAfterUnclear => "fails_after_unclear",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub status: TransitionStatus,
    pub first_failing_bin: Option<i64>,
    pub last_safe_bin: Option<i64>,
    /// The zone (tokens) where the budget stops being safe: (zone_lo, zone_hi].
    pub zone_lo_tokens: Option<i64>,
    pub zone_hi_tokens: Option<i64>,
    /// Mean width of the paired-delta CIs over bins with data: high = unstable.
    pub instability: Option<f64>,
    pub bins_with_data: i64,
    #[serde(default)]
    pub bins_uninformative: i64,
    /// Paired examples per bin that would settle the unsettled bins, when known.
    #[serde(default)]
    pub n_needed: Option<i64>,
}

/// Summarises a budget's bins (in length order) into one outcome; `edges` has
/// one more element than `bins`.
pub fn summarize(
    bins: &[BinEvidence],
    edges: &[i64],
    delta: f64,
    floor: f64,
    ci: f64,
) -> Transition {
    let verdicts: Vec<BinVerdict> = bins.iter().map(|e| verdict(e, delta, floor)).collect();
    let with_data: Vec<usize> = (0..bins.len()).filter(|&i| bins[i].n >= MIN_N).collect();
    let widths: Vec<f64> = with_data
        .iter()
        .filter(|&&i| bins[i].lo.is_finite())
        .map(|&i| bins[i].hi - bins[i].lo)
        .collect();
    let informative: Vec<usize> = with_data
        .iter()
        .copied()
        .filter(|&i| verdicts[i] != BinVerdict::Uninformative)
        .collect();
    let mut t = Transition {
        status: TransitionStatus::InsufficientData,
        first_failing_bin: None,
        last_safe_bin: None,
        zone_lo_tokens: None,
        zone_hi_tokens: None,
        instability: (!widths.is_empty()).then(|| mean(&widths)),
        bins_with_data: with_data.len() as i64,
        bins_uninformative: verdicts
            .iter()
            .filter(|v| **v == BinVerdict::Uninformative)
            .count() as i64,
        n_needed: None,
    };
    if informative.is_empty() && t.bins_uninformative > 0 {
        t.status = TransitionStatus::Uninformative;
        return t;
    }
    let unsettled: Vec<usize> = informative
        .iter()
        .copied()
        .filter(|&i| verdicts[i] == BinVerdict::Insufficient)
        .collect();
    t.n_needed = unsettled
        .iter()
        .map(|&i| {
            n_to_show_safe(bins[i].loss, delta, ci)
                .or_else(|| n_to_show_fails(bins[i].loss, bins[i].gain, delta, ci))
        })
        .collect::<Option<Vec<usize>>>()
        .and_then(|v| v.into_iter().max())
        .map(|n| n as i64);
    let Some(&f) = informative
        .iter()
        .find(|&&i| verdicts[i] == BinVerdict::Fails)
    else {
        if !informative.is_empty() && unsettled.is_empty() && with_data.len() == bins.len() {
            t.status = TransitionStatus::Safe;
        }
        return t;
    };
    t.first_failing_bin = Some(f as i64);
    t.zone_hi_tokens = Some(edges[f + 1]);
    if informative
        .iter()
        .all(|&i| verdicts[i] == BinVerdict::Fails)
    {
        t.status = TransitionStatus::FailsEveryLength;
        return t;
    }
    if informative.first() == Some(&f) {
        t.status = TransitionStatus::FailsFromShortest;
        return t;
    }
    let safe = informative
        .iter()
        .copied()
        .rfind(|&i| i < f && verdicts[i] == BinVerdict::Safe);
    match safe {
        Some(s) => {
            t.status = TransitionStatus::Transition;
            t.last_safe_bin = Some(s as i64);
            t.zone_lo_tokens = Some(edges[s + 1]);
        }
        None => t.status = TransitionStatus::FailsAfterUnclear,
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #30, item 4: the status was a string; as an enum it is stored
    /// under the same names (Parquet, SQLite, JSON), so tables written
    /// before read back and the SQLite sink's `status` column is unchanged.
    #[test]
    fn transition_statuses_keep_the_names_they_were_stored_under() {
        let all = [
            (TransitionStatus::Reference, "reference"),
            (TransitionStatus::Uninformative, "uninformative"),
            (TransitionStatus::Safe, "safe"),
            (TransitionStatus::InsufficientData, "insufficient_data"),
            (TransitionStatus::FailsEveryLength, "fails_every_length"),
            (TransitionStatus::FailsFromShortest, "fails_from_shortest"),
            (TransitionStatus::Transition, "transition"),
            (TransitionStatus::FailsAfterUnclear, "fails_after_unclear"),
        ];
        for (status, name) in all {
            assert_eq!(status.name(), name);
            assert_eq!(serde_json::to_value(status).unwrap(), name);
            let back: TransitionStatus = serde_json::from_value(name.into()).unwrap();
            assert_eq!(back, status);
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Row {
            status: TransitionStatus,
        }
        let rows: Vec<Row> = all
            .iter()
            .map(|(status, _)| Row { status: *status })
            .collect();
        let bytes = crate::table::write(&rows).unwrap();
        assert_eq!(
            crate::table::read_owned::<Row>(bytes.clone()).unwrap(),
            rows
        );
        // The column holds the names, as when the field was a string.
        #[derive(Deserialize)]
        struct Stored {
            status: String,
        }
        let stored: Vec<String> = crate::table::read_owned::<Stored>(bytes)
            .unwrap()
            .into_iter()
            .map(|r| r.status)
            .collect();
        let names: Vec<&str> = all.iter().map(|(_, n)| *n).collect();
        assert_eq!(stored, names);
    }

    #[test]
    fn shared_resamples_give_the_bootstrap_interval_and_count_as_integers() {
        let mut rng = SplitMix64::new(5);
        let d: Vec<f64> = (0..200)
            .map(|i| [0.0, -1.0, 0.0, 1.0, -1.0][i % 5])
            .collect();
        let res = SharedResamples::draw(d.len(), 4000, &SplitMix64::new(9));
        let (lo, hi) = res.mean_ci(&d, 0.95);
        let (blo, bhi) = bootstrap_ci(&d, 4000, 0.95, &mut rng);
        // The same interval up to Monte Carlo error (mean −0.2, sd of the mean ≈ 0.053).
        assert!(
            (lo - blo).abs() < 0.02 && (hi - bhi).abs() < 0.02,
            "{lo} {hi} vs {blo} {bhi}"
        );
        assert!(lo < -0.2 && hi > -0.2);
        // The integer path gives exactly what the float path gives on the same draws.
        let (flo, fhi) = bootstrap_ci(&d, 4000, 0.95, &mut SplitMix64::new(9));
        assert_eq!((lo, hi), (flo, fhi));
        // Every cell of a bin sees the same draws.
        assert_eq!(res.mean_ci(&d, 0.95), (lo, hi));
        // Paired evidence from shared resamples matches the per-cell one.
        let a: Vec<f64> = (0..200).map(|i| (i % 4 != 0) as u8 as f64).collect();
        let b: Vec<f64> = (0..200).map(|i| (i % 3 != 0) as u8 as f64).collect();
        let e1 = bin_evidence_shared(&a, &b, &res, 0.95);
        let e2 = bin_evidence(&a, &b, 4000, 0.95, &mut SplitMix64::new(3));
        assert_eq!((e1.n, e1.loss, e1.loss_ub), (e2.n, e2.loss, e2.loss_ub));
        assert!((e1.lo - e2.lo).abs() < 0.02 && (e1.hi - e2.hi).abs() < 0.02);
    }

    #[test]
    fn selection_and_bucket_counts_give_the_sorted_percentiles() {
        let mut rng = SplitMix64::new(11);
        for (len, ci) in [
            (1usize, 0.95),
            (2, 0.9),
            (7, 0.95),
            (1000, 0.95),
            (999, 0.5),
        ] {
            let v: Vec<f64> = (0..len).map(|_| rng.unit()).collect();
            let mut sorted = v.clone();
            sorted.sort_by(f64::total_cmp);
            let a = (1.0 - ci) / 2.0;
            let want = (percentile(&sorted, a), percentile(&sorted, 1.0 - a));
            assert_eq!(percentile_ci(&mut v.clone(), ci), want, "len {len}");
            // Integer sums of a sample of size n in [-n, n], as bucket counts.
            let n = 13usize;
            let sums: Vec<i64> = (0..len)
                .map(|_| (rng.next_u64() % (2 * n as u64 + 1)) as i64 - n as i64)
                .collect();
            let mut hist = vec![0u32; 2 * n + 1];
            for s in &sums {
                hist[(s + n as i64) as usize] += 1;
            }
            let mut means: Vec<f64> = sums.iter().map(|&s| s as f64 / n as f64).collect();
            means.sort_by(f64::total_cmp);
            assert_eq!(
                histogram_ci(&hist, -(n as i64), n, ci),
                (percentile(&means, a), percentile(&means, 1.0 - a)),
                "len {len}"
            );
        }
    }

    #[test]
    fn resamples_split_over_the_cores_are_the_draws_of_one_pass() {
        // 203 examples (three drawn one by one per resample) and 3001
        // resamples (an uneven split): big enough to run in parts.
        let mut rng = SplitMix64::new(17);
        let graded: Vec<f64> = (0..203).map(|_| rng.unit()).collect();
        let counts: Vec<f64> = (0..203).map(|i| [0.0, 1.0, -1.0, 1.0][i % 4]).collect();
        let res = SharedResamples::draw(203, 3001, &SplitMix64::new(4));
        for d in [&graded, &counts] {
            let one_pass = bootstrap_ci(d, 3001, 0.9, &mut SplitMix64::new(4));
            assert_eq!(res.mean_ci(d, 0.9), one_pass);
            assert_eq!(res.mean_cis(&[d, d], 0.9), vec![one_pass, one_pass]);
        }
        // Skipping ahead is drawing and discarding.
        let (mut a, mut b) = (SplitMix64::new(8), SplitMix64::new(8));
        a.skip(1000);
        (0..1000).for_each(|_| {
            b.next_u64();
        });
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn one_pass_over_a_bins_cells_gives_each_cells_own_interval() {
        let mut rng = SplitMix64::new(5);
        for n in [1usize, 3, 4, 9, 200] {
            let res = SharedResamples::draw(n, 500, &SplitMix64::new(n as u64));
            let draw = |rng: &mut SplitMix64, f: &dyn Fn(f64) -> f64| -> Vec<f64> {
                (0..n).map(|_| f(rng.unit())).collect()
            };
            let cells: Vec<Vec<f64>> = vec![
                draw(&mut rng, &|u| {
                    if u < 0.3 {
                        -1.0
                    } else if u < 0.9 {
                        0.0
                    } else {
                        1.0
                    }
                }),
                vec![0.0; n],
                draw(&mut rng, &|u| u - 0.5),
                draw(&mut rng, &|u| if u < 0.5 { -1.0 } else { 0.0 }),
                vec![1.0; n],
            ];
            let refs: Vec<&[f64]> = cells.iter().map(|c| c.as_slice()).collect();
            let one_by_one: Vec<(f64, f64)> = refs.iter().map(|d| res.mean_ci(d, 0.95)).collect();
            assert_eq!(res.mean_cis(&refs, 0.95), one_by_one, "n {n}");
        }
    }

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

    fn ev(lo: f64, hi: f64, loss: f64, loss_ub: f64) -> BinEvidence {
        BinEvidence {
            n: 40,
            lo,
            hi,
            loss,
            loss_ub,
            // What the bound would show for such a CI.
            net_loss_lb: -hi,
            gain: 0.0,
            reference_mean: 0.9,
        }
    }

    const SAFE: (f64, f64, f64, f64) = (-0.05, 0.02, 0.0, 0.05);
    const FAIL: (f64, f64, f64, f64) = (-0.6, -0.3, 0.45, 0.6);
    const UNSURE: (f64, f64, f64, f64) = (-0.2, 0.05, 0.05, 0.2);

    fn evs(v: &[(f64, f64, f64, f64)]) -> Vec<BinEvidence> {
        v.iter().map(|&(a, b, c, d)| ev(a, b, c, d)).collect()
    }

    #[test]
    fn a_real_zone_runs_from_the_last_safe_bin_to_the_first_failing_one() {
        let edges = [0, 100, 200, 300, 400];
        let t = summarize(&evs(&[SAFE, SAFE, FAIL, FAIL]), &edges, 0.1, 0.1, 0.95);
        assert_eq!(t.status, TransitionStatus::Transition);
        assert_eq!((t.last_safe_bin, t.first_failing_bin), (Some(1), Some(2)));
        assert_eq!((t.zone_lo_tokens, t.zone_hi_tokens), (Some(200), Some(300)));
    }

    #[test]
    fn a_loss_in_every_bin_is_length_independent_not_a_transition() {
        let edges = [0, 100, 200, 300];
        let t = summarize(&evs(&[FAIL, FAIL, FAIL]), &edges, 0.1, 0.1, 0.95);
        assert_eq!(t.status, TransitionStatus::FailsEveryLength);
        assert_eq!(t.zone_lo_tokens, None);
    }

    #[test]
    fn failing_from_the_shortest_bin_has_no_zone() {
        let edges = [0, 100, 200, 300];
        let t = summarize(&evs(&[FAIL, UNSURE, FAIL]), &edges, 0.1, 0.1, 0.95);
        assert_eq!(t.status, TransitionStatus::FailsFromShortest);
        assert_eq!((t.first_failing_bin, t.zone_lo_tokens), (Some(0), None));
        // A failing bin after bins never shown safe: no zone start either.
        let t = summarize(&evs(&[UNSURE, FAIL, FAIL]), &edges, 0.1, 0.1, 0.95);
        assert_eq!(t.status, TransitionStatus::FailsAfterUnclear);
        assert_eq!(t.zone_lo_tokens, None);
    }

    #[test]
    fn safe_needs_evidence_and_the_floor_makes_bins_uninformative() {
        let edges = [0, 100, 200];
        assert_eq!(
            summarize(&evs(&[SAFE, SAFE]), &edges, 0.1, 0.1, 0.95).status,
            TransitionStatus::Safe
        );
        let t = summarize(&evs(&[SAFE, UNSURE]), &edges, 0.1, 0.1, 0.95);
        assert_eq!(t.status, TransitionStatus::InsufficientData);
        assert!(t.n_needed.unwrap() > 40, "{t:?}");
        let mut floor = evs(&[SAFE, SAFE]);
        for e in &mut floor {
            e.reference_mean = 0.0;
        }
        let t = summarize(&floor, &edges, 0.1, 0.1, 0.95);
        assert_eq!(
            (t.status, t.bins_uninformative),
            (TransitionStatus::Uninformative, 2)
        );
        // Issue #29, item 6: two examples a bin, the full cache at 0 in both.
        // The report warns that no verdict is possible; the bins and the
        // outcome said "insufficient data" (fewer than MIN_N examples). Now
        // they say uninformative, as the warning does.
        let zero = [0.0, 0.0];
        let few = bin_evidence(&zero, &zero, 200, 0.95, &mut SplitMix64::new(1));
        assert!(few.n < MIN_N);
        assert_eq!(verdict(&few, 0.1, 0.1), BinVerdict::Uninformative);
        let t = summarize(&[few, few], &edges, 0.1, 0.1, 0.95);
        assert_eq!(
            (t.status, t.bins_uninformative),
            (TransitionStatus::Uninformative, 2)
        );
    }

    #[test]
    fn four_of_four_right_is_not_evidence_of_safety() {
        // All right in both cells: the bootstrap CI is [0, 0], but a true loss of
        // 0.3 gives 4 of 4 right a quarter of the time.
        let a = [1.0; 4];
        let e = bin_evidence(&a, &a, 1000, 0.95, &mut SplitMix64::new(1));
        assert_eq!((e.lo, e.hi), (0.0, 0.0));
        assert_eq!(verdict(&e, 0.1, 0.1), BinVerdict::Insufficient);
        // Zero losses out of n: safe from n = 36 on (1 − 0.025^(1/n) < 0.1).
        assert_eq!(n_to_show_safe(0.0, 0.1, 0.95), Some(36));
        let a40 = [1.0; 40];
        let e = bin_evidence(&a40, &a40, 1000, 0.95, &mut SplitMix64::new(1));
        assert_eq!(verdict(&e, 0.1, 0.1), BinVerdict::Safe);
    }

    #[test]
    fn clopper_pearson_by_hand() {
        // 0 of n: 1 − (1 − conf)^(1/n).
        let u = clopper_pearson_upper(0.0, 10, 0.975);
        assert!((u - (1.0 - 0.025f64.powf(0.1))).abs() < 1e-9, "{u}");
        // n of n: 1.
        assert_eq!(clopper_pearson_upper(5.0, 5, 0.975), 1.0);
        // 1 of 10 at 97.5 %: 0.4450 (tables).
        assert!((clopper_pearson_upper(1.0, 10, 0.975) - 0.4450).abs() < 1e-3);
        // At the bound, P(X ≤ k) is 1 − conf, summed term by term here.
        for (k, n) in [
            (0usize, 1usize),
            (3, 7),
            (12, 40),
            (57, 200),
            (199, 200),
            (300, 3000),
        ] {
            let u = clopper_pearson_upper(k as f64, n, 0.975);
            let mut pmf = (n as f64) * (1.0 - u).ln();
            let mut cdf = pmf.exp();
            for i in 0..k {
                pmf += ((n - i) as f64 / (i + 1) as f64).ln() + u.ln() - (1.0 - u).ln();
                cdf += pmf.exp();
            }
            assert!(
                (cdf - 0.025).abs() < 1e-9,
                "{k} of {n}: bound {u}, cdf {cdf}"
            );
        }
    }

    /// Exact coverage of the Wilson interval: the probability, over Binomial(n, p),
    /// that the interval holds p.
    fn wilson_coverage(n: usize, p: f64, ci: f64) -> f64 {
        let mut log_pmf = n as f64 * (1.0 - p).ln();
        let mut cov = 0.0;
        for k in 0..=n {
            if k > 0 {
                log_pmf += ((n - k + 1) as f64 / k as f64).ln() + p.ln() - (1.0 - p).ln();
            }
            let (lo, hi) = wilson(k, n, ci);
            if lo <= p && p <= hi {
                cov += log_pmf.exp();
            }
        }
        cov
    }

    /// Simulated paired bins: the reference is right with probability `p`; the
    /// cell loses a right answer with probability `q` and, independently, keeps
    /// or flips nothing else. Returns (P(fails), P(safe)) for one bin.
    fn rule_rates(n: usize, p: f64, q: f64, runs: usize, seed: u64) -> (f64, f64) {
        let mut rng = SplitMix64::new(seed);
        let unit = |r: &mut SplitMix64| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (mut fails, mut safe) = (0, 0);
        for _ in 0..runs {
            let a: Vec<f64> = (0..n).map(|_| f64::from(unit(&mut rng) < p)).collect();
            let b: Vec<f64> = a
                .iter()
                .map(|&x| {
                    if x == 1.0 && unit(&mut rng) < q {
                        0.0
                    } else {
                        x
                    }
                })
                .collect();
            let e = bin_evidence(&a, &b, 400, 0.95, &mut rng);
            match verdict(&e, 0.1, 0.1) {
                BinVerdict::Fails => fails += 1,
                BinVerdict::Safe => safe += 1,
                _ => {}
            }
        }
        (fails as f64 / runs as f64, safe as f64 / runs as f64)
    }

    /// Exact P(fails) for right/wrong scores when each example is, independently,
    /// a loss (full right, cell wrong) with probability `pl` and a gain with
    /// probability `pg`: the sum over every (losses, gains) outcome.
    fn exact_fail_rate(n: usize, pl: f64, pg: f64, delta: f64) -> f64 {
        let ln_fact: Vec<f64> = (0..=n)
            .scan(0.0, |acc, i| {
                if i > 0 {
                    *acc += (i as f64).ln();
                }
                Some(*acc)
            })
            .collect();
        let pt = 1.0 - pl - pg;
        let mut p = 0.0;
        for b in 0..=n {
            for c in 0..=(n - b) {
                if net_loss_lower(b as f64, c as f64, n, 0.975) <= delta {
                    continue;
                }
                let t = n - b - c;
                let mut lp = ln_fact[n] - ln_fact[b] - ln_fact[c] - ln_fact[t];
                for (k, q) in [(b, pl), (c, pg), (t, pt)] {
                    if k > 0 {
                        lp += k as f64 * q.ln();
                    }
                }
                p += lp.exp();
            }
        }
        p
    }

    #[test]
    fn fails_needs_a_bound_as_strong_as_safe() {
        // 3 losses of 3: the bootstrap CI is the point −1, but an exact test on
        // 3 discordant pairs gives p = 0.25; the bound stays below δ.
        let (a, b) = ([1.0; 3], [0.0; 3]);
        let e = bin_evidence(&a, &b, 1000, 0.95, &mut SplitMix64::new(1));
        assert_eq!((e.lo, e.hi), (-1.0, -1.0));
        assert!(e.net_loss_lb < 0.1, "{e:?}");
        assert_eq!(verdict(&e, 0.1, 0.1), BinVerdict::Insufficient);
        // All losses: "fails" from 8 examples (2·0.0125^(1/n) − 1 > 0.1).
        let first = (3..40)
            .find(|&n| {
                let e = bin_evidence(
                    &vec![1.0; n],
                    &vec![0.0; n],
                    200,
                    0.95,
                    &mut SplitMix64::new(1),
                );
                verdict(&e, 0.1, 0.1) == BinVerdict::Fails
            })
            .unwrap();
        assert_eq!(first, 8);
        assert_eq!(n_to_show_fails(1.0, 0.0, 0.1, 0.95), Some(8));
        // 5 losses of 6 would fail from 12 examples at the same rate.
        let n = n_to_show_fails(5.0 / 6.0, 0.0, 0.1, 0.95).unwrap();
        assert!((7..=40).contains(&n), "{n}");
        assert_eq!(n_to_show_fails(0.1, 0.0, 0.1, 0.95), None);
        // Gains offset losses: 10 losses and 10 gains of 40 is no net loss.
        let a: Vec<f64> = (0..40).map(|i| f64::from(i < 30)).collect();
        let b: Vec<f64> = (0..40).map(|i| f64::from((10..40).contains(&i))).collect();
        let e = bin_evidence(&a, &b, 400, 0.95, &mut SplitMix64::new(2));
        assert!(e.net_loss_lb < 0.0, "{e:?}");
        // By hand: 20 losses, no gains, n = 50 at 98.75 % each side.
        let lb = net_loss_lower(20.0, 0.0, 50, 0.975);
        let want = clopper_pearson_lower(20.0, 50, 0.9875) - clopper_pearson_upper(0.0, 50, 0.9875);
        assert!((lb - want).abs() < 1e-12 && lb > 0.1, "{lb}");
        // The lower bound mirrors the upper one: P(X ≥ k) = 1 − conf at it.
        let l = clopper_pearson_lower(12.0, 40, 0.975);
        assert!((l - (1.0 - clopper_pearson_upper(28.0, 40, 0.975))).abs() < 1e-12);
        assert_eq!(clopper_pearson_lower(0.0, 10, 0.975), 0.0);
    }

    /// The figures in docs/STATISTICS.md come from this test (`cargo test --lib
    /// statistical_validity -- --nocapture` prints them).
    #[test]
    fn statistical_validity_measured() {
        // Bin means of right/wrong scores: Wilson covers at its nominal level.
        for n in [40, 200] {
            for p in [0.5, 0.9, 0.99] {
                let c = wilson_coverage(n, p, 0.95);
                eprintln!("wilson coverage n={n} p={p}: {c:.3}");
                assert!((0.92..=0.97).contains(&c), "n={n} p={p}: {c}");
            }
        }
        // No effect (the cell answers exactly as the full cache): never fails,
        // and with 50 examples the bin is shown safe.
        let (f, s) = rule_rates(50, 0.9, 0.0, 300, 1);
        eprintln!("no effect, n=50: P(fails)={f:.3} P(safe)={s:.3}");
        assert_eq!(f, 0.0);
        assert!(s > 0.95, "{s}");
        // False positives over 5 bins of 40: the cell answers independently of
        // the full cache with the same accuracy (no true loss, the noisiest
        // pairing); the chance that any bin of the budget "fails" stays ≤ 5 %.
        let mut rng = SplitMix64::new(2);
        let unit = |r: &mut SplitMix64| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let runs = 200;
        let mut budgets_failing = 0;
        for _ in 0..runs {
            let mut any = false;
            for _ in 0..5 {
                let a: Vec<f64> = (0..40).map(|_| f64::from(unit(&mut rng) < 0.7)).collect();
                let b: Vec<f64> = (0..40).map(|_| f64::from(unit(&mut rng) < 0.7)).collect();
                let e = bin_evidence(&a, &b, 400, 0.95, &mut rng);
                any |= verdict(&e, 0.1, 0.1) == BinVerdict::Fails;
            }
            budgets_failing += usize::from(any);
        }
        let fp_budget = budgets_failing as f64 / runs as f64;
        eprintln!(
            "false-positive rate per budget over 5 bins of 40 (independent, p=0.7): {fp_budget:.3}"
        );
        assert!(fp_budget <= 0.05, "{fp_budget}");
        // A true drop of δ = 0.1 (p = 0.9, a tenth of right answers lost... q = 1/9)
        // with 50 examples: the rule calls it failing rarely (its CI must clear −δ),
        // and never calls it safe.
        let (f, s) = rule_rates(50, 0.9, 0.1 / 0.9, 300, 3);
        eprintln!("true drop 0.1, n=50: P(fails)={f:.3} P(safe)={s:.3}");
        assert!(s < 0.05, "{s}");
        // A drop of 0.2 is never called safe (the old rule's blind spot); a
        // drop of 0.3 is found a third of the time at n = 50 (the price of a
        // bound as strong as safe's: the old bootstrap rule found it 0.89 of
        // the time, and also "failed" 3 losses of 3).
        let (_, s) = rule_rates(50, 0.9, 0.2 / 0.9, 300, 4);
        eprintln!("true drop 0.2, n=50: P(safe)={s:.3}");
        assert_eq!(s, 0.0);
        let (f, _) = rule_rates(50, 0.9, 0.3 / 0.9, 300, 5);
        eprintln!("true drop 0.3, n=50: P(fails)={f:.3}");
        assert!(f > 0.25, "{f}");
        // The false-positive rate of "fails" at a net loss of exactly δ, exact
        // (every outcome summed), n = 3…50, for losses alone and for losses
        // partly offset by gains: never above 2.5 %.
        let mut worst: (f64, usize, f64, f64) = (0.0, 0, 0.0, 0.0);
        for n in 3..=50 {
            for (pl, pg) in [(0.1, 0.0), (0.15, 0.05), (0.3, 0.2)] {
                let f = exact_fail_rate(n, pl, pg, 0.1);
                assert!(f <= 0.025, "n={n} loss {pl} gain {pg}: {f}");
                if f > worst.0 {
                    worst = (f, n, pl, pg);
                }
            }
        }
        eprintln!(
            "fails at a net loss of exactly δ=0.1, n=3..50: worst P(fails)={:.4} (n={}, loss {}, gain {})",
            worst.0, worst.1, worst.2, worst.3
        );
        for n in [3, 5, 10, 20, 36, 50] {
            eprintln!(
                "n={n}: P(fails) at net loss 0.1: {:.4}; power at loss 0.3: {:.3}, at loss 0.5: {:.3}",
                exact_fail_rate(n, 0.1, 0.0, 0.1),
                exact_fail_rate(n, 0.3, 0.0, 0.1),
                exact_fail_rate(n, 0.5, 0.0, 0.1)
            );
        }
    }
}
