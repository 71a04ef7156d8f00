//! LongBench-format data through every discovery path, broken records, the
//! generic JSONL/Parquet loader, and a report scored with the task's metric.
//! The fixtures are written here, in LongBench's record format.

mod common;
use common::*;
use serde_json::json;
use std::io::Write;
use std::sync::Arc;

/// A hotpotqa-style record with a context of about `words` words.
fn record(id: &str, words: usize, answer: &str) -> String {
    let filler = "The river ran past the old mill and under the stone bridge. ";
    let n = words / 12 + 1;
    let context = format!(
        "Passage 1: {}The town of Alderby is known for its {answer}. {}",
        filler.repeat(n / 2),
        filler.repeat(n - n / 2)
    );
    json!({
        "input": "What is the town of Alderby known for?",
        "context": context,
        "answers": [answer],
        "length": words,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": null,
        "_id": id,
    })
    .to_string()
}

fn hotpotqa_jsonl() -> String {
    let answers = ["cheese", "bells", "ferries", "kites", "lanterns", "clocks"];
    (0..12)
        .map(|i| record(&format!("hp{i:02}"), 200 + 150 * i, answers[i % 6]))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn zip_bytes(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, text) in entries {
            z.start_file(*name, opts).unwrap();
            z.write_all(text.as_bytes()).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// A Parquet file shaped like Hugging Face's conversion: string columns and
/// list-of-string answers.
fn parquet_bytes(text: &str) -> Vec<u8> {
    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    let recs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let col = |k: &str| -> ArrayRef {
        Arc::new(StringArray::from(
            recs.iter()
                .map(|r| r[k].as_str().map(str::to_string))
                .collect::<Vec<_>>(),
        ))
    };
    let mut answers = ListBuilder::new(StringBuilder::new());
    for r in &recs {
        for a in r["answers"].as_array().unwrap() {
            answers.values().append_value(a.as_str().unwrap());
        }
        answers.append(true);
    }
    let length: ArrayRef = Arc::new(Int64Array::from(
        recs.iter()
            .map(|r| r["length"].as_i64().unwrap())
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_from_iter(vec![
        ("input", col("input")),
        ("context", col("context")),
        ("answers", Arc::new(answers.finish()) as ArrayRef),
        ("length", length),
        ("dataset", col("dataset")),
        ("_id", col("_id")),
    ])
    .unwrap();
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    buf
}

const EXP: &str = "\
output: {exp_group_id: lb}
dataset: {name: longbench, source: longbench, task: hotpotqa}
binning: {n_bins: 2}
sampling: {n_per_bin: 6}
engine: {kind: reference}
kv: {policies: [snapkv], budgets: [1.0, 0.5]}
analysis: {bootstrap: {iters: 100}}
";

fn project() -> Project {
    let p = Project::new();
    p.write("config/experiments/lb.yaml", EXP);
    p
}

fn prepare(p: &Project, args: &[&str], env: &[(&str, &std::path::Path)]) -> std::process::Output {
    let mut c = p.kvt();
    c.args(["build", "prepare", "-c", "config/experiments/lb.yaml"])
        .args(args);
    c.env_remove("HF_HOME").env_remove("HF_HUB_CACHE");
    c.env("HOME", p.path("home"));
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn manifest(p: &Project) -> serde_json::Value {
    serde_json::from_str(&p.manifest("longbench__hotpotqa")).unwrap()
}

#[test]
fn every_discovery_path_loads_the_same_records() {
    let data = hotpotqa_jsonl();
    let zip = zip_bytes(&[("data/hotpotqa.jsonl", &data), ("data/trec.jsonl", "")]);
    let check = |p: &Project, out: std::process::Output, location: &str| {
        assert!(out.status.success(), "{location}: {}", stderr_of(&out));
        let m = manifest(p);
        assert_eq!(m["dataset"]["n_loaded"], 12, "{location}");
        assert_eq!(m["dataset"]["location"], location);
        assert_eq!(m["entries"].as_array().unwrap().len(), 12);
    };

    // 1. The project's data/raw/longbench/data/<task>.jsonl.
    let p = project();
    p.write("data/raw/longbench/data/hotpotqa.jsonl", &data);
    check(&p, prepare(&p, &[], &[]), "hotpotqa.jsonl");

    // 2. An explicit data.zip.
    let p = project();
    std::fs::create_dir_all(p.path("dl")).unwrap();
    std::fs::write(p.path("dl/data.zip"), &zip).unwrap();
    check(
        &p,
        prepare(&p, &["--set", "dataset.path=dl/data.zip"], &[]),
        "data.zip!data/hotpotqa.jsonl",
    );

    // 3. The Hugging Face hub cache (HF_HUB_CACHE).
    let p = project();
    let snap = p.path("hub/datasets--THUDM--LongBench/snapshots/0a1b2c");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("data.zip"), &zip).unwrap();
    check(
        &p,
        prepare(&p, &[], &[("HF_HUB_CACHE", &p.path("hub"))]),
        "data.zip!data/hotpotqa.jsonl",
    );

    // 4. HF_HOME: hub under it, and the datasets library's extracted downloads.
    let p = project();
    p.write(
        "hf/datasets/downloads/extracted/9f8e7d/data/hotpotqa.jsonl",
        &data,
    );
    check(
        &p,
        prepare(&p, &[], &[("HF_HOME", &p.path("hf"))]),
        "hotpotqa.jsonl",
    );

    // 5. Parquet conversions: <task>/test/*.parquet.
    let p = project();
    std::fs::create_dir_all(p.path("pq/hotpotqa/test")).unwrap();
    std::fs::write(
        p.path("pq/hotpotqa/test/0000.parquet"),
        parquet_bytes(&data),
    )
    .unwrap();
    check(
        &p,
        prepare(&p, &["--set", "dataset.path=pq"], &[]),
        "0000.parquet",
    );

    // Nothing anywhere: exit 2 and every place looked at.
    let p = project();
    let out = prepare(&p, &[], &[("HF_HUB_CACHE", &p.path("nohub"))]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("`hotpotqa` not found")
            && err.contains("data/raw/longbench")
            && err.contains("nohub"),
        "{err}"
    );
    // Task names are exact.
    p.write("data/raw/longbench/data/hotpotqa.jsonl", &data);
    let out = prepare(&p, &["--set", "dataset.task=HotpotQA"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn datasets_lists_tasks_found() {
    let p = project();
    p.write("data/raw/longbench/data/hotpotqa.jsonl", &hotpotqa_jsonl());
    p.write("data/raw/longbench/data/trec_e.jsonl", "");
    let out = p
        .kvt()
        .arg("datasets")
        .env("HOME", p.path("home"))
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = stdout_of(&out);
    assert!(
        text.contains("hotpotqa") && text.contains("trec_e"),
        "{text}"
    );
}

#[test]
fn broken_records_fail_with_file_line_or_are_skipped_and_counted() {
    let p = project();
    let mut lines: Vec<String> = hotpotqa_jsonl().lines().map(str::to_string).collect();
    lines[3] = "{\"input\": \"q\", \"context\": ".to_string();
    lines[5] = json!({"_id": "nofield", "context": "c", "answers": ["a"]}).to_string();
    p.write(
        "data/raw/longbench/data/hotpotqa.jsonl",
        &(lines.join("\n") + "\n"),
    );
    let out = prepare(&p, &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("hotpotqa.jsonl:4")
            && err.contains("not valid JSON")
            && err.contains("on_bad_record"),
        "{err}"
    );

    // Skipped and counted, in the manifest, the report and the SQLite file.
    let out = p
        .kvt()
        .args([
            "build",
            "report",
            "-c",
            "config/experiments/lb.yaml",
            "--set",
            "dataset.on_bad_record=skip",
        ])
        .env("HOME", p.path("home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(manifest(&p)["dataset"]["n_skipped_records"], 2);
    assert!(p
        .read("runs/lb/report.md")
        .contains("10 records loaded, 2 bad records skipped"));
    let c = rusqlite::Connection::open(p.path("runs/lb/kv_transition.sqlite")).unwrap();
    let n: i64 = c
        .query_row("SELECT n_skipped_records FROM datasets", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);

    // Duplicate ids and empty contexts are errors that name the line.
    let mut dup: Vec<String> = hotpotqa_jsonl().lines().map(str::to_string).collect();
    dup[7] = dup[2].clone();
    p.write("data/raw/longbench/data/hotpotqa.jsonl", &dup.join("\n"));
    let err = stderr_of(&prepare(&p, &[], &[]));
    assert!(
        err.contains("hotpotqa.jsonl:8") && err.contains("duplicate example id `hp02`"),
        "{err}"
    );
    p.write(
        "data/raw/longbench/data/hotpotqa.jsonl",
        &json!({"_id": "e", "input": "q", "context": "", "answers": ["a"]}).to_string(),
    );
    let err = stderr_of(&prepare(&p, &[], &[]));
    assert!(
        err.contains("hotpotqa.jsonl:1") && err.contains("empty"),
        "{err}"
    );
    // An empty file: no examples.
    p.write("data/raw/longbench/data/hotpotqa.jsonl", "\n");
    let err = stderr_of(&prepare(&p, &[], &[]));
    assert!(err.contains("no examples"), "{err}");
}

#[test]
fn report_on_longbench_data_uses_the_task_metric() {
    let p = project();
    p.write("data/raw/longbench/data/hotpotqa.jsonl", &hotpotqa_jsonl());
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/lb.yaml"])
        .env("HOME", p.path("home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report = p.read("runs/lb/report.md");
    assert!(report.contains("metric `qa_f1_score`"), "{report}");
    // The data file enters the key: editing it reruns prepare.
    let mut data = hotpotqa_jsonl();
    data.push_str(&record("hp99", 300, "owls"));
    p.write("data/raw/longbench/data/hotpotqa.jsonl", &data);
    let out = p
        .kvt()
        .args(["build", "prepare", "-c", "config/experiments/lb.yaml"])
        .env("HOME", p.path("home"))
        .output()
        .unwrap();
    assert!(
        built_nodes(&out).contains(&"prepare".to_string()),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(manifest(&p)["dataset"]["n_loaded"], 13);
}

#[test]
fn any_jsonl_or_parquet_with_a_field_mapping() {
    let p = project();
    let rows: Vec<String> = (0..6)
        .map(|i| {
            json!({"q": format!("Where is item {i}?"), "doc": format!("Item {i} is in box {}. ", i * 7).repeat(20 + i * 10), "gold": format!("box {}", i * 7)})
                .to_string()
        })
        .collect();
    p.write("mine/set.jsonl", &rows.join("\n"));
    let mapping = [
        "--set",
        "dataset.source=file",
        "--set",
        "dataset.name=mine",
        "--set",
        "dataset.task=set",
        "--set",
        "dataset.fields={id: null, question: q, context: doc, answers: gold, meta: []}",
    ];
    let mut args = vec!["--set", "dataset.path=mine/set.jsonl"];
    args.extend(mapping);
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/lb.yaml"])
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let m: serde_json::Value = serde_json::from_str(&p.manifest("mine__set")).unwrap();
    assert_eq!(m["dataset"]["n_loaded"], 6);
    assert_eq!(
        m["examples"][0]["example_id"]
            .as_str()
            .unwrap()
            .split('-')
            .next(),
        Some("set")
    );
    assert!(p.read("runs/lb/report.md").contains("metric `qa_f1_score`"));
    // A mapped field that is missing names the field and the mapping key.
    let mut bad = args.clone();
    bad.extend(["--set", "dataset.fields.question=query"]);
    let out = p
        .kvt()
        .args(["build", "prepare", "-c", "config/experiments/lb.yaml"])
        .args(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("set.jsonl:1")
            && err.contains("`query`")
            && err.contains("dataset.fields.question"),
        "{err}"
    );
}
