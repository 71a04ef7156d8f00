//! Token counting with tiktoken encodings (`cl100k_base` default, `o200k_base`).
//! Each encoding is loaded once per process and shared.

use anyhow::{bail, Result};
use tiktoken_rs::CoreBPE;

/// A loaded tokenizer by name.
pub fn encoding(name: &str) -> Result<&'static CoreBPE> {
    Ok(match name {
        "cl100k_base" => tiktoken_rs::cl100k_base_singleton(),
        "o200k_base" => tiktoken_rs::o200k_base_singleton(),
        other => bail!("unknown tiktoken encoding `{other}`; use `cl100k_base` or `o200k_base`"),
    })
}

pub fn count_tokens(bpe: &CoreBPE, text: &str) -> usize {
    bpe.encode_ordinary(text).len()
}

/// Counts tokens of many texts on all cores, in input order.
pub fn count_many(bpe: &CoreBPE, texts: &[&str]) -> Vec<usize> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(1);
    let chunk = texts.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(|t| count_tokens(bpe, t)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("tokenizer thread"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_the_encodings() {
        let cl = encoding("cl100k_base").unwrap();
        // "hello world" is two tokens in both encodings; digits split in threes in cl100k.
        assert_eq!(count_tokens(cl, "hello world"), 2);
        assert_eq!(count_tokens(cl, "918273"), 2);
        assert_eq!(count_tokens(cl, ""), 0);
        let o2 = encoding("o200k_base").unwrap();
        assert_eq!(count_tokens(o2, "hello world"), 2);
        assert!(encoding("gpt2").is_err());
        // Parallel counting keeps input order. Numbers take no leading space:
        // "918273 918273" is 918 · 273 · " " · 918 · 273.
        let texts = ["a", "hello world", "", "918273 918273"];
        assert_eq!(count_many(cl, &texts), vec![1, 2, 0, 5]);
    }
}
