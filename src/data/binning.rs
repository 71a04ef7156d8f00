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
