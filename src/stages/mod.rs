//! kvt's ops: the stages of its pipelines. Each is a deterministic function of
//! its config slice and input artifacts: prepare → infer (per policy × budget)
//! → score (per policy × budget) → analyze → plots, sqlite_base → sqlite,
//! explorer → report.

pub mod analyze;
pub mod explorer;
pub mod fidelity;
pub mod infer;
pub mod plots;
pub mod prepare;
pub mod report;
pub mod score;
pub mod sqlite;

use crate::config::schema::TokenizerKind;
use crate::config::{closest, LoadedConfig};
use crate::engine::error::{EngineError, Unfinished};
use crate::engine::store::ObjectError;
use crate::engine::{BoxError, KeyContext, Op, OpContext, OpRegistry, OpResult};
use anyhow::Result;
use std::path::Path;

/// The configuration checks that need kvt's domain vocabulary (policy names,
/// which engine runs which policy, which metric a task is scored with). Every
/// command that loads a config runs them right after `config::load`, before
/// any stage, so a problem here exits 2 naming file, line and key.
pub fn check_config(loaded: &LoadedConfig) -> Result<()> {
    let c = &loaded.config;
    let answerer = infer::answerer(c.engine.kind, c.engine.model_path.is_some());
    let native_model = answerer == infer::Answerer::ModelFile;
    // A launched server quantises its own cache (its command gets `{quant}`
    // and the quantisation's `engine.launch.vars`); the native engine does
    // it itself; nothing else can.
    let launched = c.engine.kind == crate::config::schema::EngineKind::Launch;
    for q in
        c.kv.quant
            .iter()
            .filter(|q| *q != crate::config::schema::NO_QUANT)
    {
        if !native_model && !launched {
            return Err(loaded.key_error(
                "kv.quant",
                &format!("`{q}` runs on the native engine (`engine.kind: native`, or `serve` with `engine.model_path`) or on a launched server that quantises its own cache (`engine.kind: launch`, `{{quant}}` in its command); use `[none]` here"),
            ).into());
        }
    }
    for p in &c.kv.policies {
        if answerer == infer::Answerer::Named {
            // A server of the user's knows its own policies (kvpress's
            // presses by class name, say): it answers an unknown one with
            // an error that kvt records.
            if p.is_empty() || p.contains(char::is_whitespace) {
                return Err(loaded
                    .key_error(
                        "kv.policies",
                        &format!("`{p}` is not a policy name (one word, no spaces)"),
                    )
                    .into());
            }
            continue;
        }
        let spec = match crate::llm::PolicySpec::parse(p) {
            Ok(s) => s,
            Err(e) => {
                let known: Vec<String> = crate::llm::native::policy::POLICY_NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                let hint = closest(p, &known)
                    .filter(|k| k != p)
                    .map(|c| format!("did you mean `{c}`? "))
                    .unwrap_or_default();
                return Err(loaded
                    .key_error("kv.policies", &format!("{e}; {hint}"))
                    .into());
            }
        };
        if !native_model && !spec.reference_can_run() {
            return Err(loaded.key_error(
                "kv.policies",
                &format!("`{p}` runs on the native engine only (`engine.kind: native`, or `serve` with `engine.model_path`); the reference simulator knows {}", crate::llm::reference::policies().join(", ")),
            ).into());
        }
    }
    // Settings only an engine that takes each cell's KV parameters honours:
    // the native engine, or a server sent them (`scripts/kvpress_server.py`
    // applies them). A shared context also runs on the simulator (as
    // context compression); an OpenAI-compatible server cannot keep one.
    let sends_kv = answerer == infer::Answerer::Named && c.engine.send_kv;
    let takes_kv = answerer == infer::Answerer::ModelFile || sends_kv;
    const KV_ENGINES: &str = "the native engine (`engine.kind: native`, or `serve` with `engine.model_path`) or a server sent each cell's parameters (`engine.send_kv: true`, e.g. scripts/kvpress_server.py)";
    for (key, set, simulated, what, instead) in [
        (
            "kv.decode",
            c.kv.decode.is_some(),
            false,
            "compression while decoding runs on",
            "use `null` here",
        ),
        (
            "kv.compress",
            c.kv.compress.shares_context(),
            true,
            "`shared` and `multi_turn` (one compressed context, many questions) run on",
            "an OpenAI-compatible server cannot compress a context once and keep it for the next question. Use `context` here",
        ),
        (
            "kv.score_dtype",
            c.kv.score_dtype.is_some(),
            false,
            "the precision of policy scores is a setting of",
            "use `null` here",
        ),
    ] {
        let simulator_runs_it = simulated && answerer == infer::Answerer::Simulator;
        if set && !takes_kv && !simulator_runs_it {
            return Err(loaded
                .key_error(key, &format!("{what} {KV_ENGINES}; {instead}"))
                .into());
        }
    }
    if c.engine.dequantize && c.engine.kind != crate::config::schema::EngineKind::Native {
        return Err(loaded.key_error(
            "engine.dequantize",
            "f32 weights are a setting of the in-process native engine: use `engine.kind: native`, or `false` here",
        ).into());
    }
    if c.prompt.max_tokens.is_some() && c.tokenizer.kind == TokenizerKind::Server {
        return Err(loaded.key_error(
            "prompt.max_tokens",
            "cutting prompts needs a local tokenizer (`tokenizer.kind: tiktoken` or `hf`); a server tokenizer only counts. Use `null` here, or a local tokenizer",
        ).into());
    }
    if let Err(e) = score::metric_for(
        c.dataset.source.as_str(),
        &c.dataset.task,
        c.dataset.metric.as_deref(),
    ) {
        let key = if c.dataset.metric.is_some() {
            "dataset.metric"
        } else {
            "dataset.task"
        };
        let msg = e.to_string();
        let msg = msg.split_once(": ").map_or(msg.as_str(), |(_, m)| m);
        return Err(loaded.key_error(key, msg).into());
    }
    check_inputs(loaded)
}

/// The files and environment a build will read, checked now (`kvt validate`
/// and the start of every build) rather than found missing by a stage: the
/// dataset's files and globs, the tokenizer, the model file.
fn check_inputs(loaded: &LoadedConfig) -> Result<()> {
    let c = &loaded.config;
    let root = &loaded.root;
    // An error from a locating function says "config `KEY`: …": that key is
    // where it points.
    let keyed = |e: anyhow::Error, default_key: &str| -> anyhow::Error {
        let msg = format!("{e:#}");
        let (key, rest) = msg
            .strip_prefix("config `")
            .and_then(|m| m.split_once("`: ").or_else(|| m.split_once("` ")))
            .map_or((default_key, msg.as_str()), |(k, r)| (k, r));
        // A format read from the file's extension is the path's problem.
        let key = if key == "dataset.format" && c.dataset.format.is_none() {
            "dataset.path"
        } else {
            key
        };
        loaded.key_error(key, rest).into()
    };
    prepare::locate(&c.dataset, root).map_err(|e| keyed(e, "dataset.path"))?;
    match c.tokenizer.kind {
        TokenizerKind::Tiktoken => {
            if !matches!(c.tokenizer.name.as_str(), "cl100k_base" | "o200k_base") {
                return Err(loaded.key_error(
                    "tokenizer.name",
                    &format!(
                        "`{}` is not a tiktoken encoding kvt has: use `cl100k_base` or `o200k_base`, or `tokenizer.kind: hf` with a tokenizer.json",
                        c.tokenizer.name
                    ),
                ).into());
            }
        }
        TokenizerKind::Hf => {
            crate::data::tokenize::resolve_hf(&c.tokenizer.name, root)
                .map_err(|e| keyed(e, "tokenizer.name"))?;
        }
        TokenizerKind::Server => {}
    }
    if infer::answerer(c.engine.kind, c.engine.model_path.is_some()) == infer::Answerer::ModelFile {
        // With no `model_path` (KVT_MODEL stands in), the line that chose
        // the engine is where to look.
        let at = if c.engine.model_path.is_some() {
            "engine.model_path"
        } else {
            "engine.kind"
        };
        crate::llm::native::resolve_model_path(c.engine.model_path.as_deref(), root)
            .map_err(|e| loaded.key_error_at("engine.model_path", at, &format!("{e:#}")))?;
    }
    Ok(())
}

pub use crate::engine::NoTransport;

/// Registers every kvt op.
pub fn register(reg: &mut OpRegistry) {
    reg.register(AsOp(prepare::Prepare));
    reg.register(AsOp(infer::Infer));
    reg.register(AsOp(score::Score));
    reg.register(AsOp(analyze::Analyze));
    reg.register(AsOp(plots::Plots));
    reg.register(AsOp(sqlite::SqliteBase));
    reg.register(AsOp(sqlite::Sqlite));
    reg.register(AsOp(explorer::Explorer));
    reg.register(AsOp(report::Report));
}

/// What one `kvt build` hands its stages (through the engine's
/// [`crate::engine::BuildOptions::shared`], not process globals): the
/// command line's options and the state the nodes of one build share.
#[derive(Default)]
pub struct BuildEnv {
    /// `--shard I/N`: `infer` sends only shard I's requests (by request key).
    pub shard: Option<(u64, u64)>,
    /// `--quiet`: stages print no progress lines.
    pub quiet: bool,
    /// Which request keys are being sent, and which have an outcome, in this build.
    pub(crate) sending: infer::Sending,
}

impl BuildEnv {
    /// The build's environment, as the CLI shared it.
    pub fn of<'a>(ctx: &'a OpContext) -> Result<&'a BuildEnv> {
        ctx.shared::<BuildEnv>().ok_or_else(|| {
            anyhow::anyhow!(
                "node `{}`: this build was started without kvt's build environment (`stages::BuildEnv`)",
                ctx.node()
            )
        })
    }
}

/// A kvt stage: an engine [`Op`] written with `anyhow`, as the rest of the
/// binary is. [`AsOp`] hands its errors to the engine with their types
/// intact (see [`op_error`]); the methods mean what `Op`'s do.
pub trait Stage: Send + Sync + 'static {
    type Uses: serde::de::DeserializeOwned;
    type Transport: serde::de::DeserializeOwned;
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    fn fingerprint(
        &self,
        _ctx: &KeyContext,
        _uses: &Self::Uses,
        _transport: &Self::Transport,
    ) -> Result<Option<String>> {
        Ok(None)
    }
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, transport: Self::Transport) -> Result<()>;
    fn compose_export(&self, _file: &Path, _overlays: &[Vec<u8>]) -> Result<()> {
        anyhow::bail!("stage `{}` does not compose exports", self.name())
    }
    fn recompose_in_place(&self, _file: &Path, _overlays: &[Vec<u8>]) -> Result<bool> {
        Ok(false)
    }
}

/// A [`Stage`] as the engine's [`Op`].
pub struct AsOp<S>(pub S);

impl<S: Stage> Op for AsOp<S> {
    type Uses = S::Uses;
    type Transport = S::Transport;
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn version(&self) -> u32 {
        self.0.version()
    }
    fn fingerprint(
        &self,
        ctx: &KeyContext,
        uses: &S::Uses,
        transport: &S::Transport,
    ) -> OpResult<Option<String>> {
        self.0.fingerprint(ctx, uses, transport).map_err(op_error)
    }
    fn run(&self, ctx: &mut OpContext, uses: S::Uses, transport: S::Transport) -> OpResult {
        self.0.run(ctx, uses, transport).map_err(op_error)
    }
    fn compose_export(&self, file: &Path, overlays: &[Vec<u8>]) -> OpResult {
        self.0.compose_export(file, overlays).map_err(op_error)
    }
    fn recompose_in_place(&self, file: &Path, overlays: &[Vec<u8>]) -> OpResult<bool> {
        self.0.recompose_in_place(file, overlays).map_err(op_error)
    }
}

/// An `anyhow` error as the engine's boxed error. anyhow's own conversion
/// boxes its outermost error inside a private type the engine cannot
/// downcast, so an error without context that the engine branches on (its
/// kinds, an unfinished shard, a damaged object) is handed over as itself.
/// Context keeps its causes visible: they are the chain's sources.
pub fn op_error(e: anyhow::Error) -> BoxError {
    // A configuration error inside a stage is usage (exit 2), which the
    // engine, below the configuration layer, knows only as its own kind.
    if crate::kind_of(&e) == crate::ErrorKind::Usage && !e.chain().any(|c| c.is::<EngineError>()) {
        return Box::new(EngineError::usage(format!("{e:#}")));
    }
    if e.chain().nth(1).is_some() {
        return e.into();
    }
    let e = match e.downcast::<EngineError>() {
        Ok(own) => return Box::new(own),
        Err(e) => e,
    };
    let e = match e.downcast::<Unfinished>() {
        Ok(u) => return Box::new(u),
        Err(e) => e,
    };
    match e.downcast::<ObjectError>() {
        Ok(o) => Box::new(o),
        Err(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::error::{kind_of, ErrorKind};
    use anyhow::Context as _;

    /// Regression: anyhow's own conversion to a boxed error hides its
    /// outermost error's type, so a usage error returned by a stage read as
    /// a failure (exit 1 instead of 2) until `op_error` handed it over.
    #[test]
    fn regression_a_stage_errors_kind_survives_the_way_to_the_engine() {
        let plain = anyhow::Error::from(EngineError::usage("bad template"));
        let hidden: BoxError = anyhow::Error::from(EngineError::usage("bad template")).into();
        assert_eq!(
            kind_of(hidden.as_ref()),
            ErrorKind::Failed,
            "anyhow's conversion"
        );
        assert_eq!(kind_of(op_error(plain).as_ref()), ErrorKind::Usage);
        let wrapped = Err::<(), _>(EngineError::usage("bad template"))
            .context("node `infer`")
            .unwrap_err();
        let boxed = op_error(wrapped);
        assert_eq!(kind_of(boxed.as_ref()), ErrorKind::Usage);
        assert_eq!(
            crate::engine::error::chain_text(boxed.as_ref()),
            "node `infer`: bad template"
        );
        let unfinished = op_error(Unfinished("shard 1/2".into()).into());
        let e = EngineError::from(unfinished);
        assert!(e.find::<Unfinished>().is_some());
        let damaged = op_error(ObjectError::Missing("ab".into()).into());
        assert!(EngineError::from(damaged).find::<ObjectError>().is_some());
        // A configuration error met inside a stage stays usage, words and all.
        let bad = Err::<(), _>(crate::config::ConfigError::Invalid("key `x`: no".into()))
            .context("node `prepare`")
            .unwrap_err();
        let boxed = op_error(bad);
        assert_eq!(kind_of(boxed.as_ref()), ErrorKind::Usage);
        assert_eq!(boxed.to_string(), "node `prepare`: key `x`: no");
    }
}
