//! Scrapes a server's Prometheus `/metrics` during a run for its KV-cache
//! usage (vLLM's `vllm:kv_cache_usage_perc` / `vllm:gpu_cache_usage_perc`,
//! SGLang's `sglang:token_usage`, llama.cpp's `llamacpp:kv_cache_usage_ratio`
//! where the build has it). The latest value is attached to each response as
//! it arrives; servers without `/metrics` are simply not scraped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Metric names read as a KV-cache usage fraction, first match wins.
pub const KV_USAGE_METRICS: &[&str] = &[
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
];

/// The value of the first known KV-usage metric in a Prometheus text page
/// (the largest over label sets, e.g. several models or engines).
pub fn kv_usage(page: &str) -> Option<f64> {
    for name in KV_USAGE_METRICS {
        let mut best: Option<f64> = None;
        for line in page.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let rest = match rest.chars().next() {
                Some('{') => rest.split_once('}').map(|(_, v)| v),
                Some(' ') | Some('\t') => Some(rest),
                _ => None,
            };
            if let Some(v) = rest.and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok()) {
                best = Some(best.map_or(v, |b| b.max(v)));
            }
        }
        if best.is_some() {
            return best;
        }
    }
    None
}

/// The latest sample, shared with the request loop.
#[derive(Default)]
pub struct Sample {
    bits: AtomicU64,
    seen: AtomicBool,
    pub stop: AtomicBool,
}

impl Sample {
    pub fn get(&self) -> Option<f64> {
        self.seen
            .load(Ordering::Relaxed)
            .then(|| f64::from_bits(self.bits.load(Ordering::Relaxed)))
    }
    fn set(&self, v: f64) {
        self.bits.store(v.to_bits(), Ordering::Relaxed);
        self.seen.store(true, Ordering::Relaxed);
    }
}

/// Polls `root/metrics` every `every` until `sample.stop` is set or the
/// server has no metrics page.
pub async fn scrape(root: String, sample: &Sample, every: Duration) {
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return;
    };
    let url = format!("{}/metrics", root.trim_end_matches('/'));
    while !sample.stop.load(Ordering::Relaxed) {
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => {
                if let Ok(text) = r.text().await {
                    match kv_usage(&text) {
                        Some(v) => sample.set(v),
                        None => {
                            tracing::debug!("{url}: no KV-cache usage metric; not scraping");
                            return;
                        }
                    }
                }
            }
            Ok(r) => {
                tracing::debug!("{url}: HTTP {}; not scraping", r.status());
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_known_metrics_with_and_without_labels() {
        let page = "# HELP x\nvllm:num_requests_running 3\nvllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\nvllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.5\n";
        assert_eq!(kv_usage(page), Some(0.5));
        assert_eq!(kv_usage("sglang:token_usage 0.125\n"), Some(0.125));
        assert_eq!(
            kv_usage("vllm:kv_cache_usage_percent 0.9\n"),
            None,
            "names match exactly"
        );
        assert_eq!(kv_usage("llamacpp:prompt_tokens_total 4\n"), None);
    }
}
