//! `infer` (one node per policy × budget): sends every example of the manifest
//! to the engine once. Each request has a key — blake3 of its identity (model,
//! KV policy and parameters, budget, rendered messages, decoding, label, extra
//! body fields), never the server address, API key, concurrency or timeouts —
//! and its outcome goes into the request journal the moment it arrives. A
//! rebuild sends only what has no final answer; the `responses` artifact is
//! always rebuilt from the journal, so a fully answered node reproduces the
//! same bytes and nothing downstream reruns.
//!
//! Engines (`engine.kind`, a transport setting): `reference` runs the reference
//! engine in process; `serve` starts `kvt serve` on a free loopback port for
//! the node and stops it afterwards; `openai` talks to `engine.base_url`.

use crate::config::schema::{Api, Decoding, EngineKind, Prompt};
use crate::engine::remote::Remote;
use crate::engine::{canonical_json, OpContext};
use crate::llm::backend::{Backend, Query, Shape};
use crate::llm::client::{Client, ClientOptions};
use crate::llm::http::HttpBackend;
use crate::llm::journal::Journal;
use crate::llm::spawned::{shared_model_server, SpawnedServer};
use crate::llm::KvParams;
use crate::llm::Outcome;
use crate::stages::prepare::Entry;
use crate::table;
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub struct Infer;

/// One row of the `responses` artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseRow {
    pub example_id: String,
    pub request_key: String,
    /// Prompt tokens before middle truncation (`prompt.max_tokens`), if cut.
    #[serde(default)]
    pub truncated_from: Option<u64>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What this node's sending produced: how many answers arrived, and each
/// one as the journal recorded it (its JSON), so the artifact is built
/// without reading them back.
#[derive(Default)]
struct Answered {
    sent: AtomicUsize,
    /// This run's outcomes as recorded (their JSON went to the journal).
    fresh: Mutex<std::collections::HashMap<String, Outcome>>,
}

/// A cell label's policy and KV quantisation (`snapkv+q8_0` → `snapkv`,
/// `q8_0`; `snapkv` → `snapkv`, `none`).
fn policy_and_quant(label: &str) -> (&str, &str) {
    label
        .split_once('+')
        .unwrap_or((label, crate::config::schema::NO_QUANT))
}

/// A launched server's own variables for a cell (`engine.launch.vars`):
/// those of its budget as written (`"0.5"`), then those of its quantisation
/// (`none`, `q8_0`, `q4_0`), which win. They enter request identity: they are
/// what the cell means to that server.
fn cell_launch_vars(
    vars: &BTreeMap<String, BTreeMap<String, String>>,
    kv: &KvParams,
) -> BTreeMap<String, String> {
    let budget = crate::engine::pipeline::format_binding(&json!(kv.budget));
    let (_, quant) = policy_and_quant(&kv.policy);
    let mut out = vars.get(&budget).cloned().unwrap_or_default();
    out.extend(vars.get(quant).cloned().unwrap_or_default());
    out
}

/// How a model file is told apart between builds (and shown by `kvt graph`
/// when it changed): its size and modification time, as a person reads them.
fn model_stamp(len: u64, modified: std::time::SystemTime) -> String {
    format!(
        "model file of {len} bytes, modified {}",
        humantime::format_rfc3339_millis(modified)
    )
}

/// How often a sending node reports progress: `KVT_PROGRESS_SECS` (0: never),
/// else every 30 s; never under `--quiet`.
fn progress_every(quiet: bool) -> Option<Duration> {
    if quiet {
        return None;
    }
    let secs = std::env::var("KVT_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(30.0);
    (secs > 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs))
}

/// `  infer[…]: 12 of 48 answered (0.40/s), about 1m30s left`.
pub fn progress_line(node: &str, done: usize, total: usize, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let rate = done as f64 / secs;
    let left = if done == 0 {
        "time left not known yet".to_string()
    } else {
        let rest = (total.saturating_sub(done)) as f64 / rate;
        format!(
            "about {} left",
            crate::engine::progress::human_duration(rest)
        )
    };
    format!("  {node}: {done} of {total} answered ({rate:.2}/s), {left}")
}

struct Settings {
    kv: KvParams,
    model: String,
    /// With `max_new_tokens` already set for the task.
    decoding: Decoding,
    /// The user-message template for the task.
    template: String,
    /// For launched servers: this budget's template variables (identity).
    launch_vars: BTreeMap<String, String>,
    /// `chat` or `completions`.
    api: Api,
    /// Middle truncation: (max prompt tokens, tokenizer).
    truncate: Option<(usize, crate::data::tokenize::Tok)>,
    prompt: Prompt,
    label: Option<String>,
    extra: BTreeMap<String, Value>,
    kind: EngineKind,
    stream: bool,
    /// The GGUF file (native engine, or `kvt serve` with a model file) and its digest.
    model_file: Option<(std::path::PathBuf, String)>,
    /// Native engine: every cell of the experiment, answered from one prefill.
    cohort: Vec<KvParams>,
    record_kept: bool,
    /// A launched or remote server gets the cell's KV parameters per request.
    send_kv: bool,
    /// Native engine: weights in f32 (dequantised at load).
    dequantize: bool,
    /// Top-k log-probabilities asked for (0: none, and always 0 for the simulator).
    logprobs: usize,
    /// Gold and full-cache teacher forcing (a model file, or `send_kv`).
    fidelity: bool,
    /// The reference simulator answers (its identity enters request keys).
    simulator: bool,
    /// How the engine is reached (never identity).
    transport: Transport,
}

mod backend;
mod identity;
mod send;
mod sync;
pub use identity::{answerer, fill, Answerer, PromptSource, Request, SIMULATOR_ID};
use identity::{build_requests, digest_cached, shape, slice_id};
pub use send::Sending;
pub use sync::{pull_journal, push_entries, shard_of};
use sync::{push_batch, push_journal, remote_batch, remote_batch_wait, Outbox};

/// The request journal inside a cache directory.
pub fn journal_path(cache_root: &std::path::Path) -> std::path::PathBuf {
    cache_root.join("v1").join("journal.sqlite")
}

/// What `infer` reads into its key (its stage's `uses`, exactly).
#[derive(Deserialize)]
pub struct Uses {
    #[serde(rename = "model.name")]
    model: String,
    #[serde(rename = "kv.sink_tokens")]
    sink_tokens: u32,
    #[serde(rename = "kv.window")]
    window: u32,
    #[serde(rename = "kv.pool_kernel")]
    pool_kernel: u32,
    #[serde(rename = "kv.seed")]
    seed: u64,
    #[serde(rename = "kv.beta")]
    beta: f64,
    #[serde(rename = "kv.compress")]
    compress: crate::config::schema::Compress,
    #[serde(rename = "kv.decode")]
    decode: Option<crate::config::schema::DecodeCompression>,
    #[serde(rename = "kv.score_dtype")]
    score_dtype: Option<crate::config::schema::ScoreDtype>,
    decoding: Decoding,
    prompt: Prompt,
    #[serde(rename = "dataset.task")]
    task: String,
    #[serde(rename = "tokenizer.kind")]
    tokenizer_kind: crate::config::schema::TokenizerKind,
    #[serde(rename = "tokenizer.name")]
    tokenizer_name: String,
    #[serde(rename = "engine.label")]
    label: Option<String>,
    #[serde(rename = "engine.extra_body")]
    extra_body: BTreeMap<String, Value>,
    #[serde(rename = "engine.launch.vars")]
    launch_vars: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(rename = "engine.api")]
    api: Api,
    #[serde(rename = "engine.model_path")]
    model_path: Option<String>,
    #[serde(rename = "engine.record_kept")]
    record_kept: bool,
    #[serde(rename = "engine.send_kv")]
    send_kv: bool,
    #[serde(rename = "engine.dequantize")]
    dequantize: bool,
    #[serde(rename = "engine.logprobs")]
    logprobs: u32,
    #[serde(rename = "engine.fidelity")]
    fidelity: bool,
}

/// How `infer` reaches its engine (its stage's `transport`, exactly): never
/// part of the key.
#[derive(Deserialize)]
pub struct Transport {
    #[serde(rename = "engine.kind")]
    kind: EngineKind,
    #[serde(rename = "kv.cells")]
    cells: Vec<crate::config::schema::KvCell>,
    #[serde(rename = "engine.prefill_cache_mib")]
    prefill_cache_mib: u64,
    #[serde(rename = "engine.base_url")]
    base_url: Option<String>,
    #[serde(rename = "engine.replicas")]
    replicas: Vec<String>,
    #[serde(rename = "engine.api_key_env")]
    api_key_env: Option<String>,
    #[serde(rename = "engine.concurrency")]
    concurrency: u32,
    #[serde(rename = "engine.rpm")]
    rpm: Option<u32>,
    #[serde(rename = "engine.tpm")]
    tpm: Option<u64>,
    #[serde(rename = "engine.timeout_s")]
    timeout_s: f64,
    #[serde(rename = "engine.max_retries")]
    max_retries: u32,
    #[serde(rename = "engine.max_response_mib")]
    max_response_mib: u64,
    #[serde(rename = "engine.stream")]
    stream: bool,
    #[serde(rename = "engine.launch")]
    launch: crate::config::schema::Launch,
    #[serde(rename = "output.exp_group_id")]
    exp_group_id: String,
}

impl crate::stages::Stage for Infer {
    fn name(&self) -> &'static str {
        "infer"
    }
    /// Requests that failed transiently last time make the node stale, so the
    /// next build retries them (and only them).
    fn fingerprint(
        &self,
        k: &crate::engine::KeyContext,
        u: &Uses,
        t: &Transport,
    ) -> Result<Option<String>> {
        // Which model answers is identity; how it is reached is not. The
        // simulator is one model whether in process or behind `kvt serve`; a
        // model file is its bytes (size and mtime stand for the digest here,
        // cheaply; the digest is in every request key); a remote server's
        // model is `model.name`, already in the key.
        let kind = t.kind;
        let model = u.model_path.clone();
        let stamp = match answerer(kind, model.is_some()) {
            Answerer::Simulator => Some(format!("model {SIMULATOR_ID}")),
            Answerer::ModelFile => model
                .map(std::path::PathBuf::from)
                .or_else(|| std::env::var_os("KVT_MODEL").map(Into::into))
                .and_then(|p| {
                    let p = if p.is_absolute() { p } else { k.root.join(p) };
                    let m = std::fs::metadata(&p).ok()?;
                    Some(model_stamp(m.len(), m.modified().ok()?))
                }),
            Answerer::Named => None,
        };
        let path = journal_path(k.cache_root);
        let pending = if path.exists() {
            let j = Journal::shared(&path)?;
            let n = j.lock().expect("journal").pending(&slice_id(k))?;
            (n > 0).then(|| format!("{n} requests to retry"))
        } else {
            None
        };
        Ok(match (stamp, pending) {
            (None, None) => None,
            (a, b) => Some([a, b].into_iter().flatten().collect::<Vec<_>>().join("; ")),
        })
    }
    fn version(&self) -> u32 {
        2
    }
    type Uses = Uses;
    type Transport = Transport;
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, transport: Self::Transport) -> Result<()> {
        let u = uses;
        let t = transport;
        let kind = t.kind;
        let model_path = u.model_path.clone();
        let simulator = answerer(kind, model_path.is_some()) == Answerer::Simulator;
        let native = answerer(kind, model_path.is_some()) == Answerer::ModelFile;
        let cell = |policy: String, budget: f64| -> Result<KvParams> {
            Ok(KvParams {
                policy,
                budget,
                sink_tokens: u.sink_tokens,
                window: u.window,
                pool_kernel: u.pool_kernel,
                seed: u.seed,
                beta: (native || u.send_kv).then_some(u.beta),
                compress: (native || u.send_kv).then_some(u.compress),
                decode: u.decode.clone(),
                score_dtype: u.score_dtype,
            })
        };
        let mut kv = cell(ctx.item("policy")?, ctx.item("budget")?)?;
        if u.send_kv && kv.is_full() {
            // Every policy's full cache is one request, whatever it is called.
            kv.policy = "full".into();
            kv.budget = 1.0;
        }
        let model_file = if native {
            let path = crate::llm::native::resolve_model_path(model_path.as_deref(), ctx.root())
                .map_err(|e| crate::KvtError::usage(format!("config `engine.model_path`: {e}")))?;
            let digest = digest_cached(&path)?;
            kv.native_cell().context("config `kv.policies`")?;
            Some((path, digest))
        } else if simulator {
            kv.check().context("config `kv.policies` / `kv.budgets`")?;
            None
        } else {
            // A server of the user's knows its own policies (an unknown one
            // is its 400, recorded as a final failure).
            kv.check_budget().context("config `kv.budgets`")?;
            None
        };
        let mut cohort = Vec::new();
        if native {
            for kc in &t.cells {
                let c = cell(kc.policy.clone(), kc.budget)?;
                if !cohort
                    .iter()
                    .any(|o: &KvParams| o.native_cell().ok() == c.native_cell().ok())
                {
                    cohort.push(c);
                }
            }
        }
        let prompt = u.prompt.clone();
        let task = &u.task;
        let task_base = task.strip_suffix("_e").unwrap_or(task).to_string();
        let mut decoding = u.decoding.clone();
        let template = match prompt.tasks.get(&task_base) {
            Some(tp) => {
                decoding.max_new_tokens = tp.max_new_tokens;
                tp.template.clone()
            }
            None => prompt.template.clone(),
        };
        let truncate = match prompt.max_tokens {
            Some(m) => {
                let cfg = crate::config::schema::Tokenizer {
                    kind: u.tokenizer_kind,
                    name: u.tokenizer_name.clone(),
                    url: None,
                };
                let tok = crate::data::tokenize::Tok::load(&cfg, ctx.root(), None)?;
                Some((m as usize, tok))
            }
            None => None,
        };
        let launch_vars = cell_launch_vars(&u.launch_vars, &kv);
        let s = Settings {
            api: u.api,
            launch_vars,
            kv,
            model: u.model.clone(),
            decoding,
            template,
            truncate,
            prompt,
            label: u.label.clone(),
            extra: u.extra_body.clone(),
            kind,
            stream: t.stream,
            model_file,
            cohort,
            record_kept: u.record_kept,
            send_kv: u.send_kv,
            dequantize: u.dequantize,
            logprobs: if simulator { 0 } else { u.logprobs as usize },
            // kvt's native engine, and servers that take kvt's per-request
            // fields (`send_kv`: scripts/kvpress_server.py).
            fidelity: (native || u.send_kv) && u.fidelity,
            simulator,
            transport: t,
        };
        let t_node = std::time::Instant::now();
        // Debug timings: wall time since the node started, and process CPU.
        let node = ctx.node().to_string();
        let timing = |what: &str| {
            tracing::debug!(
                node = node.as_str(),
                "{what} at {:?} (cpu {:?})",
                t_node.elapsed(),
                crate::engine::cpu_time()
            )
        };
        timing("infer starts");
        let requests = {
            let examples: Vec<PromptSource> = table::read_owned(ctx.input("prepare", "examples")?)?;
            let entries: Vec<Entry> = table::read_owned(ctx.input("prepare", "manifest")?)?;
            build_requests(&s, &examples, &entries)?
        };

        let journal = Journal::shared(&journal_path(ctx.cache_root))?;
        let journal: &Mutex<Journal> = &journal;
        let keys: Vec<String> = requests.iter().map(|r| r.key.clone()).collect();
        if let Some(remote) = ctx.remote {
            let t0 = std::time::Instant::now();
            let n = pull_journal(remote, journal)?;
            tracing::debug!(node = ctx.node(), "journal pulled in {:?}", t0.elapsed());
            if n > 0 {
                tracing::info!(node = ctx.node(), "{n} answers from the remote cache");
            }
        }
        timing("requests built");
        let known = journal.lock().expect("journal").get_many(&keys)?;
        timing("journal read");
        // Answers from before this run (a killed run's among them) that the
        // remote may lack; this run's own go up as they arrive.
        let earlier: Vec<String> = known
            .iter()
            .filter(|(_, o)| o.is_final)
            .map(|(k, _)| k.clone())
            .collect();
        let pending: Vec<&Request> = requests
            .iter()
            .filter(|r| !known.get(&r.key).is_some_and(|o| o.is_final))
            .collect();
        // `--shard I/N`: only shard I's requests are sent here; the node
        // stays unfinished while other shards' requests lack answers.
        let shard = crate::stages::BuildEnv::of(ctx)?.shard;
        let (to_send, others): (Vec<&Request>, Vec<&Request>) = match shard {
            Some((i, n)) => pending.iter().partition(|r| shard_of(&r.key, n) == i),
            None => (pending, Vec::new()),
        };
        let answered = Answered::default();
        if !to_send.is_empty() {
            tracing::info!(
                node = ctx.node(),
                pending = to_send.len(),
                total = requests.len(),
                "sending requests"
            );
            let t0 = std::time::Instant::now();
            let shape = shape(&s)?;
            let result = self.send_all(ctx, &s, &shape, &to_send, journal, &answered);
            tracing::debug!(
                node = ctx.node(),
                "answered in {:?} (cpu {:?})",
                t0.elapsed(),
                crate::engine::cpu_time()
            );
            // What was answered reaches the remote even when the node fails.
            if let Some(remote) = ctx.remote {
                push_journal(remote, journal, &earlier)?;
            }
            result?;
        } else if let Some(remote) = ctx.remote {
            push_journal(remote, journal, &earlier)?;
        }
        if ctx.is_cancelled() {
            anyhow::bail!("interrupted: answered requests are kept in the journal; run the build again to finish");
        }
        if let (Some((i, n)), false) = (shard, others.is_empty()) {
            return Err(crate::engine::error::Unfinished(format!(
                "shard {i}/{n}: sent {} requests, {} belong to other shards; their answers reach this node through the remote cache (or a build without --shard sends them)",
                answered.sent.load(Ordering::Relaxed),
                others.len()
            ))
            .into());
        }

        // The artifact: the journal's outcomes in manifest order. This run's
        // answers and earlier final ones are at hand; the journal is read
        // only for the rest (answers another node sent meanwhile).
        let fresh = answered.fresh.into_inner().expect("answers");
        let mut j = journal.lock().expect("journal");
        let rest: Vec<String> = keys
            .iter()
            .filter(|k| !fresh.contains_key(*k) && !known.get(*k).is_some_and(|o| o.is_final))
            .cloned()
            .collect();
        let mut got = j.get_many(&rest)?;
        got.extend(fresh);
        for (k, o) in known {
            if o.is_final {
                got.entry(k).or_insert(o);
            }
        }
        timing("answers read back");
        let mut rows = Vec::with_capacity(requests.len());
        let mut transient = 0;
        for r in &requests {
            let o = got.get(&r.key).cloned().unwrap_or_else(|| Outcome {
                error_kind: Some(crate::llm::Failure::EngineError),
                error: Some("no response recorded".into()),
                ..Default::default()
            });
            if !o.is_final {
                transient += 1;
            }
            rows.push(ResponseRow {
                truncated_from: r.truncated_from,
                example_id: r.example_id.clone(),
                request_key: r.key.clone(),
                outcome: o,
            });
        }
        j.set_pending(&slice_id(&ctx.key), transient as i64)?;
        if transient > 0 {
            let example = rows
                .iter()
                .find(|r| !r.outcome.is_final)
                .and_then(|r| r.outcome.error.clone())
                .unwrap_or_default();
            if transient == rows.len() {
                // Name where the requests went (a launched server's address
                // changes per run and its log is named elsewhere).
                let at: Vec<&str> = s
                    .transport
                    .base_url
                    .iter()
                    .chain(&s.transport.replicas)
                    .map(String::as_str)
                    .collect();
                let server = if s.transport.kind == EngineKind::Openai && !at.is_empty() {
                    format!("the server at `{}`", at.join("`, `"))
                } else {
                    "the server".to_string()
                };
                anyhow::bail!(
                    "all {transient} requests failed after retries (e.g. {example}); is {server} up? Nothing was lost: run the build again to retry them"
                );
            }
            tracing::warn!(
                "{}: {transient} of {} requests failed after retries (e.g. {example}); they are scored as failures now and retried on the next build",
                ctx.node(),
                rows.len()
            );
        }
        tracing::info!(
            node = ctx.node(),
            sent = answered.sent.load(Ordering::Relaxed),
            "all requests answered"
        );
        ctx.put("responses", &table::write(&rows)?)?;
        timing("responses written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launched_cell_gets_its_budgets_then_its_quantisations_vars() {
        let vars: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_value(json!({
            "0.5": {"cache_type": "f16", "ctx": "2048"},
            "q8_0": {"cache_type": "q8_0"},
            "none": {"cache_type": "f16"}
        }))
        .unwrap();
        let kv = KvParams::for_test;
        let got = cell_launch_vars(&vars, &kv("snapkv+q8_0", 0.5));
        assert_eq!(got["cache_type"], "q8_0", "the quantisation's wins");
        assert_eq!(got["ctx"], "2048");
        assert_eq!(
            cell_launch_vars(&vars, &kv("full", 1.0))["cache_type"],
            "f16"
        );
        assert_eq!(policy_and_quant("snapkv+q4_0"), ("snapkv", "q4_0"));
        assert_eq!(policy_and_quant("snapkv"), ("snapkv", "none"));
    }

    #[test]
    fn task_prompts_and_middle_truncation() {
        let bpe = crate::data::tokenize::encoding("cl100k_base").unwrap();
        let ex = PromptSource {
            example_id: "e1".into(),
            question: "Who?".into(),
            context: "word ".repeat(500),
            extra: Default::default(),
            answers: Vec::new(),
            meta: Default::default(),
        };
        let entry = Entry {
            example_id: "e1".into(),
            bin_idx: 0,
            token_len: 500,
        };
        let settings = |max: Option<usize>| Settings {
            kv: KvParams::for_test("snapkv", 0.5),
            model: "m".into(),
            decoding: Decoding {
                temperature: 0.0,
                top_p: 1.0,
                max_new_tokens: 32,
            },
            template: "START {context}\nQuestion: {question}\nAnswer:".into(),
            launch_vars: Default::default(),
            api: Api::Chat,
            truncate: max.map(|m| {
                (
                    m,
                    crate::data::tokenize::Tok::Tiktoken("cl100k_base".into()),
                )
            }),
            prompt: Prompt {
                system: "s".into(),
                template: String::new(),
                tasks: Default::default(),
                max_tokens: None,
            },
            label: None,
            extra: Default::default(),
            kind: EngineKind::Serve,
            stream: true,
            model_file: None,
            cohort: Vec::new(),
            record_kept: false,
            send_kv: false,
            dequantize: false,
            logprobs: 0,
            fidelity: false,
            simulator: true,
            transport: serde_json::from_value(json!({
                "engine.kind": "serve", "kv.cells": [{"policy": "streaming", "budget": 1.0}],
                "engine.prefill_cache_mib": 64, "engine.base_url": null, "engine.replicas": [],
                "engine.api_key_env": null, "engine.concurrency": 1, "engine.rpm": null,
                "engine.tpm": null, "engine.timeout_s": 1.0, "engine.max_retries": 0,
                "engine.max_response_mib": 1, "engine.stream": false,
                "engine.launch": {"command": null, "vars": {}, "health_path": "/health",
                                  "api_path": "/v1", "startup_timeout_s": 1.0},
                "output.exp_group_id": "t"
            }))
            .unwrap(),
        };
        let full = build_requests(
            &settings(None),
            std::slice::from_ref(&ex),
            std::slice::from_ref(&entry),
        )
        .unwrap();
        assert_eq!(full[0].truncated_from, None);
        // Keys index the journal: a change in how they are computed makes
        // every answer users already paid for unreachable. Pinned when
        // requests stopped carrying their JSON, a change checked against a
        // journal the earlier code wrote (every answer was found).
        assert_eq!(
            full[0].key,
            "84c5d6c6747903d98ef0790dbc46044e3694c98e473babbce37cb8065ab18792"
        );
        let shape = shape(&settings(None)).unwrap();
        let body = full[0].query(&shape).body();
        assert_eq!(body["max_tokens"], 32);
        assert_eq!(body["messages"][1]["content"], full[0].user.as_str());
        let cut = build_requests(&settings(Some(60)), &[ex], &[entry]).unwrap();
        let user = cut[0].query(&shape).messages()[1]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let user = user.as_str();
        let n_before = cut[0].truncated_from.unwrap() as usize;
        assert!(n_before > 500, "{n_before}");
        // Both ends survive, the middle goes; about 60 tokens remain.
        assert!(
            user.starts_with("START word") && user.ends_with("Question: Who?\nAnswer:"),
            "{user}"
        );
        let n_after = bpe.encode_ordinary(user).len();
        assert!((55..=62).contains(&n_after), "{n_after}");
        assert_ne!(cut[0].key, full[0].key, "truncation changes the request");
    }

    #[test]
    fn a_model_stamp_reads_as_a_size_and_a_time() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_780_000_000_123);
        assert_eq!(
            model_stamp(1234, t),
            "model file of 1234 bytes, modified 2026-05-28T20:26:40.123Z"
        );
    }

    #[test]
    fn template_fill_is_single_pass() {
        let ex = PromptSource {
            example_id: "x".into(),
            question: "Q{context}?".into(),
            context: "C {question}".into(),
            extra: Default::default(),
            answers: Vec::new(),
            meta: Default::default(),
        };
        assert_eq!(
            fill("[{context}] {question} {x}", &ex),
            "[C {question}] Q{context}? {x}"
        );
        let ex = PromptSource {
            extra: [("options".to_string(), "A. red\nB. {context}".to_string())].into(),
            ..ex
        };
        assert_eq!(
            fill("{question}\n{options}\n{\"json\": 1}", &ex),
            "Q{context}?\nA. red\nB. {context}\n{\"json\": 1}"
        );
    }
}
