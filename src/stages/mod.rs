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
use crate::engine::OpRegistry;
use anyhow::Result;

/// The configuration checks that need kvt's domain vocabulary (policy names,
/// which engine runs which policy, which metric a task is scored with). Every
/// command that loads a config runs them right after `config::load`, before
/// any stage, so a problem here exits 2 naming file, line and key.
pub fn check_config(loaded: &LoadedConfig) -> Result<()> {
    let c = &loaded.config;
    let answerer = infer::answerer(c.engine.kind, c.engine.model_path.is_some());
    let native_model = answerer == infer::Answerer::ModelFile;
    for p in &c.kv.policies {
        if answerer == infer::Answerer::Named {
            // A server of the user's knows its own policies (kvpress's
            // presses by class name, say): it answers an unknown one with
            // an error that kvt records.
            if p.is_empty() || p.contains(char::is_whitespace) {
                return Err(loaded.key_error(
                    "kv.policies",
                    &format!("`{p}` is not a policy name (one word, no spaces)"),
                ));
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
                let base = p.split('+').next().unwrap_or(p);
                let hint = closest(base, &known)
                    .filter(|k| *k != base)
                    .map(|c| format!("did you mean `{c}`? "))
                    .unwrap_or_default();
                return Err(loaded.key_error("kv.policies", &format!("{e}; {hint}")));
            }
        };
        if !native_model && !spec.reference_can_run() {
            return Err(loaded.key_error(
                "kv.policies",
                &format!("`{p}` runs on the native engine only (`engine.kind: native`, or `serve` with `engine.model_path`); the reference simulator knows {}", crate::llm::reference::POLICIES.join(", ")),
            ));
        }
    }
    if c.engine.dequantize && c.engine.kind != crate::config::schema::EngineKind::Native {
        return Err(loaded.key_error(
            "engine.dequantize",
            "f32 weights are a setting of the in-process native engine: use `engine.kind: native`, or `false` here",
        ));
    }
    if c.prompt.max_tokens.is_some() && c.tokenizer.kind == TokenizerKind::Server {
        return Err(loaded.key_error(
            "prompt.max_tokens",
            "cutting prompts needs a local tokenizer (`tokenizer.kind: tiktoken` or `hf`); a server tokenizer only counts. Use `null` here, or a local tokenizer",
        ));
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
        return Err(loaded.key_error(key, msg));
    }
    Ok(())
}

/// The `transport` slice of an op that reads no transport values.
#[derive(serde::Deserialize)]
pub struct NoTransport {}

/// Registers every kvt op.
pub fn register(reg: &mut OpRegistry) {
    reg.register(prepare::Prepare);
    reg.register(infer::Infer);
    reg.register(score::Score);
    reg.register(analyze::Analyze);
    reg.register(plots::Plots);
    reg.register(sqlite::SqliteBase);
    reg.register(sqlite::Sqlite);
    reg.register(explorer::Explorer);
    reg.register(report::Report);
}
