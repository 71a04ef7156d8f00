//! Tokenizers beyond tiktoken: a Hugging Face tokenizer.json made here (from a
//! path and from a fake hub cache), and the server's `/tokenize` (kvt serve).

mod common;
use common::*;

/// A word-level tokenizer: every word or punctuation run is one token.
fn tokenizer_json() -> String {
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "the": 1}, "unk_token": "[UNK]"}
    })
    .to_string()
}

const SANITY: &str = "\
output: {exp_group_id: tok}
dataset: {lengths: [200, 400], per_length: 3}
binning: {n_bins: 2}
sampling: {n_per_bin: 3}
";

/// (example id, a field of it) from the manifest's `entries` or `examples`, sorted.
fn manifest_pairs(p: &Project, list: &str, field: &str) -> Vec<(String, serde_json::Value)> {
    let m: serde_json::Value = serde_json::from_str(&p.manifest("synthetic__needle")).unwrap();
    let mut v: Vec<(String, serde_json::Value)> = m[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["example_id"].as_str().unwrap().to_string(),
                e[field].clone(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn entries(p: &Project) -> Vec<(String, i64)> {
    manifest_pairs(p, "entries", "token_len")
        .into_iter()
        .map(|(id, v)| (id, v.as_i64().unwrap()))
        .collect()
}

fn contexts(p: &Project) -> Vec<(String, String)> {
    manifest_pairs(p, "examples", "context")
        .into_iter()
        .map(|(id, v)| (id, v.as_str().unwrap().to_string()))
        .collect()
}

fn prepare(p: &Project, args: &[&str]) -> std::process::Output {
    p.kvt()
        .args(["build", "prepare", "-c", "config/experiments/tok.yaml"])
        .args(args)
        .env("HOME", p.path("home"))
        .env_remove("HF_HOME")
        .output()
        .unwrap()
}

#[test]
fn a_tokenizer_json_counts_tokens_from_a_path_and_from_the_hub_cache() {
    let p = Project::new();
    p.write("config/experiments/tok.yaml", SANITY);
    p.write("tok/tokenizer.json", &tokenizer_json());
    let out = prepare(
        &p,
        &[
            "--set",
            "tokenizer.kind=hf",
            "--set",
            "tokenizer.name=tok/tokenizer.json",
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Word-level: the count is the number of \w+ and punctuation runs.
    let words = |s: &str| {
        let mut n = 0;
        let mut prev: Option<bool> = None; // Some(true) in a word, Some(false) in punctuation
        for c in s.chars() {
            let cur = if c.is_whitespace() {
                None
            } else {
                Some(c.is_alphanumeric() || c == '_')
            };
            if cur.is_some() && cur != prev {
                n += 1;
            }
            prev = cur;
        }
        n
    };
    let ctx = contexts(&p);
    for ((id, n), (id2, text)) in entries(&p).iter().zip(&ctx) {
        assert_eq!(id, id2);
        assert_eq!(*n as usize, words(text), "{id}");
    }
    // The same file found in a hub cache by model id.
    let q = Project::new();
    q.write("config/experiments/tok.yaml", SANITY);
    q.write(
        "hub/models--acme--tiny/snapshots/abc/tokenizer.json",
        &tokenizer_json(),
    );
    let out = q
        .kvt()
        .args([
            "build",
            "prepare",
            "-c",
            "config/experiments/tok.yaml",
            "--set",
            "tokenizer.kind=hf",
            "--set",
            "tokenizer.name=acme/tiny",
        ])
        .env("HF_HUB_CACHE", q.path("hub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(entries(&q), entries(&p));
    // A missing one says where it looked; nothing is downloaded. It is a
    // configuration error, found before any stage runs (issue #26).
    let out = prepare(
        &p,
        &[
            "--set",
            "tokenizer.kind=hf",
            "--set",
            "tokenizer.name=acme/none",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("models--acme--none"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn the_server_tokenizer_matches_the_engine_and_counts_are_cached() {
    let p = Project::new();
    p.write("config/experiments/tok.yaml", SANITY);
    let out = prepare(&p, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let tiktoken = entries(&p);

    let s = Served::start(&[]);
    let (st, body) = http(
        &s.addr,
        "POST",
        "/tokenize",
        Some(r#"{"content": "hello world"}"#),
    );
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["count"],
        2
    );
    let args = [
        "--set",
        "tokenizer.kind=server",
        "--set",
        "tokenizer.name=kvt-reference",
        "--set",
    ];
    let url = format!("tokenizer.url={}", s.addr);
    let mut a: Vec<&str> = args.to_vec();
    a.push(&url);
    let out = prepare(&p, &a);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        entries(&p),
        tiktoken,
        "the reference engine counts in cl100k_base"
    );
    // The URL is transport: another address is not a new key.
    drop(s);
    let other = "tokenizer.url=http://127.0.0.1:9";
    let out = prepare(
        &p,
        &[
            "--set",
            "tokenizer.kind=server",
            "--set",
            "tokenizer.name=kvt-reference",
            "--set",
            other,
        ],
    );
    assert!(built_nodes(&out).is_empty(), "{}", stderr_of(&out));
    // Rebuilt with the server gone: the counts come from the cache.
    let out = prepare(
        &p,
        &[
            "--set",
            "tokenizer.kind=server",
            "--set",
            "tokenizer.name=kvt-reference",
            "--set",
            other,
            "--force",
            "prepare",
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(entries(&p), tiktoken);
    // A new text with the server gone: a clear error.
    let out = prepare(
        &p,
        &[
            "--set",
            "tokenizer.kind=server",
            "--set",
            "tokenizer.name=kvt-reference",
            "--set",
            other,
            "--set",
            "dataset.seed=77",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("/tokenize"), "{}", stderr_of(&out));
}

#[test]
fn tokenizer_bytes_enter_the_prepare_key() {
    let p = Project::new();
    p.write("config/experiments/tok.yaml", SANITY);
    p.write("tok/tokenizer.json", &tokenizer_json());
    let hf = [
        "--set",
        "tokenizer.kind=hf",
        "--set",
        "tokenizer.name=tok/tokenizer.json",
    ];
    let out = prepare(&p, &hf);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(built_nodes(&out), vec!["prepare"]);
    let out = prepare(&p, &hf);
    assert!(built_nodes(&out).is_empty(), "{}", stderr_of(&out));
    // Same name, other bytes: a different tokenizer, so prepare runs again.
    assert!(tokenizer_json().contains("\"the\":1"));
    p.write(
        "tok/tokenizer.json",
        &tokenizer_json().replace("\"the\":1", "\"the\":1,\"a\":2"),
    );
    let out = prepare(&p, &hf);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(built_nodes(&out), vec!["prepare"], "{}", stderr_of(&out));
}

#[test]
fn prompt_max_tokens_cuts_in_the_configured_tokenizer() {
    let p = Project::new();
    p.write(
        "config/experiments/tok.yaml",
        &format!(
            "{SANITY}kv: {{policies: [streaming], budgets: [1.0]}}\nprompt: {{max_tokens: 60}}\n"
        ),
    );
    p.write("tok/tokenizer.json", &tokenizer_json());
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/tok.yaml"])
        .args([
            "--set",
            "tokenizer.kind=hf",
            "--set",
            "tokenizer.name=tok/tokenizer.json",
        ])
        .output()
        .unwrap();
    // Before: truncation always looked the name up as a tiktoken encoding and
    // failed for a tokenizer.json.
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report = p.read("runs/tok/report.md");
    assert!(
        report.contains("Prompts shortened by `prompt.max_tokens`"),
        "{report}"
    );
    // A server tokenizer cannot cut: a configuration error before any stage.
    let out = p
        .kvt()
        .args(["validate", "-c", "config/experiments/tok.yaml"])
        .args(["--set", "tokenizer.kind=server"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("prompt.max_tokens"),
        "{}",
        stderr_of(&out)
    );
}
