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
