//! Built-in synthetic long-context tasks, generated deterministically from a
//! seed at any target length: `needle` (one key → value fact at a chosen
//! depth), `multikey` (several facts, one asked for, the others distractors)
//! and `vartrack` (a chain of assignments to follow), and `multiquestion`
//! (several facts, each asked in a question of its own: one context's turns,
//! `meta.context_group` and `meta.context_turn`, for `kv.compress: shared`), and `listcodes`
//! (every access code in the document, listed in order: a long answer, for
//! compression while decoding; scored by the share of codes listed). The
//! filler prose and the templates are kvt's own.

use super::{Example, SplitMix64};
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use tiktoken_rs::CoreBPE;

pub const TASKS: &[&str] = &[
    "needle",
    "multikey",
    "vartrack",
    "multiquestion",
    "listcodes",
];

/// Codes `listcodes` hides in each context (each answer lists them all).
pub const LISTED_CODES: usize = 6;

/// Synthetic tasks whose answer is several values, all of which count
/// (scored by `string_match_all`: the share of them in the answer).
pub fn answers_all(task: &str) -> bool {
    task == "listcodes"
}

/// Questions `multiquestion` asks of each context.
pub const QUESTIONS_PER_CONTEXT: usize = 3;

/// Neutral filler prose written for kvt: long enough to bury a fact, dull
/// enough never to answer a question.
pub(crate) const FILLER: &[&str] = &[
    "The harbour town woke slowly, with gulls circling above the fish market long before the stalls opened.",
    "A retired surveyor kept a notebook of every bridge he had crossed, listing the river, the span and the weather.",
    "In late autumn the orchard smelled of wet leaves and the last apples that nobody had bothered to pick.",
    "The night train stopped at every village, and the guard knew most passengers by the parcels they carried.",
    "Her workshop held three lathes, a cabinet of chisels and a radio that only received the shipping forecast.",
    "Rain had softened the footpath, so the walkers kept to the stone wall where the ground stayed firm.",
    "The library's reading room was quiet except for the ticking radiator and the occasional turning page.",
    "Each spring the allotment society argued about the water butts and then agreed to share them as before.",
    "A small ferry crossed the estuary twice an hour, carrying bicycles, tourists and crates of vegetables.",
    "The old mill had been converted into flats, though the wheel still turned when the river ran high.",
    "On the ridge the wind was steady enough to lean on, and the heather moved like a slow grey sea.",
    "The bakery sold out of rye loaves by nine, after which the queue thinned to people buying buns.",
    "His grandmother wrote letters in green ink and numbered every page in the top right corner.",
    "The museum's clock collection ran a few minutes apart, so the hour arrived as a ripple of chimes.",
    "Fog settled in the valley overnight and lifted by noon, leaving the fences beaded with water.",
    "The committee minutes recorded a long debate about the colour of the new benches in the square.",
    "A stray cat had adopted the signal box and slept on the warm shelf above the lever frame.",
    "The allotment's scarecrow wore a borrowed raincoat that its owner had quietly given up on.",
    "Beyond the quarry the road narrowed to a track lined with hawthorn and the odd abandoned cart.",
    "The choir rehearsed on Thursdays in the school hall, stacking the chairs against the wall afterwards.",
    "Tide tables were pinned inside the café window, curling at the corners in the afternoon sun.",
    "The county archive kept parish maps in flat drawers that squeaked when pulled too quickly.",
    "Snow rarely lasted on the coast, but inland the lanes could stay white for a week or more.",
    "A pair of herons fished the shallow end of the reservoir, ignoring the sailing club entirely.",
];

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ren", "tas", "vo", "bel", "dun", "sor", "fen", "gal", "hix", "jor", "pel",
    "qua", "zim",
];

pub(crate) fn word(rng: &mut SplitMix64) -> String {
    let n = 2 + rng.below(2) as usize;
    let mut w: String = (0..n)
        .map(|_| SYLLABLES[rng.below(SYLLABLES.len() as u64) as usize])
        .collect();
    if let Some(first) = w.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    w
}

fn number(rng: &mut SplitMix64) -> String {
    format!("{}", 100_000 + rng.below(900_000))
}

/// Filler sentences totalling about `tokens` tokens (token counts per sentence
/// are summed, which is within a few tokens of the joined text).
fn filler(rng: &mut SplitMix64, tokens: usize, sentence_tokens: &[usize]) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut total = 0;
    while total < tokens {
        let i = rng.below(FILLER.len() as u64) as usize;
        out.push(FILLER[i]);
        total += sentence_tokens[i] + 1;
    }
    out
}

/// The fact every access-code task hides.
fn code_fact(key: &str, value: &str) -> String {
    format!("Archive note: the access code assigned to {key} is {value}.")
}

/// `n` access codes at depths spread evenly over the context, in order:
/// (depth, key, value), a key and a value drawn per code.
fn spread_codes(rng: &mut SplitMix64, n: usize) -> Vec<(f64, String, String)> {
    (0..n)
        .map(|k| {
            let (key, value) = (word(rng), number(rng));
            ((k as f64 + 0.5) / n as f64, key, value)
        })
        .collect()
}

/// Puts `facts` into `sentences` at fractional depths (0 = start, 1 = end).
pub(crate) fn insert_at_depths(sentences: &mut Vec<String>, facts: Vec<(f64, String)>) {
    let mut facts = facts;
    facts.sort_by(|a, b| b.0.total_cmp(&a.0));
    let n = sentences.len();
    for (depth, fact) in facts {
        let pos = ((n as f64) * depth.clamp(0.0, 1.0)).round() as usize;
        sentences.insert(pos.min(sentences.len()), fact);
    }
}

/// Generates `per_length` examples of `task` at each target token length.
pub fn generate(
    bpe: &CoreBPE,
    task: &str,
    seed: u64,
    lengths: &[u64],
    per_length: u64,
) -> Result<Vec<Example>> {
    if super::ruler::is_task(task) {
        return super::ruler::generate(bpe, task, seed, lengths, per_length);
    }
    if !TASKS.contains(&task) {
        bail!(
            "unknown synthetic task `{task}`; choose one of: {}, or RULER's {}, vt_CxH",
            TASKS.join(", "),
            super::ruler::TASKS.join(", ")
        );
    }
    let sentence_tokens: Vec<usize> = FILLER
        .iter()
        .map(|s| super::tokenize::count_tokens(bpe, s))
        .collect();
    let mut out = Vec::new();
    for &len in lengths {
        for i in 0..per_length {
            let mut rng = SplitMix64::for_cell(seed, &format!("{task}/{len}/{i}"));
            // Depths spread evenly over the context, so every length covers them all.
            let depth = (i as f64 + 0.5) / per_length as f64;
            let mut meta = Map::new();
            meta.insert("task".into(), json!(task));
            meta.insert("target_tokens".into(), json!(len));
            meta.insert("depth".into(), json!((depth * 1000.0).round() / 1000.0));
            let mut turns: Vec<(String, String, f64)> = Vec::new();
            let mut all_answers: Vec<String> = Vec::new();
            let (facts, question, answer) = match task {
                "listcodes" => {
                    let n = LISTED_CODES;
                    let mut facts = Vec::new();
                    for (d, key, value) in spread_codes(&mut rng, n) {
                        facts.push((d, code_fact(&key, &value)));
                        all_answers.push(value);
                    }
                    meta.insert("n_codes".into(), json!(n));
                    (
                        facts,
                        format!("List every access code in the document, in the order they appear, one per line ({n} codes)."),
                        String::new(),
                    )
                }
                "multiquestion" => {
                    // Facts at depths spread over the context, asked in
                    // an order of their own so turn and depth do not align.
                    let n = QUESTIONS_PER_CONTEXT;
                    let mut facts = Vec::new();
                    for (d, key, value) in spread_codes(&mut rng, n) {
                        facts.push((d, code_fact(&key, &value)));
                        turns.push((
                            format!("What is the access code assigned to {key}?"),
                            value,
                            d,
                        ));
                    }
                    let shift = rng.below(n as u64) as usize;
                    turns.rotate_left(shift);
                    meta.insert("n_questions".into(), json!(n));
                    (facts, String::new(), String::new())
                }
                "needle" => {
                    let (key, value) = (word(&mut rng), number(&mut rng));
                    let fact = code_fact(&key, &value);
                    (
                        vec![(depth, fact)],
                        format!("What is the access code assigned to {key}?"),
                        value,
                    )
                }
                "multikey" => {
                    let n_keys = 4;
                    let target = rng.below(n_keys) as usize;
                    let mut facts = Vec::new();
                    let (mut q, mut a) = (String::new(), String::new());
                    for k in 0..n_keys as usize {
                        let (key, value) = (word(&mut rng), number(&mut rng));
                        let d = if k == target { depth } else { rng.unit() };
                        facts.push((d, code_fact(&key, &value)));
                        if k == target {
                            q = format!("What is the access code assigned to {key}?");
                            a = value;
                        }
                    }
                    meta.insert("n_keys".into(), json!(n_keys));
                    (facts, q, a)
                }
                _ => {
                    let value = number(&mut rng);
                    let names: Vec<String> =
                        (0..4).map(|_| word(&mut rng).to_uppercase()).collect();
                    let mut facts = vec![(
                        depth * 0.5,
                        format!("Let the register {} hold {value}.", names[0]),
                    )];
                    for k in 1..names.len() {
                        let d = depth * 0.5 + (k as f64 / names.len() as f64) * 0.5;
                        facts.push((
                            d,
                            format!("Copy register {} into register {}.", names[k - 1], names[k]),
                        ));
                    }
                    let last = names.last().cloned().unwrap_or_default();
                    meta.insert("chain".into(), Value::from(names));
                    (
                        facts,
                        format!("Which number does register {last} hold?"),
                        value,
                    )
                }
            };
            let fact_tokens: usize = facts
                .iter()
                .map(|(_, f)| super::tokenize::count_tokens(bpe, f))
                .sum();
            let mut sentences: Vec<String> = filler(
                &mut rng,
                (len as usize).saturating_sub(fact_tokens),
                &sentence_tokens,
            )
            .into_iter()
            .map(str::to_string)
            .collect();
            insert_at_depths(&mut sentences, facts);
            let context = sentences.join(" ");
            let id = format!("{task}-{len}-{i:03}");
            if turns.is_empty() {
                let answers = if all_answers.is_empty() {
                    vec![answer]
                } else {
                    all_answers
                };
                out.push(Example {
                    example_id: id,
                    question,
                    context,
                    answers,
                    meta,
                    extra: Default::default(),
                });
                continue;
            }
            for (t, (question, answer, depth)) in turns.into_iter().enumerate() {
                let mut meta = meta.clone();
                meta.insert("depth".into(), json!((depth * 1000.0).round() / 1000.0));
                meta.insert(super::GROUP.into(), json!(id));
                meta.insert(super::TURN.into(), json!(t + 1));
                out.push(Example {
                    example_id: format!("{id}-q{}", t + 1),
                    question,
                    context: context.clone(),
                    answers: vec![answer],
                    meta,
                    extra: Default::default(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_hits_the_target_length() {
        let bpe = crate::data::tokenize::encoding("cl100k_base").unwrap();
        for task in TASKS {
            let a = generate(bpe, task, 1, &[300, 1200], 3).unwrap();
            let b = generate(bpe, task, 1, &[300, 1200], 3).unwrap();
            assert_eq!(a, b);
            let per_context = if *task == "multiquestion" {
                QUESTIONS_PER_CONTEXT
            } else {
                1
            };
            assert_eq!(a.len(), 6 * per_context);
            for ex in &a {
                assert!(
                    ex.context.contains(&ex.answers[0]),
                    "{task}: answer missing from context"
                );
                let target = ex.meta["target_tokens"].as_u64().unwrap() as usize;
                let n = crate::data::tokenize::count_tokens(bpe, &ex.context);
                assert!(
                    n >= target * 9 / 10 && n <= target * 11 / 10 + 40,
                    "{task}: {n} tokens for target {target}"
                );
            }
            let c = generate(bpe, task, 2, &[300], 1).unwrap();
            assert_ne!(c[0], a[0]);
        }
    }

    #[test]
    fn multiquestion_asks_each_fact_of_one_context_in_turn() {
        let bpe = crate::data::tokenize::encoding("cl100k_base").unwrap();
        let v = generate(bpe, "multiquestion", 7, &[600], 2).unwrap();
        assert_eq!(v.len(), 2 * QUESTIONS_PER_CONTEXT);
        for group in v.chunks(QUESTIONS_PER_CONTEXT) {
            let g = group[0].group().unwrap();
            let mut answers = std::collections::BTreeSet::new();
            for (t, ex) in group.iter().enumerate() {
                assert_eq!(ex.group(), Some(g));
                assert_eq!(ex.meta[crate::data::TURN], json!(t + 1));
                assert_eq!(ex.example_id, format!("{g}-q{}", t + 1));
                assert_eq!(ex.context, group[0].context);
                assert!(ex.context.contains(&ex.answers[0]));
                assert!(ex.question.starts_with("What is the access code"));
                answers.insert(ex.answers[0].clone());
            }
            assert_eq!(
                answers.len(),
                QUESTIONS_PER_CONTEXT,
                "one fact per question"
            );
        }
        assert_ne!(v[0].context, v[QUESTIONS_PER_CONTEXT].context);
    }

    #[test]
    fn listcodes_hides_its_codes_in_order_and_asks_for_all() {
        let bpe = crate::data::tokenize::encoding("cl100k_base").unwrap();
        let v = generate(bpe, "listcodes", 3, &[800], 2).unwrap();
        assert_eq!(v.len(), 2);
        for ex in &v {
            assert_eq!(ex.answers.len(), LISTED_CODES);
            let at: Vec<usize> = ex
                .answers
                .iter()
                .map(|a| ex.context.find(a.as_str()).expect("code in the context"))
                .collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "in order: {at:?}");
            assert!(ex.question.contains("every access code"));
        }
        assert!(answers_all("listcodes") && !answers_all("needle"));
    }

    #[test]
    fn unknown_task_is_an_error() {
        let bpe = crate::data::tokenize::encoding("cl100k_base").unwrap();
        assert!(generate(bpe, "nope", 1, &[100], 1).is_err());
    }
}
