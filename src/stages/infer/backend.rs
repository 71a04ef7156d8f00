//! How `infer` reaches its engine: the backend `engine.kind` names, and the
//! server a launched engine runs per node.

use super::*;
use crate::llm::backend::{CellOptions, InProcess};

impl Infer {
    /// Starts the configured server for this node and waits until it is healthy.
    pub(super) fn launch(
        &self,
        ctx: &OpContext,
        s: &Settings,
    ) -> Result<crate::llm::launcher::Launched> {
        use crate::llm::launcher::{free_port, render, Launched};
        let l = &s.transport.launch;
        let template = l.command.clone().unwrap_or_default();
        let port = free_port()?;
        let budget_key = crate::engine::pipeline::format_binding(&json!(s.kv.budget));
        let (policy, quant) = policy_and_quant(&s.kv.policy);
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        vars.insert("port".into(), port.to_string());
        vars.insert("model".into(), s.model.clone());
        vars.insert("policy".into(), policy.to_string());
        vars.insert("quant".into(), quant.to_string());
        vars.insert("budget".into(), budget_key);
        vars.extend(s.launch_vars.clone());
        let command =
            render(&template, &vars).map_err(|e| crate::KvtError::usage(e.to_string()))?;
        let exp = &s.transport.exp_group_id;
        let log = ctx.root().join("runs").join(exp).join("logs").join(format!(
            "{}.log",
            ctx.node().replace(['[', ']', ',', '='], "_")
        ));
        tracing::info!(
            node = ctx.node(),
            "launching: {}",
            crate::redact::text(&command)
        );
        let mut launched = Launched::start(&command, ctx.root(), port, &l.api_path, &log)?;
        let health = format!("http://127.0.0.1:{port}{}", l.health_path);
        launched.wait_healthy(
            &health,
            Duration::from_secs_f64(l.startup_timeout_s.max(1.0)),
        )?;
        Ok(launched)
    }

    /// The backend `engine.kind` names, ready to answer (servers started).
    pub(super) fn backend(
        &self,
        ctx: &OpContext,
        s: &Settings,
        concurrency: usize,
    ) -> Result<Box<dyn Backend>> {
        let max_new_tokens = s.decoding.max_new_tokens as usize;
        let options = || CellOptions {
            max_new_tokens,
            cohort: s.cohort.clone(),
            record_kept: s.record_kept,
            logprobs: s.logprobs,
            fidelity: s.fidelity,
        };
        match s.kind {
            // The same backends `kvt serve` answers through, per request.
            EngineKind::Reference => InProcess::Reference.backend(&s.kv, options()),
            EngineKind::Native => {
                let (path, _) = s
                    .model_file
                    .as_ref()
                    .expect("native engine has a model file");
                let mib = s.transport.prefill_cache_mib;
                let engine =
                    crate::llm::native::NativeEngine::shared(path, mib as usize, s.dequantize)?;
                InProcess::Native(engine).backend(&s.kv, options())
            }
            EngineKind::Serve | EngineKind::Launch | EngineKind::Openai => {
                self.http_backend(ctx, s, concurrency)
            }
        }
    }

    pub(super) fn http_backend(
        &self,
        ctx: &OpContext,
        s: &Settings,
        concurrency: usize,
    ) -> Result<Box<dyn Backend>> {
        let mut spawned = None;
        let mut launched = None;
        let base_urls: Vec<String> = match s.kind {
            EngineKind::Serve => match &s.model_file {
                // One model server for every node of this process: its prefills
                // are shared between cells, and the model loads once.
                Some((file, _)) => vec![shared_model_server(&s.model, file)?],
                None => {
                    let srv = SpawnedServer::start(&s.model, None)?;
                    let u = srv.url.clone();
                    spawned = Some(srv);
                    vec![u]
                }
            },
            EngineKind::Launch => {
                let l = self.launch(ctx, s)?;
                let u = l.base_url.clone();
                launched = Some(l);
                vec![u]
            }
            _ => {
                let mut v: Vec<String> = s.transport.base_url.iter().cloned().collect();
                v.extend(s.transport.replicas.iter().cloned());
                if v.is_empty() {
                    return Err(crate::KvtError::usage(
                        "config `engine.base_url` is required when `engine.kind` is `openai` (e.g. http://127.0.0.1:8000/v1)",
                    )
                    .into());
                }
                v
            }
        };
        let api_key = match &s.transport.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                crate::KvtError::usage(format!(
                    "config `engine.api_key_env` names `{var}`, which is not set in the environment"
                ))
            })?),
            None => None,
        };
        let timeout_s = s.transport.timeout_s;
        let client = Client::new(ClientOptions {
            base_urls: base_urls.clone(),
            api_key,
            timeout: Duration::from_secs_f64(timeout_s.max(0.001)),
            max_retries: s.transport.max_retries,
            stream: s.stream,
            backoff: Duration::from_millis(
                std::env::var("KVT_BACKOFF_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(250),
            ),
            api: s.api,
            max_response_bytes: s.transport.max_response_mib.saturating_mul(1 << 20),
            limits: crate::llm::limits::Limits {
                concurrency,
                rpm: s.transport.rpm,
                tpm: s.transport.tpm,
            },
        })?;
        Ok(Box::new(HttpBackend {
            client,
            base_urls,
            wait_health: s.kind == EngineKind::Serve,
            launched,
            spawned,
            seed: s.kv.seed,
        }))
    }
}
