//! One trait for every way kvt gets answers: the reference simulator and the
//! native engine in process, and HTTP to a spawned `kvt serve`, a launched
//! server or any OpenAI-compatible URL (`llm::http::HttpBackend`). `infer`
//! builds requests, keeps the journal and telemetry, and picks a backend by
//! the typed `engine.kind`; a new engine is a new implementation here, not a
//! new branch in `infer`.

use super::Outcome;
use anyhow::Result;
use serde_json::Value;

/// What every request of a node shares: the system prompt, the API and the
/// body fields around the messages. A request's JSON is built from it when
/// the request is sent, so a node holds each prompt once, as text.
#[derive(Debug, Clone)]
pub struct Shape {
    pub system: String,
    /// `completions`: one `prompt` string instead of chat `messages`.
    pub completions: bool,
    /// The body without `messages`/`prompt` and without `extra`.
    pub base: Value,
    /// `engine.extra_body`, applied last (it may override anything).
    pub extra: std::collections::BTreeMap<String, Value>,
    /// The body's bytes up to its messages, made once (`Query::body_bytes`).
    pub head: std::sync::OnceLock<Option<Vec<u8>>>,
}

impl Shape {
    /// The serialized body without its messages or prompt and without the
    /// closing brace, ready for them; `None` when `extra` sets `messages` or
    /// `prompt` itself (such a body is built whole).
    fn head_bytes(&self) -> Option<Vec<u8>> {
        let mut body = self.base.clone();
        for (k, v) in &self.extra {
            body[k] = v.clone();
        }
        let obj = body.as_object()?;
        if obj.contains_key("messages") || obj.contains_key("prompt") {
            return None;
        }
        let mut bytes = serde_json::to_vec(&body).ok()?;
        bytes.pop();
        if bytes.len() > 1 {
            bytes.push(b',');
        }
        Some(bytes)
    }

    /// `max_tokens` as the body carries it (for `engine.tpm` estimates).
    pub fn max_tokens(&self) -> u64 {
        self.extra
            .get("max_tokens")
            .or_else(|| self.base.get("max_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

/// One request as a backend sees it.
#[derive(Clone, Copy)]
pub struct Query<'a> {
    /// The request's identity (the journal key; sent as `x-kvt-request-key`).
    pub key: &'a str,
    /// The user turn (the filled, possibly truncated, template).
    pub user: &'a str,
    /// The question alone (the simulator's reader looks for it).
    pub question: &'a str,
    /// Gold answers for the engine to teacher-force (sent as `kvt_golds`).
    pub golds: &'a [String],
    pub shape: &'a Shape,
    /// The whole conversation, when it is not kvt's two turns (`kvt serve`
    /// answers what it was sent); `user` and the shape's system turn are
    /// then unused.
    pub conversation: Option<&'a [Value]>,
    /// Under `kv.compress: multi_turn`: the user turns of the questions
    /// asked before this one about the same context, first first (sent as
    /// `kvt_history`); empty otherwise.
    pub history: &'a [String],
}

impl Query<'_> {
    /// Chat messages (`role`, `content`): the system turn, then the user's
    /// (or the conversation as given).
    pub fn messages(&self) -> Vec<Value> {
        match self.conversation {
            Some(c) => c.to_vec(),
            None => messages(&self.shape.system, self.user),
        }
    }

    /// The earlier turns ([`Query::history`]), each as it would be sent
    /// alone: this request's system turn and that turn's user message.
    pub fn history_messages(&self) -> Vec<Vec<Value>> {
        let system = match self.conversation {
            Some(c) => c.iter().find(|m| m["role"] == "system").cloned(),
            None => Some(serde_json::json!({"role": "system", "content": self.shape.system})),
        };
        self.history
            .iter()
            .map(|u| {
                system
                    .iter()
                    .cloned()
                    .chain([serde_json::json!({"role": "user", "content": u})])
                    .collect()
            })
            .collect()
    }

    /// [`Query::body`], serialized: the shared head once per node, then this
    /// request's turns written straight into the buffer (no JSON tree, the
    /// prompt copied once).
    pub fn body_bytes(&self) -> Vec<u8> {
        let head = match self.conversation {
            None => self.shape.head.get_or_init(|| self.shape.head_bytes()),
            Some(_) => &None,
        };
        let Some(head) = head else {
            return serde_json::to_vec(&self.body()).unwrap_or_default();
        };
        let system = &self.shape.system;
        let mut out = Vec::with_capacity(head.len() + system.len() + self.user.len() + 96);
        out.extend_from_slice(head);
        let string = push_json_str;
        if self.shape.completions {
            out.extend_from_slice(br#""prompt":"#);
            string(&mut out, &format!("{system}\n\n{}", self.user));
        } else {
            out.extend_from_slice(br#""messages":[{"role":"system","content":"#);
            string(&mut out, system);
            out.extend_from_slice(br#"},{"role":"user","content":"#);
            string(&mut out, self.user);
            out.extend_from_slice(b"}]");
        }
        if !self.golds.is_empty() {
            out.extend_from_slice(br#","kvt_golds":"#);
            serde_json::to_writer(&mut out, self.golds).expect("writing JSON to memory");
        }
        if !self.history.is_empty() {
            out.extend_from_slice(br#","kvt_history":"#);
            serde_json::to_writer(&mut out, self.history).expect("writing JSON to memory");
        }
        out.push(b'}');
        out
    }

    /// The OpenAI-compatible request body (HTTP backends).
    pub fn body(&self) -> Value {
        let mut body = self.shape.base.clone();
        if self.conversation.is_some() {
            body["messages"] = Value::Array(self.messages());
        } else if self.shape.completions {
            body["prompt"] = Value::String(format!("{}\n\n{}", self.shape.system, self.user));
        } else {
            body["messages"] = Value::Array(self.messages());
        }
        if !self.golds.is_empty() {
            body["kvt_golds"] = serde_json::json!(self.golds);
        }
        if !self.history.is_empty() {
            body["kvt_history"] = serde_json::json!(self.history);
        }
        for (k, v) in &self.shape.extra {
            body[k] = v.clone();
        }
        body
    }
}

/// Appends `s` as a JSON string (quoted and escaped as serde_json writes it).
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing JSON to memory")
}

/// The two chat turns kvt sends (and hashes into request keys).
pub fn messages(system: &str, user: &str) -> Vec<Value> {
    vec![
        serde_json::json!({"role": "system", "content": system}),
        serde_json::json!({"role": "user", "content": user}),
    ]
}

/// Called once per answer as it arrives, so a crash loses at most the
/// answers in flight.
pub type Record<'a> = dyn Fn(&str, &Outcome) -> Result<()> + Sync + 'a;

/// One answer whole: the outcome `kvt build` records, and what only an
/// in-process engine has beside it (the native engine's full answer, which
/// `kvt serve` returns as `kvt.native`).
pub struct Answer {
    pub outcome: Outcome,
    pub native: Option<super::native::NativeAnswer>,
}

pub trait Backend: Send + Sync {
    /// Answers `queries` with up to `concurrency` in flight, calling `record`
    /// for each; stops starting new ones once `cancelled()` is true. A failed
    /// request is an `Outcome` with an error kind, not an `Err`: `Err` means
    /// the backend itself cannot go on (a server that never came up, a
    /// journal that cannot be written).
    fn answer_all(
        &self,
        queries: &[Query<'_>],
        concurrency: usize,
        cancelled: &(dyn Fn() -> bool + Sync),
        record: &Record<'_>,
    ) -> Result<()>;

    /// One query, answered whole (`kvt serve` sends it back): by default
    /// through [`Backend::answer_all`], so both commands take one path.
    fn answer_one(&self, q: &Query<'_>) -> Result<Answer> {
        let got = std::sync::Mutex::new(None);
        self.answer_all(std::slice::from_ref(q), 1, &|| false, &|_, o| {
            *got.lock().expect("answer slot") = Some(o.clone());
            Ok(())
        })?;
        let outcome = got
            .into_inner()
            .expect("answer slot")
            .ok_or_else(|| anyhow::anyhow!("the engine gave no answer"))?;
        Ok(Answer {
            outcome,
            native: None,
        })
    }
}

/// An engine kvt runs in its own process: the simulator, or a GGUF model on
/// the native engine. `kvt build` (`engine.kind: reference | native`) and
/// `kvt serve` (per request) get their [`Backend`] from it, so a request is
/// answered the same way by either command.
#[derive(Clone)]
pub enum InProcess {
    Reference,
    Native(std::sync::Arc<super::native::NativeEngine>),
}

/// What an in-process backend needs beyond a cell's KV parameters.
#[derive(Default)]
pub struct CellOptions {
    pub max_new_tokens: usize,
    /// Every cell answered from the same prefill (native engine).
    pub cohort: Vec<super::KvParams>,
    pub record_kept: bool,
    /// Top-k log-probabilities per generated token (native engine).
    pub logprobs: usize,
    pub fidelity: bool,
}

impl InProcess {
    /// The name answers carry (`engine` in the outcome and in `kvt serve`'s
    /// `kvt` field).
    pub fn name(&self) -> &'static str {
        match self {
            InProcess::Reference => "reference",
            InProcess::Native(_) => "native",
        }
    }

    /// The backend that answers `kv`'s cell.
    pub fn backend(&self, kv: &super::KvParams, o: CellOptions) -> Result<Box<dyn Backend>> {
        Ok(match self {
            InProcess::Reference => Box::new(super::reference::ReferenceBackend {
                kv: kv.clone(),
                max_new_tokens: o.max_new_tokens,
            }),
            InProcess::Native(engine) => Box::new(super::native::backend::NativeBackend {
                engine: engine.clone(),
                cell: kv.native_cell()?,
                cohort: o
                    .cohort
                    .iter()
                    .map(super::KvParams::native_cell)
                    .collect::<Result<_>>()?,
                record_kept: o.record_kept,
                logprobs: o.logprobs,
                fidelity: o.fidelity,
                max_new_tokens: o.max_new_tokens,
            }),
        })
    }
}

/// Chat messages as (role, text) pairs.
pub fn chat_pairs(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or("user").to_string(),
                m["content"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn body_bytes_are_the_body() {
        let user = "Line one\nwith \"quotes\", a tab\t, é and \u{1}.";
        for completions in [false, true] {
            for extra in [
                json!({}),
                json!({"max_tokens": 3, "top_k": [1, 2]}),
                json!({"messages": [{"role": "user", "content": "override"}]}),
                json!({"prompt": "override"}),
            ] {
                let shape = Shape {
                    system: "Be brief.".into(),
                    completions,
                    base: json!({"model": "m", "max_tokens": 8, "stream": false}),
                    extra: serde_json::from_value(extra.clone()).unwrap(),
                    head: Default::default(),
                };
                let golds = ["Paris".to_string(), "the \"city\"".to_string()];
                let q = Query {
                    key: "k",
                    user,
                    question: "q",
                    golds: if completions { &golds } else { &[] },
                    shape: &shape,
                    conversation: None,
                    history: if completions { &[] } else { &golds },
                };
                let sent: Value = serde_json::from_slice(&q.body_bytes()).unwrap();
                assert_eq!(sent, q.body(), "completions {completions}, extra {extra}");
                let want = extra.get("max_tokens").and_then(Value::as_u64).unwrap_or(8);
                assert_eq!(shape.max_tokens(), want);
            }
        }
        // An empty base still makes an object.
        let shape = Shape {
            system: String::new(),
            completions: false,
            base: json!({}),
            extra: Default::default(),
            head: Default::default(),
        };
        let q = Query {
            key: "k",
            user: "u",
            question: "",
            golds: &[],
            shape: &shape,
            conversation: None,
            history: &[],
        };
        let sent: Value = serde_json::from_slice(&q.body_bytes()).unwrap();
        assert_eq!(sent, q.body());
    }
}
