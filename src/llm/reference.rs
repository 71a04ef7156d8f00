//! The reference engine: a deterministic simulator of KV-cache eviction with an
//! extractive reader. No model weights, no network.
//!
//! Given the prompt's tokens, a policy decides which tokens keep their KV
//! entries; the reader then answers from the surviving text only. Relevance
//! ("attention") is simulated lexically: a query token attends to earlier
//! tokens with the same id, weighted by rarity (1 / occurrences in the prompt),
//! so rare tokens such as a key's name matter and common ones barely do.
//!
//! * `full` keeps everything.
//! * `streaming` (StreamingLLM-style): the first `sink_tokens` plus the most
//!   recent tokens up to the budget.
//! * `snapkv` (SnapKV-style): the last `window` tokens are the observation
//!   window and are kept; every earlier token is scored by the attention it
//!   receives from the window, scores are max-pooled over `pool_kernel`
//!   neighbours, and the top scores fill the rest of the budget.
//! * `h2o` (H2O-style): heavy hitters by cumulative attention received from all
//!   later tokens, plus a recent window of `window` tokens.
//! * `random`: the recent window plus a seeded uniform sample.

use crate::data::SplitMix64;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tiktoken_rs::CoreBPE;

/// The policies the simulator runs (from the one list in
/// `llm::native::policy`).
pub fn policies() -> Vec<&'static str> {
    crate::llm::native::policy::simulated_names()
}

/// What the reader says when the surviving text does not hold the answer.
pub const NOT_FOUND: &str = "I cannot find the answer in the text I still have.";

pub use super::KvParams;

fn rarity(tokens: &[u32]) -> HashMap<u32, f64> {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(t, c)| (t, 1.0 / c as f64))
        .collect()
}

/// Keeps the `k` highest-scoring positions of `cand`, ties to the later position.
fn top_k(cand: &[usize], score: &[f64], k: usize, keep: &mut [bool]) {
    let mut c: Vec<usize> = cand.to_vec();
    c.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(b.cmp(&a)));
    for &i in c.iter().take(k) {
        keep[i] = true;
    }
}

/// Which prompt tokens keep their KV entries.
pub fn keep_mask(tokens: &[u32], p: &KvParams) -> Vec<bool> {
    let n = tokens.len();
    let k = p.capacity(n);
    if k >= n {
        return vec![true; n];
    }
    let mut keep = vec![false; n];
    let window = (p.window as usize).min(k);
    match p.policy.as_str() {
        "streaming" => {
            let sink = (p.sink_tokens as usize).min(k);
            keep[..sink].iter_mut().for_each(|x| *x = true);
            keep[n - (k - sink)..].iter_mut().for_each(|x| *x = true);
        }
        "snapkv" => {
            let obs = n - window;
            keep[obs..].iter_mut().for_each(|x| *x = true);
            let w = rarity(tokens);
            let mut in_window: HashMap<u32, f64> = HashMap::new();
            for &t in &tokens[obs..] {
                *in_window.entry(t).or_default() += w[&t];
            }
            let raw: Vec<f64> = tokens[..obs]
                .iter()
                .map(|t| in_window.get(t).copied().unwrap_or(0.0))
                .collect();
            let r = (p.pool_kernel as usize) / 2;
            let pooled: Vec<f64> = (0..obs)
                .map(|i| {
                    raw[i.saturating_sub(r)..(i + r + 1).min(obs)]
                        .iter()
                        .copied()
                        .fold(0.0, f64::max)
                })
                .collect();
            let cand: Vec<usize> = (0..obs).collect();
            top_k(&cand, &pooled, k - window, &mut keep);
        }
        "h2o" => {
            let recent = n - window;
            keep[recent..].iter_mut().for_each(|x| *x = true);
            // Attention received from all later tokens: later same-id tokens × rarity.
            let w = rarity(tokens);
            let mut later: HashMap<u32, usize> = HashMap::new();
            let mut score = vec![0.0; n];
            for i in (0..n).rev() {
                let t = tokens[i];
                score[i] = *later.get(&t).unwrap_or(&0) as f64 * w[&t];
                *later.entry(t).or_default() += 1;
            }
            let cand: Vec<usize> = (0..recent).collect();
            top_k(&cand, &score, k - window, &mut keep);
        }
        "random" => {
            let recent = n - window;
            keep[recent..].iter_mut().for_each(|x| *x = true);
            let mut cand: Vec<usize> = (0..recent).collect();
            let mut rng = SplitMix64::for_cell(p.seed, &format!("random/{n}"));
            // Partial Fisher–Yates: the first k - window positions are the sample.
            let m = k - window;
            for i in 0..m.min(cand.len()) {
                let j = i + rng.below((cand.len() - i) as u64) as usize;
                cand.swap(i, j);
            }
            for &i in &cand[..m.min(cand.len())] {
                keep[i] = true;
            }
        }
        _ => keep.iter_mut().for_each(|x| *x = true),
    }
    keep
}

/// The surviving text: each contiguous run of kept tokens decoded on its own,
/// runs separated by a gap marker so the reader never joins across a hole.
pub fn surviving_text(bpe: &CoreBPE, tokens: &[u32], keep: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (t, &k) in tokens.iter().zip(keep) {
        if k {
            cur.push(*t);
        } else if !cur.is_empty() {
            runs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs.iter()
        .map(|r| String::from_utf8_lossy(&bpe.decode_bytes(r).unwrap_or_default()).into_owned())
        .collect()
}

fn between<'a>(s: &'a str, pre: &str, post: &str) -> Option<&'a str> {
    let start = s.find(pre)? + pre.len();
    let len = s[start..].find(post)?;
    Some(&s[start..start + len])
}

fn digits_after(s: &str) -> Option<String> {
    let d: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    (!d.is_empty()).then_some(d)
}

/// Finds `{pre}{value}` with `value` a run of digits in any surviving run.
fn find_number(runs: &[String], pre: &str) -> Option<String> {
    runs.iter().find_map(|r| {
        r.match_indices(pre)
            .find_map(|(i, _)| digits_after(&r[i + pre.len()..]))
    })
}

/// Answers the question from the surviving runs, or says it cannot.
pub fn read_answer(runs: &[String], question: &str) -> String {
    if let Some(key) = between(question, "access code assigned to ", "?") {
        if let Some(v) = find_number(runs, &format!("access code assigned to {key} is ")) {
            return v;
        }
    } else if let Some(reg) = between(question, "does register ", " hold") {
        // Follow the copies back to the register that was set directly.
        let mut cur = reg.to_string();
        for _ in 0..64 {
            if let Some(v) = find_number(runs, &format!("Let the register {cur} hold ")) {
                return v;
            }
            let src = runs.iter().find_map(|r| {
                let pat = format!(" into register {cur}.");
                let end = r.find(&pat)?;
                let start = r[..end].rfind("Copy register ")? + "Copy register ".len();
                Some(r[start..end].to_string())
            });
            match src {
                Some(s) if !s.contains(' ') => cur = s,
                _ => break,
            }
        }
    } else if let Some(text) = read_ruler(runs, question) {
        return text;
    }
    NOT_FOUND.to_string()
}

/// Counts of the words `pick` accepts in the surviving runs; the `k` most
/// frequent (ties by word), or `None` when there are fewer.
fn most_frequent(runs: &[String], k: usize, pick: impl Fn(&str, &str) -> bool) -> Option<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in runs {
        let mut prev = "";
        for w in r.split_whitespace() {
            if pick(prev, w) {
                *counts.entry(w).or_default() += 1;
            }
            prev = w;
        }
    }
    let mut by: Vec<(usize, &str)> = counts.into_iter().map(|(w, c)| (c, w)).collect();
    by.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    (by.len() >= k).then(|| {
        by[..k]
            .iter()
            .map(|(_, w)| *w)
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// The RULER-style tasks (`data::ruler`): needles by key, variable chains,
/// common and frequent words, read from what survived.
fn read_ruler(runs: &[String], question: &str) -> Option<String> {
    let found = |values: Vec<String>| (!values.is_empty()).then(|| values.join(", "));
    if let Some(rest) = question.split_once("the secret ").map(|(_, r)| r) {
        let (kind, keys) = rest.split_once(" for ")?;
        let kind = kind.trim_end_matches('s');
        let keys = keys.split('?').next()?;
        let mut values = Vec::new();
        for key in keys.split(", ") {
            let entry = crate::data::ruler::needle(kind, key, "");
            let pre = entry.trim_end_matches('.');
            for r in runs {
                for (i, _) in r.match_indices(pre) {
                    let v: String = r[i + pre.len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_hexdigit() || *c == '-')
                        .collect();
                    if !v.is_empty() && !values.contains(&v) {
                        values.push(v);
                    }
                }
            }
        }
        return found(values);
    }
    if let Some(value) = between(question, "holding the value ", "?") {
        let mut names: Vec<String> = Vec::new();
        let mut frontier = vec![value.to_string()];
        while let Some(src) = frontier.pop() {
            let post = format!(" to {src}.");
            for r in runs {
                for (end, _) in r.match_indices(&post) {
                    let Some(start) = r[..end].rfind("Set ") else {
                        continue;
                    };
                    let name = &r[start + 4..end];
                    if name.len() == 5 && !names.iter().any(|n| n == name) {
                        names.push(name.to_string());
                        frontier.push(name.to_string());
                    }
                }
            }
        }
        return found(names);
    }
    if question.contains("numbered list above") {
        return most_frequent(runs, 10, |prev, w| {
            prev.strip_suffix('.')
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
                && w.chars().all(|c| c.is_ascii_lowercase())
        });
    }
    if question.contains("coded words occur most often") {
        return most_frequent(runs, 3, |_, w| {
            w.len() == 6 && w.chars().all(|c| c.is_ascii_lowercase())
        });
    }
    None
}

/// One answer of the reference engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefAnswer {
    pub text: String,
    pub finish_reason: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub retained_tokens: usize,
    /// Set when the native engine answered (`kvt serve --model-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<crate::llm::native::NativeAnswer>,
}

/// Runs the whole engine on a rendered prompt whose last line(s) hold the question.
pub fn answer(
    bpe: &CoreBPE,
    prompt: &str,
    question: &str,
    p: &KvParams,
    max_new_tokens: usize,
) -> Result<RefAnswer> {
    p.check()?;
    let tokens = bpe.encode_ordinary(prompt);
    let keep = keep_mask(&tokens, p);
    let retained = keep.iter().filter(|&&k| k).count();
    let runs = surviving_text(bpe, &tokens, &keep);
    let full = read_answer(&runs, question);
    let out = bpe.encode_ordinary(&full);
    let (text, finish) = if out.len() > max_new_tokens {
        let cut = &out[..max_new_tokens];
        (
            String::from_utf8_lossy(&bpe.decode_bytes(cut).unwrap_or_default()).into_owned(),
            "length",
        )
    } else {
        (full, "stop")
    };
    Ok(RefAnswer {
        completion_tokens: out.len().min(max_new_tokens),
        text,
        finish_reason: finish.to_string(),
        prompt_tokens: tokens.len(),
        retained_tokens: retained,
        native: None,
    })
}

/// Analytic KV-cache memory: tokens × layers × kv-heads × head-dim × 2 (K and V) × bytes.
pub fn kv_bytes(tokens: u64, g: &crate::config::schema::KvGeometry) -> u64 {
    tokens * g.layers as u64 * g.kv_heads as u64 * g.head_dim as u64 * 2 * g.bytes_per_elem as u64
}

/// The simulator as a [`super::backend::Backend`], in process: one worker per
/// core (at most `concurrency`), answers recorded as they come.
pub struct ReferenceBackend {
    pub kv: KvParams,
    pub max_new_tokens: usize,
}

impl super::backend::Backend for ReferenceBackend {
    fn answer_all(
        &self,
        queries: &[super::backend::Query<'_>],
        concurrency: usize,
        cancelled: &(dyn Fn() -> bool + Sync),
        record: &super::backend::Record<'_>,
    ) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let next = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..threads.min(concurrency.max(1)))
                .map(|_| {
                    sc.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= queries.len() || cancelled() {
                                return Ok(());
                            }
                            let q = &queries[i];
                            record(q.key, &self.answer_one(q)?.outcome)?;
                        }
                    })
                })
                .collect();
            hs.into_iter()
                .try_for_each(|h| h.join().expect("reference worker"))
        })
    }

    /// One answer, on the calling thread (`kvt serve` asks one at a time).
    fn answer_one(&self, q: &super::backend::Query<'_>) -> Result<super::backend::Answer> {
        let bpe = crate::data::tokenize::encoding("cl100k_base")?;
        let t0 = std::time::Instant::now();
        let prompt = super::server::render(&q.messages())
            .map_err(|e| anyhow::anyhow!(e))?
            .0;
        let a = answer(bpe, &prompt, q.question, &self.kv, self.max_new_tokens)?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        Ok(super::backend::Answer {
            outcome: super::Outcome {
                text: a.text,
                finish_reason: Some(a.finish_reason),
                prompt_tokens: Some(a.prompt_tokens as u64),
                completion_tokens: Some(a.completion_tokens as u64),
                retained_tokens: Some(a.retained_tokens as u64),
                engine: Some(super::backend::InProcess::Reference.name().into()),
                latency_ms: ms,
                ttft_ms: Some(ms),
                is_final: true,
                ..Default::default()
            },
            native: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(policy: &str, budget: f64) -> KvParams {
        KvParams {
            policy: policy.into(),
            budget,
            sink_tokens: 2,
            window: 3,
            pool_kernel: 3,
            seed: 7,
            beta: None,
            compress: None,
            decode: None,
            score_dtype: None,
        }
    }

    fn kept(mask: &[bool]) -> Vec<usize> {
        mask.iter()
            .enumerate()
            .filter(|(_, &k)| k)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn capacity_is_fractional_or_absolute() {
        assert_eq!(params("snapkv", 0.5).capacity(10), 5);
        assert_eq!(params("snapkv", 0.25).capacity(10), 3);
        assert_eq!(params("snapkv", 4.0).capacity(10), 4);
        assert_eq!(params("snapkv", 40.0).capacity(10), 10);
        assert_eq!(params("full", 0.1).capacity(10), 10);
        assert!(params("nope", 0.5).check().is_err());
        assert!(params("full", 0.0).check().is_err());
    }

    #[test]
    fn streaming_keeps_sinks_and_the_recent_window() {
        let toks: Vec<u32> = (0..12).collect();
        let m = keep_mask(&toks, &params("streaming", 0.5));
        assert_eq!(kept(&m), vec![0, 1, 8, 9, 10, 11]);
    }

    #[test]
    fn snapkv_keeps_what_the_window_attends_to_and_its_neighbours() {
        // Token 42 appears at position 3 and in the observation window (last 3).
        let toks = vec![1, 1, 1, 42, 7, 1, 1, 1, 1, 1, 9, 42, 8];
        let m = keep_mask(&toks, &params("snapkv", 6.0));
        // Window 10..13; pooled (kernel 3) scores put 2, 3, 4 on top.
        let k = kept(&m);
        assert_eq!(k, vec![2, 3, 4, 10, 11, 12]);
    }

    #[test]
    fn h2o_keeps_heavy_hitters_and_recent_tokens() {
        // Token 5 recurs: its early occurrences receive the most attention.
        let toks = vec![5, 2, 5, 3, 5, 4, 5, 7, 8, 9];
        let m = keep_mask(&toks, &params("h2o", 6.0));
        assert_eq!(kept(&m), vec![0, 2, 4, 7, 8, 9]);
    }

    #[test]
    fn random_is_seeded_and_keeps_the_budget() {
        let toks: Vec<u32> = (0..100).collect();
        let a = keep_mask(&toks, &params("random", 0.3));
        assert_eq!(a, keep_mask(&toks, &params("random", 0.3)));
        assert_eq!(kept(&a).len(), 30);
        assert!(kept(&a).ends_with(&[97, 98, 99]));
        let mut other = params("random", 0.3);
        other.seed = 8;
        assert_ne!(a, keep_mask(&toks, &other));
    }

    #[test]
    fn reader_finds_needles_and_chains_and_never_joins_gaps() {
        let runs = vec!["x the access code assigned to Kalo is 123456. y".to_string()];
        assert_eq!(
            read_answer(&runs, "What is the access code assigned to Kalo?"),
            "123456"
        );
        assert_eq!(
            read_answer(&runs, "What is the access code assigned to Ka?"),
            NOT_FOUND
        );
        let split = vec![
            "the access code assigned to Kalo is".to_string(),
            "123456.".to_string(),
        ];
        assert_eq!(
            read_answer(&split, "What is the access code assigned to Kalo?"),
            NOT_FOUND
        );
        let chain = vec![
            "Let the register AB hold 42. blah Copy register AB into register CD.".to_string(),
            "Copy register CD into register EF.".to_string(),
        ];
        assert_eq!(
            read_answer(&chain, "Which number does register EF hold?"),
            "42"
        );
        assert_eq!(
            read_answer(&chain[1..], "Which number does register EF hold?"),
            NOT_FOUND
        );
    }

    #[test]
    fn engine_answers_from_full_cache_and_loses_early_needles_under_streaming() {
        let bpe = crate::data::tokenize::encoding("cl100k_base").unwrap();
        let filler = "The ferry crossed the estuary twice an hour. ".repeat(60);
        let prompt = format!(
            "Archive note: the access code assigned to Velo is 918273. {filler}\nQuestion: What is the access code assigned to Velo?\nAnswer:"
        );
        let q = "What is the access code assigned to Velo?";
        let mut p = params("full", 1.0);
        p.window = 32;
        p.pool_kernel = 7;
        let full = answer(bpe, &prompt, q, &p, 32).unwrap();
        assert_eq!(full.text, "918273");
        assert_eq!(full.retained_tokens, full.prompt_tokens);
        p.policy = "streaming".into();
        p.budget = 0.3;
        let s = answer(bpe, &prompt, q, &p, 32).unwrap();
        assert_eq!(s.text, NOT_FOUND);
        assert!(s.retained_tokens < s.prompt_tokens / 2);
        p.policy = "snapkv".into();
        assert_eq!(answer(bpe, &prompt, q, &p, 32).unwrap().text, "918273");
        // Too few new tokens: cut and marked as truncated.
        p.policy = "streaming".into();
        let t = answer(bpe, &prompt, q, &p, 3).unwrap();
        assert_eq!(
            (t.finish_reason.as_str(), t.completion_tokens),
            ("length", 3)
        );
    }

    /// The reader answers every RULER-style task from the full text, and
    /// loses needles that an eviction cut away.
    #[test]
    fn reader_answers_the_ruler_family_from_the_full_cache() {
        let bpe = crate::data::tokenize::encoding("cl100k_base").unwrap();
        for task in crate::data::ruler::TASKS.iter().copied().chain(["vt_2x3"]) {
            for ex in crate::data::ruler::generate(bpe, task, 3, &[1500], 2).unwrap() {
                let prompt = format!("{}\n\nQuestion: {}\nAnswer:", ex.context, ex.question);
                let a = answer(bpe, &prompt, &ex.question, &params("full", 1.0), 200).unwrap();
                let all = ex.answers.iter().all(|g| a.text.contains(g.as_str()));
                assert!(all, "{task}: {} for {:?}", a.text, ex.answers);
            }
        }
        // Streaming at 10 % keeps only the sinks and the end: an early needle is gone.
        let ex = crate::data::ruler::generate(bpe, "niah_single_2", 3, &[3000], 4)
            .unwrap()
            .remove(0);
        let prompt = format!("{}\n\nQuestion: {}\nAnswer:", ex.context, ex.question);
        let a = answer(bpe, &prompt, &ex.question, &params("streaming", 0.1), 200).unwrap();
        assert_eq!(a.text, NOT_FOUND);
    }

    #[test]
    fn kv_memory_is_analytic() {
        let g = crate::config::schema::KvGeometry {
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            bytes_per_elem: 2,
        };
        assert_eq!(kv_bytes(1000, &g), 1000 * 32 * 8 * 128 * 2 * 2);
    }
}
