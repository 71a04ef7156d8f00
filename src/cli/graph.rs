//! Renders `kvt graph`: a tree for people, Graphviz dot, or JSON for scripts.

use super::GraphFormat;
use crate::engine::state::{NodeReport, NodeState};
use crate::engine::Plan;
use petgraph::graph::NodeIndex;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

fn describe(state: &NodeState) -> String {
    match state {
        NodeState::Fresh(_) => "fresh".into(),
        NodeState::Stale(reasons) => {
            let r: Vec<String> = reasons.iter().map(ToString::to_string).collect();
            format!("stale: {}", r.join("; "))
        }
        NodeState::Pending(ups) => {
            let u: Vec<String> = ups.iter().map(|u| format!("`{u}`")).collect();
            format!(
                "pending: waits for {} (reruns only if its inputs change)",
                u.join(", ")
            )
        }
    }
}

fn paint(state: &NodeState, text: &str, color: bool) -> String {
    if !color {
        return text.to_string();
    }
    let code = match state {
        NodeState::Fresh(_) => "32",
        NodeState::Stale(_) => "33",
        NodeState::Pending(_) => "36",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

pub fn render(plan: &Plan, reports: &[NodeReport], format: GraphFormat, color: bool) -> String {
    let by_ix: BTreeMap<NodeIndex, &NodeReport> = reports.iter().map(|r| (r.index, r)).collect();
    match format {
        GraphFormat::Text => text(plan, &by_ix, color),
        GraphFormat::Dot => dot(plan, reports),
        GraphFormat::Json => json(plan, reports),
    }
}

fn text(plan: &Plan, by_ix: &BTreeMap<NodeIndex, &NodeReport>, color: bool) -> String {
    let mut out = String::new();
    let (mut fresh, mut stale, mut pending) = (0, 0, 0);
    for r in by_ix.values() {
        match r.state {
            NodeState::Fresh(_) => fresh += 1,
            NodeState::Stale(_) => stale += 1,
            NodeState::Pending(_) => pending += 1,
        }
    }
    let sinks: Vec<NodeIndex> = plan
        .order
        .iter()
        .copied()
        .filter(|&ix| plan.dependents(ix).is_empty())
        .collect();
    let mut shown = BTreeSet::new();
    for s in sinks {
        walk(plan, by_ix, s, "", "", &mut shown, &mut out, color);
    }
    let _ = writeln!(
        out,
        "\n{} nodes: {fresh} fresh, {stale} stale, {pending} pending",
        by_ix.len()
    );
    out
}

#[allow(clippy::too_many_arguments)]
fn walk(
    plan: &Plan,
    by_ix: &BTreeMap<NodeIndex, &NodeReport>,
    ix: NodeIndex,
    lead: &str,
    child_lead: &str,
    shown: &mut BTreeSet<NodeIndex>,
    out: &mut String,
    color: bool,
) {
    let spec = &plan.graph[ix];
    let state = &by_ix[&ix].state;
    let deps = plan.deps(ix);
    if !shown.insert(ix) {
        let _ = writeln!(out, "{lead}{} (*)", spec.id);
        return;
    }
    let _ = writeln!(
        out,
        "{lead}{}  {}",
        spec.id,
        paint(state, &describe(state), color)
    );
    for (i, d) in deps.iter().enumerate() {
        let last = i + 1 == deps.len();
        let (l, c) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        walk(
            plan,
            by_ix,
            *d,
            &format!("{child_lead}{l}"),
            &format!("{child_lead}{c}"),
            shown,
            out,
            color,
        );
    }
}

fn dot(plan: &Plan, reports: &[NodeReport]) -> String {
    let mut out =
        String::from("digraph kvt {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for r in reports {
        let spec = &plan.graph[r.index];
        let colour = match r.state {
            NodeState::Fresh(_) => "darkgreen",
            NodeState::Stale(_) => "orange",
            NodeState::Pending(_) => "steelblue",
        };
        let label = format!("{}\\n{}", spec.id, describe(&r.state)).replace('"', "\\\"");
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{label}\", color={colour}];",
            spec.id
        );
    }
    for &ix in &plan.order {
        for d in plan.deps(ix) {
            let _ = writeln!(
                out,
                "  \"{}\" -> \"{}\";",
                plan.graph[d].id, plan.graph[ix].id
            );
        }
    }
    out.push_str("}\n");
    out
}

fn json(plan: &Plan, reports: &[NodeReport]) -> String {
    let nodes: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let spec = &plan.graph[r.index];
            let (reasons, waits_for) = match &r.state {
                NodeState::Stale(rs) => (serde_json::to_value(rs).unwrap_or_default(), serde_json::json!([])),
                NodeState::Pending(ups) => (serde_json::json!([]), serde_json::json!(ups)),
                NodeState::Fresh(_) => (serde_json::json!([]), serde_json::json!([])),
            };
            serde_json::json!({
                "id": spec.id,
                "stage": spec.stage,
                "op": spec.op.name(),
                "op_version": spec.op.version(),
                "state": r.state.label(),
                "reasons": reasons,
                "waits_for": waits_for,
                "key": r.key.map(|k| k.hex()),
                "needs": plan.deps(r.index).iter().map(|d| plan.graph[*d].id.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut s =
        serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes })).unwrap_or_default();
    s.push('\n');
    s
}
