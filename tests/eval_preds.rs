//! `kvt eval-preds` on prediction files in LongBench's `pred/` format.

mod common;
use common::*;

fn kvt(p: &Project, args: &[&str]) -> std::process::Output {
    p.kvt().arg("eval-preds").args(args).output().unwrap()
}

fn line(pred: &str, answers: &[&str], length: i64) -> String {
    serde_json::json!({"pred": pred, "answers": answers, "all_classes": null, "length": length})
        .to_string()
}

#[test]
fn a_file_a_directory_buckets_and_json() {
    let p = Project::new();
    // hotpotqa (qa_f1): 1.0, 0.0, 2/3 (pred "London Paris" vs "Paris") → 100·(5/3)/3 = 55.56.
    p.write(
        "pred/hotpotqa.jsonl",
        &[
            line("Paris.", &["Paris"], 1000),
            line("Rome", &["Paris"], 5000),
            line("London Paris", &["Paris", "Lyon"], 9000),
        ]
        .join("\n"),
    );
    // passage_count: 1.0 and 0.5 → 75.00; a blank line is ignored.
    p.write(
        "pred/passage_count.jsonl",
        &format!(
            "{}\n\n{}\n",
            line("7", &["7"], 100),
            line("7 or 8", &["7"], 100)
        ),
    );
    p.write("pred/notes.jsonl", "{}\n");

    let out = kvt(&p, &["--task", "hotpotqa", "pred/hotpotqa.jsonl"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.contains("hotpotqa") && text.contains("qa_f1_score") && text.contains("55.56"),
        "{text}"
    );

    let out = kvt(&p, &["--dir", "pred", "--json"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"hotpotqa": 55.56, "passage_count": 75.0})
    );

    let out = kvt(&p, &["--dir", "pred", "--json", "--by-length"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["hotpotqa"],
        serde_json::json!({"0-4k": 100.0, "4-8k": 0.0, "8k+": 66.67})
    );
    assert_eq!(v["passage_count"]["4-8k"], serde_json::Value::Null);
    // The table form names the buckets.
    let out = kvt(&p, &["--dir", "pred", "--by-length"]);
    assert!(stdout_of(&out).contains("0-4k"));
}

#[test]
fn bad_input_names_the_file_and_line_and_exits_2() {
    let p = Project::new();
    p.write(
        "hotpotqa.jsonl",
        &format!("{}\n{{\"pred\": \"x\"}}\n", line("a", &["a"], 1)),
    );
    let out = kvt(&p, &["hotpotqa.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("hotpotqa.jsonl:2"),
        "{}",
        stderr_of(&out)
    );

    p.write("x.jsonl", &line("a", &["a"], 1));
    let out = kvt(&p, &["--task", "HotpotQA", "x.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("unknown LongBench task `HotpotQA`"));
    let out = kvt(&p, &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = kvt(&p, &["--dir", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn custom_length_buckets_and_the_levenshtein_code_similarity() {
    let p = Project::new();
    p.write(
        "pred/hotpotqa.jsonl",
        &[
            line("Paris.", &["Paris"], 1000),
            line("Rome", &["Paris"], 2500),
            line("London Paris", &["Paris", "Lyon"], 9000),
            line("Paris", &["Paris"], 20000),
        ]
        .join("\n"),
    );
    let out = kvt(&p, &["--dir", "pred", "--json", "--by-length=0,2k,4k,16k"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["hotpotqa"],
        serde_json::json!({"0-2k": 100.0, "2-4k": 0.0, "4-16k": 66.67, "16k+": 100.0})
    );
    let out = kvt(&p, &["--dir", "pred", "--by-length=0,1500,3000"]);
    let text = stdout_of(&out);
    assert!(
        text.contains("0-1500") && text.contains("1500-3000") && text.contains("3000+"),
        "{text}"
    );
    for bad in [
        "--by-length=100,4k",
        "--by-length=0,8k,4k",
        "--by-length=0,x",
    ] {
        let out = kvt(&p, &["--dir", "pred", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(stderr_of(&out).contains(bad), "{bad}: {}", stderr_of(&out));
    }

    // The two fuzzywuzzy backends: difflib finds the block "abc" and nothing
    // beside it (6/13 → 46), python-Levenshtein's LCS is "bcbc" (1 − 5/13 → 62).
    p.write("lcc.jsonl", &line("abcxyzbc", &["bcabc"], 100));
    let score = |args: &[&str]| -> serde_json::Value {
        let out = kvt(&p, &[&["lcc.jsonl", "--json"], args].concat());
        assert!(out.status.success(), "{}", stderr_of(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["lcc"].clone()
    };
    assert_eq!(score(&[]), serde_json::json!(46.0));
    assert_eq!(score(&["--code-sim", "difflib"]), serde_json::json!(46.0));
    assert_eq!(
        score(&["--code-sim", "levenshtein"]),
        serde_json::json!(62.0)
    );
    let out = kvt(&p, &["lcc.jsonl", "--code-sim", "rapidfuzz"]);
    assert_eq!(out.status.code(), Some(2));
}
