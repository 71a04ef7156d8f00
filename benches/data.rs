//! Data benchmarks: loading long-context records, counting tokens per
//! tokenizer, a whole `prepare` on a LongBench-format file, and
//! `kvt eval-preds --dir` over all 21 LongBench tasks.
//! Run: `cargo bench --bench data`. Figures go in benches/README.md.

use divan::counter::{BytesCount, ItemsCount};
use kvt::config::schema::Fields;
use kvt::data::records::Collector;
use kvt::data::SplitMix64;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn main() {
    divan::main();
}

const WORDS: &[&str] = &[
    "river",
    "mill",
    "bridge",
    "the",
    "of",
    "and",
    "council",
    "harbour",
    "lantern",
    "report",
    "committee",
    "orchard",
    "1987",
    "was",
    "in",
    "a",
    "station",
    "signal",
    "archive",
    "north",
    "ferry",
    "granite",
    "quarry",
    "village",
    "market",
    "Thursday",
    "evening",
    "library",
    "clock",
];

fn text(rng: &mut SplitMix64, words: usize) -> String {
    let mut s = String::with_capacity(words * 7);
    for i in 0..words {
        s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        s.push(if i % 17 == 16 { '.' } else { ' ' });
    }
    s
}

/// 400 LongBench-format records of about 25 KB each (~10 MB).
fn corpus() -> &'static str {
    static C: OnceLock<String> = OnceLock::new();
    C.get_or_init(|| {
        let mut r = SplitMix64::new(1);
        (0..400)
            .map(|i| {
                serde_json::json!({
                    "input": "What did the committee decide?", "context": text(&mut r, 3500 + (i % 7) * 100),
                    "answers": ["to rebuild the bridge"], "length": 3500, "dataset": "hotpotqa",
                    "language": "en", "all_classes": null, "_id": format!("r{i:04}"),
                })
                .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn fields() -> Fields {
    Fields {
        id: Some("_id".into()),
        question: Some("input".into()),
        context: "context".into(),
        answers: "answers".into(),
        meta: vec!["length".into(), "dataset".into()],
        extra: Default::default(),
        group: None,
    }
}

#[divan::bench(sample_count = 20)]
fn load_records_jsonl_10mb(b: divan::Bencher) {
    let c = corpus();
    let f = fields();
    b.counter(BytesCount::new(c.len())).bench(|| {
        let mut col = Collector::new(&f, "fail").unwrap();
        col.jsonl("bench.jsonl", c, "bench").unwrap();
        assert_eq!(col.out.examples.len(), 400);
    });
}

fn contexts() -> Vec<String> {
    let f = fields();
    let mut col = Collector::new(&f, "fail").unwrap();
    col.jsonl("bench.jsonl", corpus(), "bench").unwrap();
    col.out.examples.into_iter().map(|e| e.context).collect()
}

fn count_bench(b: divan::Bencher, tok: kvt::data::tokenize::Tok) {
    let ctx = contexts();
    let refs: Vec<&str> = ctx.iter().map(String::as_str).collect();
    let bytes: usize = refs.iter().map(|s| s.len()).sum();
    let total: usize = tok.count_many(&refs, None).unwrap().iter().sum();
    b.counter(BytesCount::new(bytes))
        .counter(ItemsCount::new(total))
        .bench(|| tok.count_many(&refs, None).unwrap());
}

#[divan::bench(sample_count = 10)]
fn count_tokens_cl100k(b: divan::Bencher) {
    count_bench(b, kvt::data::tokenize::Tok::Tiktoken("cl100k_base".into()));
}

/// The same texts through tiktoken_rs's own encoder (regex split), for the
/// pre-tokenizer's gain.
#[divan::bench(sample_count = 10)]
fn count_tokens_cl100k_tiktoken_rs(b: divan::Bencher) {
    let t = kvt::data::tokenize::encoding("cl100k_base").unwrap();
    let ctx = contexts();
    let refs: Vec<&str> = ctx.iter().map(String::as_str).collect();
    let bytes: usize = refs.iter().map(|s| s.len()).sum();
    b.counter(BytesCount::new(bytes))
        .bench(|| kvt::data::tokenize::count_many(t, &refs));
}

#[divan::bench(sample_count = 10)]
fn count_tokens_o200k(b: divan::Bencher) {
    count_bench(b, kvt::data::tokenize::Tok::Tiktoken("o200k_base".into()));
}

/// The same texts through tiktoken_rs's own encoder (regex split), for the
/// pre-tokenizer's gain.
#[divan::bench(sample_count = 10)]
fn count_tokens_o200k_tiktoken_rs(b: divan::Bencher) {
    let t = kvt::data::tokenize::encoding("o200k_base").unwrap();
    let ctx = contexts();
    let refs: Vec<&str> = ctx.iter().map(String::as_str).collect();
    let bytes: usize = refs.iter().map(|s| s.len()).sum();
    b.counter(BytesCount::new(bytes))
        .bench(|| kvt::data::tokenize::count_many(t, &refs));
}

#[divan::bench(sample_count = 10)]
fn count_tokens_hf_wordlevel(b: divan::Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(
        &path,
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "the": 1}, "unk_token": "[UNK]"}
        })
        .to_string(),
    )
    .unwrap();
    let cfg = kvt::config::schema::Tokenizer {
        kind: kvt::config::schema::TokenizerKind::Hf,
        name: path.display().to_string(),
        url: None,
    };
    count_bench(
        b,
        kvt::data::tokenize::Tok::load(&cfg, dir.path(), None).unwrap(),
    );
}

fn project(files: &[(&str, String)], exp: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(root.join("config/experiments")).unwrap();
    std::fs::copy(
        repo.join("config/default.yaml"),
        root.join("config/default.yaml"),
    )
    .unwrap();
    std::fs::write(root.join("config/experiments/b.yaml"), exp).unwrap();
    for (rel, text) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    (dir, root)
}

/// `kvt build prepare --force prepare` on a 10 MB LongBench-format file: read,
/// parse, count tokens (cl100k), bin, sample, write Parquet and the manifest.
#[divan::bench(sample_count = 10)]
fn prepare_process_longbench_10mb(b: divan::Bencher) {
    let (_d, root) = project(
        &[("data/raw/longbench/data/hotpotqa.jsonl", corpus().to_string())],
        "output: {exp_group_id: b}\ndataset: {name: longbench, source: longbench, task: hotpotqa}\nbinning: {n_bins: 5}\nsampling: {n_per_bin: 20}\n",
    );
    b.counter(BytesCount::new(corpus().len())).bench(|| {
        let ok = Command::new(env!("CARGO_BIN_EXE_kvt"))
            .current_dir(&root)
            .args([
                "build",
                "prepare",
                "-q",
                "-c",
                "config/experiments/b.yaml",
                "--force",
                "prepare",
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    });
}

/// 21 LongBench tasks, 4,750 predictions in LongBench's `pred/` format.
fn preds_dir() -> &'static Path {
    static D: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &D.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let mut r = SplitMix64::new(3);
        let zh = |r: &mut SplitMix64, n: usize| -> String {
            let chars: Vec<char> = "我们去北京上海天气很好今天明天的了是在有人这个中国大学，。".chars().collect();
            (0..n).map(|_| chars[r.below(chars.len() as u64) as usize]).collect()
        };
        let tasks = kvt::metrics::longbench::TASKS;
        for (k, (task, metric)) in tasks.iter().enumerate() {
            let n = if k < 4 { 230 } else { 226 };
            let mut lines = Vec::new();
            for i in 0..n {
                let (pred, gold) = match *metric {
                    "rouge_score" => (text(&mut r, 300), text(&mut r, 350)),
                    "rouge_zh_score" => (zh(&mut r, 300), zh(&mut r, 300)),
                    "qa_f1_zh_score" => (zh(&mut r, 30), zh(&mut r, 10)),
                    "code_sim_score" => (format!("    x = foo({i})\n"), format!("    x = foo({})", i + 1)),
                    "retrieval_score" => (format!("Paragraph {}", i % 30), format!("Paragraph {}", i % 29)),
                    "retrieval_zh_score" => (format!("段落{}", i % 30), format!("段落{}", i % 29)),
                    "count_score" => (format!("{}", i % 20), format!("{}", i % 19)),
                    _ => (text(&mut r, 12), text(&mut r, 4)),
                };
                lines.push(
                    serde_json::json!({"pred": pred, "answers": [gold], "all_classes": ["Location", "Entity", "Human being"], "length": 1000 + i * 50})
                        .to_string(),
                );
            }
            std::fs::write(root.join(format!("{task}.jsonl")), lines.join("\n")).unwrap();
        }
        (dir, root)
    })
    .1
}

#[divan::bench(sample_count = 10)]
fn eval_preds_dir_21_tasks_4750_predictions(b: divan::Bencher) {
    let dir = preds_dir();
    b.counter(ItemsCount::new(4750usize)).bench(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_kvt"))
            .args(["eval-preds", "--dir"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success());
    });
}

/// 5,000 rows of `infer`'s `responses` artifact (a short answer, usage,
/// timings) written as Parquet: the table writer as `infer` uses it.
#[divan::bench(sample_count = 10)]
fn table_write_5000_responses(b: divan::Bencher) {
    let rows: Vec<kvt::stages::infer::ResponseRow> = (0..5000)
        .map(|i| kvt::stages::infer::ResponseRow {
            example_id: format!("r{i}"),
            request_key: format!("{i:064x}"),
            truncated_from: None,
            outcome: kvt::llm::Outcome {
                text: "42".into(),
                finish_reason: Some("stop".into()),
                prompt_tokens: Some(500),
                completion_tokens: Some(1),
                latency_ms: i as f64 * 0.01,
                http_status: Some(200),
                is_final: true,
                ..Default::default()
            },
        })
        .collect();
    b.counter(ItemsCount::new(rows.len()))
        .bench(|| kvt::table::write(&rows).unwrap());
}
