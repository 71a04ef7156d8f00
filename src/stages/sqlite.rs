//! The SQLite sink: the experiment as one SQLite file, `runs/<exp_group_id>/
//! kv_transition.sqlite` (or `db.path`), with the blueprint's tables and
//! foreign keys on. Two ops, so an analysis change rewrites only what changed:
//!
//! * `sqlite_base` writes everything that follows from the data and the
//!   responses (datasets, examples, bins, manifest entries, runs, requests,
//!   responses, telemetry, failures, scores) — once per change of those;
//! * `sqlite` stores only a small database of the analysis tables
//!   (experiments, bin_stats, transition_summary) and passes the base's
//!   digest through; the exported file is the base with those tables copied
//!   in (`compose_export`), written beside its destination and renamed, so a
//!   failed sink never leaves a half-written database behind and the cache
//!   never holds a full copy per analysis version.

use crate::config::schema;
use crate::data::Example;
use crate::engine::{canonical_json, OpContext};
use crate::metrics::normalize;
use crate::stages::analyze::{BinStat, TransitionRow};
use crate::stages::prepare::{Bin, Entry};
use crate::stages::score::ScoreRow;
use crate::stages::NoTransport;
use crate::table;
use anyhow::{Context, Result};
use rusqlite::{params, Connection};
use serde_json::{json, Value};

pub struct Sqlite;

pub const TABLES: &[&str] = &[
    "experiments",
    "datasets",
    "examples",
    "bins",
    "manifest_entries",
    "runs",
    "requests",
    "responses",
    "telemetry",
    "failures",
    "scores",
    "token_logprobs",
    "response_fidelity",
    "bin_stats",
    "transition_summary",
    "fidelity_stats",
    "selective_stats",
];

const SCHEMA: &str = "
PRAGMA foreign_keys = ON;
CREATE TABLE experiments (
  exp_group_id TEXT PRIMARY KEY,
  config_digest TEXT NOT NULL,
  config_json TEXT NOT NULL,
  kvt_version TEXT NOT NULL,
  model TEXT NOT NULL
);
CREATE TABLE datasets (
  dataset_id TEXT PRIMARY KEY,
  name TEXT NOT NULL, task TEXT NOT NULL, source TEXT NOT NULL,
  tokenizer TEXT NOT NULL, n_bins INTEGER NOT NULL,
  location TEXT, n_loaded INTEGER, n_skipped_records INTEGER NOT NULL
);
CREATE TABLE examples (
  example_id TEXT PRIMARY KEY,
  dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id),
  question TEXT NOT NULL, context TEXT NOT NULL,
  answers_json TEXT NOT NULL, meta_json TEXT NOT NULL
);
CREATE TABLE bins (
  dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id),
  bin_idx INTEGER NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL,
  n_available INTEGER NOT NULL, n_selected INTEGER NOT NULL,
  PRIMARY KEY (dataset_id, bin_idx)
);
CREATE TABLE manifest_entries (
  dataset_id TEXT NOT NULL,
  example_id TEXT NOT NULL REFERENCES examples(example_id),
  bin_idx INTEGER NOT NULL, token_len INTEGER NOT NULL,
  PRIMARY KEY (dataset_id, example_id),
  FOREIGN KEY (dataset_id, bin_idx) REFERENCES bins(dataset_id, bin_idx)
);
CREATE TABLE runs (
  run_id TEXT PRIMARY KEY,
  exp_group_id TEXT NOT NULL REFERENCES experiments(exp_group_id),
  dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id),
  policy TEXT NOT NULL, budget REAL NOT NULL, n_requests INTEGER NOT NULL
);
CREATE TABLE requests (
  request_id TEXT PRIMARY KEY,
  run_id TEXT NOT NULL REFERENCES runs(run_id),
  example_id TEXT NOT NULL REFERENCES examples(example_id),
  request_key TEXT NOT NULL
);
CREATE TABLE responses (
  request_id TEXT PRIMARY KEY REFERENCES requests(request_id),
  text TEXT NOT NULL, finish_reason TEXT, error TEXT
);
CREATE TABLE telemetry (
  request_id TEXT PRIMARY KEY REFERENCES requests(request_id),
  latency_ms REAL NOT NULL, ttft_ms REAL,
  prompt_tokens INTEGER, completion_tokens INTEGER, retained_tokens INTEGER,
  retries INTEGER NOT NULL, server_rss_kib INTEGER, endpoint TEXT, kv_cache_usage REAL,
  server_prompt_ms REAL, server_predicted_ms REAL,
  kv_kept_total INTEGER, kv_full_total INTEGER, kv_kept_per_layer TEXT, kv_bytes INTEGER,
  prefill_ms REAL, decode_ms REAL, prefill_reused INTEGER, device_peak_bytes INTEGER
);
CREATE TABLE failures (
  request_id TEXT PRIMARY KEY REFERENCES requests(request_id),
  error_type TEXT NOT NULL, detail TEXT
);
CREATE TABLE scores (
  request_id TEXT PRIMARY KEY REFERENCES requests(request_id),
  metric TEXT NOT NULL, score REAL NOT NULL, em REAL NOT NULL, f1 REAL NOT NULL,
  recall REAL NOT NULL, pred_norm TEXT NOT NULL, gold_norm TEXT NOT NULL
);
CREATE TABLE token_logprobs (
  request_id TEXT NOT NULL REFERENCES requests(request_id),
  position INTEGER NOT NULL, token TEXT NOT NULL, logprob REAL NOT NULL,
  top_logprobs TEXT,
  PRIMARY KEY (request_id, position)
);
CREATE TABLE response_fidelity (
  request_id TEXT PRIMARY KEY REFERENCES requests(request_id),
  confidence_mean REAL, confidence_min REAL,
  gold_loglik_per_token REAL, gold_loglik_best REAL, gold_loglik_json TEXT,
  kl_mean REAL, top1_agree REAL, first_divergence INTEGER, kl_basis TEXT,
  kl_per_token TEXT
);
CREATE TABLE bin_stats (
  run_id TEXT NOT NULL REFERENCES runs(run_id),
  bin_idx INTEGER NOT NULL, bin_lo INTEGER NOT NULL, bin_hi INTEGER NOT NULL,
  n INTEGER NOT NULL, metric TEXT NOT NULL, mean REAL, ci_lo REAL, ci_hi REAL,
  reference_budget REAL NOT NULL, n_paired INTEGER NOT NULL,
  delta REAL, delta_lo REAL, delta_hi REAL,
  n_failed INTEGER NOT NULL, fail_rate REAL, fail_lo REAL, fail_hi REAL,
  latency_p50_ms REAL, latency_p95_ms REAL, ttft_p50_ms REAL,
  prompt_tokens_mean REAL, retained_tokens_mean REAL, kv_bytes_mean REAL,
  server_rss_peak_mib REAL, kv_cache_usage_peak REAL,
  PRIMARY KEY (run_id, bin_idx)
);
CREATE TABLE transition_summary (
  run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
  reference_budget REAL NOT NULL, delta_threshold REAL NOT NULL,
  status TEXT NOT NULL, first_failing_bin INTEGER, last_safe_bin INTEGER,
  zone_lo_tokens INTEGER, zone_hi_tokens INTEGER, instability REAL,
  bins_with_data INTEGER NOT NULL
);
CREATE TABLE fidelity_stats (
  run_id TEXT NOT NULL REFERENCES runs(run_id),
  bin_idx INTEGER NOT NULL, bin_lo INTEGER NOT NULL, bin_hi INTEGER NOT NULL,
  metric TEXT NOT NULL, available INTEGER NOT NULL, n INTEGER NOT NULL,
  mean REAL, ci_lo REAL, ci_hi REAL, lower REAL, upper REAL, top1_agree REAL,
  verdict TEXT NOT NULL,
  PRIMARY KEY (run_id, bin_idx, metric)
);
CREATE TABLE selective_stats (
  run_id TEXT NOT NULL REFERENCES runs(run_id),
  bin_idx INTEGER NOT NULL, split TEXT NOT NULL, stats_json TEXT NOT NULL,
  available INTEGER NOT NULL, n_test INTEGER NOT NULL, n_calibration INTEGER NOT NULL,
  augrc REAL, augrc_lo REAL, augrc_hi REAL, confidently_wrong REAL,
  d_augrc REAL, d_confidently_wrong REAL, nll REAL, brier REAL, ece REAL,
  PRIMARY KEY (run_id, bin_idx)
);
";

pub fn run_id(policy: &str, budget: f64) -> String {
    format!("{policy}@{budget}")
}

/// What the base database holds, gathered from the artifacts.
pub struct BaseInput<'a> {
    pub exp_group_id: &'a str,
    pub manifest: &'a Value,
    pub examples: &'a [Example],
    pub entries: &'a [Entry],
    pub bins: &'a [Bin],
    pub scores: &'a [ScoreRow],
}

/// What the analysis overlay holds.
pub struct OverlayInput<'a> {
    pub exp_group_id: &'a str,
    pub model: &'a str,
    pub config: &'a Value,
    pub bin_stats: &'a [BinStat],
    pub transitions: &'a [TransitionRow],
    pub fidelity: &'a [crate::stages::fidelity::FidelityStat],
    pub selective: &'a [crate::stages::fidelity::SelectiveStat],
}

/// The tables the overlay carries into the base.
pub const OVERLAY_TABLES: &[&str] = &[
    "experiments",
    "bin_stats",
    "transition_summary",
    "fidelity_stats",
    "selective_stats",
];

/// A new database at `path` with the whole schema, foreign keys off (a part
/// is checked once composed), no rollback journal and no fsync: a scratch
/// file used only if everything succeeds.
fn scratch_db(path: &std::path::Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA foreign_keys = OFF;",
    )?;
    conn.execute_batch(SCHEMA.replace("PRAGMA foreign_keys = ON;", "").as_str())?;
    Ok(conn)
}

fn row_counts(conn: &Connection, tables: &[&str]) -> Result<serde_json::Map<String, Value>> {
    let mut counts = serde_json::Map::new();
    for t in tables {
        let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?;
        counts.insert(t.to_string(), json!(n));
    }
    Ok(counts)
}

/// Writes the base database at `path` (which must not exist) in one
/// transaction; returns the row counts of its tables.
pub fn write_base(path: &std::path::Path, s: &BaseInput) -> Result<serde_json::Map<String, Value>> {
    let mut conn = scratch_db(path)?;
    let tx = conn.transaction()?;
    let ds = &s.manifest["dataset"];
    let dataset_id = ds["dataset_id"].as_str().unwrap_or_default();
    tx.execute(
        "INSERT INTO datasets VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            dataset_id,
            ds["name"].as_str(),
            ds["task"].as_str(),
            ds["source"].as_str(),
            s.manifest["tokenizer"].as_str(),
            s.bins.len() as i64,
            ds["location"].as_str(),
            ds["n_loaded"].as_i64(),
            ds["n_skipped_records"].as_i64().unwrap_or(0),
        ],
    )?;
    {
        let mut st = tx.prepare("INSERT INTO examples VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        for e in s.examples {
            st.execute(params![
                e.example_id,
                dataset_id,
                e.question,
                e.context,
                serde_json::to_string(&e.answers)?,
                serde_json::to_string(&e.meta)?,
            ])?;
        }
        let mut st = tx.prepare("INSERT INTO bins VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        for b in s.bins {
            st.execute(params![
                dataset_id,
                b.bin_idx,
                b.lo,
                b.hi,
                b.n_available,
                b.n_selected
            ])?;
        }
        let mut st = tx.prepare("INSERT INTO manifest_entries VALUES (?1, ?2, ?3, ?4)")?;
        for e in s.entries {
            st.execute(params![dataset_id, e.example_id, e.bin_idx, e.token_len])?;
        }
    }
    let mut runs: std::collections::BTreeMap<String, (String, f64, i64)> = Default::default();
    for r in s.scores {
        runs.entry(run_id(&r.policy, r.budget))
            .or_insert((r.policy.clone(), r.budget, 0))
            .2 += 1;
    }
    {
        let mut st = tx.prepare("INSERT INTO runs VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        for (id, (p, b, n)) in &runs {
            st.execute(params![id, s.exp_group_id, dataset_id, p, b, n])?;
        }
        let golds: std::collections::HashMap<&str, String> = s
            .examples
            .iter()
            .map(|e| {
                (
                    e.example_id.as_str(),
                    e.answers
                        .iter()
                        .map(|a| normalize(a))
                        .collect::<Vec<_>>()
                        .join(" | "),
                )
            })
            .collect();
        let mut rq = tx.prepare("INSERT INTO requests VALUES (?1, ?2, ?3, ?4)")?;
        let mut rs = tx.prepare("INSERT INTO responses VALUES (?1, ?2, ?3, ?4)")?;
        let mut te = tx.prepare(
            "INSERT INTO telemetry VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
        )?;
        let mut fa = tx.prepare("INSERT INTO failures VALUES (?1, ?2, ?3)")?;
        let mut sc = tx.prepare("INSERT INTO scores VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?;
        let mut tl = tx.prepare("INSERT INTO token_logprobs VALUES (?1, ?2, ?3, ?4, ?5)")?;
        let mut rf = tx.prepare(
            "INSERT INTO response_fidelity VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for r in s.scores {
            let run = run_id(&r.policy, r.budget);
            let id = format!("{run}/{}", r.example_id);
            rq.execute(params![id, run, r.example_id, r.request_key])?;
            rs.execute(params![
                id,
                r.response.text,
                r.response.finish_reason,
                r.response.error
            ])?;
            te.execute(params![
                id,
                r.response.latency_ms,
                r.response.ttft_ms,
                r.response.prompt_tokens.map(|x| x as i64),
                r.response.completion_tokens.map(|x| x as i64),
                r.response.retained_tokens.map(|x| x as i64),
                r.response.retries,
                r.response.server_rss_kib.map(|x| x as i64),
                r.response.endpoint,
                r.response.kv_cache_usage,
                r.response.server_prompt_ms,
                r.response.server_predicted_ms,
                r.response.kv_kept_total.map(|x| x as i64),
                r.response.kv_full_total.map(|x| x as i64),
                r.response
                    .kv_kept_per_layer
                    .as_ref()
                    .map(|v| serde_json::to_string(v).expect("numbers serialize")),
                r.response.kv_bytes.map(|x| x as i64),
                r.response.prefill_ms,
                r.response.decode_ms,
                r.response.prefill_reused,
                r.response.device_peak_bytes.map(|x| x as i64),
            ])?;
            for (i, t) in r.response.logprobs.iter().flatten().enumerate() {
                let top = (!t.top.is_empty())
                    .then(|| serde_json::to_string(&t.top).expect("pairs serialize"));
                tl.execute(params![id, i as i64, t.token, f64::from(t.logprob), top])?;
            }
            let p = &r.probs;
            let fid = r.response.fidelity.as_ref();
            if r.response.logprobs.is_some() || r.response.gold_loglik.is_some() || fid.is_some() {
                rf.execute(params![
                    id,
                    p.conf_mean,
                    p.conf_min,
                    p.gold_ll,
                    p.gold_ll_best,
                    r.response
                        .gold_loglik
                        .as_ref()
                        .map(|g| serde_json::to_string(g).expect("numbers serialize")),
                    p.kl_mean,
                    p.top1_agree,
                    p.first_divergence,
                    fid.map(|f| f.basis.clone()),
                    fid.map(|f| serde_json::to_string(&f.kl).expect("numbers serialize")),
                ])?;
            }
            if let Some(f) = &r.failure {
                let detail = r
                    .response
                    .error
                    .clone()
                    .or_else(|| Some(r.response.text.clone()));
                fa.execute(params![id, f.label(), detail])?;
            }
            sc.execute(params![
                id,
                r.metric,
                r.score,
                r.em,
                r.f1,
                r.recall,
                normalize(&r.response.text),
                golds
                    .get(r.example_id.as_str())
                    .cloned()
                    .unwrap_or_default(),
            ])?;
        }
    }
    let base: Vec<&str> = TABLES
        .iter()
        .copied()
        .filter(|t| !OVERLAY_TABLES.contains(t))
        .collect();
    let counts = row_counts(&tx, &base)?;
    // Checked once here, but for references to the analysis tables (empty
    // until composed, which checks those).
    let neighbours = overlay_neighbours(&tx)?;
    let own: Vec<&str> = base
        .iter()
        .copied()
        .filter(|t| !neighbours.contains(t))
        .collect();
    let broken = foreign_key_violations(&tx, &own)?;
    anyhow::ensure!(
        broken == 0,
        "{broken} rows of the base violate a foreign key"
    );
    tx.commit()?;
    conn.close().map_err(|(_, e)| e)?;
    Ok(counts)
}

/// Writes the analysis overlay at `path`: the experiment (with its whole
/// configuration), bin statistics and transitions.
pub fn write_overlay(
    path: &std::path::Path,
    s: &OverlayInput,
) -> Result<serde_json::Map<String, Value>> {
    let mut conn = scratch_db(path)?;
    let tx = conn.transaction()?;
    let config_text = String::from_utf8(canonical_json(s.config))?;
    tx.execute(
        "INSERT INTO experiments VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            s.exp_group_id,
            blake3::hash(config_text.as_bytes()).to_hex().to_string(),
            config_text,
            env!("CARGO_PKG_VERSION"),
            s.model,
        ],
    )?;
    {
        let mut bs = tx.prepare(
            "INSERT INTO bin_stats VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13,
             ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)",
        )?;
        for b in s.bin_stats {
            bs.execute(params![
                run_id(&b.policy, b.budget),
                b.bin_idx,
                b.bin_lo,
                b.bin_hi,
                b.n,
                b.metric,
                b.mean,
                b.ci_lo,
                b.ci_hi,
                b.reference_budget,
                b.n_paired,
                b.delta,
                b.delta_lo,
                b.delta_hi,
                b.n_failed,
                b.fail_rate,
                b.fail_lo,
                b.fail_hi,
                b.latency_p50_ms,
                b.latency_p95_ms,
                b.ttft_p50_ms,
                b.prompt_tokens_mean,
                b.retained_tokens_mean,
                b.kv_bytes_mean,
                b.server_rss_peak_mib,
                b.kv_cache_usage_peak,
            ])?;
        }
        let mut ts = tx.prepare(
            "INSERT INTO transition_summary VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for t in s.transitions {
            ts.execute(params![
                run_id(&t.policy, t.budget),
                t.reference_budget,
                t.delta_threshold,
                t.t.status.name(),
                t.t.first_failing_bin,
                t.t.last_safe_bin,
                t.t.zone_lo_tokens,
                t.t.zone_hi_tokens,
                t.t.instability,
                t.t.bins_with_data,
            ])?;
        }
        let mut fs = tx.prepare(
            "INSERT INTO fidelity_stats VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        for f in s.fidelity {
            fs.execute(params![
                run_id(&f.policy, f.budget),
                f.bin_idx,
                f.bin_lo,
                f.bin_hi,
                f.metric,
                f.available,
                f.n,
                f.mean,
                f.ci_lo,
                f.ci_hi,
                f.lower,
                f.upper,
                f.top1_agree,
                f.verdict.name(),
            ])?;
        }
        let mut ss = tx.prepare(
            "INSERT INTO selective_stats VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        for x in s.selective {
            ss.execute(params![
                run_id(&x.policy, x.budget),
                x.bin_idx,
                x.split,
                serde_json::to_string(x)?,
                x.available,
                x.n_test,
                x.n_calibration,
                x.augrc,
                x.augrc_lo,
                x.augrc_hi,
                x.confidently_wrong,
                x.d_augrc,
                x.d_confidently_wrong,
                x.nll,
                x.brier,
                x.ece,
            ])?;
        }
    }
    let counts = row_counts(&tx, OVERLAY_TABLES)?;
    // Only the overlay's own tables stay: a few pages instead of the schema's thirty.
    for t in TABLES.iter().rev().filter(|t| !OVERLAY_TABLES.contains(t)) {
        tx.execute(&format!("DROP TABLE {t}"), [])?;
    }
    tx.commit()?;
    conn.execute_batch("VACUUM;")?;
    conn.close().map_err(|(_, e)| e)?;
    Ok(counts)
}

/// Replaces the overlay's tables in `file` (the base, or an earlier
/// composition of it) in one transaction, which commits only when every
/// foreign key holds (the base's own were checked when it was written).
/// `in_place`: `file` is the user's exported database, so the change goes
/// through SQLite's rollback journal and is synced; otherwise `file` is a
/// private copy renamed into place afterwards, and needs neither.
pub fn compose(file: &std::path::Path, overlay: &std::path::Path, in_place: bool) -> Result<()> {
    let mut conn = Connection::open(file)?;
    if in_place {
        conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA synchronous = FULL;")?;
    } else {
        conn.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")?;
    }
    // The overlay's rows, read through their own connection (an attached
    // database's schema would take part in the foreign-key checks).
    let ov = Connection::open_with_flags(overlay, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut tables = Vec::new();
    for t in OVERLAY_TABLES {
        let mut st = ov.prepare(&format!("SELECT * FROM {t}"))?;
        let width = st.column_count();
        let rows = st
            .query_map([], |r| {
                (0..width)
                    .map(|i| r.get::<_, rusqlite::types::Value>(i))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tables.push((t, width, rows));
    }
    // Foreign keys are checked once the tables are replaced, before the
    // commit (a failure rolls back: the file stays as it was).
    conn.execute_batch("PRAGMA foreign_keys = OFF;")?;
    let tx = conn.transaction()?;
    for (t, width, rows) in &tables {
        tx.execute(&format!("DELETE FROM {t}"), [])?;
        let marks = vec!["?"; *width].join(", ");
        let mut ins = tx.prepare(&format!("INSERT INTO {t} VALUES ({marks})"))?;
        for row in rows {
            ins.execute(rusqlite::params_from_iter(row))?;
        }
    }
    let broken = foreign_key_violations(&tx, &overlay_neighbours(&tx)?)?;
    anyhow::ensure!(
        broken == 0,
        "{broken} rows violate a foreign key once the analysis tables are in"
    );
    tx.commit()?;
    conn.close().map_err(|(_, e)| e)?;
    if !in_place {
        // Durable before the rename into place.
        std::fs::File::open(file)?.sync_all()?;
    }
    Ok(())
}

/// What `sqlite_base` reads (its stage's `uses`, exactly).
#[derive(serde::Deserialize)]
pub struct BaseUses {
    #[serde(rename = "output.exp_group_id")]
    exp: String,
}

/// `sqlite_base`: the part of the database that follows from the data and
/// the responses.
pub struct SqliteBase;

impl crate::stages::Stage for SqliteBase {
    fn name(&self) -> &'static str {
        "sqlite_base"
    }
    /// 3: token log-probabilities and per-response fidelity.
    fn version(&self) -> u32 {
        3
    }
    type Uses = BaseUses;
    type Transport = NoTransport;
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, _: Self::Transport) -> Result<()> {
        let BaseUses { exp } = uses;
        // Only the header of `manifest.json`: its examples are skipped, not
        // parsed into a tree (they come from the `examples` table).
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(default)]
            dataset: Value,
            #[serde(default)]
            tokenizer: Value,
        }
        let head: Head = serde_json::from_slice(&ctx.input("prepare", "manifest_json")?)?;
        let manifest = serde_json::json!({"dataset": head.dataset, "tokenizer": head.tokenizer});
        let examples: Vec<Example> = table::read_owned(ctx.input("prepare", "examples")?)?;
        let entries: Vec<Entry> = table::read_owned(ctx.input("prepare", "manifest")?)?;
        let bins: Vec<Bin> = table::read_owned(ctx.input("prepare", "bins")?)?;
        let scores = crate::stages::score::read_all::<ScoreRow>(ctx)?;
        let file = ctx.scratch_dir()?.join("base.sqlite");
        let counts = write_base(
            &file,
            &BaseInput {
                exp_group_id: &exp,
                manifest: &manifest,
                examples: &examples,
                entries: &entries,
                bins: &bins,
                scores: &scores,
            },
        )
        .context("writing the SQLite sink's base")?;
        ctx.put("db_base", &std::fs::read(&file)?)?;
        ctx.put("counts", serde_json::to_string_pretty(&counts)?.as_bytes())?;
        Ok(())
    }
}

/// What `sqlite` reads: it records the experiment's configuration, so it
/// takes these sections whole (its stage's `uses`, exactly).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Uses {
    #[serde(rename = "output.exp_group_id")]
    exp: String,
    #[serde(rename = "db.path")]
    db_path: String,
    #[serde(rename = "model.name")]
    model: String,
    dataset: schema::Dataset,
    #[serde(rename = "tokenizer.kind")]
    tokenizer_kind: schema::TokenizerKind,
    #[serde(rename = "tokenizer.name")]
    tokenizer_name: String,
    binning: schema::Binning,
    sampling: schema::Sampling,
    kv: schema::Kv,
    decoding: schema::Decoding,
    prompt: schema::Prompt,
    analysis: schema::Analysis,
}

impl crate::stages::Stage for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    /// 3: the analysis tables only; the file is composed when exported.
    /// 4: fidelity and selective-prediction tables.
    fn version(&self) -> u32 {
        4
    }
    type Uses = Uses;
    type Transport = NoTransport;
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, _: Self::Transport) -> Result<()> {
        let u = uses;
        // The experiment's configuration as recorded: the typed sections
        // written back (the same JSON, so the same digest).
        let config = serde_json::to_value(&u).context("serializing the configuration")?;
        let (exp, db_path) = (u.exp.clone(), u.db_path.clone());
        let bin_stats: Vec<BinStat> = table::read_owned(ctx.input("analyze", "bin_stats")?)?;
        let transitions: Vec<TransitionRow> =
            table::read_owned(ctx.input("analyze", "transition_summary")?)?;
        let fidelity: Vec<crate::stages::fidelity::FidelityStat> =
            table::read_owned(ctx.input("analyze", "fidelity_stats")?)?;
        let selective: Vec<crate::stages::fidelity::SelectiveStat> =
            table::read_owned(ctx.input("analyze", "selective_stats")?)?;
        let file = ctx.scratch_dir()?.join("analysis.sqlite");
        let mut counts: serde_json::Map<String, Value> =
            serde_json::from_slice(&ctx.input("sqlite_base", "counts")?)?;
        counts.extend(
            write_overlay(
                &file,
                &OverlayInput {
                    exp_group_id: &exp,
                    model: &u.model,
                    config: &config,
                    bin_stats: &bin_stats,
                    transitions: &transitions,
                    fidelity: &fidelity,
                    selective: &selective,
                },
            )
            .context("writing the SQLite sink's analysis tables")?,
        );
        // In the blueprint's table order.
        let counts: serde_json::Map<String, Value> = TABLES
            .iter()
            .map(|t| (t.to_string(), counts.get(*t).cloned().unwrap_or(json!(0))))
            .collect();
        ctx.put("analysis", &std::fs::read(&file)?)?;
        ctx.pass_through("sqlite_base", "db_base", "db_base")?;
        ctx.put("summary", serde_json::to_string_pretty(&counts)?.as_bytes())?;
        let target = if db_path == "auto" {
            format!("runs/{exp}/kv_transition.sqlite")
        } else {
            db_path
        };
        ctx.export_composed("db_base", &["analysis"], target);
        Ok(())
    }
    fn compose_export(&self, file: &std::path::Path, overlays: &[Vec<u8>]) -> Result<()> {
        apply(file, overlays, false)
    }
    /// The analysis tables are replaced in one transaction: an analysis
    /// change never copies the base.
    fn recompose_in_place(&self, file: &std::path::Path, overlays: &[Vec<u8>]) -> Result<bool> {
        apply(file, overlays, true)?;
        Ok(true)
    }
}

/// Rows of `tables` whose foreign keys point nowhere.
fn foreign_key_violations(conn: &Connection, tables: &[&str]) -> Result<i64> {
    let mut broken = 0;
    for t in tables {
        broken += conn.query_row(
            "SELECT COUNT(*) FROM pragma_foreign_key_check(?1)",
            [t],
            |r| r.get::<_, i64>(0),
        )?;
    }
    Ok(broken)
}

/// The analysis tables and every table with a foreign key into one of
/// them: what composing can break.
fn overlay_neighbours(conn: &Connection) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for t in TABLES {
        let parents: Vec<String> = conn
            .prepare("SELECT \"table\" FROM pragma_foreign_key_list(?1)")?
            .query_map([t], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if OVERLAY_TABLES.contains(t)
            || parents.iter().any(|p| OVERLAY_TABLES.contains(&p.as_str()))
        {
            out.push(*t);
        }
    }
    Ok(out)
}

/// The sink's one overlay (the analysis tables) applied to `file`.
fn apply(file: &std::path::Path, overlays: &[Vec<u8>], in_place: bool) -> Result<()> {
    let [analysis] = overlays else {
        anyhow::bail!(
            "the SQLite sink composes one overlay, got {}",
            overlays.len()
        );
    };
    let ov = file.with_extension(format!("analysis.{}.tmp", std::process::id()));
    std::fs::write(&ov, analysis)?;
    let result = compose(file, &ov, in_place);
    let _ = std::fs::remove_file(&ov);
    result
}
