//! Hostile inputs through the real binary: over 100 mutated experiment
//! configs and over 40 mutated JSON-lines datasets. Nothing panics or aborts; every
//! configuration problem exits 2 naming the file, the line and the key; every
//! data problem names file:line.

mod common;
use common::*;

/// A valid experiment; each mutation changes one value (or the YAML itself).
const BASE: &str = "\
output:
  exp_group_id: fz
dataset:
  name: synthetic
  task: needle
  lengths: [256, 512]
  per_length: 2
binning:
  n_bins: 2
sampling:
  n_per_bin: 2
engine:
  kind: reference
kv:
  policies: [streaming]
  budgets: [1.0, 0.5]
analysis:
  bootstrap:
    iters: 50
";

/// Replaces the value of `key:` (a line of BASE, matched with its indent)
/// by `value`; or appends `extra` lines when the key is new.
fn mutate(key_line: &str, value: &str) -> String {
    let mut out = String::new();
    let mut found = false;
    for line in BASE.lines() {
        let trimmed = line.trim_start();
        if !found && trimmed.starts_with(&format!("{key_line}:")) {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!("{indent}{key_line}: {value}\n"));
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(found, "BASE has no `{key_line}:`");
    out
}

/// Problems are collected, not asserted one by one, so a failing run lists
/// every mutation that misbehaves.
macro_rules! check {
    ($problems:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            $problems.push(format!($($fmt)+));
        }
    };
}

fn no_crash(problems: &mut Vec<String>, out: &std::process::Output, what: &str) -> bool {
    let code = out.status.code();
    let ok = matches!(code, Some(0..=2)) && !stderr_of(out).contains("panicked");
    check!(
        problems,
        ok,
        "{what}: exit {code:?} (a crash, abort or panic)\n{}",
        stderr_of(out)
    );
    ok
}

fn report(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

/// (description, experiment text, the dotted key an error must name; None
/// for YAML that does not parse, which must name file:line only).
fn mutated_configs() -> Vec<(String, String, Option<&'static str>)> {
    let mut v: Vec<(String, String, Option<&'static str>)> = Vec::new();
    let mut set = |key_line: &'static str, dotted: &'static str, value: &str| {
        v.push((
            format!("{dotted} = {value}"),
            mutate(key_line, value),
            Some(dotted),
        ));
    };
    for bad in [
        "[18446744073709551615]",
        "[]",
        "[0]",
        "[-5]",
        "lots",
        "[256, x]",
    ] {
        set("lengths", "dataset.lengths", bad);
    }
    for bad in ["0", "-1", "1000000", "2.5", "\"two\""] {
        set("n_bins", "binning.n_bins", bad);
    }
    for bad in ["0", "-3", "99999999999", "[]"] {
        set("n_per_bin", "sampling.n_per_bin", bad);
    }
    for bad in ["0", "-1", "many"] {
        set("per_length", "dataset.per_length", bad);
    }
    for bad in ["vllm", "\"\"", "42", "[reference]", "null"] {
        set("kind", "engine.kind", bad);
    }
    for bad in ["[]", "[h2o_plus]", "[snapkv+q3_0]", "streaming", "[42]"] {
        set("policies", "kv.policies", bad);
    }
    for bad in ["[]", "[0]", "[-0.5]", "[.nan]", "[.inf]", "[half]"] {
        set("budgets", "kv.budgets", bad);
    }
    for bad in ["0", "-10", "\"fifty\""] {
        set("iters", "analysis.bootstrap.iters", bad);
    }
    let long = "x".repeat(5000);
    for bad in [
        "../../escape",
        "a/b",
        "\"\"",
        "..",
        long.as_str(),
        "null",
        "[1]",
    ] {
        set("exp_group_id", "output.exp_group_id", bad);
    }
    for bad in ["../../../x", "a/b", "\"\"", "[x]"] {
        set("name", "dataset.name", bad);
    }
    for bad in ["nope", "../x", "\"\""] {
        set("task", "dataset.task", bad);
    }
    // Keys that do not exist, at several depths.
    v.push((
        "unknown top-level key".into(),
        format!("{BASE}modle:\n  name: x\n"),
        Some("modle"),
    ));
    v.push((
        "unknown nested key".into(),
        BASE.replace("  n_bins: 2", "  n_bins: 2\n  nbins: 3"),
        Some("binning.nbins"),
    ));
    v.push((
        "edges decreasing".into(),
        BASE.replace("  n_bins: 2", "  n_bins: 2\n  edges: [0, 900, 300]"),
        Some("binning.edges"),
    ));
    v.push((
        "edges of the wrong length".into(),
        BASE.replace("  n_bins: 2", "  n_bins: 2\n  edges: [0, 900]"),
        Some("binning.edges"),
    ));
    v.push((
        "template without {context}".into(),
        format!("{BASE}prompt:\n  template: \"Question: {{question}}\"\n"),
        Some("prompt.template"),
    ));
    v.push((
        "pipeline escaping the project".into(),
        format!("{BASE}pipeline: ../../etc/passwd\n"),
        Some("pipeline"),
    ));
    v.push((
        "missing dataset file".into(),
        BASE.replace(
            "  name: synthetic",
            "  name: synthetic\n  source: file\n  path: nowhere.jsonl",
        ),
        Some("dataset.path"),
    ));
    v.push((
        "a list where a mapping belongs".into(),
        BASE.replace("sampling:\n  n_per_bin: 2", "sampling: [2]"),
        Some("sampling"),
    ));
    // Issue #26: values whose range `validate` once skipped, and inputs a
    // build reads (an extra top-level section, appended to BASE).
    let mut section = |what: &str, yaml: &str, key: &'static str| {
        v.push((what.to_string(), format!("{BASE}{yaml}\n"), Some(key)));
    };
    for (what, yaml, key) in [
        (
            "an unknown key beside a section",
            "decoding: {max_new_tokens: 8}\nengine_x: 1",
            "engine_x",
        ),
        (
            "temperature -1",
            "decoding: {temperature: -1}",
            "decoding.temperature",
        ),
        (
            "temperature nan",
            "decoding:\n  temperature: .nan",
            "decoding.temperature",
        ),
        ("top_p 2", "decoding: {top_p: 2}", "decoding.top_p"),
        ("top_p 0", "decoding: {top_p: 0}", "decoding.top_p"),
        (
            "max_new_tokens 0",
            "decoding: {max_new_tokens: 0}",
            "decoding.max_new_tokens",
        ),
        (
            "max_new_tokens text",
            "decoding: {max_new_tokens: lots}",
            "decoding.max_new_tokens",
        ),
        (
            "db.path absolute",
            "db: {path: /tmp/kvt-fuzz.sqlite}",
            "db.path",
        ),
        (
            "db.path escaping",
            "db: {path: ../../kvt-fuzz.sqlite}",
            "db.path",
        ),
        ("db.path empty", "db: {path: \"\"}", "db.path"),
        (
            "unknown tiktoken",
            "tokenizer: {kind: tiktoken, name: gpt2}",
            "tokenizer.name",
        ),
        (
            "hf tokenizer nowhere",
            "tokenizer: {kind: hf, name: acme/none}",
            "tokenizer.name",
        ),
        (
            "tokenizer kind",
            "tokenizer: {kind: sentencepiece}",
            "tokenizer.kind",
        ),
        ("an unknown top-level key", "analysis_x: 1", "analysis_x"),
        (
            "an unknown key after metrics",
            "metrics: {code_sim: difflib}\ncache_x: 1",
            "cache_x",
        ),
        (
            "code_sim unknown",
            "metrics: {code_sim: jaro}",
            "metrics.code_sim",
        ),
        (
            "prompt max_tokens 0",
            "prompt: {max_tokens: 0}",
            "prompt.max_tokens",
        ),
        ("a quoted dotted key", "\"kv.seed\": 3", "kv.seed"),
        ("db a list", "db: [auto]", "db"),
    ] {
        section(what, yaml, key);
    }
    // Engine values, replacing BASE's `engine:` section.
    let mut engine = |what: &str, yaml: &str, key: &'static str| {
        v.push((
            what.to_string(),
            BASE.replace("engine:\n  kind: reference\n", &format!("engine: {yaml}\n")),
            Some(key),
        ));
    };
    for (what, yaml, key) in [
        (
            "max_response_mib 0",
            "{kind: reference, max_response_mib: 0}",
            "engine.max_response_mib",
        ),
        (
            "logprobs 50",
            "{kind: reference, logprobs: 50}",
            "engine.logprobs",
        ),
        (
            "concurrency 0",
            "{kind: reference, concurrency: 0}",
            "engine.concurrency",
        ),
        (
            "timeout 0",
            "{kind: reference, timeout_s: 0}",
            "engine.timeout_s",
        ),
        (
            "timeout negative",
            "{kind: reference, timeout_s: -3}",
            "engine.timeout_s",
        ),
        (
            "max_retries negative",
            "{kind: reference, max_retries: -1}",
            "engine.max_retries",
        ),
        (
            "openai without base_url",
            "{kind: openai}",
            "engine.base_url",
        ),
        (
            "launch without a command",
            "{kind: launch}",
            "engine.launch.command",
        ),
        (
            "native without a model",
            "{kind: native}",
            "engine.model_path",
        ),
        (
            "native model missing",
            "{kind: native, model_path: models/none.gguf}",
            "engine.model_path",
        ),
        (
            "serve model missing",
            "{kind: serve, model_path: models/none.gguf}",
            "engine.model_path",
        ),
        (
            "dequantize off native",
            "{kind: reference, dequantize: true}",
            "engine.dequantize",
        ),
    ] {
        engine(what, yaml, key);
    }
    // Budgets and bins the issue found accepted.
    for bad in ["[1.0, 1.5]", "[1.0, 2.25]", "[1.0, -0.0]"] {
        v.push((
            format!("kv.budgets = {bad}"),
            mutate("budgets", bad),
            Some("kv.budgets"),
        ));
    }
    v.push((
        "focus bin that does not exist".into(),
        BASE.replace("  n_per_bin: 2", "  n_per_bin: 2\n  focus_bins: [99]"),
        Some("sampling.focus_bins"),
    ));
    // Analysis values.
    for (what, repl, key) in [
        (
            "bootstrap ci 1.5",
            "    iters: 50\n    ci: 1.5",
            "analysis.bootstrap.ci",
        ),
        (
            "transition delta 0",
            "    iters: 50\n  transition: {delta: 0}",
            "analysis.transition.delta",
        ),
        (
            "fidelity delta 0",
            "    iters: 50\n  fidelity: {delta_nats: 0}",
            "analysis.fidelity.delta_nats",
        ),
        (
            "calibration 1",
            "    iters: 50\n  splits: {calibration: 1.0}",
            "analysis.splits.calibration",
        ),
        (
            "confident_risk 2",
            "    iters: 50\n  selective: {confident_risk: 2}",
            "analysis.selective.confident_risk",
        ),
        (
            "confidence unknown",
            "    iters: 50\n  selective: {confidence: median}",
            "analysis.selective.confidence",
        ),
    ] {
        v.push((
            what.to_string(),
            BASE.replace("    iters: 50", repl),
            Some(key),
        ));
    }
    // Dataset inputs a build reads.
    for (what, extra) in [
        (
            "dataset path without an extension",
            "  source: file\n  path: data/noext",
        ),
        (
            "dataset glob matching nothing",
            "  source: file\n  path: \"data/*.nothing.jsonl\"",
        ),
        ("dataset path a folder", "  source: file\n  path: data"),
        (
            "dataset format unknown",
            "  source: file\n  path: data/noext\n  format: csv",
        ),
    ] {
        v.push((
            what.to_string(),
            BASE.replace("  name: synthetic", &format!("  name: synthetic\n{extra}")),
            Some(if what.contains("format") {
                "dataset.format"
            } else {
                "dataset.path"
            }),
        ));
    }
    // YAML that does not parse.
    for (what, text) in [
        ("unclosed bracket", BASE.replace("[256, 512]", "[256, 512")),
        (
            "tab indentation",
            BASE.replace("  n_bins: 2", "\tn_bins: 2"),
        ),
        (
            "bad indentation",
            BASE.replace("  per_length: 2", "      per_length: 2"),
        ),
        ("a scalar document", "just words\n".to_string()),
    ] {
        v.push((what.to_string(), text, None));
    }
    v
}

#[test]
fn a_hundred_mutated_configs_exit_2_naming_file_line_and_key() {
    let p = Project::new();
    p.write("data/noext", &format!("{}\n", record(0)));
    let cases = mutated_configs();
    assert!(cases.len() >= 100, "only {} mutated configs", cases.len());
    let mut valid: Vec<&str> = Vec::new();
    let mut problems = Vec::new();
    for (what, text, key) in &cases {
        p.write("config/experiments/fuzz.yaml", text);
        let out = p
            .kvt()
            .args(["validate", "-c", "config/experiments/fuzz.yaml"])
            // The model a native config falls back to must be unset here.
            .env_remove("KVT_MODEL")
            .output()
            .unwrap();
        if !no_crash(&mut problems, &out, what) {
            continue;
        }
        let err = stderr_of(&out);
        if out.status.code() == Some(0) {
            // Allowed (a value that is merely unusual); it must then build.
            valid.push(what);
            let out = p
                .kvt()
                .args(["build", "prepare", "-c", "config/experiments/fuzz.yaml"])
                .output()
                .unwrap();
            if no_crash(&mut problems, &out, what) {
                check!(
                    problems,
                    out.status.code() != Some(2),
                    "{what}: valid, then a config error in the build:\n{}",
                    stderr_of(&out)
                );
            }
            continue;
        }
        check!(
            problems,
            out.status.code() == Some(2),
            "{what}: exit {:?}: {err}",
            out.status.code()
        );
        let line_no = err
            .split("config/experiments/fuzz.yaml:")
            .nth(1)
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| c.is_ascii_digit());
        check!(problems, line_no, "{what}: no file:line in: {err}");
        if let Some(k) = key {
            check!(
                problems,
                err.contains(k),
                "{what}: key `{k}` not named in: {err}"
            );
        }
        // The error never echoes a whole file or a 5,000-character value.
        check!(
            problems,
            err.len() < 2000,
            "{what}: {} bytes of error",
            err.len()
        );
    }
    report(&problems);
    assert!(valid.len() <= 3, "mutations accepted: {valid:?}");
}

/// A valid record with `i` in its id and a context long enough to bin.
fn record(i: usize) -> String {
    format!(
        "{{\"id\": \"r{i}\", \"question\": \"What is the code?\", \"context\": \"{}The code is {i}.\", \"answers\": [\"{i}\"]}}",
        "Plain filler text. ".repeat(10 + 3 * i)
    )
}

/// (description, file bytes, the 1-based line an error must name — 0 for an
/// error about the whole file, which must name it; None when the mutation
/// is harmless and the file must load).
fn mutated_datasets() -> Vec<(String, Vec<u8>, Option<usize>)> {
    let good: Vec<String> = (0..12).map(record).collect();
    let with_line = |n: usize, line: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        for (i, g) in good.iter().enumerate() {
            if i + 1 == n {
                out.extend_from_slice(line);
            } else {
                out.extend_from_slice(g.as_bytes());
            }
            out.push(b'\n');
        }
        out
    };
    let mut v: Vec<(String, Vec<u8>, Option<usize>)> = Vec::new();
    let bad_lines: Vec<(&str, Vec<u8>)> = vec![
        ("truncated JSON", good[2].as_bytes()[..40].to_vec()),
        ("not JSON", b"hello there".to_vec()),
        ("invalid UTF-8", b"{\"id\": \"x\", \"question\": \"\xff\xfe\", \"context\": \"c\", \"answers\": [\"a\"]}".to_vec()),
        ("a NUL byte", b"{\"id\": \"x\"\x00}".to_vec()),
        ("missing question", b"{\"id\": \"x\", \"context\": \"c\", \"answers\": [\"a\"]}".to_vec()),
        ("missing context", b"{\"id\": \"x\", \"question\": \"q\", \"answers\": [\"a\"]}".to_vec()),
        ("missing answers", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\"}".to_vec()),
        ("empty answers", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\", \"answers\": []}".to_vec()),
        ("blank answer", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\", \"answers\": [\"  \"]}".to_vec()),
        ("answers an object", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\", \"answers\": {\"a\": 1}}".to_vec()),
        ("numeric answer in list", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\", \"answers\": [[1]]}".to_vec()),
        ("context a list", b"{\"id\": \"x\", \"question\": \"q\", \"context\": [\"c\"], \"answers\": [\"a\"]}".to_vec()),
        ("empty context", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"\", \"answers\": [\"a\"]}".to_vec()),
        ("a JSON array line", b"[1, 2, 3]".to_vec()),
        ("a JSON string line", b"\"just a string\"".to_vec()),
        ("null", b"null".to_vec()),
        ("trailing garbage", format!("{} trailing", good[3]).into_bytes()),
        ("two records on a line", format!("{}{}", good[3], good[4]).into_bytes()),
        ("duplicate id", good[0].clone().into_bytes()),
        ("id an object", b"{\"id\": {\"a\": 1}, \"question\": \"q\", \"context\": \"c\", \"answers\": [\"a\"]}".to_vec()),
        ("deeply nested", format!("{{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\", \"answers\": [\"a\"], \"meta\": {}{}}}", "[".repeat(200), "]".repeat(200)).into_bytes()),
        ("unterminated string", b"{\"id\": \"x\", \"question\": \"q".to_vec()),
        ("lone surrogate escape", b"{\"id\": \"x\", \"question\": \"\\ud800\", \"context\": \"c\", \"answers\": [\"a\"]}".to_vec()),
        ("answers null", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\", \"answers\": null}".to_vec()),
        ("question null", b"{\"id\": \"x\", \"question\": null, \"context\": \"c\", \"answers\": [\"a\"]}".to_vec()),
        ("trailing comma", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\", \"answers\": [\"a\"],}".to_vec()),
        ("single quotes", b"{'id': 'x', 'question': 'q', 'context': 'c', 'answers': ['a']}".to_vec()),
        ("a comment line", b"// a comment".to_vec()),
        ("NaN literal", b"{\"id\": \"x\", \"question\": \"q\", \"context\": \"c\", \"answers\": [NaN]}".to_vec()),
        ("a byte-order mark mid-file", [b"\xEF\xBB\xBF".as_slice(), b"{\"id\": \"x\"}"].concat()),
        ("id null", b"{\"id\": null, \"question\": \"q\", \"context\": \"c\", \"answers\": [\"a\"]}".to_vec()),
    ];
    for (i, (what, line)) in bad_lines.into_iter().enumerate() {
        // Spread the bad line over the file (never line 1, which the duplicate needs).
        let n = 2 + i % 10;
        v.push((what.to_string(), with_line(n, &line), Some(n)));
    }
    // Harmless variations: must load.
    let crlf: Vec<u8> = good
        .iter()
        .flat_map(|g| format!("{g}\r\n").into_bytes())
        .collect();
    v.push(("CRLF line ends".into(), crlf, None));
    let mut blank = with_line(5, b"");
    blank.extend_from_slice(b"\n\n");
    v.push(("blank lines".into(), blank, None));
    let no_final_newline = good.join("\n").into_bytes();
    v.push(("no final newline".into(), no_final_newline, None));
    let spaced: Vec<u8> = good
        .iter()
        .flat_map(|g| format!("   {g}   \n").into_bytes())
        .collect();
    v.push(("surrounding spaces".into(), spaced, None));
    let extra = good
        .iter()
        .map(|g| g.replacen('{', "{\"unused\": [1, {\"x\": null}], ", 1))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    v.push(("extra fields".into(), extra, None));
    let single = good
        .iter()
        .map(|g| {
            g.replace("\"answers\": [", "\"answers\": ")
                .replace("\"]}", "\"}")
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    v.push(("answers as one string".into(), single, None));
    let unicode = good
        .iter()
        .map(|g| g.replace("Plain filler", "Ünïcødé fïllér ✓ 日本語"))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    v.push(("non-ASCII text".into(), unicode, None));
    let escapes = good
        .iter()
        .map(|g| {
            g.replace(
                "Plain filler text.",
                "Plain \\\"quoted\\\" \\n text \\u00e9.",
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    v.push(("escapes".into(), escapes, None));
    // A byte-order mark at the start (Windows editors write one) is not data.
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend(good.join("\n").into_bytes());
    v.push(("a byte-order mark".into(), bom, None));
    let long: Vec<u8> = good
        .iter()
        .enumerate()
        .map(|(i, g)| {
            if i == 4 {
                g.replace("Plain filler text. ", &"Long filler text. ".repeat(20_000))
            } else {
                g.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    v.push(("a line of 360 kB".into(), long, None));
    // An empty file: nothing to point a line at, but the file is named.
    v.push(("an empty file".into(), Vec::new(), Some(0)));
    v.push(("only blank lines".into(), b"\n\n  \n".to_vec(), Some(0)));
    // A number where text is expected is read as its text (LongBench has numeric answers).
    let numeric = good
        .iter()
        .enumerate()
        .map(|(i, g)| g.replace("\"What is the code?\"", &format!("{i}")))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    v.push(("numbers as text".into(), numeric, None));
    v
}

const FILE_EXP: &str = "\
output: {exp_group_id: fz}
dataset:
  name: mine
  task: set
  source: file
  path: data/set.jsonl
  fields: {id: id, question: question, context: context, answers: answers, meta: []}
binning: {n_bins: 2}
sampling: {n_per_bin: 3}
";

#[test]
fn forty_mutated_jsonl_datasets_name_file_and_line() {
    let p = Project::new();
    p.write("config/experiments/file.yaml", FILE_EXP);
    let cases = mutated_datasets();
    assert!(cases.len() >= 40, "only {} mutated datasets", cases.len());
    let mut problems = Vec::new();
    for (what, bytes, line) in &cases {
        std::fs::create_dir_all(p.path("data")).unwrap();
        std::fs::write(p.path("data/set.jsonl"), bytes).unwrap();
        let out = p
            .kvt()
            .args(["build", "prepare", "-c", "config/experiments/file.yaml"])
            .output()
            .unwrap();
        if !no_crash(&mut problems, &out, what) {
            continue;
        }
        let err = stderr_of(&out);
        let Some(n) = line else {
            check!(problems, out.status.success(), "{what}: {err}");
            continue;
        };
        check!(
            problems,
            out.status.code() == Some(1),
            "{what}: exit {:?}: {err}",
            out.status.code()
        );
        // Line 0: an error about the whole file, which must name it.
        let at = if *n == 0 {
            "set.jsonl".to_string()
        } else {
            format!("set.jsonl:{n}")
        };
        check!(
            problems,
            err.contains(&at),
            "{what}: `{at}` not named in: {err}"
        );
        if *n == 0 {
            continue;
        }
        check!(
            problems,
            err.len() < 4000,
            "{what}: {} bytes of error",
            err.len()
        );
        // Skipping bad records loads the rest — except a duplicate id, which
        // is always an error (two records would share results).
        let out = p
            .kvt()
            .args(["build", "prepare", "-c", "config/experiments/file.yaml"])
            .args(["--set", "dataset.on_bad_record=skip"])
            .output()
            .unwrap();
        if no_crash(&mut problems, &out, what) {
            let want_ok = *what != "duplicate id";
            check!(
                problems,
                out.status.success() == want_ok,
                "{what} (skip): exit {:?}: {}",
                out.status.code(),
                stderr_of(&out)
            );
        }
    }
    report(&problems);
}
