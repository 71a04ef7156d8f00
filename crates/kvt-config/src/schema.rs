//! The typed configuration schema: one struct per YAML section, every section
//! `deny_unknown_fields`, so a misspelt key is an error and not a silent default.
//! The values themselves live in `config/default.yaml`; this file says only what
//! shape and type each key has.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A closed set of config values: a serde enum with snake_case names, so an
/// unknown value is a schema error (exit 2, file:line, key, the valid values).
macro_rules! closed_set {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

closed_set!(
    /// How requests are answered (`engine.kind`).
    EngineKind {
        /// kvt's reference simulator, in process.
        Reference => "reference",
        /// A GGUF model run by kvt's native engine, in process.
        Native => "native",
        /// `kvt serve` spawned for the run (native with `model_path`, else the simulator).
        Serve => "serve",
        /// A server started per node from `engine.launch.command`.
        Launch => "launch",
        /// Any OpenAI-compatible server at `engine.base_url`.
        Openai => "openai",
    }
);

closed_set!(
    /// `engine.api`: chat messages or one completion prompt.
    Api { Chat => "chat", Completions => "completions" }
);

closed_set!(
    /// `tokenizer.kind`.
    TokenizerKind { Tiktoken => "tiktoken", Hf => "hf", Server => "server" }
);

closed_set!(
    /// `dataset.source`.
    Source { Synthetic => "synthetic", Longbench => "longbench", File => "file" }
);

closed_set!(
    /// `dataset.on_bad_record`.
    OnBadRecord { Fail => "fail", Skip => "skip" }
);

closed_set!(
    /// `binning.scheme`: what an example's length is.
    BinScheme {
        /// Context tokens by `tokenizer`; bins from `n_bins` quantiles or `edges`.
        Tokens => "tokens",
        /// LongBench-E's buckets by each record's `length` field: 0–4k, 4–8k, 8k+
        /// (other bucket starts with `edges`).
        LongbenchE => "longbench_e",
        /// LongBench v2's length classes by each record's `length` field:
        /// short (up to 32k words), medium (32k–128k), long (128k–2M).
        LengthClass => "length_class",
    }
);

closed_set!(
    /// `metrics.code_sim`: which ratio fuzzywuzzy's `fuzz.ratio` computes —
    /// difflib's `SequenceMatcher` (pure Python, without python-Levenshtein)
    /// or python-Levenshtein's `ratio`. LongBench result files exist for both.
    CodeSim { Difflib => "difflib", Levenshtein => "levenshtein" }
);

impl BinScheme {
    fn tokens() -> Self {
        BinScheme::Tokens
    }
}

closed_set!(
    /// `sampling.strategy`.
    Strategy { Uniform => "uniform", FocusTransition => "focus_transition" }
);

closed_set!(
    /// `kv.score_dtype`: the precision a policy's scores are compared at
    /// before the kept entries are chosen. `bf16` and `f16` round each score
    /// as an engine computing in that format would, so near-equal scores
    /// (the same token's key norm at two positions) tie exactly, and ties go
    /// to the lower position in every engine.
    ScoreDtype { F32 => "f32", Bf16 => "bf16", F16 => "f16" }
);

/// `kv.compress`: what part of the prompt a policy compresses (native
/// engine and the kvpress server). One type from the config file to the
/// engine's cell and the request's `kvt` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compress {
    /// The context only; the question is prefilled afterwards on the
    /// compressed cache and never enters the scores (kvpress's default).
    #[default]
    Context,
    /// The whole prompt, question included (the SnapKV paper's setting).
    Prompt,
    /// The context once, without any question, for every question asked of
    /// it (a dataset's turns: `meta.group`, `meta.turn`): one prefill and
    /// one compressed cache per context and cell, each question prefilled
    /// after it on a copy (SCBench's shared-context mode).
    Shared,
    /// As `shared`, and each question follows the earlier turns' questions
    /// and the model's own answers, kept in the cache after the compressed
    /// context as in a multi-turn chat (SCBench's multi-turn mode).
    MultiTurn,
}

impl Compress {
    /// One compressed context for several questions (`shared`, `multi_turn`).
    pub fn shares_context(self) -> bool {
        matches!(self, Compress::Shared | Compress::MultiTurn)
    }
}

impl Compress {
    pub fn as_str(self) -> &'static str {
        match self {
            Compress::Context => "context",
            Compress::Prompt => "prompt",
            Compress::Shared => "shared",
            Compress::MultiTurn => "multi_turn",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Pipeline name: `pipelines/<name>.yaml` under the project root.
    pub pipeline: String,
    pub dataset: Dataset,
    pub tokenizer: Tokenizer,
    pub binning: Binning,
    pub sampling: Sampling,
    pub model: Model,
    pub engine: Engine,
    pub kv: Kv,
    pub decoding: Decoding,
    pub prompt: Prompt,
    pub metrics: Metrics,
    pub analysis: Analysis,
    pub output: Output,
    pub db: Db,
    pub cache: Cache,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub name: String,
    pub task: String,
    /// Where examples come from: `synthetic` (built in), `longbench` (a local
    /// copy, found by `dataset.path` or the usual places) or `file` (any JSONL
    /// or Parquet file at `dataset.path`, mapped by `dataset.fields`).
    pub source: Source,
    /// A file or directory; for `source: file` also a glob (`data/*.jsonl`)
    /// or a list of files and globs, read in order.
    pub path: Option<PathSpec>,
    /// `jsonl`, `json` (JSON lines or one array of records) or `parquet` for
    /// `source: file`; null: from the file extension.
    pub format: Option<String>,
    /// Which record fields become the example's id, question, context, answers and meta.
    pub fields: Fields,
    /// `fail` (default) or `skip`: what a malformed record does.
    pub on_bad_record: OnBadRecord,
    /// The metric to score with; null: substring recall for synthetic tasks,
    /// the task's own metric for LongBench, `qa_f1_score` for files.
    pub metric: Option<String>,
    pub seed: u64,
    /// Target prompt lengths (tokens) for synthetic tasks.
    pub lengths: Vec<u64>,
    /// Examples generated per target length for synthetic tasks.
    pub per_length: u64,
    /// Deterministic operations applied before binning (shuffle, take, skip, select).
    pub ops: Vec<DatasetOp>,
}

/// `dataset.path`: one path (or glob), or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PathSpec {
    One(String),
    Many(Vec<String>),
}

impl PathSpec {
    pub fn patterns(&self) -> Vec<&str> {
        match self {
            PathSpec::One(p) => vec![p.as_str()],
            PathSpec::Many(ps) => ps.iter().map(String::as_str).collect(),
        }
    }
    /// The single path, for sources that take exactly one.
    pub fn single(&self) -> Option<&str> {
        match self {
            PathSpec::One(p) => Some(p),
            PathSpec::Many(ps) if ps.len() == 1 => Some(&ps[0]),
            PathSpec::Many(_) => None,
        }
    }
}

/// One deterministic dataset operation (applied by `data::ops::apply`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DatasetOp {
    Shuffle(u64),
    Take(usize),
    Skip(usize),
    Select(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    /// Null: records are numbered `<file stem>-<line>`. Every field here is
    /// a path into the record: a key, nested keys (`meta.answer`) and list
    /// positions (`topics[0]`); a key that itself contains dots wins.
    pub id: Option<String>,
    /// Null: the records have no separate question (the instruction is inside
    /// the context); `{question}` in the template is then empty.
    pub question: Option<String>,
    pub context: String,
    /// A list of strings or one string.
    pub answers: String,
    /// Extra fields copied into the example's `meta` when present.
    pub meta: Vec<String>,
    /// More fields for prompt templates: placeholder name → field path, e.g.
    /// `{options: options}` fills `{options}` (a list becomes one item per line).
    /// Optional, so a mapping written whole (`--set dataset.fields={...}`) may omit it.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
    /// Records sharing this field's value are several questions (turns, in
    /// file order) about one context: `meta.group` and `meta.turn`, sampled
    /// together, asked of one compressed cache under `kv.compress: shared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokenizer {
    /// `tiktoken` (an encoding), `hf` (a Hugging Face `tokenizer.json`) or
    /// `server` (the serving engine's `/tokenize`, so bins are in the model's tokens).
    pub kind: TokenizerKind,
    /// tiktoken: `cl100k_base` or `o200k_base`; hf: a path to `tokenizer.json`
    /// or a model id found in the hub cache; server: the model's name (its identity).
    pub name: String,
    /// server: the tokenizer's base URL (transport, not identity); null:
    /// `engine.base_url` without `/v1`.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binning {
    /// `tokens` (default) or `longbench_e` (by the records' `length` field).
    #[serde(default = "BinScheme::tokens")]
    pub scheme: BinScheme,
    pub n_bins: u32,
    pub edges: Option<Vec<u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    pub strategy: Strategy,
    pub n_per_bin: u32,
    pub seed: u64,
    pub pinned: Vec<String>,
    pub focus_bins: Vec<u32>,
    pub focus_n_per_bin: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub name: String,
    pub kv_geometry: KvGeometry,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvGeometry {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub bytes_per_elem: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engine {
    /// `reference` (the simulator, in process), `native` (a GGUF model in
    /// process), `serve` (kvt serve spawned for the run: the native engine when
    /// `model_path` is set, else the simulator), `launch` or `openai`.
    pub kind: EngineKind,
    /// The GGUF file for `native` and `serve` (null: `$KVT_MODEL`). Its digest
    /// is the model's identity; the path is not.
    pub model_path: Option<String>,
    /// Native engine: keep the positions each layer and KV head kept, per response.
    pub record_kept: bool,
    /// Send the cell's KV parameters (policy, budget, window, …) with every
    /// request in a `kvt` field, as kvt does to its own engines: for servers
    /// that read them per request, such as `scripts/kvpress_server.py`.
    #[serde(default)]
    pub send_kv: bool,
    /// Native engine: run every weight matrix in f32, dequantised once at
    /// load, instead of its quantised form (slower; for comparing with f32
    /// implementations such as transformers). Enters request identity.
    #[serde(default)]
    pub dequantize: bool,
    /// Top-k log-probabilities recorded per generated token (0: none). The
    /// native engine computes them; OpenAI-compatible servers are asked
    /// through `logprobs`/`top_logprobs`; the simulator has none.
    #[serde(default)]
    pub logprobs: u32,
    /// Native engine (in process or behind `kvt serve`): teacher-force the
    /// gold answers and the full cache's own answer under every cell (gold
    /// log-likelihood, KL to the full cache, top-1 agreement).
    #[serde(default)]
    pub fidelity: bool,
    /// Native engine: memory for recent prefills shared between cells (MiB).
    pub prefill_cache_mib: u64,
    pub base_url: Option<String>,
    /// More replicas of the same model beside `base_url` (requests are
    /// balanced by outstanding requests).
    pub replicas: Vec<String>,
    /// Name of the environment variable holding the API key (never the key itself).
    pub api_key_env: Option<String>,
    pub concurrency: u32,
    /// Requests per minute at most (null: no limit).
    pub rpm: Option<u32>,
    /// Tokens per minute at most, estimated from the request (null: no limit).
    pub tpm: Option<u64>,
    pub timeout_s: f64,
    pub max_retries: u32,
    /// A response body larger than this (MiB) is an `ENGINE_ERROR`, so a
    /// misbehaving server cannot exhaust memory.
    pub max_response_mib: u64,
    /// Optional user label that enters request identity.
    pub label: Option<String>,
    /// Extra JSON fields sent with every request (they enter request identity).
    pub extra_body: BTreeMap<String, serde_json::Value>,
    /// Stream responses (measures time to first token).
    pub stream: bool,
    /// `chat` (messages, the server applies its chat template) or
    /// `completions` (one prompt string: system message, blank line, user message).
    pub api: Api,
    /// For `kind: launch`: a server started per `infer` node.
    pub launch: Launch,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    /// Run by `sh -c`; `{port}`, `{model}`, `{policy}`, `{budget}`,
    /// `{quant}` and the cell's `vars` are filled in.
    pub command: Option<String>,
    /// Per budget (as written in `kv.budgets`, e.g. "0.5") and per KV
    /// quantisation (`none`, `q8_0`, `q4_0`; these win): extra template variables.
    pub vars: BTreeMap<String, BTreeMap<String, String>>,
    pub health_path: String,
    /// Path of the OpenAI-compatible API under the server's root.
    pub api_path: String,
    pub startup_timeout_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    /// The system message.
    pub system: String,
    /// The user message; `{context}` and `{question}` are filled in. Keep the
    /// question on a line starting with `Question:` for the reference engine.
    pub template: String,
    /// Per-task templates and generation lengths (LongBench's tasks by default),
    /// used when `dataset.task` names one.
    pub tasks: BTreeMap<String, TaskPrompt>,
    /// Prompts longer than this many tokens (by `tokenizer`) lose their middle,
    /// keeping the first and last halves, as LongBench does; null: no limit.
    pub max_tokens: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPrompt {
    pub template: String,
    pub max_new_tokens: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kv {
    /// Eviction policies to compare; each runs at every budget but 1.0 (a
    /// policy at 1.0 keeps everything: the full cache).
    pub policies: Vec<String>,
    pub budgets: Vec<f64>,
    /// KV quantisations to cross with the policies: `none`, `q8_0`, `q4_0`.
    #[serde(default = "default_quant")]
    pub quant: Vec<String>,
    /// The cells to run, derived from `policies`, `budgets` and `quant` at
    /// load ([`Kv::expand_cells`]), which overwrites whatever was read; a
    /// config file naming it is refused as an unknown key (it is not in
    /// `config/default.yaml`). Read back by ops that take `kv` whole.
    #[serde(default)]
    pub cells: Vec<KvCell>,
    pub sink_tokens: u32,
    pub window: u32,
    pub pool_kernel: u32,
    pub seed: u64,
    /// PyramidKV's β (native engine).
    pub beta: f64,
    /// Native engine: `context` (compress the context, then prefill the question
    /// on the compressed cache, as kvpress does) or `prompt` (compress the whole
    /// prompt, question included, as the SnapKV paper does).
    pub compress: Compress,
    /// Compression while the answer is generated (native engine); null:
    /// none. Left out of the configuration as ops see it when null, so the
    /// `kv` section and the keys of experiments without it are unchanged
    /// (`infer` lists it as optional: `kv.decode?`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<DecodeCompression>,
    /// The precision scores are compared at (native engine and servers sent
    /// `engine.send_kv`); null: as computed (f32). Left out when null, so
    /// keys without it are unchanged (`kv.score_dtype?`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_dtype: Option<ScoreDtype>,
}

/// `kv.decode`: while an answer is generated, every `interval` new tokens
/// the cache is cut back to `target` entries a head (as kvpress's
/// `DecodingPress` does), on top of whatever the cell's policy evicted at
/// prefill. Sliding-window layers keep their window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeCompression {
    /// Generated tokens between two compressions (the first when decoding starts).
    pub interval: u32,
    /// Entries a head to cut back to: a token count (> 1), or a fraction
    /// (≤ 1) of the cache when decoding starts.
    pub target: f64,
    /// Which entries stay: `streaming` (the first `sink_tokens` and the
    /// most recent; the default), `knorm` (the smallest keys) or `random`
    /// (seeded by `kv.seed`): scores that need no attention statistics.
    #[serde(default = "DecodeCompression::default_policy")]
    pub policy: String,
}

impl DecodeCompression {
    /// The policies that can score a cache while it decodes.
    pub const POLICIES: &'static [&'static str] = &["streaming", "knorm", "random"];
    fn default_policy() -> String {
        "streaming".into()
    }
    /// Entries a head to keep when the cache held `at_start` as decoding began.
    pub fn target_entries(&self, at_start: usize) -> usize {
        if self.target > 1.0 {
            self.target as usize
        } else {
            ((self.target * at_start as f64).ceil() as usize).max(1)
        }
    }
}

fn default_quant() -> Vec<String> {
    vec![NO_QUANT.to_string()]
}

/// `kv.quant`'s name for the unquantised cache.
pub const NO_QUANT: &str = "none";

/// One cell of the sweep: a policy label (`snapkv`, or `snapkv+q8_0` for a
/// quantised cache) at one budget. Its fields are the infer and score nodes'
/// bindings, so a cell's node id reads `infer[budget=0.5,policy=snapkv]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvCell {
    pub policy: String,
    pub budget: f64,
}

/// The policy that keeps every entry: every cell's reference.
pub const FULL: &str = "full";

impl Kv {
    /// The cells a sweep runs, each once: the full cache at 1.0 first (every
    /// cell's reference, run even when `full` is not listed), the full cache
    /// once per other quantisation, then every other policy at every budget
    /// but 1.0 (where it keeps everything, so it is the full cache) for each
    /// quantisation. A quantised cell's label is `policy+quant`.
    pub fn expand_cells(&self) -> Vec<KvCell> {
        let label = |p: &str, q: &str| {
            if q == NO_QUANT {
                p.to_string()
            } else {
                format!("{p}+{q}")
            }
        };
        let mut cells = vec![KvCell {
            policy: FULL.into(),
            budget: 1.0,
        }];
        for q in self.quant.iter().filter(|q| *q != NO_QUANT) {
            cells.push(KvCell {
                policy: label(FULL, q),
                budget: 1.0,
            });
        }
        for p in self.policies.iter().filter(|p| *p != FULL) {
            for q in &self.quant {
                for &b in self.budgets.iter().filter(|b| **b != 1.0) {
                    let c = KvCell {
                        policy: label(p, q),
                        budget: b,
                    };
                    if !cells.contains(&c) {
                        cells.push(c);
                    }
                }
            }
        }
        cells
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decoding {
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// LongBench's code similarity (`code_sim_score`) as fuzzywuzzy computes
    /// it: `difflib` (without python-Levenshtein) or `levenshtein` (with it).
    pub code_sim: CodeSim,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    pub bootstrap: Bootstrap,
    pub transition: Transition,
    #[serde(default)]
    pub fidelity: FidelityRule,
    #[serde(default)]
    pub splits: Splits,
    #[serde(default)]
    pub selective: Selective,
}

/// Verdicts on the continuous metrics (gold log-likelihood, KL).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FidelityRule {
    /// The largest loss per answer token (nats) that still counts as safe:
    /// the drop in the gold answer's log-likelihood, or the KL to the full cache.
    pub delta_nats: f64,
}

impl Default for FidelityRule {
    fn default() -> Self {
        FidelityRule { delta_nats: 0.1 }
    }
}

/// Examples split by id into calibration (thresholds chosen) and test
/// (figures reported).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Splits {
    /// The share of examples in the calibration split.
    pub calibration: f64,
    pub seed: u64,
}

impl Default for Splits {
    fn default() -> Self {
        Splits {
            calibration: 0.5,
            seed: 0,
        }
    }
}

/// Selective prediction: what an answer's confidence is, and the risk the
/// "confidently wrong" threshold is chosen for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selective {
    /// `mean` (mean token log-probability) or `min` (the least likely token).
    pub confidence: ConfidenceKind,
    /// Answers at or above the threshold where the full cache's calibration
    /// answers are wrong at most this often count as confident.
    pub confident_risk: f64,
}

impl Default for Selective {
    fn default() -> Self {
        Selective {
            confidence: ConfidenceKind::Mean,
            confident_risk: 0.1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceKind {
    Mean,
    Min,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    pub iters: u32,
    pub seed: u64,
    pub ci: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transition {
    /// The largest loss against the full cache that still counts as safe.
    pub delta: f64,
    /// A bin whose full cache scores below this mean is uninformative: the
    /// model (or engine) cannot do the task there, so no budget can be judged.
    pub floor: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// Names `runs/<exp_group_id>/`; must be one safe path component.
    pub exp_group_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Db {
    /// `auto` → `runs/<exp_group_id>/kv_transition.sqlite`, or a path.
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// Cache root, relative to the project root unless absolute.
    pub dir: String,
    /// A shared remote cache: `s3://bucket/prefix`, `gs://…`, `az://…` or
    /// `file:///shared/dir` (credentials from the environment, never here).
    #[serde(default)]
    pub remote: Option<String>,
}

#[cfg(test)]
mod cell_tests {
    use super::*;

    fn kv(policies: &[&str], budgets: &[f64], quant: &[&str]) -> Kv {
        Kv {
            policies: policies.iter().map(|s| s.to_string()).collect(),
            budgets: budgets.to_vec(),
            quant: quant.iter().map(|s| s.to_string()).collect(),
            cells: Vec::new(),
            sink_tokens: 4,
            window: 32,
            pool_kernel: 7,
            seed: 0,
            beta: 20.0,
            compress: Compress::Context,
            decode: None,
            score_dtype: None,
        }
    }

    fn labels(k: &Kv) -> Vec<String> {
        k.expand_cells()
            .iter()
            .map(|c| format!("{}@{}", c.policy, c.budget))
            .collect()
    }

    #[test]
    fn the_full_cache_runs_once_per_quantisation_and_no_policy_at_one() {
        let k = kv(
            &["snapkv", "full", "streaming"],
            &[1.0, 0.5, 1024.0],
            &["none", "q8_0"],
        );
        assert_eq!(
            labels(&k),
            [
                "full@1",
                "full+q8_0@1",
                "snapkv@0.5",
                "snapkv@1024",
                "snapkv+q8_0@0.5",
                "snapkv+q8_0@1024",
                "streaming@0.5",
                "streaming@1024",
                "streaming+q8_0@0.5",
                "streaming+q8_0@1024",
            ]
        );
        // The reference runs even when neither `full` nor 1.0 is listed.
        assert_eq!(
            labels(&kv(&["snapkv"], &[0.5], &["none"])),
            ["full@1", "snapkv@0.5"]
        );
        // Only the full cache: one cell per quantisation.
        assert_eq!(
            labels(&kv(&["full"], &[1.0, 0.5], &["none", "q4_0"])),
            ["full@1", "full+q4_0@1"]
        );
    }
}
