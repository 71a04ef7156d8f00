//! `kvt eval-preds`: scores predictions made elsewhere, in LongBench's `pred/`
//! format (one JSON object per line with `pred`, `answers`, `all_classes`,
//! `length`), with the benchmark's own metrics and rounding.

use crate::metrics::longbench::{self as lb};
use crate::KvtError;
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Pred {
    pred: String,
    answers: Vec<String>,
    #[serde(default)]
    all_classes: Option<Vec<String>>,
    #[serde(default)]
    length: Option<i64>,
}

/// Scores of one task file.
pub struct TaskResult {
    pub task: String,
    pub metric: &'static str,
    pub n: usize,
    pub score: Option<f64>,
    /// Length buckets (LongBench-E's 0-4k, 4-8k, 8k+, or other edges) in
    /// order, with their scores, when asked for.
    pub buckets: Option<Vec<(String, Option<f64>)>>,
}

/// How predictions are scored.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Bucket starts by the records' `length` (the first is 0), when scoring by length.
    pub by_length: Option<Vec<i64>>,
    pub code_sim: lb::CodeSim,
}

/// `--by-length` edges: none given → LongBench-E's `0,4000,8000`; else
/// increasing, comma-separated lengths starting at 0 (`k` means thousands).
pub fn parse_edges(arg: Option<&str>) -> Result<Vec<i64>> {
    let Some(arg) = arg.filter(|a| !a.trim().is_empty()) else {
        return Ok(lb::LONGBENCH_E_EDGES.to_vec());
    };
    let bad = |why: String| -> anyhow::Error {
        KvtError::usage(format!(
            "`--by-length={arg}`: {why}; give increasing bucket starts from 0, e.g. `--by-length=0,4k,8k,16k`"
        ))
        .into()
    };
    let edges = arg
        .split(',')
        .map(|x| {
            let x = x.trim();
            let (num, scale) = match x.strip_suffix(['k', 'K']) {
                Some(n) => (n, 1000),
                None => (x, 1),
            };
            num.parse::<i64>()
                .ok()
                .and_then(|n| n.checked_mul(scale))
                .filter(|n| *n >= 0)
                .ok_or_else(|| bad(format!("`{x}` is not a length")))
        })
        .collect::<Result<Vec<i64>>>()?;
    if edges.first() != Some(&0) {
        return Err(bad("the first bucket must start at 0".into()));
    }
    if edges.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("the edges must increase".into()));
    }
    Ok(edges)
}

pub fn score_file(path: &Path, task: &str, opts: &EvalOptions) -> Result<TaskResult> {
    let metric = lb::metric_of(task).ok_or_else(|| {
        KvtError::usage(format!(
            "unknown LongBench task `{task}` (names are case-sensitive); known: {}",
            lb::task_names().join(", ")
        ))
    })?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| KvtError::usage(format!("cannot read `{}`: {e}", path.display())))?;
    let mut scores = Vec::new();
    let edges = opts.by_length.as_deref();
    let mut buckets: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Pred = serde_json::from_str(line).map_err(|e| {
            KvtError::usage(format!(
                "`{}:{}`: not a prediction record ({e}); expected {{\"pred\": ..., \"answers\": [...], \"all_classes\": ..., \"length\": ...}}",
                path.display(),
                i + 1
            ))
        })?;
        let classes = p.all_classes.unwrap_or_default();
        let s = lb::sample_score(task, &p.pred, &p.answers, &classes, opts.code_sim)
            .expect("known task");
        scores.push(s);
        if let Some(edges) = edges {
            let len = p.length.ok_or_else(|| {
                KvtError::usage(format!(
                    "`{}:{}`: `--by-length` needs a `length` field in every record",
                    path.display(),
                    i + 1
                ))
            })?;
            buckets
                .entry(lb::length_bucket(len, edges))
                .or_default()
                .push(s);
        }
    }
    Ok(TaskResult {
        task: task.to_string(),
        metric,
        n: scores.len(),
        score: lb::task_score(&scores),
        buckets: edges.map(|edges| {
            (0..edges.len())
                .map(|b| {
                    (
                        lb::bucket_label(edges, b),
                        lb::bucket_score(buckets.get(&b).map_or(&[][..], Vec::as_slice)),
                    )
                })
                .collect()
        }),
    })
}

/// The task a file scores as: its stem, without LongBench-E's `_e` suffix.
pub fn task_of(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    match stem.strip_suffix("_e") {
        Some(t) if lb::metric_of(t).is_some() => t.to_string(),
        _ => stem,
    }
}

pub fn run(
    task: Option<&str>,
    file: Option<&Path>,
    dir: Option<&Path>,
    opts: &EvalOptions,
    as_json: bool,
) -> Result<()> {
    let jobs: Vec<(PathBuf, String)> = match (file, dir) {
        (Some(f), None) => {
            let t = task.map(str::to_string).unwrap_or_else(|| task_of(f));
            vec![(f.to_path_buf(), t)]
        }
        (None, Some(d)) => {
            if task.is_some() {
                return Err(KvtError::usage("`--task` goes with a FILE, not with `--dir`").into());
            }
            let mut v = Vec::new();
            let entries = std::fs::read_dir(d)
                .map_err(|e| KvtError::usage(format!("cannot read `{}`: {e}", d.display())))?;
            for e in entries {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "jsonl") {
                    let t = task_of(&p);
                    if lb::metric_of(&t).is_some() {
                        v.push((p, t));
                    } else {
                        tracing::warn!("skipping `{}`: not a LongBench task name", p.display());
                    }
                }
            }
            v.sort();
            if v.is_empty() {
                return Err(KvtError::usage(format!(
                    "no `<task>.jsonl` files for LongBench tasks in `{}`",
                    d.display()
                ))
                .into());
            }
            v
        }
        _ => {
            return Err(KvtError::usage(
                "give one prediction FILE (with `--task`, or named `<task>.jsonl`) or `--dir DIR`",
            )
            .into())
        }
    };
    // Files in parallel: each is independent.
    let results: Vec<Result<TaskResult>> = crate::engine::par_map(&jobs, |(p, t)| {
        score_file(p, t, opts).with_context(|| format!("scoring `{}`", p.display()))
    });
    let results: Vec<TaskResult> = results.into_iter().collect::<Result<_>>()?;
    print!("{}", render(&results, as_json));
    Ok(())
}

fn num(x: Option<f64>) -> Value {
    x.map_or(Value::Null, |v| json!(v))
}

/// `result.json`-style JSON, or a table.
pub fn render(results: &[TaskResult], as_json: bool) -> String {
    if as_json {
        let mut m = Map::new();
        for r in results {
            let v = match &r.buckets {
                Some(b) => Value::Object(b.iter().map(|(k, v)| (k.clone(), num(*v))).collect()),
                None => num(r.score),
            };
            m.insert(r.task.clone(), v);
        }
        return format!(
            "{}\n",
            serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default()
        );
    }
    let fmt = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.2}"));
    let mut out = String::new();
    match results.first().and_then(|r| r.buckets.as_ref()) {
        Some(b) => {
            out.push_str(&format!("{:<22} {:<22} {:>6}", "task", "metric", "n"));
            for (label, _) in b {
                out.push_str(&format!(" {label:>8}"));
            }
            out.push('\n');
        }
        None => out.push_str(&format!(
            "{:<22} {:<22} {:>6} {:>8}\n",
            "task", "metric", "n", "score"
        )),
    }
    for r in results {
        match &r.buckets {
            Some(b) => {
                out.push_str(&format!("{:<22} {:<22} {:>6}", r.task, r.metric, r.n));
                for (_, v) in b {
                    out.push_str(&format!(" {:>8}", fmt(*v)));
                }
                out.push('\n');
            }
            None => out.push_str(&format!(
                "{:<22} {:<22} {:>6} {:>8}\n",
                r.task,
                r.metric,
                r.n,
                fmt(r.score)
            )),
        }
    }
    out
}
