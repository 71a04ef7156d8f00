//! The command line: parses arguments (clap), loads the configuration and calls
//! the engine. Nothing here decides what a stage does.

mod bundle;
mod compare;
mod eval_preds;
mod graph;
pub mod progress;

use crate::config::{self, display_path, LoadedConfig};
use crate::engine::{
    self, maintenance, BuildOptions, OpRegistry, PipelineDef, Plan, Reporter, Workspace,
};
use crate::{exit_code_for, KvtError};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The pipeline shipped inside the binary, used when the project has none.
pub const EMBEDDED_PIPELINE: &str = include_str!("../../pipelines/default.yaml");

static CANCEL: AtomicBool = AtomicBool::new(false);

#[derive(Parser, Debug)]
#[command(
    name = "kvt",
    version,
    about = "KV Transition: measure what KV-cache compression does across context lengths"
)]
pub struct Cli {
    /// More log output (-v info, -vv debug); KVT_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Experiment config file, merged over config/default.yaml.
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Override a config value: `--set kv.budgets=[1.0,0.5]` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct BuildArgs {
    /// Stages or nodes to build (with everything they need); default: all.
    targets: Vec<String>,
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Print what would run and why, run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Rerun a stage or node even if fresh (repeatable); downstream reruns only if its output changes.
    #[arg(long, value_name = "NODE")]
    force: Vec<String>,
    /// After a failure, still run everything that does not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Nodes to run at once (default: number of cores).
    #[arg(short = 'j', long)]
    jobs: Option<usize>,
    /// Fail instead of waiting when another kvt process holds the cache lock.
    #[arg(long)]
    no_wait: bool,
    /// The remote cache (`cache.remote`): `optional` (a failure is a warning
    /// and a local build), `required` (a failure fails the build) or `off`.
    #[arg(long, value_enum, default_value = "optional")]
    remote: RemoteArg,
    /// Infer only the requests of shard I of N (`--shard 2/8`), or `auto`:
    /// from Kubernetes' JOB_COMPLETION_INDEX with KVT_SHARD_COUNT, or
    /// Slurm's SLURM_ARRAY_TASK_ID/COUNT. Answers go to the journal and the
    /// remote cache; the infer nodes stay unfinished until a build that is
    /// not sharded.
    #[arg(long, value_name = "I/N|auto")]
    shard: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum RemoteArg {
    Optional,
    Required,
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port; 0 picks a free one (printed on the first line of stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model name reported by /v1/models.
    #[arg(long, default_value = "kvt-reference")]
    model: String,
    /// Default KV policy when a request has no `kvt.policy`: full, streaming, snapkv, h2o, random.
    #[arg(long, default_value = "full")]
    policy: String,
    /// Default budget: a fraction of the prompt (<= 1.0) or a token count.
    #[arg(long, default_value_t = 1.0)]
    budget: f64,
    #[arg(long, default_value_t = 4)]
    sink_tokens: u32,
    #[arg(long, default_value_t = 32)]
    window: u32,
    #[arg(long, default_value_t = 7)]
    pool_kernel: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wait this long before each answer (simulates a slow server).
    #[arg(long, env = "KVT_SERVE_DELAY_MS", default_value_t = 0)]
    delay_ms: u64,
    /// Append one JSON line per answered request to this file; answers already in it are replayed.
    #[arg(long, env = "KVT_SERVE_REQUEST_LOG")]
    request_log: Option<PathBuf>,
    /// Exit when standard input closes (used when kvt starts its own server).
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
    /// A GGUF model file: serve it with the native engine (real attention, real
    /// eviction) instead of the reference simulator.
    #[arg(long)]
    model_file: Option<PathBuf>,
    /// Native engine: memory for recent prefills shared between requests (MiB).
    #[arg(long, default_value_t = 1024)]
    prefill_cache_mib: usize,
    /// Native engine: run every weight matrix in f32, dequantised at load (to
    /// compare with f32 implementations such as transformers).
    #[arg(long)]
    dequantize: bool,
    /// Require `Authorization: Bearer KEY` on /v1/* and /tokenize.
    #[arg(long, env = "KVT_SERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build targets: run stale nodes, reuse fresh ones.
    Build(BuildArgs),
    /// Lifecycle step: build the `prepare` stage (examples, bins, manifest).
    Prepare(BuildArgs),
    /// Lifecycle step: build `infer` (every request, once) and what it needs.
    Run(BuildArgs),
    /// Lifecycle step: build `score`.
    Score(BuildArgs),
    /// Lifecycle step: build `analyze` (bin statistics, transitions).
    Analyze(BuildArgs),
    /// Lifecycle step: build `report` (with plots and the SQLite file).
    Report(BuildArgs),
    /// Lifecycle step: build everything.
    All(BuildArgs),
    /// Serve the reference engine over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Internal: runs one launched server and stops its process group when
    /// kvt closes this process's standard input (or dies).
    #[command(hide = true, name = "launch-supervisor")]
    LaunchSupervisor {
        #[arg(long)]
        log: PathBuf,
        #[arg(last = true)]
        script: Vec<String>,
    },
    /// List the LongBench tasks found in a local copy (nothing is downloaded).
    Datasets {
        /// Look only here (a directory, data.zip, .jsonl or .parquet); default: the usual places.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Score predictions made elsewhere (LongBench `pred/` format) with LongBench's metrics.
    EvalPreds {
        /// A predictions file (`<task>.jsonl`, or any name with `--task`).
        file: Option<PathBuf>,
        /// The LongBench task (case-sensitive), e.g. `hotpotqa`; default: the file's stem.
        #[arg(long)]
        task: Option<String>,
        /// Score every `<task>.jsonl` in a directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Buckets by the records' `length`: LongBench-E's 0-4k, 4-8k, 8k+, or
        /// other bucket starts with `--by-length=0,2k,4k,8k`.
        #[arg(long, value_name = "EDGES", num_args = 0..=1, require_equals = true, default_missing_value = "")]
        by_length: Option<String>,
        /// LongBench's code similarity as fuzzywuzzy computes it: `difflib`
        /// (without python-Levenshtein) or `levenshtein` (with it).
        #[arg(long, value_name = "VARIANT", default_value = "difflib", value_parser = ["difflib", "levenshtein"])]
        code_sim: String,
        /// Print JSON shaped like LongBench's result.json.
        #[arg(long)]
        json: bool,
    },
    /// Show every node, whether it is fresh or stale, and why.
    Graph {
        targets: Vec<String>,
        #[command(flatten)]
        cfg: ConfigArgs,
        #[arg(long, value_enum, default_value = "text")]
        format: GraphFormat,
    },
    /// Check a config file against the schema.
    Validate {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Show the resolved paths (and with --print-config the merged config, secrets redacted).
    Resolve {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[arg(long)]
        print_config: bool,
    },
    /// Two experiments side by side: the cells both contain, paired by
    /// example, with the difference B − A and its bootstrap interval.
    Compare {
        /// A config file, or the exp_group_id of a config in config/experiments/.
        a: String,
        /// The same for B (may be A again, changed with --set-b).
        b: String,
        /// Override a value of A's config (repeatable), as `--set` does.
        #[arg(long = "set-a", value_name = "KEY=VALUE")]
        set_a: Vec<String>,
        /// Override a value of B's config (repeatable).
        #[arg(long = "set-b", value_name = "KEY=VALUE")]
        set_b: Vec<String>,
        /// Build what is missing up to `score` first (may send requests).
        #[arg(long)]
        build: bool,
        /// Where compare.md and compare.html go (default: runs/compare/<A>-vs-<B>/).
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
    },
    /// Write a built experiment to one portable file: config (secrets
    /// redacted), every node's result, its answers, the exported files.
    Bundle {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The bundle to write (e.g. run.tar.zst).
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
    /// Load a bundle into the cache after checking every digest; the same
    /// config then builds here with zero requests.
    Import {
        /// A file written by `kvt bundle`.
        file: PathBuf,
        #[command(flatten)]
        dir: CacheDirArgs,
    },
    /// Inspect and maintain the content-addressed cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Args, Debug, Clone)]
struct CacheDirArgs {
    /// Cache directory (default: KVT_CACHE_DIR, else `cache.dir` from the
    /// project's config/default.yaml, else `cache/` in the project root).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Size of the cache by op and by age (with --remote: of the remote cache).
    Du {
        #[command(flatten)]
        dir: CacheDirArgs,
        /// The remote cache instead: the project's `cache.remote` (or KVT_REMOTE), or this URL.
        #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
        remote: Option<String>,
    },
    /// Push every result and answer in the local cache to the remote cache.
    Push {
        #[command(flatten)]
        dir: CacheDirArgs,
        /// The remote: the project's `cache.remote` (or KVT_REMOTE) unless given.
        #[arg(long, value_name = "URL")]
        remote: Option<String>,
    },
    /// Pull every result and answer from the remote cache into the local one.
    Pull {
        #[command(flatten)]
        dir: CacheDirArgs,
        /// The remote: the project's `cache.remote` (or KVT_REMOTE) unless given.
        #[arg(long, value_name = "URL")]
        remote: Option<String>,
    },
    /// Re-hash every object; report (and quarantine) corrupt ones; exit 1 if any.
    Verify {
        #[command(flatten)]
        dir: CacheDirArgs,
    },
    /// Remove what the configs in config/experiments/ no longer need.
    Gc {
        #[command(flatten)]
        dir: CacheDirArgs,
        /// Remove unneeded entries, oldest first, until the cache is at most this size (e.g. 10G).
        #[arg(long)]
        max_size: Option<String>,
        /// Remove unneeded entries older than this (e.g. 30d, 12h).
        #[arg(long)]
        max_age: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
}

/// Runs the CLI with the given op registration; returns the exit code.
pub fn main_with(register: fn(&mut OpRegistry)) -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_logging(cli.verbose, cli.quiet);
    let _ = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            eprintln!("kvt: interrupted twice, exiting now");
            crate::llm::launcher::kill_all();
            std::process::exit(130);
        }
    });
    let mut registry = OpRegistry::new();
    register(&mut registry);
    match run(cli, &registry) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", crate::redact::text(&e.to_string()));
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {}", crate::redact::text(&cause.to_string()));
            }
            exit_code_for(&e)
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::redact::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        // Its own report of a failed write goes through std's `eprintln!`,
        // which panics when stderr is closed (`… 2>&1 | head -1`).
        .log_internal_errors(false)
        .try_init();
}

fn run(cli: Cli, registry: &OpRegistry) -> Result<()> {
    match cli.command {
        Command::Build(args) => cmd_build(&args, registry, cli.quiet),
        Command::Prepare(args) => lifecycle("prepare", args, &["prepare"], registry, cli.quiet),
        Command::Run(args) => lifecycle("run", args, &["infer"], registry, cli.quiet),
        Command::Score(args) => lifecycle("score", args, &["score"], registry, cli.quiet),
        Command::Analyze(args) => lifecycle("analyze", args, &["analyze"], registry, cli.quiet),
        Command::Report(args) => lifecycle("report", args, &["report"], registry, cli.quiet),
        Command::All(args) => lifecycle("all", args, &[], registry, cli.quiet),
        Command::Compare {
            a,
            b,
            set_a,
            set_b,
            build,
            out,
        } => cmd_compare(&a, &b, &set_a, &set_b, build, out, registry, cli.quiet),
        Command::Bundle { cfg, out } => {
            let loaded = load_config(&cfg.config, &cfg.set)?;
            let c = bundle::bundle(&loaded, registry, &out)?;
            if !cli.quiet {
                eprintln!(
                    "kvt: wrote {} ({}): {} node results, {} objects, {} answers, {} files",
                    display_path(&out),
                    maintenance::human_bytes(c.bytes),
                    c.records,
                    c.objects,
                    c.answers,
                    c.files
                );
            }
            Ok(())
        }
        Command::Import { file, dir } => {
            let (cache, _) = cache_root_for(&dir)?;
            let (c, config) = bundle::import(&file, &cache)?;
            if !cli.quiet {
                eprintln!(
                    "kvt: imported {} into `{}`: {} node results, {} objects, {} answers, every digest checked",
                    display_path(&file),
                    display_path(&cache),
                    c.records,
                    c.objects,
                    c.answers
                );
                eprintln!(
                    "kvt: `kvt build report -c {config}` now builds here without sending a request"
                );
            }
            Ok(())
        }
        Command::Datasets { path } => {
            let root = std::env::current_dir()?;
            let root = config::find_root(&root).unwrap_or(root);
            let places = match path {
                Some(p) => vec![p],
                None => crate::data::longbench::default_places(&root),
            };
            let mut any = false;
            for place in &places {
                let tasks = crate::data::longbench::tasks_in(place);
                if tasks.is_empty() {
                    println!("{}: no LongBench files", display_path(place));
                    continue;
                }
                any = true;
                println!("{}:", display_path(place));
                for (t, src) in tasks {
                    println!("  {t:<24} {}", src.describe());
                }
            }
            if !any {
                println!("no LongBench task found; unzip LongBench's data.zip into data/raw/longbench/ or pass --path");
            }
            Ok(())
        }
        Command::EvalPreds {
            file,
            task,
            dir,
            by_length,
            code_sim,
            json,
        } => {
            let opts = eval_preds::EvalOptions {
                by_length: by_length
                    .map(|e| eval_preds::parse_edges(Some(&e)))
                    .transpose()?,
                code_sim: if code_sim == "levenshtein" {
                    crate::metrics::longbench::CodeSim::Levenshtein
                } else {
                    crate::metrics::longbench::CodeSim::Difflib
                },
            };
            eval_preds::run(
                task.as_deref(),
                file.as_deref(),
                dir.as_deref(),
                &opts,
                json,
            )
        }
        Command::LaunchSupervisor { log, script } => {
            let code = crate::llm::launcher::supervise(&log, &script.join(" "))?;
            std::process::exit(code)
        }
        Command::Serve(a) => crate::llm::server::serve(crate::llm::server::ServeOptions {
            host: a.host,
            port: a.port,
            model: a.model,
            defaults: crate::llm::KvParams {
                policy: a.policy,
                budget: a.budget,
                sink_tokens: a.sink_tokens,
                window: a.window,
                pool_kernel: a.pool_kernel,
                seed: a.seed,
                beta: None,
                compress: None,
                decode: None,
                score_dtype: None,
            },
            delay_ms: a.delay_ms,
            request_log: a.request_log,
            exit_on_stdin_eof: a.exit_on_stdin_eof,
            model_file: a.model_file,
            prefill_cache_mib: a.prefill_cache_mib,
            dequantize: a.dequantize,
            api_key: a.api_key.filter(|k| !k.is_empty()),
        })
        .map_err(|e| KvtError::usage(format!("kvt serve: {e:#}")).into()),
        Command::Graph {
            targets,
            cfg,
            format,
        } => {
            let loaded = load_config(&cfg.config, &cfg.set)?;
            let (plan, ws) = plan_for(&loaded, registry, &targets, RemoteArg::Optional)?;
            let reports = engine::explain(&ws, &plan, &|_| false)?;
            let color = format == GraphFormat::Text && std::io::stdout().is_terminal();
            print!("{}", graph::render(&plan, &reports, format, color));
            Ok(())
        }
        Command::Validate { cfg } => {
            let loaded = load_config(&cfg.config, &cfg.set)?;
            let _ = load_pipeline(&loaded, registry)?;
            for w in loaded.warnings() {
                eprintln!("warning: {w}");
            }
            if let Some(w) =
                crate::stages::prepare::metric_fit(&loaded.config.dataset, &loaded.root)
            {
                eprintln!("warning: {w}");
            }
            println!("ok: `{}` is valid", display_path(&cfg.config));
            Ok(())
        }
        Command::Resolve { cfg, print_config } => {
            let loaded = load_config(&cfg.config, &cfg.set)?;
            println!("config: {}", display_path(&cfg.config));
            println!("root: {}", display_path(&loaded.root));
            println!("exp_group_id: {}", loaded.exp_group_id());
            println!("run_dir: {}", loaded.run_dir().display());
            println!("sqlite: {}", loaded.sqlite_path().display());
            println!("dataset_id: {}", loaded.dataset_id());
            println!("cache: {}", display_path(&loaded.cache_dir()));
            if print_config {
                let yaml =
                    serde_saphyr::to_string(&loaded.redacted()).context("printing the config")?;
                println!("---\n{yaml}");
            }
            Ok(())
        }
        Command::Cache { command } => cmd_cache(command, registry, cli.quiet),
    }
}

/// The blueprint's lifecycle commands are build targets.
fn lifecycle(
    cmd: &str,
    mut args: BuildArgs,
    targets: &[&str],
    registry: &OpRegistry,
    quiet: bool,
) -> Result<()> {
    if !args.targets.is_empty() {
        return Err(KvtError::usage(format!(
            "`kvt {cmd}` takes no targets; use `kvt build TARGET...`"
        ))
        .into());
    }
    args.targets = targets.iter().map(|t| t.to_string()).collect();
    cmd_build(&args, registry, quiet)
}

/// Loads the pipeline the config names: `pipelines/<name>.yaml` under the root,
/// or the built-in one for `default` when the project has no such file.
fn load_pipeline(loaded: &LoadedConfig, registry: &OpRegistry) -> Result<(PipelineDef, String)> {
    let name = &loaded.config.pipeline;
    let rel = if name.ends_with(".yaml") || name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("pipelines").join(format!("{name}.yaml"))
    };
    let path = loaded.root.join(&rel);
    let (text, source) = match std::fs::read_to_string(&path) {
        Ok(t) => (t, rel.display().to_string()),
        Err(_) if name == "default" => (
            EMBEDDED_PIPELINE.to_string(),
            "built-in default pipeline".to_string(),
        ),
        Err(e) => {
            return Err(KvtError::usage(format!(
                "`{}`: key `pipeline` names `{name}`, but `{}` cannot be read ({e})",
                display_path(&loaded.config_path),
                display_path(&path)
            ))
            .into())
        }
    };
    let def = PipelineDef::parse(&text, &source)?;
    // Validate the whole pipeline once, whatever the targets.
    Plan::new(&def, &source, &loaded.value, registry, &[])?;
    Ok((def, source))
}

/// The plan and workspace for `targets`; `mode` is `--remote` (how
/// `cache.remote` is used; commands without the flag pass `Optional`).
fn plan_for(
    loaded: &LoadedConfig,
    registry: &OpRegistry,
    targets: &[String],
    mode: RemoteArg,
) -> Result<(Plan, Workspace)> {
    let (def, source) = load_pipeline(loaded, registry)?;
    let plan = Plan::new(&def, &source, &loaded.value, registry, targets)?;
    let mut ws = Workspace::new(&loaded.root, &loaded.cache_dir(), loaded.exp_group_id());
    let url = std::env::var("KVT_REMOTE")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| loaded.config.cache.remote.clone());
    if let (Some(url), false) = (url, mode == RemoteArg::Off) {
        let required = mode == RemoteArg::Required;
        let remote = engine::remote::Remote::open(&url, &loaded.root, required).map_err(|e| {
            KvtError::usage(format!(
                "{e:#}; fix `cache.remote` (or KVT_REMOTE), or build without it: --remote off"
            ))
        })?;
        if required {
            remote.probe().map_err(|e| {
                anyhow::anyhow!("{e:#}; `--remote required` was given, so the build stops (check the endpoint and credentials, or use --remote optional)")
            })?;
        }
        ws.remote = Some(std::sync::Arc::new(remote));
    }
    Ok((plan, ws))
}

fn cmd_build(args: &BuildArgs, registry: &OpRegistry, quiet: bool) -> Result<()> {
    let t0 = Instant::now();
    let loaded = load_config(&args.cfg.config, &args.cfg.set)?;
    let shard = match &args.shard {
        Some(s) => Some(parse_shard(s)?),
        None => None,
    };
    let (plan, ws) = plan_for(&loaded, registry, &args.targets, args.remote)?;
    for w in loaded.warnings() {
        eprintln!("warning: {w}");
    }
    for f in &args.force {
        let known = plan
            .graph
            .node_weights()
            .any(|n| &n.id == f || &n.stage == f);
        if !known {
            return Err(KvtError::usage(format!(
                "`--force {f}`: no such stage or node in this build"
            ))
            .into());
        }
    }
    if args.dry_run {
        let force = args.force.clone();
        let reports = engine::explain(&ws, &plan, &|n| {
            force.iter().any(|f| *f == n.id || *f == n.stage)
        })?;
        let mut would = 0;
        for r in &reports {
            let spec = &plan.graph[r.index];
            match &r.state {
                engine::NodeState::Fresh(_) => {}
                engine::NodeState::Stale(reasons) => {
                    would += 1;
                    let why: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                    println!("would run {}: {}", spec.id, why.join("; "));
                }
                engine::NodeState::Pending(ups) => {
                    println!(
                        "may run {}: waits for {} (runs only if their outputs change)",
                        spec.id,
                        ups.join(", ")
                    );
                }
            }
        }
        if would == 0 {
            println!("nothing to do: all {} node(s) fresh", reports.len());
        }
        return Ok(());
    }
    let reporter = progress::TermReporter::new(quiet, std::io::stderr().is_terminal());
    let _lock = engine::lock::acquire(&ws.cache_root, "`kvt build`", args.no_wait, &reporter)
        .map_err(no_wait_hint)?;
    ws.store.clean_tmp();
    let opts = BuildOptions {
        jobs: args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        keep_going: args.keep_going,
        force: args.force.clone(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        shared: Some(engine::Shared(std::sync::Arc::new(
            crate::stages::BuildEnv {
                shard,
                quiet,
                ..Default::default()
            },
        ))),
    };
    let summary = engine::build(&ws, &plan, &opts, &CANCEL, &reporter)?;
    if let Some(e) = ws.remote.as_ref().and_then(|r| r.take_error()) {
        anyhow::bail!("the remote cache failed and `--remote required` was given: {e}");
    }
    // Every answer into journal.sqlite itself, so the file alone is complete.
    // (Only when its write-ahead log holds something: a no-op build stays cheap.)
    let journal = crate::stages::infer::journal_path(&ws.cache_root);
    let wal = journal.with_file_name("journal.sqlite-wal");
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        if let Err(e) = crate::llm::journal::Journal::shared(&journal)
            .and_then(|j| j.lock().expect("journal").checkpoint())
        {
            reporter.note(&format!("could not checkpoint the request journal: {e:#}"));
        }
    }
    if !quiet {
        eprintln!(
            "kvt: {} built, {} fresh, {} failed, {} not run{} in {:.0} ms",
            summary.built.len(),
            summary.fresh.len(),
            summary.failed.len(),
            summary.skipped.len() + summary.stopped.len(),
            if summary.unfinished.is_empty() {
                String::new()
            } else {
                format!(", {} sharded (unfinished)", summary.unfinished.len())
            },
            t0.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(engine::build::outcome(&summary)?)
}

/// `I/N` (0-based I < N) or `auto` from the scheduler's environment.
fn parse_shard(s: &str) -> Result<(u64, u64)> {
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let (i, n) = if s == "auto" {
        if let Some(i) = env("JOB_COMPLETION_INDEX") {
            let n = env("KVT_SHARD_COUNT").ok_or_else(|| {
                KvtError::usage("`--shard auto` under Kubernetes: set KVT_SHARD_COUNT to the Job's `completions`")
            })?;
            (i, n)
        } else if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
            let min = env("SLURM_ARRAY_TASK_MIN").unwrap_or(0);
            let n = env("SLURM_ARRAY_TASK_COUNT").ok_or_else(|| {
                KvtError::usage("`--shard auto` under Slurm: SLURM_ARRAY_TASK_COUNT is not set (an array job sets it)")
            })?;
            (id.saturating_sub(min), n)
        } else {
            return Err(KvtError::usage(
                "`--shard auto` found no scheduler index (JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID); give `--shard I/N`",
            )
            .into());
        }
    } else {
        let parsed = s.split_once('/').and_then(|(i, n)| {
            Some((i.trim().parse::<u64>().ok()?, n.trim().parse::<u64>().ok()?))
        });
        parsed.ok_or_else(|| {
            KvtError::usage(format!("`--shard {s}`: expected I/N, e.g. 0/4, or auto"))
        })?
    };
    if n == 0 || i >= n {
        return Err(KvtError::usage(format!(
            "`--shard`: shard {i} of {n} does not exist (shards are numbered 0 to N-1)"
        ))
        .into());
    }
    Ok((i, n))
}

#[allow(clippy::too_many_arguments)]
fn cmd_compare(
    a: &str,
    b: &str,
    set_a: &[String],
    set_b: &[String],
    build: bool,
    out: Option<PathBuf>,
    registry: &OpRegistry,
    quiet: bool,
) -> Result<()> {
    let cwd = std::env::current_dir()?;
    let root = config::find_root(&cwd).unwrap_or(cwd);
    let mut sides = Vec::new();
    for (label, arg, sets) in [("A", a, set_a), ("B", b, set_b)] {
        let path = compare::resolve(arg, &root)?;
        if build {
            let args = BuildArgs {
                targets: vec!["score".into()],
                cfg: ConfigArgs {
                    config: path.clone(),
                    set: sets.to_vec(),
                },
                dry_run: false,
                force: vec![],
                keep_going: false,
                jobs: None,
                no_wait: false,
                remote: RemoteArg::Optional,
                shard: None,
            };
            cmd_build(&args, registry, quiet)
                .with_context(|| format!("building the scores of {label} (`{arg}`)"))?;
        }
        let loaded = load_config(&path, sets)?;
        let name = if sets.is_empty() {
            loaded.exp_group_id().to_string()
        } else {
            format!("{} with {}", loaded.exp_group_id(), sets.join(" "))
        };
        sides.push(compare::load_side(&name, &path, loaded, registry)?);
    }
    let (sa, sb) = (&sides[0], &sides[1]);
    let c = compare::compare(sa, sb);
    let md = compare::markdown(sa, sb, &c);
    print!("{md}");
    let slug = |s: &compare::Side| -> String {
        s.name
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' {
                    ch
                } else {
                    '_'
                }
            })
            .collect()
    };
    let dir = out.unwrap_or_else(|| {
        root.join("runs/compare")
            .join(format!("{}-vs-{}", slug(sa), slug(sb)))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating `{}`", dir.display()))?;
    engine::store::write_atomic_named(&dir, &dir.join("compare.md"), md.as_bytes())?;
    engine::store::write_atomic_named(
        &dir,
        &dir.join("compare.html"),
        compare::html(sa, sb, &c).as_bytes(),
    )?;
    if !quiet {
        eprintln!(
            "kvt: {} paired cells, {} only in A, {} only in B; wrote {}",
            c.rows.len(),
            c.only_a.len(),
            c.only_b.len(),
            display_path(&dir.join("compare.md"))
        );
    }
    Ok(())
}

/// Loads a configuration and runs every check on it (schema, values, paths,
/// and the domain checks in `stages::check_config`) before any stage runs.
fn load_config(path: &Path, sets: &[String]) -> Result<config::LoadedConfig> {
    let loaded = config::load(path, sets)?;
    crate::stages::check_config(&loaded)?;
    Ok(loaded)
}

/// Checks a side database's rows: (rows read, rows damaged).
type RowCheck = fn(&Path) -> Result<(usize, usize)>;

/// A SQLite file kvt keeps in the cache beside the content store.
struct SideDb {
    label: &'static str,
    path: PathBuf,
    recovery: &'static str,
    /// A per-row check beyond SQLite's own: (rows read, rows damaged).
    rows: Option<RowCheck>,
}

impl SideDb {
    /// The file with its write-ahead log and shared-memory index.
    fn bytes(&self) -> u64 {
        ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                std::fs::metadata(PathBuf::from(p)).ok()
            })
            .map(|m| m.len())
            .sum()
    }
    /// SQLite's own integrity check, read-only.
    fn check(&self) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        let verdict: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        anyhow::ensure!(verdict == "ok", "{verdict}");
        if let Some(rows) = self.rows {
            let (read, bad) = rows(&self.path)?;
            anyhow::ensure!(
                bad == 0,
                "{bad} of {read} entries fail their checksum (builds ignore and recount them)"
            );
        }
        Ok(())
    }
}

/// The request journal (answers: paid-for work) and the token-count cache.
fn side_databases(cache: &Path) -> Vec<SideDb> {
    vec![
        SideDb {
            label: "request journal",
            path: crate::stages::infer::journal_path(cache),
            recovery: "it holds answers: copy it aside, try `sqlite3 <file> .recover`, or move it away to start over (infer outputs already cached are kept)",
            rows: None,
        },
        SideDb {
            label: "token-count cache",
            path: cache.join("v1").join("token_counts.sqlite"),
            recovery: "only a cache: delete it (builds already count without it)",
            rows: Some(crate::data::tokenize::verify_count_cache),
        },
    ]
}

/// Adds kvt's own words to the engine's "cache is locked" error (known by
/// its kind, not its text).
fn no_wait_hint(e: crate::engine::EngineError) -> anyhow::Error {
    if e.kind() == crate::engine::error::ErrorKind::Locked {
        let message = format!("{e} (`--no-wait` was given; drop it to wait for the lock)");
        return crate::engine::EngineError::Locked(message).into();
    }
    e.into()
}

/// The remote for `kvt cache push|pull|du --remote`: the URL given, else
/// KVT_REMOTE, else the project's `cache.remote`; required (errors fail).
fn open_remote_for(dir: &CacheDirArgs, url: Option<String>) -> Result<engine::remote::Remote> {
    let (_, root) = cache_root_for(dir)?;
    let root = root.unwrap_or(std::env::current_dir()?);
    let url = url
        .filter(|u| !u.is_empty())
        .or_else(|| config::project_remote(&root))
        .ok_or_else(|| {
            KvtError::usage(
                "no remote cache: set `cache.remote` in config/default.yaml, KVT_REMOTE, or pass `--remote URL`",
            )
        })?;
    let remote = engine::remote::Remote::open(&url, &root, true)
        .map_err(|e| KvtError::usage(format!("{e:#}")))?;
    remote.probe()?;
    Ok(remote)
}

fn cache_root_for(dir: &CacheDirArgs) -> Result<(PathBuf, Option<PathBuf>)> {
    let cwd = std::env::current_dir()?;
    let root = config::find_root(&cwd);
    if let Some(d) = &dir.cache_dir {
        return Ok((d.clone(), root));
    }
    if let Ok(d) = std::env::var("KVT_CACHE_DIR") {
        let base = root.clone().unwrap_or(cwd);
        return Ok((base.join(d), root));
    }
    match root {
        Some(r) => Ok((config::project_cache_dir(&r), Some(r))),
        None => Err(KvtError::usage(
            "no kvt project here (no `config/default.yaml` in this directory or above); pass `--cache-dir`",
        )
        .into()),
    }
}

/// Action keys that the experiment configs under `<root>/config/experiments/` still need.
fn live_keys(
    root: &Path,
    cache_root: &Path,
    registry: &OpRegistry,
) -> Result<(BTreeSet<engine::Digest>, usize)> {
    let dir = root.join("config/experiments");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut live = BTreeSet::new();
    for f in &files {
        let loaded = load_config(f, &[]).with_context(|| {
            format!("`{}` cannot be read, so gc cannot tell what it needs; fix it or move it out of config/experiments/", display_path(f))
        })?;
        let (def, source) = load_pipeline(&loaded, registry)?;
        let plan = Plan::new(&def, &source, &loaded.value, registry, &[])?;
        let ws = Workspace::new(&loaded.root, cache_root, loaded.exp_group_id());
        for r in engine::explain(&ws, &plan, &|_| false)? {
            if let engine::NodeState::Fresh(rec) = r.state {
                live.insert(rec.key);
            }
        }
    }
    Ok((live, files.len()))
}

fn cmd_cache(command: CacheCommand, registry: &OpRegistry, quiet: bool) -> Result<()> {
    match command {
        CacheCommand::Du {
            dir,
            remote: Some(url),
        } => {
            let remote = open_remote_for(&dir, Some(url))?;
            println!("remote cache `{}`:", remote.url);
            for (dir, what) in [
                ("v1/objects", "objects"),
                ("v1/actions", "node results"),
                ("v1/journal", "journal batches"),
            ] {
                let items = remote.list_sized(dir)?;
                println!(
                    "  {what:<16} {:>7}  {:>10}",
                    items.len(),
                    maintenance::human_bytes(items.iter().map(|(_, b)| b).sum())
                );
            }
            Ok(())
        }
        CacheCommand::Push { dir, remote } => {
            let remote = open_remote_for(&dir, remote)?;
            let (cache, _) = cache_root_for(&dir)?;
            let store = engine::ContentStore::new(&cache);
            let actions = engine::ActionCache::new(&cache);
            let (records, objects) = remote.push_all(&store, &actions)?;
            let journal =
                crate::llm::journal::Journal::shared(&crate::stages::infer::journal_path(&cache))?;
            let rows = journal
                .lock()
                .expect("journal")
                .all_unsynced_final(&remote.url)?;
            crate::stages::infer::push_entries(&remote, &journal, &rows)?;
            println!(
                "pushed to `{}`: {records} node results, {objects} objects, {} answers",
                remote.url,
                rows.len()
            );
            Ok(())
        }
        CacheCommand::Pull { dir, remote } => {
            let remote = open_remote_for(&dir, remote)?;
            let (cache, _) = cache_root_for(&dir)?;
            let store = engine::ContentStore::new(&cache);
            let actions = engine::ActionCache::new(&cache);
            let records = remote.pull_all(&store, &actions)?;
            let journal =
                crate::llm::journal::Journal::shared(&crate::stages::infer::journal_path(&cache))?;
            let answers = crate::stages::infer::pull_journal(&remote, &journal)?;
            journal.lock().expect("journal").checkpoint()?;
            println!(
                "pulled from `{}`: {records} node results, {answers} answers",
                remote.url
            );
            Ok(())
        }
        CacheCommand::Du { dir, remote: None } => {
            let (cache, _) = cache_root_for(&dir)?;
            let r = maintenance::du(&cache)?;
            println!(
                "cache `{}`: {} in {} objects and {} action records",
                display_path(&cache),
                maintenance::human_bytes(r.total_bytes),
                r.objects,
                r.actions
            );
            println!("\nby op:");
            for row in &r.by_op {
                println!(
                    "  {:<24} {:>6} {:>12}",
                    row.op,
                    row.objects,
                    maintenance::human_bytes(row.bytes)
                );
            }
            for db in side_databases(&cache) {
                if db.bytes() > 0 {
                    println!(
                        "{}: {} (`{}`)",
                        db.label,
                        maintenance::human_bytes(db.bytes()),
                        display_path(&db.path)
                    );
                }
            }
            println!("\nobjects by age:");
            for (label, n, b) in &r.by_age {
                println!(
                    "  {:<24} {:>6} {:>12}",
                    label,
                    n,
                    maintenance::human_bytes(*b)
                );
            }
            Ok(())
        }
        CacheCommand::Verify { dir } => {
            let (cache, _) = cache_root_for(&dir)?;
            let _lock = engine::lock::acquire(
                &cache,
                "`kvt cache verify`",
                false,
                &progress::TermReporter::new(false, false),
            )?;
            let r = maintenance::verify(&cache)?;
            let mut damaged = Vec::new();
            for db in side_databases(&cache) {
                if let Err(e) = db.check() {
                    println!(
                        "damaged: {} `{}`: {e}; {}",
                        db.label,
                        display_path(&db.path),
                        db.recovery
                    );
                    damaged.push(db.label);
                }
            }
            for d in &r.corrupt {
                println!("corrupt: object {d} (moved to quarantine/; the nodes that made it will rebuild)");
            }
            for (node, art) in &r.missing {
                println!("missing: output `{art}` of `{node}` (it will rebuild)");
            }
            if r.corrupt.is_empty() && damaged.is_empty() {
                println!("ok: {} objects verified", r.checked);
                Ok(())
            } else if r.corrupt.is_empty() {
                Err(KvtError::failed(format!("damaged: {}", damaged.join(", "))).into())
            } else {
                Err(KvtError::failed(format!(
                    "{} of {} objects corrupt",
                    r.corrupt.len(),
                    r.checked
                ))
                .into())
            }
        }
        CacheCommand::Gc {
            dir,
            max_size,
            max_age,
            no_wait,
        } => {
            let (cache, root) = cache_root_for(&dir)?;
            let max_size = max_size
                .map(|s| {
                    maintenance::parse_size(&s).ok_or_else(|| {
                        KvtError::usage(format!(
                            "`--max-size {s}`: expected a size like `10G` or `500M`"
                        ))
                    })
                })
                .transpose()?;
            let max_age = max_age
                .map(|s| {
                    maintenance::parse_age(&s).ok_or_else(|| {
                        KvtError::usage(format!(
                            "`--max-age {s}`: expected an age like `30d` or `12h`"
                        ))
                    })
                })
                .transpose()?;
            let _lock = engine::lock::acquire(
                &cache,
                "`kvt cache gc`",
                no_wait,
                &progress::TermReporter::new(false, false),
            )
            .map_err(no_wait_hint)?;
            let (live, n_configs) = match root {
                Some(r) => live_keys(&r, &cache, registry)?,
                None => (BTreeSet::new(), 0),
            };
            let r = maintenance::gc(&cache, &live, max_size, max_age)?;
            let journal = crate::stages::infer::journal_path(&cache);
            let mut forgotten = 0;
            if let (Some(age), true) = (max_age, journal.exists()) {
                let cutoff = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
                    - age;
                forgotten = crate::llm::journal::Journal::open(&journal)?.forget_before(cutoff)?;
            }
            if !quiet {
                println!(
                    "freed {} ({} action records, {} objects, {} journal answers); kept {} results needed by {} config(s) in config/experiments/; cache now {}",
                    maintenance::human_bytes(r.freed_bytes),
                    r.removed_actions,
                    r.removed_objects,
                    forgotten,
                    r.kept_live,
                    n_configs,
                    maintenance::human_bytes(r.remaining_bytes)
                );
            }
            Ok(())
        }
    }
}
