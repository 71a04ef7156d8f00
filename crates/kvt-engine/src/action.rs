//! The action cache (node key → the outputs it produced, with timing and kvt
//! version) and the per-scope "last build" records that let `kvt graph` say why
//! a node is stale: what its config slice, inputs and op version were last time.

use super::digest::Digest;
use super::error::{Context, Result};
use super::store::{write_atomic, STORE_FORMAT};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// One output artifact of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    pub name: String,
    pub digest: Digest,
    pub size: u64,
}

/// A file outside the cache materialised from an output (a sink such as
/// `runs/<exp>/report.md`). Paths are relative to the project root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub artifact: String,
    pub path: String,
    /// Artifacts the op applies over `artifact` when the file is written
    /// (`Op::compose_export`); the composed file itself is never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<String>,
}

/// What a node's run produced, stored under its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub key: Digest,
    pub op: String,
    pub op_version: u32,
    pub node: String,
    pub config: BTreeMap<String, serde_json::Value>,
    pub fingerprint: Option<String>,
    pub inputs: BTreeMap<String, Digest>,
    pub outputs: Vec<OutputRef>,
    pub exports: Vec<Export>,
    /// Seconds since the Unix epoch.
    pub started_at: f64,
    pub finished_at: f64,
    pub duration_ms: f64,
    /// The version of the program that produced the record (provenance only).
    #[serde(rename = "kvt_version")]
    pub producer_version: String,
}

impl ActionRecord {
    pub fn output(&self, name: &str) -> Option<&OutputRef> {
        self.outputs.iter().find(|o| o.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct ActionCache {
    root: PathBuf,
}

impl ActionCache {
    pub fn new(cache_root: &Path) -> Self {
        Self {
            root: cache_root.join(STORE_FORMAT),
        }
    }

    pub fn actions_dir(&self) -> PathBuf {
        self.root.join("actions")
    }

    fn path_of(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.actions_dir()
            .join(&hex[..2])
            .join(format!("{}.json", &hex[2..]))
    }

    /// The record for a key; an unreadable record counts as absent (and is rebuilt).
    pub fn get(&self, key: &Digest) -> Option<ActionRecord> {
        let bytes = fs::read(self.path_of(key)).ok()?;
        let rec: ActionRecord = serde_json::from_slice(&bytes).ok()?;
        (rec.key == *key).then_some(rec)
    }

    pub fn put(&self, rec: &ActionRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(rec)?;
        write_atomic(&self.root.join("tmp"), &self.path_of(&rec.key), &bytes)
            .with_context(|| format!("recording the result of `{}`", rec.node))
    }

    pub fn remove(&self, key: &Digest) -> Result<()> {
        let p = self.path_of(key);
        if p.exists() {
            fs::remove_file(p)?;
        }
        Ok(())
    }

    /// Every readable record, with its file path and size on disk.
    pub fn list(&self) -> Vec<(ActionRecord, PathBuf, u64)> {
        let mut out = Vec::new();
        let Ok(dirs) = fs::read_dir(self.actions_dir()) else {
            return out;
        };
        for dir in dirs.flatten() {
            let Ok(files) = fs::read_dir(dir.path()) else {
                continue;
            };
            for f in files.flatten() {
                let Ok(bytes) = fs::read(f.path()) else {
                    continue;
                };
                if let Ok(rec) = serde_json::from_slice::<ActionRecord>(&bytes) {
                    out.push((rec, f.path(), bytes.len() as u64));
                }
            }
        }
        out.sort_by_key(|a| a.0.key);
        out
    }

    fn last_path(&self, scope: &str, node: &str) -> PathBuf {
        let safe: String = node
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.=".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let tag = Digest::of(node.as_bytes()).short();
        self.root
            .join("last")
            .join(scope)
            .join(format!("{safe}-{}.json", &tag[..8]))
    }

    /// The record of the last successful build of `node` in `scope`.
    pub fn last(&self, scope: &str, node: &str) -> Option<ActionRecord> {
        let bytes = fs::read(self.last_path(scope, node)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn set_last(&self, scope: &str, rec: &ActionRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(rec)?;
        write_atomic(
            &self.root.join("tmp"),
            &self.last_path(scope, &rec.node),
            &bytes,
        )
    }

    /// Every last-build record of every scope.
    pub fn list_last(&self) -> Vec<ActionRecord> {
        let mut out = Vec::new();
        let Ok(scopes) = fs::read_dir(self.root.join("last")) else {
            return out;
        };
        for s in scopes.flatten() {
            let Ok(files) = fs::read_dir(s.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Some(rec) = fs::read(f.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                {
                    out.push(rec);
                }
            }
        }
        out
    }
}
