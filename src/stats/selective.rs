//! Continuous fidelity evidence and selective prediction.
//!
//! * Student-t one-sided bounds on a mean loss (nats per token), the rule
//!   behind the continuous verdicts (`docs/STATISTICS.md`);
//! * the deterministic calibration / test split by example id;
//! * risk–coverage, AUGRC, risk at coverage, coverage at risk, NLL, Brier,
//!   ECE and the rate of confidently wrong answers.
//!
//! Every threshold is chosen on calibration examples and applied to test
//! examples: the functions that choose take only calibration data.

use super::BinVerdict;

/// ln Γ(x) (Lanczos, g = 7), accurate to ~1e-13 for x > 0.
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function I_x(a, b) (continued fraction).
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - incomplete_beta(1.0 - x, b, a);
    }
    // Lentz's method on the standard continued fraction.
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut f = d;
    for m in 1..300 {
        let m = m as f64;
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            if d.abs() < tiny {
                d = tiny;
            }
            c = 1.0 + num / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-15 {
            break;
        }
    }
    front * f / a
}

/// P(T ≤ t) for Student's t with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(x, df / 2.0, 0.5);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p` quantile of Student's t (bisection on the CDF), remembered per
/// (p, df) in this thread: an analysis asks for the same few many times.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    thread_local! {
        static SEEN: std::cell::RefCell<std::collections::HashMap<(u64, u64), f64>> =
            Default::default();
    }
    let key = (p.to_bits(), df.to_bits());
    if let Some(q) = SEEN.with(|m| m.borrow().get(&key).copied()) {
        return q;
    }
    let q = t_quantile_uncached(p, df);
    SEEN.with(|m| m.borrow_mut().insert(key, q));
    q
}

fn t_quantile_uncached(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e3, 1e3);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// One-sided lower and upper bounds (each at level `conf`) on the mean of
/// `x` from Student's t: `mean ∓ t_{conf, n−1} · s/√n`. None below 2 values.
pub fn t_bounds(x: &[f64], conf: f64) -> Option<(f64, f64)> {
    let n = x.len();
    if n < 2 {
        return None;
    }
    let m = super::mean(x);
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1) as f64;
    let half = t_quantile(conf, (n - 1) as f64) * (var / n as f64).sqrt();
    Some((m - half, m + half))
}

/// Minimum paired examples for a continuous verdict.
pub const MIN_N_CONTINUOUS: usize = 3;

/// A continuous loss (nats per token, ≥ 0 meaning worse than the full
/// cache): fails when the lower bound of its mean (one-sided at `conf`)
/// lies above `delta`; safe when the upper bound lies below it, taken at
/// `1 − (1 − conf)/20` — losses such as KL are skewed to the right, where a
/// t upper bound at `conf` is too low (measured: 11 % wrongly safe at n = 3
/// for exponential losses; at the stricter level it stays near 2.5 %).
pub fn continuous_verdict(loss: &[f64], delta: f64, conf: f64) -> BinVerdict {
    if loss.len() < MIN_N_CONTINUOUS {
        return BinVerdict::Insufficient;
    }
    if t_bounds(loss, conf).is_some_and(|(lo, _)| lo > delta) {
        return BinVerdict::Fails;
    }
    if t_bounds(loss, safe_level(conf)).is_some_and(|(_, hi)| hi < delta) {
        return BinVerdict::Safe;
    }
    BinVerdict::Insufficient
}

/// The one-sided level of the "safe" bound for continuous losses.
pub fn safe_level(conf: f64) -> f64 {
    1.0 - (1.0 - conf) / 20.0
}

/// True when an example belongs to the calibration split: a hash of the
/// seed and its id, so the split never depends on labels, order or cell.
pub fn is_calibration(example_id: &str, share: f64, seed: u64) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(example_id.as_bytes());
    let b = h.finalize();
    let x = u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"));
    ((x >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// One answer for selective prediction: its confidence (a log-probability)
/// and whether it was right.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub confidence: f64,
    pub correct: bool,
}

/// Answers from most to least confident (ties keep their given order, which
/// callers make the example order).
fn by_confidence(x: &[Scored]) -> Vec<Scored> {
    let mut v = x.to_vec();
    v.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    v
}

/// The risk–coverage curve: for k = 1…n the k most confident answers kept,
/// (coverage k/n, selective risk = wrong among them / k).
pub fn risk_coverage(x: &[Scored]) -> Vec<(f64, f64)> {
    let n = x.len();
    let mut wrong = 0usize;
    by_confidence(x)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            wrong += usize::from(!s.correct);
            ((i + 1) as f64 / n as f64, wrong as f64 / (i + 1) as f64)
        })
        .collect()
}

/// AUGRC: the area under the generalized risk–coverage curve, where the
/// generalized risk at coverage k/n is (wrong among the k most confident)/n
/// — the chance an answer is both kept and wrong. The mean over k = 1…n.
/// 0 is best; a model whose wrong answers are all least confident scores
/// lowest for its accuracy.
pub fn augrc(x: &[Scored]) -> f64 {
    let n = x.len();
    if n == 0 {
        return f64::NAN;
    }
    let mut wrong = 0usize;
    let mut area = 0.0;
    for s in by_confidence(x) {
        wrong += usize::from(!s.correct);
        area += wrong as f64 / n as f64;
    }
    area / n as f64
}

/// The threshold that keeps the `coverage` share of most confident answers
/// (chosen on calibration answers): the confidence of the last one kept.
pub fn threshold_for_coverage(calibration: &[Scored], coverage: f64) -> Option<f64> {
    let v = by_confidence(calibration);
    let k = (coverage * v.len() as f64).ceil() as usize;
    (k > 0).then(|| v[k.min(v.len()) - 1].confidence)
}

/// The lowest threshold whose kept calibration answers are wrong at most
/// `risk` of the time (the largest coverage at that risk); None when even
/// the single most confident answer is wrong.
pub fn threshold_for_risk(calibration: &[Scored], risk: f64) -> Option<f64> {
    let v = by_confidence(calibration);
    let mut wrong = 0usize;
    let mut best = None;
    for (i, s) in v.iter().enumerate() {
        wrong += usize::from(!s.correct);
        let ties_follow = v.get(i + 1).is_some_and(|t| t.confidence == s.confidence);
        if !ties_follow && wrong as f64 / (i + 1) as f64 <= risk {
            best = Some(s.confidence);
        }
    }
    best
}

/// Coverage and selective risk of answers at or above `threshold`.
pub fn apply_threshold(test: &[Scored], threshold: f64) -> (f64, f64) {
    let kept: Vec<&Scored> = test.iter().filter(|s| s.confidence >= threshold).collect();
    let cov = kept.len() as f64 / test.len().max(1) as f64;
    let risk = if kept.is_empty() {
        f64::NAN
    } else {
        kept.iter().filter(|s| !s.correct).count() as f64 / kept.len() as f64
    };
    (cov, risk)
}

/// Share of answers that are wrong with confidence at or above `threshold`.
pub fn confidently_wrong(test: &[Scored], threshold: f64) -> f64 {
    test.iter()
        .filter(|s| !s.correct && s.confidence >= threshold)
        .count() as f64
        / test.len().max(1) as f64
}

/// Calibration of p = exp(confidence) against correctness: (NLL, Brier, ECE
/// over `bins` equal-width bins of p).
pub fn calibration(x: &[Scored], bins: usize) -> (f64, f64, f64) {
    let n = x.len().max(1) as f64;
    let p = |s: &Scored| s.confidence.exp().clamp(1e-6, 1.0 - 1e-6);
    let y = |s: &Scored| f64::from(u8::from(s.correct));
    let nll = x
        .iter()
        .map(|s| -(y(s) * p(s).ln() + (1.0 - y(s)) * (1.0 - p(s)).ln()))
        .sum::<f64>()
        / n;
    let brier = x.iter().map(|s| (p(s) - y(s)).powi(2)).sum::<f64>() / n;
    let mut acc = vec![(0usize, 0.0f64, 0.0f64); bins];
    for s in x {
        let b = ((p(s) * bins as f64) as usize).min(bins - 1);
        acc[b].0 += 1;
        acc[b].1 += p(s);
        acc[b].2 += y(s);
    }
    let ece = acc
        .iter()
        .filter(|b| b.0 > 0)
        .map(|&(k, ps, ys)| (k as f64 / n) * ((ys - ps) / k as f64).abs())
        .sum();
    (nll, brier, ece)
}

/// The reliability diagram's points: per equal-width bin of p, (mean p,
/// accuracy, count).
pub fn reliability(x: &[Scored], bins: usize) -> Vec<(f64, f64, usize)> {
    let mut acc = vec![(0usize, 0.0f64, 0.0f64); bins];
    for s in x {
        let p = s.confidence.exp().clamp(0.0, 1.0);
        let b = ((p * bins as f64) as usize).min(bins - 1);
        acc[b].0 += 1;
        acc[b].1 += p;
        acc[b].2 += f64::from(u8::from(s.correct));
    }
    acc.into_iter()
        .filter(|b| b.0 > 0)
        .map(|(k, p, y)| (p / k as f64, y / k as f64, k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(c: f64, ok: bool) -> Scored {
        Scored {
            confidence: c,
            correct: ok,
        }
    }

    /// Six answers, by hand: confidences −0.1 … −0.6, right, right, wrong,
    /// right, wrong, wrong (most confident first).
    fn six() -> Vec<Scored> {
        vec![
            s(-0.4, true),
            s(-0.1, true),
            s(-0.6, false),
            s(-0.3, false),
            s(-0.2, true),
            s(-0.5, false),
        ]
    }

    #[test]
    fn risk_coverage_and_augrc_by_hand() {
        // Sorted: R R W R W W. Wrong so far: 0 0 1 1 2 3.
        let rc = risk_coverage(&six());
        let want = [0.0, 0.0, 1.0 / 3.0, 0.25, 0.4, 0.5];
        for (i, (c, r)) in rc.iter().enumerate() {
            assert!((c - (i + 1) as f64 / 6.0).abs() < 1e-12);
            assert!((r - want[i]).abs() < 1e-12, "{i}: {r}");
        }
        // Generalized risk: 0, 0, 1/6, 1/6, 2/6, 3/6; mean = 7/36.
        assert!((augrc(&six()) - 7.0 / 36.0).abs() < 1e-12);
        // All wrong answers least confident is the best order at this accuracy:
        // R R R W W W gives (0+0+0+1+2+3)/36.
        let best: Vec<Scored> = (0..6).map(|i| s(-(i as f64), i < 3)).collect();
        assert!((augrc(&best) - 6.0 / 36.0).abs() < 1e-12);
    }

    #[test]
    fn thresholds_at_coverage_and_risk_by_hand() {
        let x = six();
        // Coverage 0.5 keeps the 3 most confident: threshold −0.3.
        assert_eq!(threshold_for_coverage(&x, 0.5), Some(-0.3));
        // Risk at that coverage: 1 wrong of 3.
        let (cov, risk) = apply_threshold(&x, -0.3);
        assert!((cov - 0.5).abs() < 1e-12 && (risk - 1.0 / 3.0).abs() < 1e-12);
        // Risk ≤ 0.01: only the two most confident (both right): −0.2.
        assert_eq!(threshold_for_risk(&x, 0.01), Some(-0.2));
        // Risk ≤ 0.4: coverage 5/6 (2 wrong of 5): −0.5.
        assert_eq!(threshold_for_risk(&x, 0.4), Some(-0.5));
        // The most confident answer wrong: no threshold reaches risk 0.
        assert_eq!(
            threshold_for_risk(&[s(0.0, false), s(-1.0, true)], 0.0),
            None
        );
        // Confidently wrong at −0.3: one wrong answer (−0.3) of six.
        assert!((confidently_wrong(&x, -0.3) - 1.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn nll_brier_ece_by_hand() {
        // p = 0.85 right, p = 0.85 wrong, p = 0.45 right.
        let x = [
            s(0.85f64.ln(), true),
            s(0.85f64.ln(), false),
            s(0.45f64.ln(), true),
        ];
        let (nll, brier, ece) = calibration(&x, 10);
        let want_nll = -(0.85f64.ln() + 0.15f64.ln() + 0.45f64.ln()) / 3.0;
        assert!((nll - want_nll).abs() < 1e-9, "{nll}");
        let want_brier = (0.0225 + 0.7225 + 0.3025) / 3.0;
        assert!((brier - want_brier).abs() < 1e-9, "{brier}");
        // Bin [0.8, 0.9): 2 answers, mean p 0.85, accuracy 0.5 → 2/3 · 0.35;
        // bin [0.4, 0.5): 1 answer, p 0.45, accuracy 1 → 1/3 · 0.55.
        assert!(
            (ece - (2.0 / 3.0 * 0.35 + 1.0 / 3.0 * 0.55)).abs() < 1e-9,
            "{ece}"
        );
        let r = reliability(&x, 10);
        assert_eq!(r.len(), 2);
        assert!((r[1].0 - 0.85).abs() < 1e-9 && r[1].1 == 0.5 && r[1].2 == 2);
    }

    #[test]
    fn t_quantiles_match_tables() {
        // t_{0.975} at 2, 10 and 30 degrees of freedom: 4.303, 2.228, 2.042.
        for (df, want) in [(2.0, 4.302_653), (10.0, 2.228_139), (30.0, 2.042_272)] {
            let q = t_quantile(0.975, df);
            assert!((q - want).abs() < 1e-4, "df {df}: {q}");
        }
        let (lo, hi) = t_bounds(&[1.0, 2.0, 3.0], 0.975).unwrap();
        // mean 2, s = 1, se = 1/√3, t = 4.303.
        let half = 4.302_653 / 3f64.sqrt();
        assert!((lo - (2.0 - half)).abs() < 1e-4 && (hi - (2.0 + half)).abs() < 1e-4);
        assert_eq!(
            continuous_verdict(&[0.0, 0.01, 0.0, 0.02], 0.1, 0.975),
            BinVerdict::Safe
        );
        assert_eq!(
            continuous_verdict(&[2.0, 2.5, 3.0, 2.2], 0.1, 0.975),
            BinVerdict::Fails
        );
        assert_eq!(
            continuous_verdict(&[0.0, 3.0], 0.1, 0.975),
            BinVerdict::Insufficient
        );
    }

    /// (P(fails), P(safe)) of the continuous rule over `runs` simulated bins
    /// of `n` losses drawn by `draw`.
    fn continuous_rates(
        n: usize,
        runs: usize,
        seed: u64,
        draw: impl Fn(&mut crate::data::SplitMix64) -> f64,
    ) -> (f64, f64) {
        let mut rng = crate::data::SplitMix64::new(seed);
        let (mut f, mut s) = (0, 0);
        for _ in 0..runs {
            let x: Vec<f64> = (0..n).map(|_| draw(&mut rng)).collect();
            match continuous_verdict(&x, 0.1, 0.975) {
                BinVerdict::Fails => f += 1,
                BinVerdict::Safe => s += 1,
                _ => {}
            }
        }
        (f as f64 / runs as f64, s as f64 / runs as f64)
    }

    /// The continuous verdicts' error rates, printed for docs/STATISTICS.md
    /// (`cargo test --lib continuous_verdicts_measured -- --nocapture`): a true
    /// mean loss of exactly δ = 0.1 nats, normal (sd 0.1) and right-skewed
    /// (exponential, as KL is) losses, n = 3…50.
    #[test]
    fn continuous_verdicts_measured() {
        let normal = |r: &mut crate::data::SplitMix64| {
            // Box–Muller.
            let (u, v) = (r.unit().max(1e-12), r.unit());
            0.1 + 0.1 * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        };
        let expo = |r: &mut crate::data::SplitMix64| -0.1 * r.unit().max(1e-12).ln();
        let mut worst_fail = 0.0f64;
        for n in [3, 5, 10, 20, 36, 50] {
            let (fn_, sn) = continuous_rates(n, 20000, n as u64, normal);
            let (fe, se) = continuous_rates(n, 20000, 100 + n as u64, expo);
            eprintln!(
                "n={n}: at mean loss δ, normal: P(fails)={fn_:.4} P(safe)={sn:.4}; exponential: P(fails)={fe:.4} P(safe)={se:.4}"
            );
            worst_fail = worst_fail.max(fn_).max(fe);
            // Wrongly "safe" at a loss of exactly δ: at most 2.5 % (+ noise)
            // for normal and for right-skewed losses.
            assert!(sn <= 0.035 && se <= 0.035, "n={n}: {sn} {se}");
        }
        // Wrongly "fails" at a loss of exactly δ: at most 2.5 % (+ noise).
        assert!(worst_fail <= 0.035, "{worst_fail}");
        // Power: a mean loss of 1 nat (a lost needle) with sd 0.5 fails from n = 3.
        let big = |r: &mut crate::data::SplitMix64| 1.0 + 0.5 * (r.unit() - 0.5) * 3.4;
        let (f, _) = continuous_rates(3, 2000, 7, big);
        eprintln!("n=3, mean loss 1.0 (uniform, sd 0.5): P(fails)={f:.3}");
        assert!(f > 0.25, "{f}");
        // No loss at all (the full cache's own KL is 0): safe from n = 3 when
        // the losses are small and steady.
        let small = |r: &mut crate::data::SplitMix64| 0.01 * r.unit();
        let (_, s) = continuous_rates(3, 2000, 8, small);
        eprintln!("n=3, mean loss 0.005: P(safe)={s:.3}");
        assert!(s > 0.9, "{s}");
    }

    #[test]
    fn the_split_depends_on_ids_and_seed_only() {
        let ids: Vec<String> = (0..2000).map(|i| format!("ex-{i}")).collect();
        let cal = ids.iter().filter(|i| is_calibration(i, 0.5, 7)).count();
        assert!((900..1100).contains(&cal), "{cal}");
        assert!(ids
            .iter()
            .all(|i| is_calibration(i, 0.5, 7) == is_calibration(i, 0.5, 7)));
        let other = ids
            .iter()
            .filter(|i| is_calibration(i, 0.5, 7) != is_calibration(i, 0.5, 8))
            .count();
        assert!(other > 500, "{other}");
        assert!(ids.iter().all(|i| !is_calibration(i, 0.0, 1)));
    }
}
