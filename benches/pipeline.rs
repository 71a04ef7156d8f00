//! Pipeline benchmarks: the bootstrap, the analysis as a function, and whole
//! `kvt` processes for the demo's no-op and analysis-only rebuilds.
//! Run: `cargo bench --bench pipeline`. Figures go in benches/README.md.

use kvt::config::schema::{Analysis, Bootstrap, KvGeometry, Transition};
use kvt::data::SplitMix64;
use kvt::stages::prepare::Bin;
use kvt::stages::score::ScoreRow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

fn main() {
    divan::main();
}

/// 25 cells × 200 examples × 10,000 resamples, cells spread over the cores
/// as `analyze` does.
#[divan::bench]
fn bootstrap_25_cells_200_examples_10000_resamples(b: divan::Bencher) {
    let cells: Vec<Vec<f64>> = (0..25)
        .map(|c| {
            let mut r = SplitMix64::new(c);
            (0..200).map(|_| (r.unit() < 0.7) as u8 as f64).collect()
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    b.bench(|| {
        std::thread::scope(|s| {
            let hs: Vec<_> = cells
                .chunks(cells.len().div_ceil(threads))
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .enumerate()
                            .map(|(i, v)| {
                                kvt::stats::bootstrap_ci(
                                    v,
                                    10_000,
                                    0.95,
                                    &mut SplitMix64::for_cell(0, &i.to_string()),
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    });
}

fn rows(budgets: &[f64], bins: i64, per_bin: i64) -> (Vec<Bin>, Vec<ScoreRow>) {
    let bin_rows: Vec<Bin> = (0..bins)
        .map(|b| Bin {
            bin_idx: b,
            lo: b * 1000,
            hi: (b + 1) * 1000,
            n_available: per_bin,
            n_selected: per_bin,
        })
        .collect();
    let mut r = SplitMix64::new(9);
    let mut out = Vec::new();
    for &budget in budgets {
        for b in 0..bins {
            for i in 0..per_bin {
                let score = (r.unit() < budget) as u8 as f64;
                out.push(ScoreRow {
                    example_id: format!("e{b}-{i}"),
                    bin_idx: b,
                    token_len: b * 1000 + i,
                    policy: "snapkv".into(),
                    budget,
                    request_key: String::new(),
                    metric: "substring_recall".into(),
                    score,
                    em: score,
                    f1: score,
                    recall: score,
                    failure: None,
                    truncated_from: None,
                    turn: None,
                    probs: Default::default(),
                    response: kvt::llm::Outcome {
                        finish_reason: Some("stop".into()),
                        latency_ms: r.unit() * 100.0,
                        ttft_ms: Some(r.unit() * 10.0),
                        prompt_tokens: Some(1000),
                        completion_tokens: Some(3),
                        retained_tokens: Some((1000.0 * budget) as u64),
                        is_final: true,
                        ..Default::default()
                    },
                });
            }
        }
    }
    (bin_rows, out)
}

/// The analysis as a function: 3 budgets × 5 bins × 200 examples, B = 2000
/// (mean CI and paired-delta CI per cell, Wilson, percentiles, transitions).
#[divan::bench]
fn analyze_3_budgets_5_bins_200_examples_b2000(b: divan::Bencher) {
    let (bins, scores) = rows(&[1.0, 0.5, 0.2], 5, 200);
    let scores: Vec<kvt::stages::score::ScoreCell> = scores.iter().map(Into::into).collect();
    let a = Analysis {
        bootstrap: Bootstrap {
            iters: 2000,
            seed: 0,
            ci: 0.95,
        },
        transition: Transition {
            delta: 0.1,
            floor: 0.1,
        },
        fidelity: Default::default(),
        splits: Default::default(),
        selective: Default::default(),
    };
    let g = KvGeometry {
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
        bytes_per_elem: 2,
    };
    b.bench(|| kvt::stages::analyze::analyze(&bins, &scores, &a, &g).unwrap());
}

/// A project with the demo's shape at 3 budgets × 5 bins × 200 examples
/// (in-process engine), built once.
fn demo_project() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir_all(root.join("config/experiments")).unwrap();
        std::fs::copy(
            repo.join("config/default.yaml"),
            root.join("config/default.yaml"),
        )
        .unwrap();
        std::fs::write(
            root.join("config/experiments/b.yaml"),
            "output: {exp_group_id: b}\n\
             dataset: {lengths: [512, 1024, 2048, 4096, 8192], per_length: 200}\n\
             binning: {n_bins: 5, edges: [0, 768, 1536, 3072, 6144, 12288]}\n\
             sampling: {n_per_bin: 200}\n\
             engine: {kind: reference}\n\
             kv: {policies: [snapkv], budgets: [1.0, 0.5, 0.2]}\n",
        )
        .unwrap();
        let ok = kvt_cmd(&root).status().unwrap().success();
        assert!(ok, "setup build failed");
        (dir, root)
    })
    .1
}

fn kvt_cmd(root: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvt"));
    c.current_dir(root)
        .args(["build", "report", "-q", "-c", "config/experiments/b.yaml"]);
    c
}

/// `kvt build report` with everything fresh, as a whole process.
#[divan::bench(sample_count = 20)]
fn demo_noop_rebuild_process(b: divan::Bencher) {
    let root = demo_project();
    b.bench(|| assert!(kvt_cmd(root).status().unwrap().success()));
}

/// A new `analysis.bootstrap.iters` each time: analyze, plots, sqlite and
/// report rerun (zero requests), as a whole process.
#[divan::bench(sample_count = 10)]
fn demo_analysis_only_rebuild_process(b: divan::Bencher) {
    static ITERS: AtomicU32 = AtomicU32::new(2000);
    let root = demo_project();
    b.bench(|| {
        let iters = ITERS.fetch_add(1, Ordering::Relaxed);
        let ok = kvt_cmd(root)
            .args(["--set", &format!("analysis.bootstrap.iters={iters}")])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    });
}
