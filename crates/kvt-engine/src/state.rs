//! Node keys and staleness: for each node, its key from (op, op version, config
//! slice, external fingerprint, input digests), whether the action cache holds
//! a result for that key with intact outputs, and if not, why not — compared
//! with the last build of the same node in the same scope.

use super::action::{ActionCache, ActionRecord};
use super::digest::{canonical_json, hash_field, Digest};
use super::error::{Context, Result};
use super::op::{KeyContext, Upstream};
use super::pipeline::{NodeSpec, Plan};
use super::store::ContentStore;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Names the node-key layout. If you change any input to `node_key`, or how it
/// is encoded, change this tag: every key changes with it and nothing old is
/// mistaken for current.
pub const KEY_FORMAT: &str = "kvt-node-key/v1";

/// Where a build reads and writes: the project root, the cache, and the scope
/// (one experiment) whose last-build records explain staleness.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
    pub cache_root: PathBuf,
    pub scope: String,
    pub store: ContentStore,
    pub actions: ActionCache,
    /// The shared remote cache, when `cache.remote` names one.
    pub remote: Option<std::sync::Arc<super::remote::Remote>>,
}

impl Workspace {
    pub fn new(root: &Path, cache_root: &Path, scope: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            cache_root: cache_root.to_path_buf(),
            scope: scope.to_string(),
            store: ContentStore::new(cache_root),
            actions: ActionCache::new(cache_root),
            remote: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum StaleReason {
    NeverBuilt,
    ConfigChanged {
        path: String,
        old: Option<Value>,
        new: Option<Value>,
    },
    InputChanged {
        input: String,
    },
    OpVersionChanged {
        old: u32,
        new: u32,
    },
    ExternalChanged {
        old: Option<String>,
        new: Option<String>,
    },
    OutputMissing {
        artifact: String,
    },
    OutputCorrupt {
        artifact: String,
    },
    Forced,
    /// The last build matches, but its result is no longer cached (removed by gc).
    ResultNotCached,
}

/// Values in stale reasons are cut to this many characters in text (the JSON
/// form keeps them whole).
const SHOW_WIDTH: usize = 60;

fn show(v: &Option<Value>) -> String {
    match v {
        Some(v) => {
            let s = v.to_string();
            if s.chars().count() > SHOW_WIDTH {
                let cut: String = s.chars().take(SHOW_WIDTH - 1).collect();
                format!("{cut}…")
            } else {
                s
            }
        }
        None => "(absent)".into(),
    }
}

/// One reason per changed leaf: objects are compared key by key, so a change
/// deep in a section names its dotted key, not the whole section.
fn diff_config(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<StaleReason>) {
    if old == new {
        return;
    }
    if let (Some(Value::Object(a)), Some(Value::Object(b))) = (old, new) {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            diff_config(&format!("{path}.{k}"), a.get(k), b.get(k), out);
        }
        return;
    }
    out.push(StaleReason::ConfigChanged {
        path: path.to_string(),
        old: old.cloned(),
        new: new.cloned(),
    });
}

impl std::fmt::Display for StaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleReason::NeverBuilt => write!(f, "never built"),
            StaleReason::ConfigChanged { path, old, new } => {
                write!(f, "config `{path}` changed {} → {}", show(old), show(new))
            }
            StaleReason::InputChanged { input } => write!(f, "input `{input}` changed"),
            StaleReason::OpVersionChanged { old, new } => {
                write!(f, "op version changed {old} → {new}")
            }
            StaleReason::ExternalChanged { old, new } => write!(
                f,
                "external input changed: {} → {}",
                old.as_deref().unwrap_or("(none)"),
                new.as_deref().unwrap_or("(none)")
            ),
            StaleReason::OutputMissing { artifact } => {
                write!(f, "output `{artifact}` missing from the cache")
            }
            StaleReason::OutputCorrupt { artifact } => {
                write!(f, "output `{artifact}` corrupt in the cache")
            }
            StaleReason::Forced => write!(f, "forced"),
            StaleReason::ResultNotCached => write!(f, "result no longer cached (removed by gc?)"),
        }
    }
}

/// The state of one node before a build.
#[derive(Debug, Clone)]
pub enum NodeState {
    Fresh(Box<ActionRecord>),
    Stale(Vec<StaleReason>),
    /// Waits for stale upstream nodes; reruns only if their outputs change.
    Pending(Vec<String>),
}

impl NodeState {
    pub fn label(&self) -> &'static str {
        match self {
            NodeState::Fresh(_) => "fresh",
            NodeState::Stale(_) => "stale",
            NodeState::Pending(_) => "pending",
        }
    }
}

/// The inputs of a node: upstream nodes with their output digests.
pub fn upstream_of(
    plan: &Plan,
    ix: petgraph::graph::NodeIndex,
    records: &[Option<ActionRecord>],
) -> Option<Vec<Upstream>> {
    plan.deps(ix)
        .into_iter()
        .map(|up| {
            let rec = records[up.index()].as_ref()?;
            let spec = &plan.graph[up];
            Some(Upstream {
                key: rec.key,
                node: spec.id.clone(),
                stage: spec.stage.clone(),
                bindings: spec.bindings.clone(),
                outputs: rec
                    .outputs
                    .iter()
                    .map(|o| (o.name.clone(), o.digest))
                    .collect(),
            })
        })
        .collect()
}

/// `upstream-node/artifact` → digest, the form inputs take in keys and records.
pub fn input_digests(ups: &[Upstream]) -> BTreeMap<String, Digest> {
    let mut m = BTreeMap::new();
    for u in ups {
        for (name, d) in &u.outputs {
            m.insert(format!("{}/{name}", u.node), *d);
        }
    }
    m
}

/// The config slice a node's key covers: its `uses` values and its bindings.
pub fn key_slice(spec: &NodeSpec) -> BTreeMap<String, Value> {
    let mut m = spec.config.clone();
    for (k, v) in &spec.bindings {
        m.insert(format!("foreach.{k}"), v.clone());
    }
    m
}

/// The node key: blake3 over the format tag, op name and version, the canonical
/// config slice, the external fingerprint and the input digests.
pub fn node_key(
    op: &str,
    version: u32,
    slice: &BTreeMap<String, Value>,
    fingerprint: Option<&str>,
    inputs: &BTreeMap<String, Digest>,
) -> Digest {
    let mut h = blake3::Hasher::new();
    hash_field(&mut h, KEY_FORMAT.as_bytes());
    hash_field(&mut h, op.as_bytes());
    hash_field(&mut h, &version.to_le_bytes());
    let slice_value = Value::Object(slice.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    hash_field(&mut h, &canonical_json(&slice_value));
    hash_field(&mut h, fingerprint.unwrap_or("").as_bytes());
    hash_field(&mut h, &(inputs.len() as u64).to_le_bytes());
    for (name, d) in inputs {
        hash_field(&mut h, name.as_bytes());
        hash_field(&mut h, &d.0);
    }
    Digest(*h.finalize().as_bytes())
}

/// A node's key and the material it was computed from.
pub struct KeyedNode {
    pub key: Digest,
    pub slice: BTreeMap<String, Value>,
    pub fingerprint: Option<String>,
    pub inputs: BTreeMap<String, Digest>,
}

pub fn key_node(ws: &Workspace, spec: &NodeSpec, ups: &[Upstream]) -> Result<KeyedNode> {
    let kctx = KeyContext {
        cache_root: &ws.cache_root,
        node: &spec.id,
        config: &spec.config,
        optional: &spec.optional,
        bindings: &spec.bindings,
        transport: &spec.transport,
        root: &ws.root,
    };
    let fingerprint = spec
        .op
        .fingerprint(&kctx)
        .with_context(|| format!("computing the key of `{}`", spec.id))?;
    let slice = key_slice(spec);
    let inputs = input_digests(ups);
    let key = node_key(
        spec.op.name(),
        spec.op.version(),
        &slice,
        fingerprint.as_deref(),
        &inputs,
    );
    Ok(KeyedNode {
        key,
        slice,
        fingerprint,
        inputs,
    })
}

/// Checks one output object: cheap when its file is untouched since the
/// record was written, a full re-hash when it was modified after.
fn output_state(store: &ContentStore, rec: &ActionRecord) -> Option<StaleReason> {
    for o in &rec.outputs {
        let path = store.path_of(&o.digest);
        let Ok(meta) = std::fs::metadata(&path) else {
            return Some(StaleReason::OutputMissing {
                artifact: o.name.clone(),
            });
        };
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(f64::MAX);
        if meta.len() != o.size || (modified > rec.finished_at && store.verify(&o.digest).is_err())
        {
            return Some(StaleReason::OutputCorrupt {
                artifact: o.name.clone(),
            });
        }
    }
    None
}

/// Decides whether a keyed node is fresh, and explains why when it is not.
pub fn decide(ws: &Workspace, spec: &NodeSpec, keyed: &KeyedNode, forced: bool) -> NodeState {
    if forced {
        return NodeState::Stale(vec![StaleReason::Forced]);
    }
    if let Some(rec) = ws.actions.get(&keyed.key) {
        return match output_state(&ws.store, &rec) {
            None => NodeState::Fresh(Box::new(rec)),
            Some(reason) => NodeState::Stale(vec![reason]),
        };
    }
    // Not here: perhaps another machine built it.
    if let Some(remote) = &ws.remote {
        match remote.pull_record(&ws.store, &keyed.key) {
            Ok(Some(rec)) => {
                if ws.actions.put(&rec).is_ok() {
                    let _ = ws.actions.set_last(&ws.scope, &rec);
                    return NodeState::Fresh(Box::new(rec));
                }
            }
            Ok(None) => {}
            Err(e) => remote.note_error(e),
        }
    }
    let Some(last) = ws.actions.last(&ws.scope, &spec.id) else {
        return NodeState::Stale(vec![StaleReason::NeverBuilt]);
    };
    let mut reasons = Vec::new();
    if last.op_version != spec.op.version() || last.op != spec.op.name() {
        reasons.push(StaleReason::OpVersionChanged {
            old: last.op_version,
            new: spec.op.version(),
        });
    }
    let paths: std::collections::BTreeSet<&String> =
        last.config.keys().chain(keyed.slice.keys()).collect();
    for p in paths {
        diff_config(p, last.config.get(p), keyed.slice.get(p), &mut reasons);
    }
    if last.fingerprint != keyed.fingerprint {
        reasons.push(StaleReason::ExternalChanged {
            old: last.fingerprint.clone(),
            new: keyed.fingerprint.clone(),
        });
    }
    let mut changed_inputs: Vec<String> = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        last.inputs.keys().chain(keyed.inputs.keys()).collect();
    for n in names {
        if last.inputs.get(n) != keyed.inputs.get(n) {
            let node = n
                .rsplit_once('/')
                .map(|(node, _)| node)
                .unwrap_or(n)
                .to_string();
            if !changed_inputs.contains(&node) {
                changed_inputs.push(node);
            }
        }
    }
    reasons.extend(
        changed_inputs
            .into_iter()
            .map(|input| StaleReason::InputChanged { input }),
    );
    if reasons.is_empty() {
        reasons.push(StaleReason::ResultNotCached);
    }
    NodeState::Stale(reasons)
}

/// One row of an explanation: a node, its state, its key when known.
pub struct NodeReport {
    pub index: petgraph::graph::NodeIndex,
    pub state: NodeState,
    pub key: Option<Digest>,
}

/// States of every node in plan order, without running anything.
pub fn explain(
    ws: &Workspace,
    plan: &Plan,
    forced: &dyn Fn(&NodeSpec) -> bool,
) -> Result<Vec<NodeReport>> {
    let mut records: Vec<Option<ActionRecord>> = vec![None; plan.graph.node_count()];
    let mut out = Vec::new();
    for &ix in &plan.order {
        let spec = &plan.graph[ix];
        let (state, key) = match upstream_of(plan, ix, &records) {
            Some(ups) => {
                let keyed = key_node(ws, spec, &ups)?;
                let state = decide(ws, spec, &keyed, forced(spec));
                if let NodeState::Fresh(rec) = &state {
                    records[ix.index()] = Some((**rec).clone());
                }
                (state, Some(keyed.key))
            }
            None => {
                let waiting = plan
                    .deps(ix)
                    .into_iter()
                    .filter(|d| records[d.index()].is_none())
                    .map(|d| plan.graph[d].id.clone())
                    .collect();
                (NodeState::Pending(waiting), None)
            }
        };
        out.push(NodeReport {
            index: ix,
            state,
            key,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_listed_input() {
        let mut slice = BTreeMap::new();
        slice.insert("a.b".to_string(), serde_json::json!(1));
        let mut inputs = BTreeMap::new();
        inputs.insert("up/x".to_string(), Digest::of(b"x"));
        let base = node_key("op", 1, &slice, None, &inputs);
        assert_eq!(
            base,
            node_key("op", 1, &slice.clone(), None, &inputs.clone())
        );
        assert_ne!(base, node_key("op2", 1, &slice, None, &inputs));
        assert_ne!(base, node_key("op", 2, &slice, None, &inputs));
        assert_ne!(base, node_key("op", 1, &slice, Some("f"), &inputs));
        let mut s2 = slice.clone();
        s2.insert("a.b".to_string(), serde_json::json!(2));
        assert_ne!(base, node_key("op", 1, &s2, None, &inputs));
        let mut i2 = inputs.clone();
        i2.insert("up/x".to_string(), Digest::of(b"y"));
        assert_ne!(base, node_key("op", 1, &slice, None, &i2));
    }
}
