//! Request identity: what a request is (the model that answers, never how
//! it is reached; the KV cell; the filled prompt; decoding), its key, and
//! the node's slice id in the journal. A request key may never move:
//! `tests/pipeline.rs` pins one.

use super::*;

/// One prepared request. The prompt is kept once, as text; its JSON is
/// built when it is sent (`Query::body`).
pub struct Request {
    /// Prompt tokens before middle truncation, when it applied.
    pub truncated_from: Option<u64>,
    pub example_id: String,
    pub key: String,
    pub question: String,
    /// The user turn.
    pub user: String,
    /// Gold answers the engine teacher-forces (`engine.fidelity`), else none.
    pub golds: Vec<String>,
    /// Under `kv.compress: multi_turn`: the user turns of the earlier
    /// questions about the same context, first first.
    pub history: Vec<String>,
}

impl Request {
    pub fn query<'a>(&'a self, shape: &'a Shape) -> Query<'a> {
        Query {
            key: &self.key,
            user: &self.user,
            question: &self.question,
            golds: &self.golds,
            shape,
            conversation: None,
            history: &self.history,
        }
    }
}

/// What of `prepare`'s examples a prompt is made of: `table::read` decodes
/// only these columns (not the answers and metadata).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PromptSource {
    pub example_id: String,
    pub question: String,
    pub context: String,
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
    /// The gold answers (read only when the engine teacher-forces them).
    #[serde(default)]
    pub answers: Vec<String>,
    /// `meta.context_group` / `meta.context_turn` place a question among its context's.
    #[serde(default)]
    pub meta: serde_json::Map<String, Value>,
}

/// Fills `{context}`, `{question}` and the extra fields (`{options}`) in a
/// template, in one pass (a context that itself contains `{question}` stays
/// as it is). Braces around anything else are left alone; the configuration
/// check has already refused unknown placeholders.
pub fn fill(template: &str, ex: &PromptSource) -> String {
    let mut out = String::with_capacity(template.len() + ex.context.len() + ex.question.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let value = crate::config::placeholder_at(tail).and_then(|name| {
            let v = match name {
                "context" => Some(ex.context.as_str()),
                "question" => Some(ex.question.as_str()),
                other => ex.extra.get(other).map(String::as_str),
            };
            v.map(|v| (v, name.len() + 2))
        });
        match value {
            Some((v, used)) => {
                out.push_str(v);
                rest = &tail[used..];
            }
            None => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The identity of kvt's reference simulator as a model (bump when its
/// answers change).
pub const SIMULATOR_ID: &str = "kvt-reference-simulator/1";

/// Who answers a request, for identity: transport never enters it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answerer {
    /// kvt's simulator, in process (`reference`) or behind `kvt serve`.
    Simulator,
    /// A GGUF file run by the native engine, in process or behind `kvt serve`.
    ModelFile,
    /// A server kvt does not control (`openai`, `launch`): `model.name`.
    Named,
}

pub fn answerer(kind: EngineKind, has_model_path: bool) -> Answerer {
    match kind {
        EngineKind::Reference => Answerer::Simulator,
        EngineKind::Native => Answerer::ModelFile,
        EngineKind::Serve if has_model_path => Answerer::ModelFile,
        EngineKind::Serve => Answerer::Simulator,
        EngineKind::Launch | EngineKind::Openai => Answerer::Named,
    }
}

/// The body fields every request of the node shares.
pub(super) fn shape(s: &Settings) -> Result<Shape> {
    let mut base = json!({
        "model": s.model,
        "temperature": s.decoding.temperature, "top_p": s.decoding.top_p,
        "max_tokens": s.decoding.max_new_tokens, "stream": s.stream,
    });
    if s.stream {
        base["stream_options"] = json!({"include_usage": true});
    }
    if s.send_kv
        || matches!(
            s.kind,
            EngineKind::Reference | EngineKind::Serve | EngineKind::Native
        )
    {
        base["kvt"] = serde_json::to_value(&s.kv)?;
    }
    if s.model_file.is_some() {
        base["kvt_cohort"] = serde_json::to_value(&s.cohort)?;
        base["kvt_record_kept"] = json!(s.record_kept);
    }
    if s.fidelity {
        base["kvt_fidelity"] = json!(true);
    }
    if s.logprobs > 0 {
        // The standard fields: chat takes a flag and a count, the
        // completions API the count itself.
        if s.api == Api::Completions {
            base["logprobs"] = json!(s.logprobs);
        } else {
            base["logprobs"] = json!(true);
            base["top_logprobs"] = json!(s.logprobs);
        }
    }
    Ok(Shape {
        system: s.prompt.system.clone(),
        completions: s.api == Api::Completions,
        base,
        extra: s.extra.clone(),
        head: Default::default(),
    })
}

pub(super) fn build_requests(
    s: &Settings,
    examples: &[PromptSource],
    entries: &[Entry],
) -> Result<Vec<Request>> {
    let by_id: BTreeMap<&str, &PromptSource> = examples
        .iter()
        .map(|e| (e.example_id.as_str(), e))
        .collect();
    let kv_identity = if s.model_file.is_some() {
        // The native engine: the cell as it runs, whatever it was called.
        s.kv.native_cell()?.identity()
    } else if s.send_kv {
        // What the server is sent is what it runs.
        json!({"sent": s.kv, "launch_vars": s.launch_vars})
    } else if s.kind == EngineKind::Launch {
        // A launched server's KV setup comes from the budget's template
        // variables (e.g. a cache type): they are the identity.
        json!({"policy": s.kv.policy, "budget": s.kv.budget, "launch_vars": s.launch_vars})
    } else if s.kv.is_full() {
        json!({"policy": "full"})
    } else {
        serde_json::to_value(&s.kv)?
    };
    // Everything in a key but the messages, once; each request adds its own.
    let mut identity = json!({
        "model": s.model, "kv": kv_identity, "api": s.api,
        "decoding": s.decoding, "label": s.label, "extra_body": s.extra,
    });
    if s.simulator {
        identity["engine"] = json!(SIMULATOR_ID);
    }
    if let Some((_, digest)) = &s.model_file {
        // The model is the file's bytes, wherever it lies and whoever serves it.
        identity["model_file"] = json!(digest);
        // How the engine turns messages into a prompt: a change there is a
        // new request.
        identity["prompt_rendering"] = json!(crate::llm::native::PROMPT_RENDERING);
        if s.dequantize {
            identity["weights"] = json!("f32");
        }
        if s.record_kept {
            identity["record_kept"] = json!(true);
        }
    }
    if s.fidelity {
        identity["fidelity"] = json!(true);
    }
    if s.logprobs > 0 {
        // Asking for log-probabilities changes what the engine is asked.
        identity["logprobs"] = json!(s.logprobs);
    }
    let keys = KeyHasher::new(identity);
    // Under `multi_turn`, each question follows its context's earlier ones:
    // (group, turn) → example, to find them.
    let multi_turn = s.kv.compress == Some(crate::config::schema::Compress::MultiTurn);
    let turn_of = |ex: &PromptSource| -> Option<(String, i64)> {
        let g = ex.meta.get(crate::data::GROUP)?.as_str()?;
        Some((g.to_string(), ex.meta.get(crate::data::TURN)?.as_i64()?))
    };
    let mut turns: BTreeMap<String, Vec<(i64, &PromptSource)>> = BTreeMap::new();
    if multi_turn {
        for ex in examples {
            if let Some((g, t)) = turn_of(ex) {
                turns.entry(g).or_default().push((t, ex));
            }
        }
        for v in turns.values_mut() {
            v.sort_by_key(|(t, _)| *t);
        }
    }
    let user_of = |ex: &PromptSource| -> Result<(String, Option<u64>)> {
        let user = fill(&s.template, ex);
        if let Some((max, tok)) = &s.truncate {
            // LongBench's rule, in the configured tokenizer's tokens.
            if let Some((cut, n)) = tok.truncate_middle(&user, *max)? {
                return Ok((cut, Some(n as u64)));
            }
        }
        Ok((user, None))
    };
    entries
        .iter()
        .map(|en| {
            let ex = by_id
                .get(en.example_id.as_str())
                .ok_or_else(|| anyhow!("manifest entry `{}` has no example", en.example_id))?;
            let (user, truncated_from) = user_of(ex)?;
            let history: Vec<String> = match turn_of(ex) {
                Some((g, t)) if multi_turn => turns[&g]
                    .iter()
                    .take_while(|(earlier, _)| *earlier < t)
                    .map(|(_, e)| user_of(e).map(|(u, _)| u))
                    .collect::<Result<_>>()?,
                _ => Vec::new(),
            };
            let golds = if s.fidelity {
                ex.answers.clone()
            } else {
                Vec::new()
            };
            Ok(Request {
                truncated_from,
                example_id: en.example_id.clone(),
                key: keys.key_with_history(&s.prompt.system, &user, &golds, &history),
                question: ex.question.clone(),
                user,
                golds,
                history,
            })
        })
        .collect()
}

/// Request keys: blake3 of the canonical JSON of the identity with the
/// request's `messages` in it. The identity's bytes around `messages` are
/// made once; each key hashes them with the two turns written in between,
/// the same bytes `canonical_json` gives for the whole.
pub(super) struct KeyHasher {
    identity: Value,
    /// The canonical bytes before and after the messages' value.
    around: Option<(Vec<u8>, Vec<u8>)>,
}

impl KeyHasher {
    /// A string no config holds, to find where the messages go.
    const MARK: &'static str = "\u{0}kvt:messages\u{0}";

    fn new(mut identity: Value) -> KeyHasher {
        identity["messages"] = Value::String(Self::MARK.into());
        let whole = canonical_json(&identity);
        let mark = serde_json::to_vec(Self::MARK).expect("a string serializes");
        let found: Vec<usize> = whole
            .windows(mark.len())
            .enumerate()
            .filter(|(_, w)| *w == mark.as_slice())
            .map(|(i, _)| i)
            .collect();
        let around = match found[..] {
            [at] => Some((whole[..at].to_vec(), whole[at + mark.len()..].to_vec())),
            _ => None,
        };
        KeyHasher { identity, around }
    }

    fn key(&self, system: &str, user: &str) -> String {
        let Some((before, after)) = &self.around else {
            return self.key_whole(system, user);
        };
        // `messages()` as canonical JSON: each turn's keys sorted.
        let mut turns = Vec::with_capacity(system.len() + user.len() + 64);
        let string = crate::llm::backend::push_json_str;
        turns.extend_from_slice(br#"[{"content":"#);
        string(&mut turns, system);
        turns.extend_from_slice(br#","role":"system"},{"content":"#);
        string(&mut turns, user);
        turns.extend_from_slice(br#","role":"user"}]"#);
        let mut h = blake3::Hasher::new();
        h.update(before);
        h.update(&turns);
        h.update(after);
        h.finalize().to_hex().to_string()
    }

    /// [`KeyHasher::key`], with the gold answers the engine teacher-forces
    /// and the earlier turns a multi-turn question follows folded in when
    /// there are any (they are part of what it is asked); without either
    /// the key is the plain one.
    fn key_with_history(
        &self,
        system: &str,
        user: &str,
        golds: &[String],
        history: &[String],
    ) -> String {
        let key = fold_into_key(self.key(system, user), "golds", golds);
        fold_into_key(key, "history", history)
    }

    /// The key from the whole identity, built as a JSON tree.
    fn key_whole(&self, system: &str, user: &str) -> String {
        let mut identity = self.identity.clone();
        identity["messages"] = Value::Array(crate::llm::backend::messages(system, user));
        blake3::hash(&canonical_json(&identity))
            .to_hex()
            .to_string()
    }
}

/// `key` with `items` folded in under `label`; the key itself when there
/// are none, so requests without them keep their keys.
fn fold_into_key(key: String, label: &str, items: &[String]) -> String {
    if items.is_empty() {
        return key;
    }
    let mut h = blake3::Hasher::new();
    h.update(key.as_bytes());
    h.update(format!("\0{label}\0").as_bytes());
    h.update(&serde_json::to_vec(items).expect("strings serialize"));
    h.finalize().to_hex().to_string()
}

/// blake3 of a model file, remembered per (path, size, mtime) for this process.
pub(super) fn digest_cached(path: &std::path::Path) -> Result<String> {
    static SEEN: OnceLock<Mutex<BTreeMap<String, String>>> = OnceLock::new();
    let meta = std::fs::metadata(path).with_context(|| format!("reading `{}`", path.display()))?;
    let stamp = format!(
        "{}|{}|{:?}",
        path.display(),
        meta.len(),
        meta.modified().ok()
    );
    let seen = SEEN.get_or_init(Default::default);
    if let Some(d) = seen.lock().expect("digests").get(&stamp) {
        return Ok(d.clone());
    }
    let d = crate::llm::native::model::file_digest(path)?;
    seen.lock().expect("digests").insert(stamp, d.clone());
    Ok(d)
}

/// Identifies a node's configuration (slice and bindings) in the journal.
pub(super) fn slice_id(k: &crate::engine::KeyContext) -> String {
    let v = json!({"config": k.config, "bindings": k.bindings});
    blake3::hash(&canonical_json(&v)).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hashed_around_the_messages_are_the_whole_identitys() {
        let identity = json!({"model": "m", "kv": {"policy": "full"}, "api": "chat",
            "decoding": {"max_new_tokens": 8}, "label": "l", "extra_body": {"z": [1, "é"]},
            "model_file": "abc", "weights": "f32"});
        let keys = KeyHasher::new(identity);
        assert!(keys.around.is_some());
        for (system, user) in [
            ("", ""),
            ("Be brief.", "word ".repeat(300).as_str()),
            ("quote \" and \\", "line\nbreak\ttab \u{1} \u{2028} 東京 😀"),
        ] {
            assert_eq!(keys.key(system, user), keys.key_whole(system, user));
        }
        // A config string holding the marker falls back to the whole tree.
        let odd = KeyHasher::new(json!({"label": KeyHasher::MARK}));
        assert!(odd.around.is_none());
        assert_eq!(odd.key("s", "u"), odd.key_whole("s", "u"));
    }
}
