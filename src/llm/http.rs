//! The HTTP backend: requests go through the OpenAI-compatible client to a
//! spawned `kvt serve`, a launched server or any URL. It keeps what must live
//! as long as the requests (a spawned or launched server), samples the
//! launched server's memory and scrapes KV-cache usage from `/metrics`.

use super::backend::{Backend, Query, Record};
use super::client::Client;
use super::launcher::Launched;
use anyhow::Result;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub struct HttpBackend {
    pub client: Client,
    pub base_urls: Vec<String>,
    /// Wait for `/health` before the first request (a server kvt just started).
    pub wait_health: bool,
    /// A server launched for this node: its memory is sampled per response,
    /// and it is stopped when the backend is dropped.
    pub launched: Option<Launched>,
    /// A `kvt serve` spawned for this node, stopped on drop.
    pub spawned: Option<super::spawned::SpawnedServer>,
    /// Sent with each request for engines that sample.
    pub seed: u64,
}

impl Backend for HttpBackend {
    fn answer_all(
        &self,
        queries: &[Query<'_>],
        concurrency: usize,
        cancelled: &(dyn Fn() -> bool + Sync),
        record: &Record<'_>,
    ) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            if self.wait_health {
                super::spawned::wait_healthy(&self.base_urls[0]).await?;
            }
            let sample = super::metrics_scrape::Sample::default();
            let roots: Vec<String> = self
                .base_urls
                .iter()
                .map(|u| u.trim_end_matches('/').trim_end_matches("/v1").to_string())
                .collect();
            let scraper =
                futures_util::future::join_all(roots.into_iter().map(|r| {
                    super::metrics_scrape::scrape(r, &sample, Duration::from_millis(500))
                }));
            let mut results = futures_util::stream::iter(queries.iter())
                .map(|q| {
                    let sample = &sample;
                    async move {
                        if cancelled() {
                            return None;
                        }
                        let mut o = self
                            .client
                            .chat(q.key, q.body_bytes(), q.shape.max_tokens(), self.seed)
                            .await;
                        o.server_rss_kib = self
                            .launched
                            .as_ref()
                            .and_then(|l| l.memory_kib())
                            .map(|m| m.1);
                        o.kv_cache_usage = sample.get();
                        Some((q.key, o))
                    }
                })
                .buffer_unordered(concurrency.max(1));
            let work = async {
                while let Some(res) = results.next().await {
                    if let Some((key, o)) = res {
                        record(key, &o)?;
                    }
                }
                sample.stop.store(true, Ordering::Relaxed);
                Ok::<(), anyhow::Error>(())
            };
            let (done, _) = futures_util::future::join(work, scraper).await;
            done?;
            if self.base_urls.len() > 1 {
                tracing::info!("answered per endpoint: {:?}", self.client.served());
            }
            Ok::<(), anyhow::Error>(())
        })
    }
}
