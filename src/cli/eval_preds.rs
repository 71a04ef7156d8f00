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
    /// LongBench-E buckets (0-4k, 4-8k, 8k+), when asked for.
    pub buckets: Option<BTreeMap<&'static str, Option<f64>>>,
}

pub fn score_file(path: &Path, task: &str, by_length: bool) -> Result<TaskResult> {
    let metric = lb::metric_of(task).ok_or_else(|| {
        KvtError::usage(format!(
            "unknown LongBench task `{task}` (names are case-sensitive); known: {}",
            lb::task_names().join(", ")
        ))
    })?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| KvtError::usage(format!("cannot read `{}`: {e}", path.display())))?;
    let mut scores = Vec::new();
    let mut buckets: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
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
        let s = lb::sample_score(task, &p.pred, &p.answers, &classes).expect("known task");
        scores.push(s);
        if by_length {
            let len = p.length.ok_or_else(|| {
                KvtError::usage(format!(
                    "`{}:{}`: `--by-length` needs a `length` field in every record",
                    path.display(),
                    i + 1
                ))
            })?;
            buckets.entry(lb::length_bucket(len)).or_default().push(s);
        }
    }
    Ok(TaskResult {
        task: task.to_string(),
        metric,
        n: scores.len(),
        score: lb::task_score(&scores),
        buckets: by_length.then(|| {
            ["0-4k", "4-8k", "8k+"]
                .into_iter()
                .map(|b| {
                    (
                        b,
                        lb::bucket_score(buckets.get(b).map_or(&[][..], Vec::as_slice)),
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
    by_length: bool,
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
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = jobs.len().div_ceil(threads).max(1);
    let results: Vec<Result<TaskResult>> = std::thread::scope(|s| {
        let hs: Vec<_> = jobs
            .chunks(chunk)
            .map(|c| {
                s.spawn(move || {
                    c.iter()
                        .map(|(p, t)| {
                            score_file(p, t, by_length)
                                .with_context(|| format!("scoring `{}`", p.display()))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("scoring thread"))
            .collect()
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
                Some(b) => Value::Object(b.iter().map(|(k, v)| (k.to_string(), num(*v))).collect()),
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
        Some(_) => out.push_str(&format!(
            "{:<22} {:<22} {:>6} {:>8} {:>8} {:>8}\n",
            "task", "metric", "n", "0-4k", "4-8k", "8k+"
        )),
        None => out.push_str(&format!(
            "{:<22} {:<22} {:>6} {:>8}\n",
            "task", "metric", "n", "score"
        )),
    }
    for r in results {
        match &r.buckets {
            Some(b) => out.push_str(&format!(
                "{:<22} {:<22} {:>6} {:>8} {:>8} {:>8}\n",
                r.task,
                r.metric,
                r.n,
                fmt(b["0-4k"]),
                fmt(b["4-8k"]),
                fmt(b["8k+"])
            )),
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
