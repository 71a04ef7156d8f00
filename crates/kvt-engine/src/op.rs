//! Ops: named, versioned Rust functions that a pipeline stage runs. An op sees
//! only the config paths its stage lists in `uses`, the artifacts of the nodes
//! it `needs`, and writes named output artifacts into the content store.

use super::action::{Export, OutputRef};
use super::digest::Digest;
use super::error::{bail, failure, Context, OpResult, Result};
use super::store::ContentStore;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A unit of work. Implementations must be deterministic functions of what
/// they are given: the same config slice and input bytes give the same
/// output bytes. Bump `version` whenever that function changes.
///
/// An op reads its configuration only as `Uses` (its stage's `uses` list:
/// hashed into the node key) and `Transport` (the stage's `transport` list:
/// how to reach things, not hashed), each a struct whose field names are the
/// dotted config paths (`#[serde(rename = "engine.api")]`, see
/// [`typed_slice`]). The engine checks both against the stage's lists when
/// the plan is built (a mismatch is a usage error, exit 2) and hands them to
/// the op typed: no op walks the raw configuration.
pub trait Op: Send + Sync + 'static {
    /// The stage's `uses` values.
    type Uses: DeserializeOwned;
    /// The stage's `transport` values ([`NoTransport`] for none).
    type Transport: DeserializeOwned;
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    /// Extra key material for inputs that live outside the cache (a dataset
    /// file, say): returned text enters the node key and the staleness report.
    fn fingerprint(
        &self,
        _ctx: &KeyContext,
        _uses: &Self::Uses,
        _transport: &Self::Transport,
    ) -> OpResult<Option<String>> {
        Ok(None)
    }
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, transport: Self::Transport) -> OpResult;
    /// Writes a composed export: `file` is a private copy of the exported
    /// artifact, to be changed in place by applying `overlays` (their bytes,
    /// in the order the export names them). Only ops that call
    /// [`OpContext::export_composed`] need it.
    fn compose_export(&self, _file: &Path, _overlays: &[Vec<u8>]) -> OpResult {
        Err(failure!("op `{}` does not compose exports", self.name()).into())
    }
    /// Updates a composed export in place: `file` already holds this op's
    /// composition of the same base artifact with earlier overlays, exactly
    /// as kvt left it. Replaces the overlays' part with `overlays`,
    /// atomically (a crash leaves the old composition or the new one), and
    /// returns true; returns false when the op can only compose from a
    /// fresh copy of the base.
    fn recompose_in_place(&self, _file: &Path, _overlays: &[Vec<u8>]) -> OpResult<bool> {
        Ok(false)
    }
}

/// The `Transport` of an op that reads no transport values.
#[derive(serde::Deserialize)]
pub struct NoTransport {}

/// The face of an [`Op`] the engine keeps (object-safe: the typed slices
/// are parsed here, from the node's config maps).
pub trait AnyOp: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    /// The plan-time check: the stage's `uses` and `transport` lists give
    /// exactly what the op reads (a mismatch is a usage error).
    fn check(
        &self,
        uses: &BTreeMap<String, Value>,
        transport: &BTreeMap<String, Value>,
    ) -> Result<()>;
    fn fingerprint(&self, ctx: &KeyContext) -> Result<Option<String>>;
    fn run(&self, ctx: &mut OpContext) -> Result<()>;
    fn compose_export(&self, file: &Path, overlays: &[Vec<u8>]) -> Result<()>;
    fn recompose_in_place(&self, file: &Path, overlays: &[Vec<u8>]) -> Result<bool>;
}

/// A node's `uses` values as its op reads them: the optional paths that
/// are not set (and so not in the key) as null.
pub(crate) fn with_optional(
    config: &BTreeMap<String, Value>,
    optional: &[String],
) -> BTreeMap<String, Value> {
    let mut all = config.clone();
    for p in optional {
        all.entry(p.clone()).or_insert(Value::Null);
    }
    all
}

fn slices<O: Op>(ctx: &KeyContext) -> Result<(O::Uses, O::Transport)> {
    let config = with_optional(ctx.config, ctx.optional);
    let uses = typed_slice(&config, "uses").with_context(|| format!("node `{}`", ctx.node))?;
    let transport =
        typed_slice(ctx.transport, "transport").with_context(|| format!("node `{}`", ctx.node))?;
    Ok((uses, transport))
}

impl<O: Op> AnyOp for O {
    fn name(&self) -> &'static str {
        Op::name(self)
    }
    fn version(&self) -> u32 {
        Op::version(self)
    }
    fn check(
        &self,
        uses: &BTreeMap<String, Value>,
        transport: &BTreeMap<String, Value>,
    ) -> Result<()> {
        typed_slice::<O::Uses>(uses, "uses")?;
        typed_slice::<O::Transport>(transport, "transport")?;
        Ok(())
    }
    fn fingerprint(&self, ctx: &KeyContext) -> Result<Option<String>> {
        let (uses, transport) = slices::<O>(ctx)?;
        Ok(Op::fingerprint(self, ctx, &uses, &transport)?)
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()> {
        let (uses, transport) = slices::<O>(&ctx.key)?;
        Ok(Op::run(self, ctx, uses, transport)?)
    }
    fn compose_export(&self, file: &Path, overlays: &[Vec<u8>]) -> Result<()> {
        Ok(Op::compose_export(self, file, overlays)?)
    }
    fn recompose_in_place(&self, file: &Path, overlays: &[Vec<u8>]) -> Result<bool> {
        Ok(Op::recompose_in_place(self, file, overlays)?)
    }
}

/// A stage's `uses` (or `transport`) values as one typed struct whose field
/// names are the dotted paths (`#[serde(rename = "engine.api")]`): the list
/// must give exactly the struct's fields — a listed path the op does not
/// read, or a read the stage does not list, is a usage error naming both —
/// so the pipeline and the op cannot silently disagree.
pub fn typed_slice<T: DeserializeOwned>(map: &BTreeMap<String, Value>, list: &str) -> Result<T> {
    let wanted = struct_fields::<T>();
    let extra: Vec<&str> = map
        .keys()
        .map(String::as_str)
        .filter(|k| !wanted.contains(k))
        .collect();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|f| !map.contains_key(*f))
        .collect();
    if !extra.is_empty() || !missing.is_empty() {
        let mut why = Vec::new();
        if !missing.is_empty() {
            why.push(format!(
                "the op reads {} but the list lacks it",
                missing.join(", ")
            ));
        }
        if !extra.is_empty() {
            why.push(format!(
                "the list has {} which the op never reads",
                extra.join(", ")
            ));
        }
        return Err(super::error::EngineError::usage(format!(
            "the stage's `{list}` list and its op disagree: {}; list exactly the config paths the op reads",
            why.join("; ")
        )));
    }
    let obj = Value::Object(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    serde_json::from_value(obj)
        .map_err(|e| super::error::EngineError::usage(format!("the stage's `{list}` values: {e}")))
}

/// The field names a derived `Deserialize` struct asks for (serde passes
/// them to `deserialize_struct`; this deserializer records them and stops).
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Probe<'a>(&'a mut &'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The registry of ops by name.
#[derive(Default, Clone)]
pub struct OpRegistry {
    ops: BTreeMap<String, Arc<dyn AnyOp>>,
}

impl OpRegistry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn register(&mut self, op: impl Op) {
        self.ops.insert(Op::name(&op).to_string(), Arc::new(op));
    }
    pub fn get(&self, name: &str) -> Option<Arc<dyn AnyOp>> {
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
    /// The stage's `uses` values as a raw map: for hashing as an identity
    /// only (ops read them typed, as their `Op::Uses`).
    pub config: &'a BTreeMap<String, Value>,
    /// Optional `uses` paths (`path?`), null for the op when not in `config`.
    pub(crate) optional: &'a [String],
    pub bindings: &'a BTreeMap<String, Value>,
    /// The stage's `transport` values (ops read them as `Op::Transport`).
    pub(crate) transport: &'a BTreeMap<String, Value>,
    pub root: &'a Path,
}

fn typed<T: DeserializeOwned>(v: &Value, what: &str) -> Result<T> {
    serde_json::from_value(v.clone())
        .with_context(|| format!("{what} has an unexpected type ({v})"))
}

impl KeyContext<'_> {
    /// The value of a `foreach` variable for this node.
    pub fn item<T: DeserializeOwned>(&self, var: &str) -> Result<T> {
        let v = self
            .bindings
            .get(var)
            .ok_or_else(|| failure!("node `{}` has no `foreach` variable `{var}`", self.node))?;
        typed(v, &format!("`foreach` variable `{var}`"))
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
    /// The shared remote cache, when there is one (ops may keep their own
    /// content-named records there: kvt's request journal does).
    pub remote: Option<&'a super::remote::Remote>,
    /// The caller's value for this build ([`super::build::BuildOptions::shared`]).
    pub(crate) shared: Option<&'a (dyn std::any::Any + Send + Sync)>,
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
    pub fn item<T: DeserializeOwned>(&self, var: &str) -> Result<T> {
        self.key.item(var)
    }
    /// The value the caller shares with every op of this build, if it is a `T`.
    pub fn shared<T: std::any::Any>(&self) -> Option<&T> {
        self.shared?.downcast_ref::<T>()
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
            .ok_or_else(|| failure!("upstream `{}` has no artifact `{artifact}`", up.node))?;
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
            overlays: Vec::new(),
        });
    }

    /// Like [`export`](Self::export), but the file is `artifact` with the
    /// `overlays` artifacts applied by the op's `compose_export` when written.
    pub fn export_composed(&mut self, artifact: &str, overlays: &[&str], path: impl Into<String>) {
        self.exports.push(Export {
            artifact: artifact.to_string(),
            path: path.into(),
            overlays: overlays.iter().map(|o| o.to_string()).collect(),
        });
    }

    /// Records an upstream artifact as an output of this node under `name`,
    /// by digest: nothing is read or written (for a composed export's base).
    pub fn pass_through(&mut self, stage: &str, artifact: &str, name: &str) -> Result<()> {
        let ups = self.upstream(stage);
        let [up] = ups.as_slice() else {
            bail!(
                "node `{}` needs exactly one `{stage}` to pass `{artifact}` through",
                self.node()
            );
        };
        let digest = *up
            .outputs
            .get(artifact)
            .ok_or_else(|| failure!("`{}` has no artifact `{artifact}`", up.node))?;
        let size = std::fs::metadata(self.store.path_of(&digest))
            .map(|m| m.len())
            .map_err(|_| super::store::ObjectError::Missing(digest.hex()))?;
        if self.outputs.iter().any(|o| o.name == name) {
            bail!("node `{}` wrote artifact `{name}` twice", self.node());
        }
        self.outputs.push(OutputRef {
            name: name.to_string(),
            digest,
            size,
        });
        Ok(())
    }

    /// A private directory for large intermediate files, removed after the node.
    pub fn scratch_dir(&self) -> Result<&Path> {
        std::fs::create_dir_all(&self.scratch)?;
        Ok(&self.scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Slice {
        #[serde(rename = "engine.api")]
        api: String,
        #[serde(rename = "dataset.metric")]
        metric: Option<String>,
    }

    fn map(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn a_typed_slice_wants_exactly_its_fields() {
        let ok = map(&[
            ("engine.api", Value::from("chat")),
            ("dataset.metric", Value::Null),
        ]);
        let s: Slice = typed_slice(&ok, "uses").unwrap();
        assert_eq!(s.api, "chat");
        // An optional field is still required in the list: absent is a mismatch.
        let missing = map(&[("engine.api", Value::from("chat"))]);
        let e = typed_slice::<Slice>(&missing, "uses")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reads dataset.metric but the list lacks it"),
            "{e}"
        );
        let extra = map(&[
            ("engine.api", Value::from("chat")),
            ("dataset.metric", Value::Null),
            ("kv.seed", Value::from(1)),
        ]);
        let e = typed_slice::<Slice>(&extra, "uses").unwrap_err();
        assert!(
            e.to_string().contains("kv.seed which the op never reads"),
            "{e}"
        );
        assert_eq!(
            super::super::error::kind_of(&e),
            super::super::error::ErrorKind::Usage
        );
    }
}
