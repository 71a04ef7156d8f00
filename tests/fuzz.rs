//! Hostile inputs through the real binary: 60 mutated experiment configs and
//! 32 mutated JSON-lines datasets. Nothing panics or aborts; every
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
fn fifty_mutated_configs_exit_2_naming_file_line_and_key() {
    let p = Project::new();
    let cases = mutated_configs();
    assert!(cases.len() >= 50, "only {} mutated configs", cases.len());
    let mut valid = 0;
    let mut problems = Vec::new();
    for (what, text, key) in &cases {
        p.write("config/experiments/fuzz.yaml", text);
        let out = p
            .kvt()
            .args(["validate", "-c", "config/experiments/fuzz.yaml"])
            .output()
            .unwrap();
        if !no_crash(&mut problems, &out, what) {
            continue;
        }
        let err = stderr_of(&out);
        if out.status.code() == Some(0) {
            // Allowed (a value that is merely unusual); it must then build.
            valid += 1;
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
    assert!(valid <= 3, "{valid} mutations were accepted");
}

/// A valid record with `i` in its id and a context long enough to bin.
fn record(i: usize) -> String {
    format!(
        "{{\"id\": \"r{i}\", \"question\": \"What is the code?\", \"context\": \"{}The code is {i}.\", \"answers\": [\"{i}\"]}}",
        "Plain filler text. ".repeat(10 + 3 * i)
    )
}

/// (description, file bytes, the 1-based line an error must name; None when
/// the mutation is harmless and the file must load).
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
fn thirty_mutated_jsonl_datasets_name_file_and_line() {
    let p = Project::new();
    p.write("config/experiments/file.yaml", FILE_EXP);
    let cases = mutated_datasets();
    assert!(cases.len() >= 30, "only {} mutated datasets", cases.len());
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
        check!(
            problems,
            err.contains(&format!("set.jsonl:{n}")),
            "{what}: `set.jsonl:{n}` not named in: {err}"
        );
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
