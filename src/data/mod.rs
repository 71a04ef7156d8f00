//! Data: the canonical example schema, built-in synthetic long-context tasks,
//! tokenizers, length binning and deterministic sampling.

pub mod binning;
pub mod longbench;
pub mod ops;
pub mod pretok;
pub mod records;
pub mod ruler;
pub mod synthetic;
pub mod tokenize;

use serde::{Deserialize, Serialize};

/// The canonical example every loader produces and every stage reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Stable across runs: derived from the dataset, task and generation index.
    pub example_id: String,
    pub question: String,
    pub context: String,
    pub answers: Vec<String>,
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Further fields a prompt template names (`{options}`, `{title}`),
    /// mapped by `dataset.fields.extra`, as the text that goes into the prompt.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, String>,
}

/// `meta` keys of a question asked about a shared context: the context's
/// group (examples with the same value share one context) and the question's
/// turn within it (1, 2, …).
pub const GROUP: &str = "context_group";
pub const TURN: &str = "context_turn";

impl Example {
    /// The context group this example's question belongs to, if any.
    pub fn group(&self) -> Option<&str> {
        self.meta.get(GROUP).and_then(|v| v.as_str())
    }
}

/// Numbers the turns of every group in the order its examples come (a
/// turn already set, as synthetic tasks set it, is kept), and checks that a
/// group's examples share their context: they are one context's questions.
pub fn number_turns(examples: &mut [Example]) -> anyhow::Result<()> {
    let mut seen: std::collections::HashMap<String, (u64, usize)> = Default::default();
    for i in 0..examples.len() {
        let Some(g) = examples[i].group().map(str::to_string) else {
            continue;
        };
        let entry = seen.entry(g.clone()).or_insert((0, i));
        entry.0 += 1;
        let (turn, first) = *entry;
        if examples[first].context != examples[i].context {
            anyhow::bail!(
                "examples `{}` and `{}` are in group `{g}` but their contexts differ: a group's questions share one context (check `dataset.fields.group`)",
                examples[first].example_id,
                examples[i].example_id
            );
        }
        examples[i]
            .meta
            .entry(TURN)
            .or_insert_with(|| serde_json::Value::from(turn));
    }
    Ok(())
}

/// What scoring reads of an example: its answers and metadata, never the
/// context (`table::read` decodes only these columns).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Gold {
    pub example_id: String,
    pub answers: Vec<String>,
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// SplitMix64: a tiny generator whose output for a seed is fixed forever, so a
/// seed in a config always yields the same examples and the same sample.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// A generator for one cell: the seed mixed with a label (task, length, index).
    pub fn for_cell(seed: u64, label: &str) -> Self {
        let h = blake3::hash(format!("{seed}/{label}").as_bytes());
        Self(u64::from_le_bytes(
            h.as_bytes()[..8].try_into().expect("8 bytes"),
        ))
    }
    /// Moves the generator `k` draws ahead at once (its state is a counter).
    pub fn skip(&mut self, k: u64) {
        self.0 = self.0.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: &str, group: Option<&str>, context: &str) -> Example {
        let mut meta = serde_json::Map::new();
        if let Some(g) = group {
            meta.insert(GROUP.into(), g.into());
        }
        Example {
            example_id: id.into(),
            question: format!("q {id}"),
            context: context.into(),
            answers: vec!["a".into()],
            meta,
            extra: Default::default(),
        }
    }

    #[test]
    fn turns_are_numbered_per_group_in_order_and_groups_share_a_context() {
        let mut v = vec![
            ex("a1", Some("A"), "ctx A"),
            ex("b1", Some("B"), "ctx B"),
            ex("x", None, "ctx X"),
            ex("a2", Some("A"), "ctx A"),
            ex("a3", Some("A"), "ctx A"),
        ];
        number_turns(&mut v).unwrap();
        let turns: Vec<Option<u64>> = v
            .iter()
            .map(|e| e.meta.get(TURN).and_then(|t| t.as_u64()))
            .collect();
        assert_eq!(turns, [Some(1), Some(1), None, Some(2), Some(3)]);
        let mut bad = vec![ex("a1", Some("A"), "one"), ex("a2", Some("A"), "two")];
        let e = number_turns(&mut bad).unwrap_err().to_string();
        assert!(
            e.contains("`a1`") && e.contains("`a2`") && e.contains("group `A`"),
            "{e}"
        );
    }

    #[test]
    fn splitmix_sequence_is_pinned() {
        // Pinned values: a change here changes every generated dataset.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }
}
