//! Pipeline definitions (`pipelines/*.yaml`) and their expansion into a DAG of
//! nodes: each stage names an `op`, the stages it `needs`, the config paths it
//! `uses`, and optionally `foreach` variables that fan it out over config lists.

use super::error::EngineError as KvtError;
use super::error::Result;
use super::op::{AnyOp, OpRegistry};
use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDef {
    pub stages: BTreeMap<String, StageDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageDef {
    pub op: String,
    #[serde(default)]
    pub needs: Vec<String>,
    /// Config paths that enter the key. A path ending in `?` is optional:
    /// it enters the key only when set (not null), so adding one to a stage
    /// leaves the keys of every configuration without it unchanged; the op
    /// still reads it (null when unset).
    #[serde(default)]
    pub uses: Vec<String>,
    /// Config paths the op may read that do NOT enter the key: transport
    /// settings such as a server address, concurrency or timeouts.
    #[serde(default)]
    pub transport: Vec<String>,
    /// Variable name → config path of a list, e.g. `budget: kv.budgets`.
    #[serde(default)]
    pub foreach: BTreeMap<String, String>,
    /// Config path of a list of mappings, each one instance's bindings
    /// (`cells: kv.cells`): for fan-outs that are not a full cross product.
    #[serde(default)]
    pub cells: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

impl PipelineDef {
    /// Parses a pipeline file; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let opts = serde_saphyr::options! { strict_booleans: true };
        serde_saphyr::from_str_with_options(text, opts)
            .map_err(|e| KvtError::usage(format!("pipeline `{source}` is invalid:\n{e}")))
    }
}

/// One node of the DAG: a stage instance with its bindings and config slice.
pub struct NodeSpec {
    pub id: String,
    pub stage: String,
    pub op: Arc<dyn AnyOp>,
    pub bindings: BTreeMap<String, Value>,
    /// `uses` path → value, the part of the config that enters the key
    /// (an optional path only when set).
    pub config: BTreeMap<String, Value>,
    /// The stage's optional `uses` paths (`path?`): the op reads each, null
    /// when it is not in `config`.
    pub optional: Vec<String>,
    /// `transport` path → value: readable by the op, never part of the key.
    pub transport: BTreeMap<String, Value>,
}

/// The DAG for a set of targets: the targets and all their ancestors.
pub struct Plan {
    pub graph: DiGraph<NodeSpec, ()>,
    /// Nodes in a fixed topological order (ties broken by node id).
    pub order: Vec<NodeIndex>,
}

fn pipeline_error(source: &str, msg: String) -> super::error::EngineError {
    KvtError::usage(format!("pipeline `{source}`: {msg}"))
}

/// How a bound value appears in a node id: strings bare, anything else as JSON.
pub fn format_binding(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn node_id(stage: &str, bindings: &BTreeMap<String, Value>) -> String {
    if bindings.is_empty() {
        return stage.to_string();
    }
    let inner: Vec<String> = bindings
        .iter()
        .map(|(k, v)| format!("{k}={}", format_binding(v)))
        .collect();
    format!("{stage}[{}]", inner.join(","))
}

fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |cur, k| cur.as_object()?.get(k))
}

impl Plan {
    /// Checks the pipeline against the registry and the config, then expands
    /// the stages needed for `targets` (stage names or node ids; empty = all).
    pub fn new(
        def: &PipelineDef,
        source: &str,
        config: &Value,
        registry: &OpRegistry,
        targets: &[String],
    ) -> Result<Plan> {
        let stages = &def.stages;
        if stages.is_empty() {
            return Err(pipeline_error(source, "declares no stages".into()));
        }
        // Stage-level checks.
        let mut sg: DiGraph<&str, ()> = DiGraph::new();
        let idx: BTreeMap<&str, NodeIndex> = stages
            .keys()
            .map(|s| (s.as_str(), sg.add_node(s.as_str())))
            .collect();
        for (name, st) in stages {
            if registry.get(&st.op).is_none() {
                return Err(pipeline_error(
                    source,
                    format!(
                        "stage `{name}` uses unknown op `{}`; known ops: {}",
                        st.op,
                        registry.names().join(", ")
                    ),
                ));
            }
            for need in &st.needs {
                let Some(&from) = idx.get(need.as_str()) else {
                    let known: Vec<String> = stages.keys().cloned().collect();
                    let hint = super::error::closest(need, &known)
                        .map(|c| format!("; did you mean `{c}`?"))
                        .unwrap_or_default();
                    return Err(pipeline_error(
                        source,
                        format!("stage `{name}` needs unknown stage `{need}`{hint}"),
                    ));
                };
                sg.add_edge(from, idx[name.as_str()], ());
            }
            for listed in st.uses.iter().chain(&st.transport) {
                // An optional path may be absent; its section may not.
                let (path, what) = match listed.strip_suffix('?') {
                    Some(p) => (
                        p.rsplit_once('.').map_or(p, |(parent, _)| parent),
                        "whose section",
                    ),
                    None => (listed.as_str(), "which"),
                };
                if get_path(config, path).is_none() {
                    let section = if listed.ends_with('?') {
                        format!(" `{path}`")
                    } else {
                        String::new()
                    };
                    return Err(pipeline_error(
                        source,
                        format!("stage `{name}` uses config path `{listed}`, {what}{section} is not in the config schema"),
                    ));
                }
            }
            if let Some(path) = &st.cells {
                if !st.foreach.is_empty() {
                    return Err(pipeline_error(
                        source,
                        format!("stage `{name}`: use `foreach` or `cells`, not both"),
                    ));
                }
                let ok = match get_path(config, path) {
                    Some(Value::Array(items)) => items.iter().all(|it| {
                        it.as_object().is_some_and(|o| {
                            !o.is_empty() && o.values().all(|v| !v.is_object() && !v.is_array())
                        })
                    }),
                    _ => false,
                };
                if !ok {
                    return Err(pipeline_error(
                        source,
                        format!("stage `{name}`: `cells` needs a list of mappings of plain values at `{path}`"),
                    ));
                }
            }
            for (var, path) in &st.foreach {
                match get_path(config, path) {
                    Some(Value::Array(_)) => {}
                    Some(other) => {
                        return Err(pipeline_error(
                            source,
                            format!("stage `{name}`: `foreach.{var}` needs a list at `{path}`, found {other}"),
                        ))
                    }
                    None => {
                        return Err(pipeline_error(
                            source,
                            format!("stage `{name}`: `foreach.{var}` path `{path}` is not in the config schema"),
                        ))
                    }
                }
            }
        }
        let stage_order = match toposort(&sg, None) {
            Ok(o) => o,
            Err(_) => {
                let cycle = tarjan_scc(&sg)
                    .into_iter()
                    .find(|c| c.len() > 1 || sg.contains_edge(c[0], c[0]))
                    .unwrap_or_default();
                let mut names: Vec<&str> = cycle.iter().map(|i| sg[*i]).collect();
                names.sort();
                names.push(names[0]);
                return Err(pipeline_error(
                    source,
                    format!("stages form a cycle: {}", names.join(" → ")),
                ));
            }
        };

        // Which stages and instances the targets need.
        let mut wanted_stages: BTreeSet<String> = BTreeSet::new();
        let mut wanted_nodes: BTreeSet<String> = BTreeSet::new();
        let mut target_filter: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        if targets.is_empty() {
            wanted_stages.extend(stages.keys().cloned());
        }
        for t in targets {
            let stage = t.split('[').next().unwrap_or(t);
            if !stages.contains_key(stage) {
                let known: Vec<String> = stages.keys().cloned().collect();
                let hint = super::error::closest(stage, &known)
                    .map(|c| format!("did you mean `{c}`? "))
                    .unwrap_or_default();
                return Err(KvtError::usage(format!(
                    "unknown target `{t}`: {hint}stages in `{source}`: {}",
                    known.join(", ")
                )));
            }
            wanted_stages.insert(stage.to_string());
            if t.contains('[') {
                target_filter
                    .entry(stage.to_string())
                    .or_default()
                    .insert(t.clone());
            }
        }

        // Expand every stage in topological order into instances.
        let mut graph: DiGraph<NodeSpec, ()> = DiGraph::new();
        let mut instances: BTreeMap<String, Vec<NodeIndex>> = BTreeMap::new();
        for si in &stage_order {
            let name = sg[*si];
            let st = &stages[name];
            let mut combos: Vec<BTreeMap<String, Value>> = vec![BTreeMap::new()];
            if let Some(path) = &st.cells {
                combos.clear();
                let items = get_path(config, path)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let mut seen = BTreeSet::new();
                for it in items {
                    let b: BTreeMap<String, Value> = it
                        .as_object()
                        .map(|o| o.clone().into_iter().collect())
                        .unwrap_or_default();
                    if !seen.insert(node_id("", &b)) {
                        return Err(pipeline_error(
                            source,
                            format!(
                                "stage `{name}`: `{path}` lists {it} twice; list each cell once"
                            ),
                        ));
                    }
                    combos.push(b);
                }
            }
            for (var, path) in &st.foreach {
                let items = get_path(config, path)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let mut seen = BTreeSet::new();
                let mut next = Vec::new();
                for c in &combos {
                    for it in &items {
                        if !seen.insert((node_id("", c), it.to_string())) {
                            return Err(pipeline_error(
                                source,
                                format!("stage `{name}`: `{path}` lists {it} twice; list each value once"),
                            ));
                        }
                        let mut c2 = c.clone();
                        c2.insert(var.clone(), it.clone());
                        next.push(c2);
                    }
                }
                combos = next;
            }
            let op = registry.get(&st.op).expect("checked above");
            let mut mine = Vec::new();
            for bindings in combos {
                let id = node_id(name, &bindings);
                let mut cfg = BTreeMap::new();
                let mut optional = Vec::new();
                for p in &st.uses {
                    match p.strip_suffix('?') {
                        Some(p) => {
                            if let Some(v) = get_path(config, p).filter(|v| !v.is_null()) {
                                cfg.insert(p.to_string(), v.clone());
                            }
                            optional.push(p.to_string());
                        }
                        None => {
                            cfg.insert(
                                p.clone(),
                                get_path(config, p).cloned().unwrap_or(Value::Null),
                            );
                        }
                    }
                }
                let transport = st
                    .transport
                    .iter()
                    .map(|p| {
                        (
                            p.clone(),
                            get_path(config, p).cloned().unwrap_or(Value::Null),
                        )
                    })
                    .collect();
                op.check(&super::op::with_optional(&cfg, &optional), &transport)
                    .map_err(|e| {
                        KvtError::usage(format!("pipeline stage `{name}` (op `{}`): {e:#}", st.op))
                    })?;
                let ix = graph.add_node(NodeSpec {
                    id,
                    stage: name.to_string(),
                    op: op.clone(),
                    bindings: bindings.clone(),
                    config: cfg,
                    optional,
                    transport,
                });
                for need in &st.needs {
                    for &up in instances.get(need).map(Vec::as_slice).unwrap_or(&[]) {
                        let ub = &graph[up].bindings;
                        if ub
                            .iter()
                            .all(|(k, v)| bindings.get(k).is_none_or(|b| b == v))
                        {
                            graph.add_edge(up, ix, ());
                        }
                    }
                }
                mine.push(ix);
            }
            instances.insert(name.to_string(), mine);
        }

        // Keep only the targets and their ancestors.
        let mut keep: BTreeSet<NodeIndex> = BTreeSet::new();
        let mut stack: Vec<NodeIndex> = Vec::new();
        for s in &wanted_stages {
            for &ix in &instances[s] {
                let filtered = target_filter
                    .get(s)
                    .is_some_and(|ids| !ids.contains(&graph[ix].id));
                if !filtered {
                    stack.push(ix);
                }
            }
        }
        for (s, ids) in &target_filter {
            for id in ids {
                if !instances[s].iter().any(|&ix| &graph[ix].id == id) {
                    let have: Vec<&str> = instances[s]
                        .iter()
                        .map(|&ix| graph[ix].id.as_str())
                        .collect();
                    return Err(KvtError::usage(format!(
                        "unknown target `{id}`; instances of `{s}`: {}",
                        have.join(", ")
                    )));
                }
            }
        }
        while let Some(ix) = stack.pop() {
            if keep.insert(ix) {
                wanted_nodes.insert(graph[ix].id.clone());
                stack.extend(graph.neighbors_directed(ix, petgraph::Direction::Incoming));
            }
        }
        graph.retain_nodes(|g, ix| wanted_nodes.contains(&g[ix].id));

        let mut order = toposort(&graph, None).expect("a subgraph of an acyclic graph is acyclic");
        // Stable order: by depth, then id, so output and scheduling are deterministic.
        let mut depth = vec![0usize; graph.node_count()];
        for &ix in &order {
            for up in graph.neighbors_directed(ix, petgraph::Direction::Incoming) {
                depth[ix.index()] = depth[ix.index()].max(depth[up.index()] + 1);
            }
        }
        order.sort_by(|a, b| {
            depth[a.index()]
                .cmp(&depth[b.index()])
                .then_with(|| graph[*a].id.cmp(&graph[*b].id))
        });
        Ok(Plan { graph, order })
    }

    pub fn find(&self, id: &str) -> Option<NodeIndex> {
        self.graph
            .node_indices()
            .find(|&ix| self.graph[ix].id == id)
    }

    /// Upstream nodes of `ix`, sorted by id.
    pub fn deps(&self, ix: NodeIndex) -> Vec<NodeIndex> {
        let mut d: Vec<NodeIndex> = self
            .graph
            .neighbors_directed(ix, petgraph::Direction::Incoming)
            .collect();
        d.sort_by(|a, b| self.graph[*a].id.cmp(&self.graph[*b].id));
        d.dedup();
        d
    }

    /// Downstream nodes of `ix`, sorted by id.
    pub fn dependents(&self, ix: NodeIndex) -> Vec<NodeIndex> {
        let mut d: Vec<NodeIndex> = self
            .graph
            .neighbors_directed(ix, petgraph::Direction::Outgoing)
            .collect();
        d.sort_by(|a, b| self.graph[*a].id.cmp(&self.graph[*b].id));
        d.dedup();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{NoTransport, Op, OpContext, OpRegistry};
    use crate::state::key_slice;

    /// An op that reads one optional value.
    struct Reads;
    #[derive(serde::Deserialize)]
    struct Uses {
        #[serde(rename = "a.b")]
        _b: u32,
        #[serde(rename = "a.extra")]
        _extra: Option<u32>,
    }
    impl Op for Reads {
        type Uses = Uses;
        type Transport = NoTransport;
        fn name(&self) -> &'static str {
            "reads"
        }
        fn version(&self) -> u32 {
            1
        }
        fn run(&self, _: &mut OpContext, _: Uses, _: NoTransport) -> crate::error::OpResult {
            Ok(())
        }
    }

    fn slice(pipeline: &str, config: Value) -> Result<BTreeMap<String, Value>> {
        let mut reg = OpRegistry::new();
        reg.register(Reads);
        let def = PipelineDef::parse(pipeline, "p")?;
        let plan = Plan::new(&def, "p", &config, &reg, &[])?;
        Ok(key_slice(&plan.graph[plan.order[0]]))
    }

    /// An optional `uses` path (`a.extra?`) enters the key only when set:
    /// adding one to a stage leaves every configuration without it keyed
    /// as before; the op still reads it (null when unset).
    #[test]
    fn an_optional_path_enters_the_key_only_when_set() {
        let p = "stages:\n  s: {op: reads, uses: [a.b, a.extra?]}\n";
        let unset = slice(p, serde_json::json!({"a": {"b": 1}})).unwrap();
        let null = slice(p, serde_json::json!({"a": {"b": 1, "extra": null}})).unwrap();
        let set = slice(p, serde_json::json!({"a": {"b": 1, "extra": 5}})).unwrap();
        assert_eq!(unset, null);
        assert_eq!(unset.keys().collect::<Vec<_>>(), ["a.b"]);
        assert_eq!(set.get("a.extra"), Some(&Value::from(5)));
        // A plain path is keyed as null when unset; the typed check still
        // holds for the optional one (it is part of the op's `Uses`).
        let plain = "stages:\n  s: {op: reads, uses: [a.b, a.extra]}\n";
        let keyed = slice(plain, serde_json::json!({"a": {"b": 1, "extra": null}})).unwrap();
        assert_eq!(keyed.get("a.extra"), Some(&Value::Null));
        // The optional path's section must exist.
        let e = slice(
            "stages:\n  s: {op: reads, uses: [a.b, x.extra?]}\n",
            serde_json::json!({"a": {"b": 1}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("`x.extra?`"), "{e}");
    }
}
