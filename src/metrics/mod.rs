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

/// RULER's `string_match_all`: the fraction of the reference strings found in
/// the prediction (case-insensitive substring), for tasks with several
/// required values (multi-value needles, variable chains, word lists).
pub fn string_match_all(pred: &str, refs: &[String]) -> f64 {
    if refs.is_empty() {
        return 0.0;
    }
    let p = pred.to_lowercase();
    let found = refs
        .iter()
        .filter(|r| p.contains(&r.to_lowercase()))
        .count();
    found as f64 / refs.len() as f64
}

/// RULER's `string_match_part`: 1 when any reference string is found in the
/// prediction (case-insensitive substring), for QA with alternative answers.
pub fn string_match_part(pred: &str, refs: &[String]) -> f64 {
    let p = pred.to_lowercase();
    refs.iter().any(|r| p.contains(&r.to_lowercase())) as u8 as f64
}

/// The option letter(s) a gold answer or a prediction names: `B`, `(B)`,
/// `B.`, `B. Supplementing image information`, `Answer: B`, `The answer is
/// (C)`, `A, C and D`, `ACD`; sorted, deduplicated, uppercase. Empty when the
/// text does not start with an option label.
pub fn option_letters(text: &str) -> String {
    let first = text.trim().lines().next().unwrap_or("").trim();
    let lower = first.to_lowercase();
    let mut rest = first;
    for prefix in [
        "the correct answer is",
        "the answer is",
        "correct answer:",
        "answer:",
        "answer",
        "option",
    ] {
        if lower.starts_with(prefix) {
            rest = first[prefix.len()..].trim_start_matches([':', ' ']);
            break;
        }
    }
    let mut letters: Vec<char> = Vec::new();
    for word in rest.split([' ', ',', '/', '&']).filter(|w| !w.is_empty()) {
        if word == "and" && !letters.is_empty() {
            continue;
        }
        let w = word
            .trim_start_matches('(')
            .trim_end_matches([')', '.', ':', ';']);
        // A lowercase or long word ends the label (`B. Supplementing …`, `A cat`).
        if w.is_empty() || w.len() > 10 || !w.chars().all(|c| c.is_ascii_uppercase()) {
            break;
        }
        letters.extend(w.chars());
        if word.ends_with(['.', ':']) {
            break;
        }
    }
    letters.sort_unstable();
    letters.dedup();
    letters.into_iter().collect()
}

/// Multiple-choice accuracy: 1 when the prediction names exactly the gold
/// answer's option letter(s), else 0 (no partial credit, no token overlap).
pub fn multiple_choice(pred: &str, gold: &str) -> f64 {
    let g = option_letters(gold);
    (!g.is_empty() && option_letters(pred) == g) as u8 as f64
}

/// Whether a gold answer is an option label (`A`, `(B)`, `C.`, `ABD`) rather
/// than an answer in words.
pub fn is_option_label(gold: &str) -> bool {
    let g = gold.trim();
    let inner = g.trim_start_matches('(').trim_end_matches([')', '.', ':']);
    !inner.is_empty() && inner.len() <= 4 && inner.chars().all(|c| c.is_ascii_uppercase())
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

pub use crate::llm::Failure;

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
    error_kind: Option<Failure>,
    text: &str,
    finish_reason: Option<&str>,
    expect_number: bool,
) -> Option<Failure> {
    if let Some(k) = error_kind {
        // A transport failure is one of the three transport labels.
        return Some(match k {
            Failure::RateLimited | Failure::Timeout => k,
            _ => Failure::EngineError,
        });
    }
    if text.trim().is_empty() {
        return Some(Failure::EmptyOutput);
    }
    if finish_reason == Some("length") {
        return Some(Failure::Truncated);
    }
    let lower = text.to_lowercase();
    if REFUSALS.iter().any(|r| lower.starts_with(r)) {
        return Some(Failure::Refusal);
    }
    if ABSTENTIONS.iter().any(|a| lower.contains(a)) {
        return Some(Failure::Abstained);
    }
    if expect_number && !text.chars().any(|c| c.is_ascii_digit()) {
        return Some(Failure::FormatError);
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
    fn option_letters_and_multiple_choice() {
        for (text, want) in [
            ("B", "B"),
            ("(B)", "B"),
            ("B.", "B"),
            ("B. Supplementing image information.", "B"),
            ("Answer: B", "B"),
            ("The answer is (C).", "C"),
            ("A, C and D", "ACD"),
            ("DCA", "ACD"),
            ("  C\nbecause the text says so", "C"),
            ("The paper supplements image data.", ""),
            ("", ""),
        ] {
            assert_eq!(option_letters(text), want, "{text:?}");
        }
        assert_eq!(
            multiple_choice("B. Supplementing image information.", "B"),
            1.0
        );
        assert_eq!(multiple_choice("(C)", "B"), 0.0);
        // A single "A" is an option, not an article (qa_f1 would score it 0).
        assert_eq!(multiple_choice("A", "A"), 1.0);
        assert_eq!(multiple_choice("A and B", "ABD"), 0.0);
        assert_eq!(multiple_choice("D, B, A", "ABD"), 1.0);
        assert_eq!(multiple_choice("anything", "a long answer"), 0.0);
        assert!(is_option_label("A") && is_option_label("(C)") && is_option_label("ABD"));
        assert!(!is_option_label("Paris") && !is_option_label("1964") && !is_option_label(""));
    }

    #[test]
    fn ruler_string_match_all_and_part() {
        let refs: Vec<String> = ["4417", "Alpha", "9"].map(String::from).to_vec();
        // All three found (case-insensitive): 1; two of three: 2/3; none: 0.
        assert_eq!(string_match_all("alpha 4417 and 9", &refs), 1.0);
        assert!((string_match_all("ALPHA then 4417", &refs) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(string_match_all("nothing", &refs), 0.0);
        // Substring, not word match: "9" is inside "1990".
        assert!((string_match_all("1990", &refs) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(string_match_part("it was alpha", &refs), 1.0);
        assert_eq!(string_match_part("none here", &refs), 0.0);
        assert_eq!(string_match_all("x", &[]), 0.0);
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
            classify(Some(Failure::RateLimited), "", None, true),
            Some(Failure::RateLimited)
        );
        assert_eq!(
            classify(Some(Failure::Timeout), "", None, true),
            Some(Failure::Timeout)
        );
        assert_eq!(
            classify(Some(Failure::EngineError), "", None, true),
            Some(Failure::EngineError)
        );
        assert_eq!(
            classify(None, "  ", Some("stop"), true),
            Some(Failure::EmptyOutput)
        );
        assert_eq!(
            classify(None, "12", Some("length"), true),
            Some(Failure::Truncated)
        );
        assert_eq!(
            classify(None, "I'm sorry, but no", Some("stop"), false),
            Some(Failure::Refusal)
        );
        assert_eq!(
            classify(None, "no idea", Some("stop"), true),
            Some(Failure::FormatError)
        );
        assert_eq!(classify(None, "no idea", Some("stop"), false), None);
        assert_eq!(classify(None, "41", Some("stop"), true), None);
        // Saying the text does not hold the answer is an abstention, not a format error.
        assert_eq!(
            classify(None, crate::llm::reference::NOT_FOUND, Some("stop"), true),
            Some(Failure::Abstained)
        );
        assert_eq!(
            classify(
                None,
                "The document does not mention Velo.",
                Some("stop"),
                false
            ),
            Some(Failure::Abstained)
        );
        // Labels are upper case and read back as themselves; a name kvt
        // does not know reads as ENGINE_ERROR, as the old string code did.
        for f in Failure::ALL {
            assert_eq!(f.label().to_uppercase(), f.label());
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.label()));
            assert_eq!(serde_json::from_str::<Failure>(&json).unwrap(), f);
        }
        assert_eq!(
            serde_json::from_str::<Failure>("\"SOMETHING_NEW\"").unwrap(),
            Failure::EngineError
        );
    }
}
