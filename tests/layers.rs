//! The layering in docs/ARCHITECTURE.md, checked on the sources: the engine
//! imports no other kvt module, and no two top-level modules import each other
//! (directly or through others).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const MODULES: &[&str] = &[
    "cli", "config", "data", "engine", "llm", "metrics", "render", "stages", "stats", "table",
];

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module → the other top-level modules its files name with `crate::`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if !MODULES.contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let entry = g.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name != module && MODULES.contains(&name.as_str()) {
                entry.insert(name);
            }
        }
    }
    g
}

#[test]
fn engine_imports_no_other_kvt_module() {
    let g = module_graph();
    let engine = g.get("engine").expect("src/engine exists");
    assert!(
        engine.is_empty(),
        "src/engine must stay domain-free but imports {engine:?}"
    );
    // Nor the crate root's kvt-specific items.
    let mut files = Vec::new();
    rs_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine"),
        &mut files,
    );
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for banned in [
            "crate::KvtError",
            "crate::exit_code_for",
            "eprintln!",
            "println!",
        ] {
            assert!(
                !text.contains(banned),
                "{} uses `{banned}`; the engine reports through its own types",
                f.display()
            );
        }
    }
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let g = module_graph();
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(cycle) = visit(m, &g, &mut Vec::new(), &mut done) {
            panic!("module cycle: {}", cycle.join(" → "));
        }
    }
    // The lower layers stay below the ops.
    for low in [
        "config", "data", "llm", "metrics", "stats", "render", "table",
    ] {
        assert!(
            !g[low].contains("stages") && !g[low].contains("cli"),
            "`{low}` imports an upper layer: {:?}",
            g[low]
        );
    }
}
