//! OpenAI-compatible chat client: streaming (time to first token, usage chunk)
//! or not, retries with exponential backoff and jitter for timeouts,
//! connection errors, 429 and 5xx (honouring `Retry-After`), and a final,
//! recorded outcome for everything else.

use super::Outcome;
use serde::Deserialize;
use serde_json::Value;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Transport settings: never part of any key.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// One or more replicas of the same model; requests go to the one with
    /// the fewest outstanding requests, and one that keeps failing is taken
    /// out of rotation for a while.
    pub base_urls: Vec<String>,
    pub api_key: Option<String>,
    pub timeout: Duration,
    pub max_retries: u32,
    pub stream: bool,
    /// First backoff step; doubles per retry, plus up to 50 % jitter, capped at 8 s.
    pub backoff: Duration,
    /// Concurrency (adaptive on 429), requests and tokens per minute.
    pub limits: super::limits::Limits,
    /// `chat` (`/chat/completions`) or `completions` (`/completions`).
    pub api: crate::config::schema::Api,
    /// A response body larger than this is an `ENGINE_ERROR` (memory stays bounded).
    pub max_response_bytes: u64,
}

pub struct Client {
    /// For endpoints that are not plain `http://` (or go through a proxy);
    /// built only when there is one.
    http: Option<reqwest::Client>,
    opts: ClientOptions,
    gate: super::limits::Gate,
    endpoints: Vec<Endpoint>,
}

/// One replica and its health.
struct Endpoint {
    base: String,
    url: String,
    /// Plain `http://` without a proxy: hyper connections of our own,
    /// requests sent to `path`.
    direct: Option<super::direct::Direct>,
    path: String,
    outstanding: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Out of rotation until this many ms after `epoch` (0: in rotation).
    down_until_ms: AtomicU64,
    served: AtomicU64,
}

/// Consecutive transport failures that take an endpoint out of rotation.
const TRIP_AFTER: u32 = 3;
/// How long it stays out before it is tried again.
const COOLDOWN_MS: u64 = 5_000;

/// The taxonomy's transport labels an attempt can fail with.
use super::Failure as Kind;

/// Why an attempt failed, and whether trying again may help.
struct Failure {
    kind: Kind,
    message: String,
    status: Option<u16>,
    transient: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn with_status(mut self, status: u16) -> Failure {
        self.status = Some(status);
        self
    }
}

fn fail(kind: Kind, message: String, status: Option<u16>, transient: bool) -> Failure {
    Failure {
        kind,
        message,
        status,
        transient,
        retry_after: None,
    }
}

impl Client {
    pub fn new(opts: ClientOptions) -> anyhow::Result<Client> {
        anyhow::ensure!(!opts.base_urls.is_empty(), "no endpoint configured");
        let endpoints: Vec<Endpoint> = opts
            .base_urls
            .iter()
            .map(|b| {
                let url = format!(
                    "{}/{}",
                    b.trim_end_matches('/'),
                    if opts.api == crate::config::schema::Api::Completions {
                        "completions"
                    } else {
                        "chat/completions"
                    }
                );
                let direct = super::direct::Direct::for_url(&url);
                let path = url
                    .strip_prefix("http://")
                    .and_then(|r| r.find('/').map(|i| r[i..].to_string()))
                    .unwrap_or_else(|| "/".into());
                Endpoint {
                    base: b.clone(),
                    url,
                    direct,
                    path,
                    outstanding: AtomicUsize::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    down_until_ms: AtomicU64::new(0),
                    served: AtomicU64::new(0),
                }
            })
            .collect();
        let http = if endpoints.iter().any(|e| e.direct.is_none()) {
            Some(
                reqwest::Client::builder()
                    .pool_max_idle_per_host(256)
                    .build()?,
            )
        } else {
            None
        };
        Ok(Client {
            http,
            gate: super::limits::Gate::new(&opts.limits),
            opts,
            endpoints,
        })
    }

    /// (endpoint, answered requests) so far.
    pub fn served(&self) -> Vec<(String, u64)> {
        self.endpoints
            .iter()
            .map(|e| (e.base.clone(), e.served.load(Ordering::Relaxed)))
            .collect()
    }

    /// The endpoint in rotation with the fewest outstanding requests (all of
    /// them when every one is out of rotation).
    fn pick(&self) -> &Endpoint {
        let now = now_ms();
        let up = |e: &&Endpoint| e.down_until_ms.load(Ordering::Relaxed) <= now;
        let pool: Vec<&Endpoint> = if self.endpoints.iter().any(|e| up(&e)) {
            self.endpoints.iter().filter(up).collect()
        } else {
            self.endpoints.iter().collect()
        };
        pool.into_iter()
            .min_by_key(|e| e.outstanding.load(Ordering::Relaxed))
            .expect("at least one endpoint")
    }

    fn record_health(&self, ep: &Endpoint, transport_failed: bool) {
        if !transport_failed {
            ep.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let n = ep.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= TRIP_AFTER && self.endpoints.len() > 1 {
            let was = ep
                .down_until_ms
                .swap(now_ms() + COOLDOWN_MS, Ordering::Relaxed);
            if was <= now_ms() {
                tracing::warn!(
                    "endpoint {} failed {n} times in a row; out of rotation for {} s",
                    ep.base,
                    COOLDOWN_MS / 1000
                );
            }
        }
    }

    /// Sends one chat request (its serialized body, with retries) and
    /// returns its outcome; `max_tokens` is the body's output budget.
    pub async fn chat(&self, key: &str, body: Vec<u8>, max_tokens: u64, seed: u64) -> Outcome {
        let mut rng = None;
        let mut retries = 0;
        // Sent as is on every attempt.
        let bytes = bytes::Bytes::from(body);
        // Estimated tokens for `engine.tpm`: ~4 bytes per prompt token plus the output budget.
        let tokens = (bytes.len() / 4) as u64 + max_tokens;
        loop {
            let permit = self.gate.acquire(tokens).await;
            let t0 = Instant::now();
            let r = self.attempt(key, &bytes, t0).await;
            drop(permit);
            match &r {
                Ok(_) => self.gate.succeeded(),
                Err(f) if f.kind == Kind::RateLimited => self.gate.rate_limited(),
                Err(_) => {}
            }
            match r {
                Ok(mut o) => {
                    o.retries = retries;
                    o.is_final = true;
                    return o;
                }
                Err(f) => {
                    if !f.transient || retries >= self.opts.max_retries {
                        return Outcome {
                            latency_ms: t0.elapsed().as_secs_f64() * 1000.0,
                            retries,
                            error_kind: Some(f.kind),
                            error: Some(f.message),
                            http_status: f.status,
                            is_final: !f.transient,
                            ..Default::default()
                        };
                    }
                    let base = self.opts.backoff.as_secs_f64() * 2f64.powi(retries as i32);
                    let rng =
                        rng.get_or_insert_with(|| crate::data::SplitMix64::for_cell(seed, key));
                    let jitter = 1.0 + 0.5 * rng.unit();
                    let wait = f
                        .retry_after
                        .map(|d| d.as_secs_f64())
                        .unwrap_or((base * jitter).min(8.0));
                    tracing::debug!(key, kind = f.kind.label(), wait, "retrying: {}", f.message);
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                    retries += 1;
                }
            }
        }
    }

    async fn attempt(
        &self,
        key: &str,
        body: &bytes::Bytes,
        t0: Instant,
    ) -> Result<Outcome, Failure> {
        let ep = self.pick();
        ep.outstanding.fetch_add(1, Ordering::Relaxed);
        let r = match tokio::time::timeout(self.opts.timeout, self.attempt_on(ep, key, body, t0))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(fail(
                Kind::Timeout,
                format!(
                    "request timed out after {} s (`engine.timeout_s`)",
                    self.opts.timeout.as_secs_f64()
                ),
                None,
                true,
            )),
        };
        ep.outstanding.fetch_sub(1, Ordering::Relaxed);
        let transport_failed = matches!(&r, Err(f) if f.transient && f.kind != Kind::RateLimited);
        self.record_health(ep, transport_failed);
        match r {
            Ok(mut o) => {
                ep.served.fetch_add(1, Ordering::Relaxed);
                if self.endpoints.len() > 1 {
                    o.endpoint = Some(ep.base.clone());
                }
                Ok(o)
            }
            Err(f) => Err(f),
        }
    }

    async fn attempt_on(
        &self,
        ep: &Endpoint,
        key: &str,
        body: &bytes::Bytes,
        t0: Instant,
    ) -> Result<Outcome, Failure> {
        let auth = self.opts.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let mut resp = match (&ep.direct, &self.http) {
            (Some(d), _) => {
                let mut headers = vec![
                    ("content-type", "application/json"),
                    ("x-kvt-request-key", key),
                ];
                if let Some(a) = &auth {
                    headers.push(("authorization", a));
                }
                Reply::Direct(
                    d.send(http::Method::POST, &ep.path, &headers, body.clone())
                        .await
                        .map_err(|e| connection_failure(&e.to_string()))?,
                )
            }
            (None, Some(http)) => {
                let mut req = http
                    .post(&ep.url)
                    .header("x-kvt-request-key", key)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
                if let Some(a) = &auth {
                    req = req.header(reqwest::header::AUTHORIZATION, a);
                }
                Reply::Reqwest(req.send().await.map_err(|e| transport_failure(&e))?)
            }
            (None, None) => {
                unreachable!("a reqwest client is built for every endpoint without a direct path")
            }
        };
        let status = resp.status();
        if !(200..300).contains(&status) {
            let retry_after = resp
                .header("retry-after")
                .and_then(|s| s.trim().parse::<f64>().ok())
                .map(|s| Duration::from_secs_f64(s.clamp(0.0, 60.0)));
            let location = resp.header("location").map(str::to_string);
            let text = read_limited(&mut resp, self.opts.max_response_bytes.min(1 << 20))
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let code = status;
            let msg = format!("HTTP {code}: {}", truncate(&text, 500));
            let mut f = match code {
                // Only the direct path sees one (reqwest follows them): kept
                // transient, so the requests are asked again once the
                // address is fixed.
                300..=399 => fail(
                    Kind::EngineError,
                    format!(
                        "HTTP {code}: the server redirects to `{}`; set `engine.base_url` to the address it points to (kvt does not follow redirects)",
                        location.unwrap_or_default()
                    ),
                    Some(code),
                    true,
                ),
                429 => fail(Kind::RateLimited, msg, Some(code), true),
                408 => fail(Kind::Timeout, msg, Some(code), true),
                500..=599 => fail(Kind::EngineError, msg, Some(code), true),
                _ => fail(Kind::EngineError, msg, Some(code), false),
            };
            f.retry_after = retry_after;
            return Err(f);
        }
        let is_sse = resp
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse {
            read_stream(resp, t0, self.opts.max_response_bytes).await
        } else {
            let bytes = read_limited(&mut resp, self.opts.max_response_bytes)
                .await
                .map_err(|f| f.with_status(status))?;
            let latency = t0.elapsed().as_secs_f64() * 1000.0;
            let v: Answer = serde_json::from_slice(&bytes).map_err(|e| {
                fail(
                    Kind::EngineError,
                    format!("malformed JSON response: {e}"),
                    Some(status),
                    true,
                )
            })?;
            let choice = v.choices.get(0).ok_or_else(|| {
                fail(
                    Kind::EngineError,
                    "response has no choices".into(),
                    Some(200),
                    true,
                )
            })?;
            let mut o = Outcome {
                text: choice
                    .get("message")
                    .and_then(|m| m.get("content"))
                    .or_else(|| choice.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                finish_reason: choice
                    .get("finish_reason")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                latency_ms: latency,
                http_status: Some(status),
                ..Default::default()
            };
            logprobs_into(choice.get("logprobs"), &mut o);
            usage_into(&v.usage, &v.kvt, &v.timings, &mut o);
            Ok(o)
        }
    }
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn transport_failure(e: &reqwest::Error) -> Failure {
    if e.is_timeout() {
        return fail(Kind::Timeout, format!("request timed out: {e}"), None, true);
    }
    connection_failure(&super::direct::error_chain(e))
}

/// Connection refused or reset, a body cut off: the server may recover.
fn connection_failure(msg: &str) -> Failure {
    fail(
        Kind::EngineError,
        format!("connection error: {msg}"),
        None,
        true,
    )
}

/// A response from either transport, its body still to be read.
enum Reply {
    Direct(super::direct::Reply),
    Reqwest(reqwest::Response),
}

impl Reply {
    fn status(&self) -> u16 {
        match self {
            Reply::Direct(r) => r.status(),
            Reply::Reqwest(r) => r.status().as_u16(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        match self {
            Reply::Direct(r) => r.header(name),
            Reply::Reqwest(r) => r.headers().get(name).and_then(|v| v.to_str().ok()),
        }
    }

    /// The body's next piece, `None` at its end.
    async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, Failure> {
        match self {
            Reply::Direct(r) => r
                .chunk()
                .await
                .map_err(|e| connection_failure(&e.to_string())),
            Reply::Reqwest(r) => r.chunk().await.map_err(|e| transport_failure(&e)),
        }
    }
}

/// What kvt reads of a (non-streamed) answer; every other field is skipped
/// unparsed, and each of these is kept as it came (a server's odd types are
/// ignored where they are read, not rejected here).
#[derive(serde::Deserialize)]
struct Answer {
    #[serde(default)]
    choices: Value,
    #[serde(default)]
    usage: Value,
    #[serde(default)]
    kvt: Value,
    #[serde(default)]
    timings: Value,
}

/// A choice's standard `logprobs` appended to the outcome's: chat's
/// `{"content": [{token, logprob, top_logprobs: [{token, logprob}]}]}` (one
/// list per answer, or a piece per stream chunk) and the completions API's
/// `{tokens, token_logprobs, top_logprobs: [{token: logprob}]}`. A choice
/// without them leaves the outcome's none: "unavailable", never zeros.
fn logprobs_into(lp: Option<&Value>, o: &mut Outcome) {
    let Some(lp) = lp.filter(|v| v.is_object()) else {
        return;
    };
    let num = |v: &Value| v.as_f64().map(|x| x as f32);
    let mut got: Vec<crate::llm::TokenLogprob> = Vec::new();
    if let Some(content) = lp.get("content").and_then(Value::as_array) {
        for t in content {
            let (Some(token), Some(logprob)) = (
                t.get("token").and_then(Value::as_str),
                t.get("logprob").and_then(num),
            ) else {
                continue;
            };
            let top = t
                .get("top_logprobs")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| {
                            Some((
                                x.get("token")?.as_str()?.to_string(),
                                num(x.get("logprob")?)?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            got.push(crate::llm::TokenLogprob {
                token: token.to_string(),
                logprob,
                top,
            });
        }
    } else if let (Some(tokens), Some(lps)) = (
        lp.get("tokens").and_then(Value::as_array),
        lp.get("token_logprobs").and_then(Value::as_array),
    ) {
        let tops = lp.get("top_logprobs").and_then(Value::as_array);
        for (i, (t, l)) in tokens.iter().zip(lps).enumerate() {
            let (Some(token), Some(logprob)) = (t.as_str(), num(l)) else {
                continue;
            };
            let mut top: Vec<(String, f32)> = tops
                .and_then(|a| a.get(i))
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), num(v)?)))
                        .collect()
                })
                .unwrap_or_default();
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            got.push(crate::llm::TokenLogprob {
                token: token.to_string(),
                logprob,
                top,
            });
        }
    } else {
        return;
    }
    o.logprobs.get_or_insert_with(Vec::new).extend(got);
}

/// Token counts, kvt's own telemetry and llama.cpp's timings, from an answer
/// or a stream chunk.
fn usage_into(usage: &Value, kvt: &Value, timings: &Value, o: &mut Outcome) {
    if usage.is_object() {
        o.prompt_tokens = usage.get("prompt_tokens").and_then(Value::as_u64);
        o.completion_tokens = usage.get("completion_tokens").and_then(Value::as_u64);
    }
    if let Some(r) = kvt.get("retained_tokens").and_then(Value::as_u64) {
        o.retained_tokens = Some(r);
    }
    if let Some(b) = kvt.get("peak_memory_bytes").and_then(Value::as_u64) {
        o.device_peak_bytes = Some(b);
    }
    if let Some(e) = kvt.get("engine").and_then(Value::as_str) {
        o.engine = Some(e.to_string());
    }
    if let Some(n) = kvt.get("native") {
        if let Ok(a) = crate::llm::native::NativeAnswer::deserialize(n) {
            crate::llm::native::telemetry_into(&a, o);
        }
    }
    if timings.is_object() {
        o.server_prompt_ms = timings.get("prompt_ms").and_then(Value::as_f64);
        o.server_predicted_ms = timings.get("predicted_ms").and_then(Value::as_f64);
    }
}

/// The whole body, or an `ENGINE_ERROR` as soon as it passes `limit` bytes.
async fn read_limited(resp: &mut Reply, limit: u64) -> Result<Vec<u8>, Failure> {
    let mut out: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(too_large(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn too_large(limit: u64) -> Failure {
    fail(
        Kind::EngineError,
        format!(
            "the response is larger than {} MiB (`engine.max_response_mib`); kvt stopped reading it",
            limit / (1 << 20)
        ),
        None,
        false,
    )
}

/// Reads a server-sent event stream of chat completion chunks. Each byte is
/// scanned for an event end once (linear in the stream's length, even when a
/// server never ends its events), and the stream is cut at `limit` bytes.
/// (Kept by hand: `eventsource-stream` re-parses its whole buffer on every
/// chunk while a line is unterminated, quadratic for such a stream.)
async fn read_stream(mut resp: Reply, t0: Instant, limit: u64) -> Result<Outcome, Failure> {
    let status = resp.status();
    let mut o = Outcome {
        http_status: Some(status),
        ..Default::default()
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut done = false;
    let mut saw_choice = false;
    let mut total: u64 = 0;
    // Bytes of `buf` already searched for an event end.
    let mut scanned = 0usize;
    while let Some(chunk) = resp.chunk().await? {
        total += chunk.len() as u64;
        if total > limit {
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&chunk);
        loop {
            // A separator may straddle the old end: look back 3 bytes.
            let from = scanned.saturating_sub(3);
            let Some((p, len)) = find_event_end(&buf[from..]) else {
                scanned = buf.len();
                break;
            };
            let pos = (from + p, len);
            scanned = 0;
            let event: Vec<u8> = buf.drain(..pos.0 + pos.1).collect();
            let event = String::from_utf8_lossy(&event[..pos.0]).into_owned();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data).map_err(|e| {
                    fail(
                        Kind::EngineError,
                        format!("malformed stream chunk: {e}"),
                        Some(status),
                        true,
                    )
                })?;
                if let Some(err) = v.get("error") {
                    return Err(fail(
                        Kind::EngineError,
                        format!("error in stream: {err}"),
                        Some(status),
                        true,
                    ));
                }
                if let Some(c) = v.get("choices").and_then(|c| c.get(0)) {
                    saw_choice = true;
                    if let Some(t) = c
                        .get("delta")
                        .and_then(|d| d.get("content"))
                        .or_else(|| c.get("text"))
                        .and_then(Value::as_str)
                    {
                        if !t.is_empty() && o.ttft_ms.is_none() {
                            o.ttft_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
                        }
                        o.text.push_str(t);
                    }
                    if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                        o.finish_reason = Some(f.to_string());
                    }
                    logprobs_into(c.get("logprobs"), &mut o);
                }
                usage_into(&v["usage"], &v["kvt"], &v["timings"], &mut o);
            }
        }
    }
    o.latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !done {
        return Err(fail(
            Kind::EngineError,
            "the stream ended before [DONE]".into(),
            Some(status),
            true,
        ));
    }
    if !saw_choice {
        return Err(fail(
            Kind::EngineError,
            "the stream carried no choices".into(),
            Some(status),
            true,
        ));
    }
    Ok(o)
}

/// End of the first event in `buf`: (position, separator length).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines() {
        assert_eq!(find_event_end(b"data: x\n\ndata: y"), Some((7, 2)));
        assert_eq!(find_event_end(b"data: x\r\n\r\n"), Some((7, 4)));
        assert_eq!(find_event_end(b"data: x\n"), None);
        assert_eq!(truncate("héllo", 2), "h…");
    }
}
