//! Deterministic dataset operations, applied in order before binning:
//! `shuffle: SEED`, `take: N`, `skip: N`, `select: [ids]` (keeps the listed
//! ids, in the listed order). The same list on the same input always gives the
//! same examples in the same order.

use super::{Example, SplitMix64};
use anyhow::{bail, Result};

pub use crate::config::schema::DatasetOp;

/// Applies `ops` in order.
pub fn apply(mut examples: Vec<Example>, ops: &[DatasetOp]) -> Result<Vec<Example>> {
    for (i, op) in ops.iter().enumerate() {
        examples = match op {
            DatasetOp::Shuffle(seed) => {
                let mut rng = SplitMix64::for_cell(*seed, "shuffle");
                // Fisher–Yates from the back.
                for j in (1..examples.len()).rev() {
                    let k = rng.below(j as u64 + 1) as usize;
                    examples.swap(j, k);
                }
                examples
            }
            DatasetOp::Take(n) => examples.into_iter().take(*n).collect(),
            DatasetOp::Skip(n) => examples.into_iter().skip(*n).collect(),
            DatasetOp::Select(ids) => {
                let mut by_id: std::collections::HashMap<String, Example> = examples
                    .into_iter()
                    .map(|e| (e.example_id.clone(), e))
                    .collect();
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    match by_id.remove(id) {
                        Some(e) => out.push(e),
                        None => bail!(
                            "`dataset.ops[{i}].select`: example `{id}` is not in the dataset (or is listed twice)"
                        ),
                    }
                }
                out
            }
        };
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                example_id: format!("e{i}"),
                question: String::new(),
                context: String::new(),
                answers: vec![],
                meta: Default::default(),
                extra: Default::default(),
            })
            .collect()
    }

    fn ids(v: &[Example]) -> Vec<&str> {
        v.iter().map(|e| e.example_id.as_str()).collect()
    }

    #[test]
    fn order_is_pinned() {
        let out = apply(ex(8), &[DatasetOp::Shuffle(42)]).unwrap();
        // Pinned: a change here changes every shuffled dataset.
        assert_eq!(ids(&out), ["e3", "e6", "e7", "e2", "e4", "e5", "e0", "e1"]);
        let out = apply(
            ex(8),
            &[
                DatasetOp::Shuffle(42),
                DatasetOp::Skip(2),
                DatasetOp::Take(3),
            ],
        )
        .unwrap();
        assert_eq!(ids(&out), ["e7", "e2", "e4"]);
        let other = apply(ex(8), &[DatasetOp::Shuffle(43)]).unwrap();
        assert_ne!(
            ids(&other),
            ["e3", "e6", "e7", "e2", "e4", "e5", "e0", "e1"]
        );
    }

    #[test]
    fn select_keeps_the_listed_order_and_rejects_unknown_ids() {
        let out = apply(ex(5), &[DatasetOp::Select(vec!["e3".into(), "e1".into()])]).unwrap();
        assert_eq!(ids(&out), ["e3", "e1"]);
        let err = apply(ex(5), &[DatasetOp::Select(vec!["e9".into()])]).unwrap_err();
        assert!(err.to_string().contains("e9"));
        assert!(apply(ex(5), &[DatasetOp::Select(vec!["e1".into(), "e1".into()])]).is_err());
    }

    #[test]
    fn ops_parse_from_yaml() {
        let ops: Vec<DatasetOp> =
            serde_saphyr::from_str("- shuffle: 3\n- take: 10\n- select: [a, b]\n").unwrap();
        assert_eq!(
            ops,
            vec![
                DatasetOp::Shuffle(3),
                DatasetOp::Take(10),
                DatasetOp::Select(vec!["a".into(), "b".into()])
            ]
        );
    }
}
