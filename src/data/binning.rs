//! Length bins and deterministic sampling. Quantile edges (or explicit ones)
//! put every example in exactly one bin; sampling picks a fixed, seeded subset
//! per bin (`uniform`, or `focus_transition` with more in named bins), always
//! including pinned ids.

use super::SplitMix64;
use anyhow::{bail, Result};

/// `n_bins + 1` edges from the token lengths' quantiles (nearest rank).
pub fn quantile_edges(lengths: &[usize], n_bins: usize) -> Vec<usize> {
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return vec![0; n_bins + 1];
    }
    (0..=n_bins)
        .map(|i| {
            let pos = ((sorted.len() - 1) as f64 * i as f64 / n_bins as f64).round() as usize;
            sorted[pos]
        })
        .collect()
}

/// Quantile edges made readable without moving any example across a bin
/// boundary: an inner edge `e` sends lengths below it down and the rest up,
/// so any value in (largest length below `e`, `e`] bins the same; the
/// roundest such value is taken (a multiple of the largest power of ten, or
/// of five times one, that fits). The outer edges bound nothing (lengths
/// beyond them join the end bins): the first is rounded down and the last
/// up, to two significant digits.
pub fn round_edges(edges: &[usize], lengths: &[usize]) -> Vec<usize> {
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    let n = edges.len();
    edges
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            if n < 2 {
                e
            } else if i == 0 {
                let step = two_digit_step(e);
                e / step * step
            } else if i == n - 1 {
                let step = two_digit_step(e);
                e.div_ceil(step) * step
            } else {
                // The largest length below e (0 when none).
                let below = sorted.partition_point(|&l| l < e);
                let floor = if below == 0 { 0 } else { sorted[below - 1] };
                roundest_in(floor, e)
            }
        })
        .collect()
}

/// A power of ten that keeps two significant digits of `x`.
fn two_digit_step(x: usize) -> usize {
    let mut step = 1;
    while x / step >= 100 {
        step *= 10;
    }
    step
}

/// The roundest whole number in (lo, hi]: the largest multiple of the
/// coarsest step (1000, 500, 100, 50, 10, 5, 1 …) that is still above `lo`.
fn roundest_in(lo: usize, hi: usize) -> usize {
    let mut p = 1usize;
    while p.saturating_mul(10) <= hi {
        p *= 10;
    }
    loop {
        for step in [p * 5, p] {
            let c = hi / step * step;
            if c > lo && c > 0 {
                return c;
            }
        }
        if p == 1 {
            return hi;
        }
        p /= 10;
    }
}

/// Edges for synthetic prompts made at target lengths, one bin per target:
/// from 0, through the midpoints between neighbouring targets, to half as
/// much again as the longest (`[512, 1024, 2048]` → `[0, 768, 1536, 3072]`).
pub fn target_edges(targets: &[usize]) -> Vec<usize> {
    let mut t = targets.to_vec();
    t.sort_unstable();
    t.dedup();
    let mut edges = vec![0];
    edges.extend(t.windows(2).map(|w| (w[0] + w[1]) / 2));
    edges.push(t.last().map_or(1, |&l| l + l / 2));
    edges
}

/// The bin of a length: bin `i` holds `[edges[i], edges[i+1])`, the last bin is
/// closed, and lengths outside the edges go to the first or last bin.
pub fn bin_of(len: usize, edges: &[usize]) -> usize {
    let n = edges.len().saturating_sub(1).max(1);
    (1..n).take_while(|&i| len >= edges[i]).count().min(n - 1)
}

/// Picks examples per bin. `items` are `(example_id, bin)`; returns chosen ids
/// in (bin, id) order.
pub fn sample(
    items: &[(String, usize)],
    n_bins: usize,
    per_bin: &dyn Fn(usize) -> usize,
    pinned: &[String],
    seed: u64,
) -> Result<Vec<(String, usize)>> {
    for p in pinned {
        if !items.iter().any(|(id, _)| id == p) {
            bail!("pinned example `{p}` is not in the dataset");
        }
    }
    let mut chosen = Vec::new();
    for b in 0..n_bins {
        let mut in_bin: Vec<(u64, &String)> = items
            .iter()
            .filter(|(_, bin)| *bin == b)
            .map(|(id, _)| (SplitMix64::for_cell(seed, id).next_u64(), id))
            .collect();
        in_bin.sort();
        let mut take: Vec<&String> = in_bin
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| pinned.contains(id))
            .collect();
        for (_, id) in &in_bin {
            if take.len() >= per_bin(b).max(take.len()) {
                break;
            }
            if !take.contains(id) {
                take.push(id);
            }
        }
        take.sort();
        chosen.extend(take.into_iter().map(|id| (id.clone(), b)));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounded_edges_bin_every_length_as_the_quantile_edges_did() {
        // Clustered lengths, as synthetic prompts at a few targets make them.
        let mut rng = SplitMix64::new(7);
        let lens: Vec<usize> = [500usize, 1000, 2000, 4000]
            .iter()
            .flat_map(|&t| (0..25).map(move |i| (t, i)))
            .map(|(t, _)| t - 90 + (rng.next_u64() % 90) as usize)
            .collect();
        for n_bins in [2, 3, 4, 5, 7] {
            let q = quantile_edges(&lens, n_bins);
            let r = round_edges(&q, &lens);
            for &l in &lens {
                assert_eq!(bin_of(l, &q), bin_of(l, &r), "{l}: {q:?} vs {r:?}");
            }
            assert!(r[0] <= q[0] && r[n_bins] >= q[n_bins], "{q:?} vs {r:?}");
        }
        assert_eq!(roundest_in(3917, 3996), 3950);
        assert_eq!(roundest_in(1480, 2031), 2000);
        assert_eq!(roundest_in(0, 7), 5);
        assert_eq!(roundest_in(6, 7), 7);
        assert_eq!(
            round_edges(&[413, 999, 3996], &[413, 998, 999, 3996]),
            [410, 999, 4000]
        );
        assert_eq!(target_edges(&[2048, 512, 1024, 1024]), [0, 768, 1536, 3072]);
    }

    #[test]
    fn every_length_lands_in_exactly_one_bin() {
        let lens: Vec<usize> = (1..=100).collect();
        let edges = quantile_edges(&lens, 5);
        assert_eq!(edges, vec![1, 21, 41, 60, 80, 100]);
        let mut counts = [0; 5];
        for l in &lens {
            counts[bin_of(*l, &edges)] += 1;
        }
        assert_eq!(counts.iter().sum::<usize>(), 100);
        assert_eq!(counts, [20, 20, 19, 20, 21]);
        assert_eq!(bin_of(0, &edges), 0);
        assert_eq!(bin_of(1000, &edges), 4);
    }

    #[test]
    fn sampling_is_deterministic_and_keeps_pinned_ids() {
        let items: Vec<(String, usize)> = (0..20).map(|i| (format!("ex{i:02}"), i % 2)).collect();
        let pinned = vec!["ex03".to_string()];
        let a = sample(&items, 2, &|_| 3, &pinned, 7).unwrap();
        let b = sample(&items, 2, &|_| 3, &pinned, 7).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 6);
        assert!(a.iter().any(|(id, _)| id == "ex03"));
        let c = sample(&items, 2, &|b| if b == 1 { 5 } else { 1 }, &[], 7).unwrap();
        assert_eq!(c.iter().filter(|(_, b)| *b == 1).count(), 5);
        assert!(sample(&items, 2, &|_| 1, &["nope".to_string()], 7).is_err());
    }
}
