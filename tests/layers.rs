//! docs/ARCHITECTURE.md checked on the sources: the engine crate depends on
//! no kvt crate and no `anyhow` (the compiler keeps it from importing kvt's
//! modules; this checks the dependency list), no two top-level modules of
//! the binary crate import each other (directly or through others), and
//! every file, module path and type the document names exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const MODULES: &[&str] = &[
    "cli", "data", "llm", "metrics", "render", "stages", "stats", "table",
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

/// Cargo.lock's packages: name → the names of its dependencies, and the
/// workspace's own packages (those without a `source`).
fn lock_graph() -> (BTreeMap<String, BTreeSet<String>>, BTreeSet<String>) {
    let lock =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut local = BTreeSet::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |k: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let name = field("name").unwrap();
        if field("source").is_none() {
            local.insert(name.clone());
        }
        let list = block
            .split("dependencies = [")
            .nth(1)
            .map(|r| r.split(']').next().unwrap())
            .unwrap_or("");
        let names = list
            .split('"')
            .skip(1)
            .step_by(2)
            .map(|d| d.split(' ').next().unwrap().to_string());
        deps.entry(name).or_default().extend(names);
    }
    (deps, local)
}

/// Every package `root` depends on, directly or not (dev-dependencies too:
/// Cargo.lock does not tell them apart, so this is a superset).
fn closure(deps: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_string()];
    while let Some(n) = stack.pop() {
        for d in deps.get(&n).into_iter().flatten() {
            if seen.insert(d.clone()) {
                stack.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn the_engine_crate_depends_on_no_kvt_crate_and_anyhow_stays_in_the_binary() {
    let (deps, local) = lock_graph();
    assert!(local.contains("kvt-engine"), "{local:?}");
    let below = closure(&deps, "kvt-engine");
    let kvt: Vec<&String> = below.iter().filter(|d| local.contains(*d)).collect();
    assert!(kvt.is_empty(), "kvt-engine depends on {kvt:?}");
    assert!(!below.contains("anyhow"), "kvt-engine depends on anyhow");
    // `anyhow` only in the binary crate (`kvt`); every other crate of the
    // workspace returns its own error type.
    for crate_ in &local {
        if crate_ != "kvt" && crate_ != "kvt-testops" {
            assert!(
                !deps[crate_].contains("anyhow"),
                "{crate_} depends on anyhow directly"
            );
        }
    }
    // Nor does the engine print: it reports through its own types.
    let mut files = Vec::new();
    rs_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/kvt-engine/src"),
        &mut files,
    );
    assert!(files.len() > 10, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for banned in ["eprintln!", "println!", "anyhow::", "anyhow!"] {
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
    for low in ["data", "llm", "metrics", "stats", "render", "table"] {
        assert!(
            !g[low].contains("stages") && !g[low].contains("cli"),
            "`{low}` imports an upper layer: {:?}",
            g[low]
        );
    }
}

/// The Rust file of module path `segs` under `src/` (`a/b.rs` or `a/b/mod.rs`);
/// `engine::…` is the `kvt-engine` crate (the binary re-exports it so).
fn module_file(src: &Path, segs: &[&str]) -> Option<std::path::PathBuf> {
    // The layers that are crates of their own, re-exported by the binary
    // crate under their old module names.
    for (module, krate) in [("engine", "kvt-engine"), ("config", "kvt-config")] {
        if segs.first() == Some(&module) {
            let dir = src.parent()?.join("crates").join(krate).join("src");
            return module_file(&dir, &segs[1..]);
        }
    }
    if segs.first() == Some(&"redact") {
        let dir = src.parent()?.join("crates/kvt-config/src");
        return module_file(&dir, segs);
    }
    if segs.is_empty() {
        return Some(src.join("lib.rs"));
    }
    let base = segs.iter().fold(src.to_path_buf(), |p, s| p.join(s));
    let file = base.with_extension("rs");
    if file.exists() {
        return Some(file);
    }
    let m = base.join("mod.rs");
    m.exists().then_some(m)
}

/// Whether `text` defines an item or method called `name`.
fn defines(text: &str, name: &str) -> bool {
    [
        "fn ", "struct ", "enum ", "trait ", "const ", "static ", "type ", "mod ",
    ]
    .iter()
    .any(|kw| {
        text.match_indices(&format!("{kw}{name}")).any(|(i, m)| {
            text[i + m.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
        })
    }) || text.contains(&format!("    {name}("))
        || text.contains(&format!("    {name},"))
        || text.contains(&format!("    {name} {{"))
}

/// Issue #30, item 8: every code path docs/ARCHITECTURE.md names exists:
/// files (`src/llm/kv.rs`), module paths (`stages::explorer::excerpt`, with
/// `{a, b}` groups) and type members (`Kv::expand_cells`), searched in the
/// sources. A renamed or removed item fails here until the document follows.
#[test]
fn every_name_in_the_architecture_document_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let whole = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    // A section headed "Planned" names what is not built yet.
    let doc = whole.split("\n## Planned").next().unwrap();
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    rs_files(&root.join("crates"), &mut files);
    let all: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    // Names of other crates' items the document mentions.
    const EXTERNAL: &[&str] = &["Tensor", "anyhow"];
    let mut missing = Vec::new();
    let mut checked = 0;
    for span in doc.split('`').skip(1).step_by(2) {
        let span = span.trim();
        if ["src/", "tests/", "templates/", "crates/"]
            .iter()
            .any(|p| span.starts_with(p))
        {
            // A file, or a test in one (`tests/cache.rs::its_name`).
            let (file, item) = match span.split_once(".rs::") {
                Some((f, it)) => (format!("{f}.rs"), Some(it)),
                None => (span.to_string(), None),
            };
            let ok = std::fs::read_to_string(root.join(&file))
                .map_or(root.join(&file).is_dir(), |t| {
                    item.is_none_or(|it| defines(&t, it))
                });
            if !ok {
                missing.push(span.to_string());
            }
            checked += 1;
            continue;
        }
        // A lone type name (`BinStat`, `EngineError`): defined somewhere.
        if span.len() > 2
            && span.starts_with(|c: char| c.is_ascii_uppercase())
            && span.chars().all(|c| c.is_ascii_alphanumeric())
            && span.chars().any(|c| c.is_ascii_lowercase())
            && !EXTERNAL.contains(&span)
        {
            checked += 1;
            if !all.iter().any(|t| defines(t, span)) {
                missing.push(span.to_string());
            }
            continue;
        }
        if !span.contains("::") || span.contains(' ') && !span.contains('{') {
            continue;
        }
        // `a::b::{c, d}` → `a::b::c`, `a::b::d`.
        let paths: Vec<String> = match span.split_once("::{") {
            Some((head, rest)) => rest
                .trim_end_matches('}')
                .split(',')
                .map(|x| format!("{head}::{}", x.trim()))
                .collect(),
            None => vec![span.to_string()],
        };
        for path in paths {
            let segs: Vec<&str> = path.split("::").collect();
            if !segs
                .iter()
                .all(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_'))
            {
                continue;
            }
            if EXTERNAL.contains(&segs[0]) {
                continue;
            }
            checked += 1;
            // The longest module prefix that is a file; the rest are items.
            let found = (0..segs.len()).rev().find_map(|k| {
                let (modules, items) = segs.split_at(k);
                if modules
                    .iter()
                    .any(|m| m.starts_with(|c: char| c.is_uppercase()))
                {
                    return None;
                }
                let file = module_file(&src, modules)?;
                let text = std::fs::read_to_string(file).unwrap();
                Some(match items {
                    [] => true,
                    // A type-relative path (`Kv::expand_cells`) or a path
                    // through an enclosing module (`infer::KeyHasher`): the
                    // items anywhere in the sources.
                    _ if k == 0 || !defines(&text, items[0]) => {
                        items.iter().all(|it| all.iter().any(|t| defines(t, it)))
                    }
                    _ => items.iter().all(|it| defines(&text, it)),
                })
            });
            if found != Some(true) {
                missing.push(path);
            }
        }
    }
    assert!(checked > 100, "only {checked} names checked");
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md names what the sources do not have: {missing:?}"
    );
}

/// Issue #30, item 3: ops read their configuration as typed `Uses` /
/// `Transport` slices, not the raw config map. The two places that hash the
/// raw slice as an identity (the journal's node slice id, the dataset id)
/// are the only ones allowed to touch it.
#[test]
fn no_op_reads_the_raw_config_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/stages");
    let mut files = Vec::new();
    rs_files(&root, &mut files);
    const HASHED_AS_IDENTITY: &[(&str, usize)] = &[("infer/identity.rs", 1), ("prepare.rs", 1)];
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let n = text.matches("k.config").count() + text.matches("key.config").count();
        let name = f.strip_prefix(&root).unwrap().to_string_lossy().to_string();
        let allowed = HASHED_AS_IDENTITY
            .iter()
            .find(|(file, _)| *file == name)
            .map_or(0, |(_, n)| *n);
        if n > allowed {
            found.push(format!("{name}: {n} reads of the raw config"));
        }
    }
    assert!(found.is_empty(), "{found:?}");
}

/// Issue #30, item 5: `kvt serve` answers through the backends `kvt build`
/// uses (`llm::backend::InProcess::backend`), never by calling an engine
/// itself; `tests/pipeline.rs::in_process_and_served_engines_answer_alike`
/// and `tests/native.rs::native_in_process_and_kvt_serve_give_the_same_answers`
/// check that both give the same answers.
#[test]
fn kvt_serve_answers_through_the_build_backends() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let server = std::fs::read_to_string(root.join("src/llm/server.rs")).unwrap();
    assert!(server.contains(".backend(") && server.contains("answer_one("));
    for direct in ["reference::answer(", "NativeRequest", ".answer(&req"] {
        assert!(
            !server.contains(direct),
            "src/llm/server.rs calls an engine directly (`{direct}`)"
        );
    }
    let infer = std::fs::read_to_string(root.join("src/stages/infer/backend.rs")).unwrap();
    assert!(
        infer.contains("InProcess::Reference.backend(") && infer.contains("InProcess::Native(")
    );
}

/// Issue #30, item 4: verdicts, transition outcomes and failure kinds are
/// enums end to end, and errors are classed by kind: no source compares
/// their names as strings, except the one place each enum names itself.
#[test]
fn no_string_compares_for_verdicts_failure_kinds_or_error_classes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rs_files(&root.join("src"), &mut files);
    for krate in ["kvt-engine", "kvt-config", "kvt-testops"] {
        rs_files(&root.join("crates").join(krate).join("src"), &mut files);
    }
    const NAMES: &[&str] = &[
        // stats::BinVerdict and stats::TransitionStatus
        "reference",
        "uninformative",
        "fails",
        "safe",
        "insufficient",
        "unavailable",
        "insufficient_data",
        "fails_every_length",
        "fails_from_shortest",
        "transition",
        "fails_after_unclear",
        // llm::Failure
        "EMPTY_OUTPUT",
        "TRUNCATED",
        "FORMAT_ERROR",
        "REFUSAL",
        "TIMEOUT",
        "ENGINE_ERROR",
        "RATE_LIMITED",
        "ABSTAINED",
    ];
    // Where each enum maps itself to its names (and back).
    const DEFINING: &[&str] = &["src/stats/mod.rs", "src/llm/mod.rs"];
    let mut found = Vec::new();
    assert!(files.len() > 50, "{files:?}");
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&f).unwrap();
        for name in NAMES {
            for pat in [
                format!("== \"{name}\""),
                format!("!= \"{name}\""),
                format!("Some(\"{name}\")"),
                format!("\"{name}\" =>"),
            ] {
                if text.contains(&pat) && !DEFINING.contains(&rel.as_str()) {
                    found.push(format!("{rel}: `{pat}`"));
                }
            }
        }
        for pat in [
            "status.as_str()",
            "verdict.as_str()",
            "contains(\"is locked",
        ] {
            if text.contains(pat) {
                found.push(format!("{rel}: `{pat}`"));
            }
        }
    }
    assert!(found.is_empty(), "string compares: {found:?}");
}
