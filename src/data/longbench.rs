//! LongBench v1 / LongBench-E from a local copy; nothing is downloaded.
//!
//! A task `hotpotqa` is the file `hotpotqa.jsonl`, `hotpotqa_e` the
//! LongBench-E file `hotpotqa_e.jsonl`. kvt finds it in, in order:
//!
//! 1. `dataset.path`, when set: a directory (holding `data/<task>.jsonl`,
//!    `<task>.jsonl`, `data.zip`, or `<task>/test/*.parquet`), a `data.zip`,
//!    a `.jsonl` file or a `.parquet` file;
//! 2. `data/raw/longbench/` in the project (same layouts);
//! 3. the Hugging Face hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!    `~/.cache/huggingface/hub`): `datasets--THUDM--LongBench/snapshots/*/`
//!    (`data.zip`, `data/`, or Parquet conversions);
//! 4. the `datasets` library's extracted downloads
//!    (`$HF_HOME/datasets/downloads/extracted/*/data/`, default
//!    `~/.cache/huggingface/datasets/...`).
//!
//! When nothing is found, the error lists every place it looked.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where a task's records are.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Jsonl(PathBuf),
    /// A zip archive and the entry inside it.
    Zip(PathBuf, String),
    Parquet(Vec<PathBuf>),
    /// Several files read in order (`dataset.path` as a list or a glob);
    /// records without an id field are numbered by their own file's stem.
    Many(Vec<Source>),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Jsonl(p) => p.display().to_string(),
            Source::Zip(z, e) => format!("{}!{e}", z.display()),
            Source::Parquet(ps) => ps
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            Source::Many(v) => v
                .iter()
                .map(Source::describe)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
    /// The files whose bytes make up the source (for the node's fingerprint).
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Source::Jsonl(p) | Source::Zip(p, _) => vec![p.clone()],
            Source::Parquet(ps) => ps.clone(),
            Source::Many(v) => v.iter().flat_map(Source::files).collect(),
        }
    }
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

fn hf_home() -> Option<PathBuf> {
    std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".cache/huggingface")))
}

/// Directories searched when `dataset.path` is not set, in order.
pub fn default_places(root: &Path) -> Vec<PathBuf> {
    let mut v = vec![root.join("data/raw/longbench")];
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("hub")));
    if let Some(hub) = hub {
        let snaps = hub.join("datasets--THUDM--LongBench/snapshots");
        v.extend(sorted_dirs(&snaps));
        if !snaps.exists() {
            v.push(snaps);
        }
    }
    if let Some(h) = hf_home() {
        let ext = h.join("datasets/downloads/extracted");
        v.extend(sorted_dirs(&ext));
        if !ext.exists() {
            v.push(ext);
        }
    }
    v
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn zip_has(zip: &Path, entry: &str) -> bool {
    std::fs::File::open(zip)
        .ok()
        .and_then(|f| zip::ZipArchive::new(f).ok())
        .is_some_and(|mut z| z.by_name(entry).is_ok())
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The task's records in one place (a directory or a file), if there.
pub fn find_in(place: &Path, task: &str) -> Option<Source> {
    let file = format!("{task}.jsonl");
    if place.is_file() {
        let name = place.file_name()?.to_string_lossy().to_string();
        return if name.ends_with(".zip") {
            let entry = format!("data/{file}");
            zip_has(place, &entry).then(|| Source::Zip(place.to_path_buf(), entry))
        } else if name.ends_with(".parquet") {
            Some(Source::Parquet(vec![place.to_path_buf()]))
        } else {
            Some(Source::Jsonl(place.to_path_buf()))
        };
    }
    for cand in [place.join("data").join(&file), place.join(&file)] {
        if cand.is_file() {
            return Some(Source::Jsonl(cand));
        }
    }
    let zip = place.join("data.zip");
    if zip.is_file() {
        if let Some(s) = find_in(&zip, task) {
            return Some(s);
        }
    }
    let pq = parquet_files(&place.join(task).join("test"));
    if !pq.is_empty() {
        return Some(Source::Parquet(pq));
    }
    None
}

/// Finds a task: in `explicit` only when given, else in the default places.
pub fn locate(task: &str, explicit: Option<&Path>, root: &Path) -> Result<Source> {
    let places = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => default_places(root),
    };
    for p in &places {
        if let Some(s) = find_in(p, task) {
            return Ok(s);
        }
    }
    let looked: Vec<String> = places
        .iter()
        .map(|p| format!("  {}", p.display()))
        .collect();
    bail!(
        "LongBench task `{task}` not found (task names are exact and case-sensitive). Looked in:\n{}\nPut the data in one of these places (e.g. unzip LongBench's data.zip into data/raw/longbench/), or point `dataset.path` at a directory, data.zip, .jsonl or .parquet file; `kvt datasets` lists what it finds",
        looked.join("\n")
    )
}

/// Reads a source's records into the collector.
pub fn load(src: &Source, c: &mut super::records::Collector, stem: &str) -> Result<()> {
    match src {
        Source::Jsonl(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading `{}`", p.display()))?;
            c.jsonl(&p.display().to_string(), &bytes, stem)
        }
        Source::Zip(z, entry) => {
            let f = std::fs::File::open(z).with_context(|| format!("opening `{}`", z.display()))?;
            let mut a = zip::ZipArchive::new(f)
                .with_context(|| format!("`{}` is not a readable zip archive", z.display()))?;
            let mut text = Vec::new();
            a.by_name(entry)?
                .read_to_end(&mut text)
                .with_context(|| format!("reading `{}!{entry}`", z.display()))?;
            c.jsonl(&src.describe(), &text, stem)
        }
        Source::Parquet(ps) => {
            for p in ps {
                let bytes =
                    std::fs::read(p).with_context(|| format!("reading `{}`", p.display()))?;
                c.parquet(&p.display().to_string(), &bytes, stem)?;
            }
            Ok(())
        }
        Source::Many(v) => {
            for s in v {
                let stem = s
                    .files()
                    .first()
                    .and_then(|p| p.file_stem())
                    .map(|x| x.to_string_lossy().to_string())
                    .unwrap_or_else(|| stem.to_string());
                load(s, c, &stem)?;
            }
            Ok(())
        }
    }
}

/// Every LongBench task file found in one place: (task, source).
pub fn tasks_in(place: &Path) -> Vec<(String, Source)> {
    let mut out = Vec::new();
    let add_jsonl_dir = |dir: &Path, out: &mut Vec<(String, Source)>| {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "jsonl") {
                    let t = p
                        .file_stem()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_string();
                    out.push((t, Source::Jsonl(p)));
                }
            }
        }
    };
    if place.is_dir() {
        add_jsonl_dir(&place.join("data"), &mut out);
        add_jsonl_dir(place, &mut out);
        let zip = place.join("data.zip");
        if let Some(mut a) = std::fs::File::open(&zip)
            .ok()
            .and_then(|f| zip::ZipArchive::new(f).ok())
        {
            let names: Vec<String> = a.file_names().flatten().map(|n| n.to_string()).collect();
            for n in names {
                if let Some(t) = n
                    .strip_prefix("data/")
                    .and_then(|x| x.strip_suffix(".jsonl"))
                {
                    if a.by_name(&n).is_ok() {
                        out.push((t.to_string(), Source::Zip(zip.clone(), n.clone())));
                    }
                }
            }
        }
        for d in sorted_dirs(place) {
            let pq = parquet_files(&d.join("test"));
            if !pq.is_empty() {
                let t = d
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string();
                out.push((t, Source::Parquet(pq)));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    out
}
