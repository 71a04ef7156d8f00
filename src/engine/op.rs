//! Ops: named, versioned Rust functions that a pipeline stage runs. An op sees
//! only the config paths its stage lists in `uses`, the artifacts of the nodes
//! it `needs`, and writes named output artifacts into the content store.

use super::action::{Export, OutputRef};
use super::digest::Digest;
use super::store::ContentStore;
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A unit of work. Implementations must be deterministic functions of what the
/// context exposes: the same config slice and input bytes give the same output
/// bytes. Bump `version` whenever that function changes.
pub trait Op: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    /// Extra key material for inputs that live outside the cache (a dataset
    /// file, say): returned text enters the node key and the staleness report.
    fn fingerprint(&self, _ctx: &KeyContext) -> Result<Option<String>> {
        Ok(None)
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()>;
}

/// The registry of ops by name.
#[derive(Default, Clone)]
pub struct OpRegistry {
    ops: BTreeMap<String, Arc<dyn Op>>,
}

impl OpRegistry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn register(&mut self, op: impl Op + 'static) {
        self.ops.insert(op.name().to_string(), Arc::new(op));
    }
    pub fn get(&self, name: &str) -> Option<Arc<dyn Op>> {
        self.ops.get(name).cloned()
    }
    pub fn names(&self) -> Vec<String> {
        self.ops.keys().cloned().collect()
    }
}

/// What an op may read before it runs: its config slice and the project root.
pub struct KeyContext<'a> {
    pub node: &'a str,
    /// The cache directory (for ops that keep state beside the store).
    pub cache_root: &'a Path,
    pub config: &'a BTreeMap<String, Value>,
    pub bindings: &'a BTreeMap<String, Value>,
    /// The stage's `transport` values: readable (a fingerprint may derive an
    /// identity from them, e.g. which engine answers), never hashed as such.
    pub transport: &'a BTreeMap<String, Value>,
    pub root: &'a Path,
}

fn typed<T: DeserializeOwned>(v: &Value, what: &str) -> Result<T> {
    serde_json::from_value(v.clone())
        .with_context(|| format!("{what} has an unexpected type ({v})"))
}

impl KeyContext<'_> {
    /// A config value at a dotted path listed in the stage's `uses`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let v = self.config.get(path).ok_or_else(|| {
            anyhow!(
                "node `{}` read config `{path}`, which its stage does not list in `uses`",
                self.node
            )
        })?;
        typed(v, &format!("config `{path}`"))
    }
    /// The value of a `foreach` variable for this node.
    pub fn item<T: DeserializeOwned>(&self, var: &str) -> Result<T> {
        let v = self
            .bindings
            .get(var)
            .ok_or_else(|| anyhow!("node `{}` has no `foreach` variable `{var}`", self.node))?;
        typed(v, &format!("`foreach` variable `{var}`"))
    }
    /// A config value at a path listed in the stage's `transport`: usable,
    /// but not part of the node key (server address, concurrency, timeouts).
    pub fn transport<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let v = self.transport.get(path).ok_or_else(|| {
            anyhow!(
                "node `{}` read config `{path}`, which its stage does not list in `transport`",
                self.node
            )
        })?;
        typed(v, &format!("config `{path}`"))
    }
}

/// One upstream node as seen by an op.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The key of the build that produced these outputs (provenance only).
    pub key: Digest,
    pub node: String,
    pub stage: String,
    pub bindings: BTreeMap<String, Value>,
    pub outputs: BTreeMap<String, Digest>,
}

/// Everything an op's `run` may touch.
pub struct OpContext<'a> {
    pub key: KeyContext<'a>,
    pub upstream: &'a [Upstream],
    /// This node's key (provenance only; it is not known to the key itself).
    pub node_key: Digest,
    pub store: &'a ContentStore,
    pub cache_root: &'a Path,
    pub cancel: &'a AtomicBool,
    pub(crate) outputs: Vec<OutputRef>,
    pub(crate) exports: Vec<Export>,
    pub(crate) scratch: PathBuf,
}

impl<'a> OpContext<'a> {
    pub fn node(&self) -> &str {
        self.key.node
    }
    pub fn root(&self) -> &Path {
        self.key.root
    }
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.key.get(path)
    }
    pub fn item<T: DeserializeOwned>(&self, var: &str) -> Result<T> {
        self.key.item(var)
    }
    /// A config value at a path listed in the stage's `transport` (see [`KeyContext::transport`]).
    pub fn transport<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.key.transport(path)
    }
    /// True once the user pressed Ctrl-C: long ops should stop and return an error.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Every instance of an upstream stage (several for a `foreach` stage).
    pub fn upstream(&self, stage: &str) -> Vec<&Upstream> {
        self.upstream.iter().filter(|u| u.stage == stage).collect()
    }

    /// An artifact of the single instance of `stage` this node depends on.
    pub fn input(&self, stage: &str, artifact: &str) -> Result<Vec<u8>> {
        let ups = self.upstream(stage);
        match ups.as_slice() {
            [one] => self.read(one, artifact),
            [] => bail!(
                "node `{}` does not depend on stage `{stage}`; add it to `needs`",
                self.node()
            ),
            _ => bail!(
                "node `{}` depends on {} instances of `{stage}`; read them with `upstream()`",
                self.node(),
                ups.len()
            ),
        }
    }

    /// An artifact of a given upstream node, verified against its digest.
    pub fn read(&self, up: &Upstream, artifact: &str) -> Result<Vec<u8>> {
        let d = up
            .outputs
            .get(artifact)
            .ok_or_else(|| anyhow!("upstream `{}` has no artifact `{artifact}`", up.node))?;
        self.store
            .get(d)
            .with_context(|| format!("reading artifact `{artifact}` of `{}`", up.node))
    }

    /// Stores an output artifact.
    pub fn put(&mut self, name: &str, bytes: &[u8]) -> Result<Digest> {
        if self.outputs.iter().any(|o| o.name == name) {
            bail!("node `{}` wrote artifact `{name}` twice", self.node());
        }
        let digest = self.store.put(bytes)?;
        self.outputs.push(OutputRef {
            name: name.to_string(),
            digest,
            size: bytes.len() as u64,
        });
        Ok(digest)
    }

    /// Asks the engine to keep `path` (relative to the project root) equal to
    /// the artifact `name`, now and on every later build.
    pub fn export(&mut self, artifact: &str, path: impl Into<String>) {
        self.exports.push(Export {
            artifact: artifact.to_string(),
            path: path.into(),
        });
    }

    /// A private directory for large intermediate files, removed after the node.
    pub fn scratch_dir(&self) -> Result<&Path> {
        std::fs::create_dir_all(&self.scratch)?;
        Ok(&self.scratch)
    }
}
