//! Engine benchmarks: a no-op `build` as a whole process (50 and 200 nodes),
//! node-key computation, and content-store writes.
//! Run: `cargo build --release -p kvt-testops && cargo bench --bench engine`
//! (the whole-process bench drives the `kvt-testops` crate's binary).
//! Figures go in benches/README.md.

use std::path::Path;
use std::process::Command;

fn main() {
    divan::main();
}

/// A project whose pipeline has `n` nodes: read + (n - 2) scale instances + count.
fn project(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(root.join("config/experiments")).unwrap();
    std::fs::create_dir_all(root.join("pipelines")).unwrap();
    std::fs::copy(
        repo.join("config/default.yaml"),
        root.join("config/default.yaml"),
    )
    .unwrap();
    std::fs::write(
        root.join("pipelines/bench.yaml"),
        "stages:\n  read: {op: t_read, uses: [dataset.path]}\n  scale: {op: t_scale, needs: [read], uses: [model.name], foreach: {budget: kv.budgets}}\n  count: {op: t_count, needs: [scale], uses: [analysis.bootstrap.iters]}\n",
    )
    .unwrap();
    let budgets: Vec<String> = (1..=n - 2)
        .map(|i| format!("{:.4}", i as f64 / (n - 2) as f64))
        .collect();
    std::fs::write(
        root.join("config/experiments/bench.yaml"),
        format!(
            "pipeline: bench\ndataset:\n  path: input.txt\nkv:\n  budgets: [{}]\noutput:\n  exp_group_id: bench\n",
            budgets.join(", ")
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("input.txt"),
        "lorem ipsum dolor sit amet ".repeat(1000),
    )
    .unwrap();
    let status = build(root);
    assert!(status.success());
    dir
}

/// `kvt-testops`, built by `cargo build --release -p kvt-testops` beside the
/// bench binary's target directory (its own crate: test ops are never
/// installed with kvt).
fn testops() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("kvt-testops");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p kvt-testops` first",
        bin.display()
    );
    bin
}

fn build(root: &Path) -> std::process::ExitStatus {
    Command::new(testops())
        .current_dir(root)
        .args(["build", "-q", "-c", "config/experiments/bench.yaml"])
        .status()
        .unwrap()
}

#[divan::bench(args = [10, 50, 200], sample_count = 30)]
fn noop_build_process(bencher: divan::Bencher, nodes: usize) {
    let dir = project(nodes);
    bencher.bench(|| assert!(build(dir.path()).success()));
}

#[divan::bench]
fn node_key(bencher: divan::Bencher) {
    use kvt::engine::digest::Digest;
    use std::collections::BTreeMap;
    let mut slice = BTreeMap::new();
    slice.insert(
        "analysis.bootstrap".to_string(),
        serde_json::json!({"iters": 1000, "seed": 0, "ci": 0.95}),
    );
    slice.insert("foreach.budget".to_string(), serde_json::json!(0.5));
    let inputs: BTreeMap<String, Digest> = (0..8)
        .map(|i| (format!("score[budget={i}]/scores"), Digest::of(&[i as u8])))
        .collect();
    bencher.bench(|| kvt::engine::state::node_key("analyze", 1, &slice, None, &inputs));
}

const MIB: usize = 1 << 20;

#[divan::bench(counter = divan::counter::BytesCount::new(16 * MIB))]
fn hash_16mib(bencher: divan::Bencher) {
    let data = vec![7u8; 16 * MIB];
    bencher.bench(|| kvt::engine::Digest::of(&data));
}

#[divan::bench(counter = divan::counter::BytesCount::new(4 * MIB), sample_count = 20)]
fn store_put_4mib(bencher: divan::Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let store = kvt::engine::ContentStore::new(dir.path());
    let mut data = vec![0u8; 4 * MIB];
    let mut n = 0u64;
    bencher.bench_local(|| {
        n += 1;
        data[..8].copy_from_slice(&n.to_le_bytes());
        store.put(&data).unwrap()
    });
}
