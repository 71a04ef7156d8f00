//! Scoring: exact match and token F1 with the blueprint's normalisation (best
//! over several gold answers), substring recall for the synthetic tasks, and
//! the failure taxonomy, defined once here.

pub mod longbench;

use serde::{Deserialize, Serialize};

/// Lowercase, punctuation removed, whitespace trimmed and collapsed.
pub fn normalize(s: &str) -> String {
    let lowered: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    lowered.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1.0 when the normalised strings are equal (both empty counts as equal).
pub fn exact_match(pred: &str, gold: &str) -> f64 {
    (normalize(pred) == normalize(gold)) as u8 as f64
}

/// Token-overlap F1 over whitespace tokens of the normalised strings.
pub fn f1(pred: &str, gold: &str) -> f64 {
    let (p, g) = (normalize(pred), normalize(gold));
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        return (pt.is_empty() && gt.is_empty()) as u8 as f64;
    }
    let mut counts: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / pt.len() as f64;
    let recall = common as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// 1.0 when the normalised gold answer occurs in the normalised prediction
/// (on word boundaries), the usual needle-in-a-haystack score.
pub fn substring_recall(pred: &str, gold: &str) -> f64 {
    let (p, g) = (normalize(pred), normalize(gold));
    if g.is_empty() {
        return 0.0;
    }
    let (p, g) = (format!(" {p} "), format!(" {g} "));
    p.contains(&g) as u8 as f64
}

fn best(pred: &str, golds: &[String], f: fn(&str, &str) -> f64) -> f64 {
    golds.iter().map(|g| f(pred, g)).fold(0.0, f64::max)
}

/// Per-request scores, best over the gold answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub em: f64,
    pub f1: f64,
    pub recall: f64,
}

pub fn score(pred: &str, golds: &[String]) -> Scores {
    Scores {
        em: best(pred, golds, exact_match),
        f1: best(pred, golds, f1),
        recall: best(pred, golds, substring_recall),
    }
}

/// The failure taxonomy. Every failed request gets exactly one label.
pub const FAILURE_LABELS: &[&str] = &[
    "EMPTY_OUTPUT",
    "TRUNCATED",
    "FORMAT_ERROR",
    "REFUSAL",
    "TIMEOUT",
    "ENGINE_ERROR",
    "RATE_LIMITED",
    "ABSTAINED",
];

/// Phrases of a model saying the text does not hold the answer (lower case,
/// anywhere in the answer). Not a format error: the model answered, with "I
/// don't know" — typically because eviction removed what it needed.
const ABSTENTIONS: &[&str] = &[
    "cannot find the answer",
    "can't find the answer",
    "could not find",
    "couldn't find",
    "unable to find",
    "does not mention",
    "doesn't mention",
    "not mentioned",
    "no information",
    "not provided in the",
    "i don't know",
    "i do not know",
];

const REFUSALS: &[&str] = &[
    "i can't help",
    "i cannot help",
    "i can't assist",
    "i cannot assist",
    "i won't",
    "i'm sorry, but",
    "i am sorry, but",
    "as an ai",
];

/// Classifies one response, in priority order: transport errors first
/// (RATE_LIMITED, TIMEOUT, ENGINE_ERROR), then EMPTY_OUTPUT, TRUNCATED,
/// REFUSAL, ABSTAINED (the model says the text does not hold the answer), and FORMAT_ERROR when `expect_number` and the answer has no digit
/// (the synthetic tasks all ask for a number). `None` means a normal answer,
/// right or wrong.
pub fn classify(
    error_kind: Option<&str>,
    text: &str,
    finish_reason: Option<&str>,
    expect_number: bool,
) -> Option<&'static str> {
    if let Some(k) = error_kind {
        return Some(match k {
            "RATE_LIMITED" => "RATE_LIMITED",
            "TIMEOUT" => "TIMEOUT",
            _ => "ENGINE_ERROR",
        });
    }
    if text.trim().is_empty() {
        return Some("EMPTY_OUTPUT");
    }
    if finish_reason == Some("length") {
        return Some("TRUNCATED");
    }
    let lower = text.to_lowercase();
    if REFUSALS.iter().any(|r| lower.starts_with(r)) {
        return Some("REFUSAL");
    }
    if ABSTENTIONS.iter().any(|a| lower.contains(a)) {
        return Some("ABSTAINED");
    }
    if expect_number && !text.chars().any(|c| c.is_ascii_digit()) {
        return Some("FORMAT_ERROR");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        assert_eq!(normalize("  The  Answer, is: 42! "), "the answer is 42");
        assert_eq!(normalize("Über-Straße"), "über straße");
        assert_eq!(normalize("..."), "");
    }

    #[test]
    fn exact_match_cases() {
        assert_eq!(exact_match("42.", "42"), 1.0);
        assert_eq!(exact_match("Paris", "paris "), 1.0);
        assert_eq!(exact_match("the 42", "42"), 0.0);
        assert_eq!(exact_match("", ""), 1.0);
        assert_eq!(exact_match("", "x"), 0.0);
    }

    #[test]
    fn f1_cases_by_hand() {
        // pred: "the cat sat" (3), gold: "a cat sat down" (4), common: cat, sat = 2.
        // P = 2/3, R = 2/4 → F1 = 2·(2/3)(1/2)/((2/3)+(1/2)) = (2/3)/(7/6) = 4/7.
        assert!((f1("the cat sat", "a cat sat down") - 4.0 / 7.0).abs() < 1e-12);
        // Repeated tokens count at most as often as in the gold answer.
        // pred "a a a" vs gold "a b": common 1, P = 1/3, R = 1/2 → 2/5.
        assert!((f1("a a a", "a b") - 0.4).abs() < 1e-12);
        assert_eq!(f1("x", "y"), 0.0);
        assert_eq!(f1("", ""), 1.0);
        assert_eq!(f1("x", ""), 0.0);
    }

    #[test]
    fn best_over_golds_and_recall() {
        let golds = vec!["918273".to_string(), "nine one eight".to_string()];
        let s = score("The code is 918273.", &golds);
        assert_eq!((s.em, s.recall), (0.0, 1.0));
        assert!((s.f1 - 0.4).abs() < 1e-12); // 1 common of 4 vs 1: P=1/4, R=1 → 0.4
        assert_eq!(substring_recall("9182731", "918273"), 0.0);
        assert_eq!(score("918273", &golds).em, 1.0);
        assert_eq!(score("x", &[]).em, 0.0);
    }

    #[test]
    fn taxonomy_priorities() {
        assert_eq!(
            classify(Some("RATE_LIMITED"), "", None, true),
            Some("RATE_LIMITED")
        );
        assert_eq!(classify(Some("TIMEOUT"), "", None, true), Some("TIMEOUT"));
        assert_eq!(
            classify(Some("ENGINE_ERROR"), "", None, true),
            Some("ENGINE_ERROR")
        );
        assert_eq!(
            classify(None, "  ", Some("stop"), true),
            Some("EMPTY_OUTPUT")
        );
        assert_eq!(
            classify(None, "12", Some("length"), true),
            Some("TRUNCATED")
        );
        assert_eq!(
            classify(None, "I'm sorry, but no", Some("stop"), false),
            Some("REFUSAL")
        );
        assert_eq!(
            classify(None, "no idea", Some("stop"), true),
            Some("FORMAT_ERROR")
        );
        assert_eq!(classify(None, "no idea", Some("stop"), false), None);
        assert_eq!(classify(None, "41", Some("stop"), true), None);
        // Saying the text does not hold the answer is an abstention, not a format error.
        assert_eq!(
            classify(None, crate::llm::reference::NOT_FOUND, Some("stop"), true),
            Some("ABSTAINED")
        );
        assert_eq!(
            classify(
                None,
                "The document does not mention Velo.",
                Some("stop"),
                false
            ),
            Some("ABSTAINED")
        );
        for l in FAILURE_LABELS {
            assert_eq!(l.to_uppercase(), *l);
        }
    }
}
