//! Where the cache lives and what it holds beside the content store: each test
//! is named for a finding of the trust review (issue #10), through the real
//! binary, a real SQLite journal and real files.

mod common;
use common::*;

const SMALL: &str = "\
output: {exp_group_id: small}
dataset: {lengths: [256, 512], per_length: 3}
binning: {n_bins: 2}
sampling: {n_per_bin: 3}
engine: {kind: reference}
kv: {policies: [streaming], budgets: [1.0, 0.5]}
analysis: {bootstrap: {iters: 100}}
";

fn project() -> Project {
    let p = Project::new();
    // Only kvt's own pipeline here (`gc` reads every experiment).
    std::fs::remove_file(p.path("config/experiments/t.yaml")).unwrap();
    p.write("config/experiments/small.yaml", SMALL);
    p
}

fn build(p: &Project, config: &str, extra_env: &[(&str, &str)]) -> std::process::Output {
    let mut c = p.kvt();
    c.args(["build", "report", "-c", config]);
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn journal_rows(path: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(path).unwrap();
    db.query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn cache_commands_honour_cache_dir_and_kvt_cache_dir() {
    let p = project();
    let defaults = p.read("config/default.yaml");
    assert!(
        defaults.contains("dir: cache"),
        "default.yaml changed shape"
    );
    p.write(
        "config/default.yaml",
        &defaults.replace("dir: cache", "dir: store"),
    );
    let out = build(&p, "config/experiments/small.yaml", &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(p.path("store/v1/objects").is_dir());
    assert!(!p.path("cache").exists());
    for cmd in [&["cache", "du"][..], &["cache", "verify"], &["cache", "gc"]] {
        let out = p.kvt().args(cmd).output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", stderr_of(&out));
        assert!(!p.path("cache").exists(), "{cmd:?} looked in cache/");
    }
    let du = stdout_of(&p.kvt().args(["cache", "du"]).output().unwrap());
    assert!(du.contains("store"), "{du}");
    assert!(!du.contains(" 0 objects"), "{du}");
    // KVT_CACHE_DIR wins over cache.dir for cache commands as for builds.
    let out = p
        .kvt()
        .args(["cache", "du"])
        .env("KVT_CACHE_DIR", "elsewhere")
        .output()
        .unwrap();
    assert!(stdout_of(&out).contains("elsewhere"), "{}", stdout_of(&out));
}

#[test]
fn the_journal_is_checkpointed_at_the_end_of_a_build() {
    let p = project();
    let out = build(&p, "config/experiments/small.yaml", &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let wal = p.path("cache/v1/journal.sqlite-wal");
    assert!(
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) == 0,
        "answers left in the write-ahead log"
    );
    // The journal file alone, copied elsewhere, holds every answer.
    let copy = p.path("copy.sqlite");
    std::fs::copy(p.path("cache/v1/journal.sqlite"), &copy).unwrap();
    // 6 examples: one full-cache request + one at 0.5 each.
    assert_eq!(journal_rows(&copy), 12);
}

#[test]
fn cache_du_counts_and_gc_max_age_shrinks_the_journal() {
    let p = project();
    assert!(build(&p, "config/experiments/small.yaml", &[])
        .status
        .success());
    let du = stdout_of(&p.kvt().args(["cache", "du"]).output().unwrap());
    assert!(du.contains("request journal:"), "{du}");
    // Answers from long ago besides the build's twelve, enough to fill pages.
    {
        let db = rusqlite::Connection::open(p.path("cache/v1/journal.sqlite")).unwrap();
        for i in 0..500 {
            db.execute(
                "INSERT INTO responses (request_key, is_final, attempts, outcome, recorded_at)
                 VALUES (?1, 1, 1, ?2, 0)",
                rusqlite::params![
                    format!("old-{i}"),
                    format!(
                        r#"{{"text":"{}","latency_ms":1.0,"retries":0,"is_final":true}}"#,
                        "x".repeat(400)
                    )
                ],
            )
            .unwrap();
        }
        // The build's own answers age by a minute (rather than the test
        // sleeping past `--max-age`).
        db.execute(
            "UPDATE responses SET recorded_at = recorded_at - 60 WHERE recorded_at > 0",
            [],
        )
        .unwrap();
        db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    let before = std::fs::metadata(p.path("cache/v1/journal.sqlite"))
        .unwrap()
        .len();
    let out = p
        .kvt()
        .args(["cache", "gc", "--max-age", "30s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stdout_of(&out).contains("512 journal answers"),
        "{}",
        stdout_of(&out)
    );
    assert_eq!(journal_rows(&p.path("cache/v1/journal.sqlite")), 0);
    let after = std::fs::metadata(p.path("cache/v1/journal.sqlite"))
        .unwrap()
        .len();
    assert!(after < before, "{after} >= {before}");
}

/// Overwrites the middle of a file with garbage (past SQLite's header page).
fn damage(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.len() > 4096,
        "{} is too small to damage",
        path.display()
    );
    let end = bytes.len().min(8192);
    for b in &mut bytes[100..end] {
        *b = 0xA5;
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn cache_verify_names_a_damaged_journal_and_token_count_database() {
    let p = project();
    assert!(build(&p, "config/experiments/small.yaml", &[])
        .status
        .success());
    damage(&p.path("cache/v1/journal.sqlite"));
    std::fs::write(p.path("cache/v1/token_counts.sqlite"), vec![0x5Au8; 16384]).unwrap();
    let out = p.kvt().args(["cache", "verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.contains("damaged: request journal") && text.contains("journal.sqlite"),
        "{text}"
    );
    assert!(
        text.contains("damaged: token-count cache") && text.contains("token_counts.sqlite"),
        "{text}"
    );
    // A build that needs the journal stops with the file and what to do; it
    // does not silently ask again.
    let out = p
        .kvt()
        .args([
            "build",
            "report",
            "-c",
            "config/experiments/small.yaml",
            "--force",
            "infer",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("journal.sqlite") && err.contains("damaged"),
        "{err}"
    );
}

#[test]
fn a_damaged_token_count_database_is_a_cache_miss() {
    let p = project();
    word_tokenizer(&p);
    std::fs::create_dir_all(p.path("cache/v1")).unwrap();
    std::fs::write(p.path("cache/v1/token_counts.sqlite"), vec![0x5Au8; 16384]).unwrap();
    let out = p
        .kvt()
        .args(["build", "prepare", "-c", "config/experiments/small.yaml"])
        .args([
            "--set",
            "tokenizer.kind=hf",
            "--set",
            "tokenizer.name=tok/tokenizer.json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("token-count cache"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn a_cache_on_another_filesystem_builds() {
    use std::os::unix::fs::MetadataExt;
    let p = project();
    let shm = std::path::Path::new("/dev/shm");
    let here = std::fs::metadata(p.root()).unwrap().dev();
    match std::fs::metadata(shm) {
        Ok(m) if m.is_dir() && m.dev() != here => {}
        _ => {
            eprintln!("skipped: /dev/shm is missing or on the project's filesystem");
            return;
        }
    }
    let cache = tempfile::tempdir_in(shm).unwrap();
    let out = build(
        &p,
        "config/experiments/small.yaml",
        &[("KVT_CACHE_DIR", cache.path().to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(p.path("runs/small/report.md").is_file());
    assert!(cache.path().join("v1/objects").is_dir());
    assert!(!p.path("cache").exists());
}

#[test]
fn two_experiments_sharing_a_dataset_name_alternate_noop_builds_with_zero_work() {
    let p = project();
    // Same dataset name and task, different sample: different prepared data.
    p.write(
        "config/experiments/other.yaml",
        &SMALL
            .replace("exp_group_id: small", "exp_group_id: other")
            .replace("n_per_bin: 3", "n_per_bin: 2"),
    );
    for c in ["small", "other"] {
        let out = build(&p, &format!("config/experiments/{c}.yaml"), &[]);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    assert_eq!(p.manifest_dirs("synthetic__needle").len(), 2);
    let stamp = |rel: &str| std::fs::metadata(p.path(rel)).unwrap().modified().unwrap();
    let dirs = p.manifest_dirs("synthetic__needle");
    let files: Vec<String> = dirs
        .iter()
        .map(|d| format!("data/processed/{d}/manifest.json"))
        .collect();
    let before: Vec<_> = files.iter().map(|f| stamp(f)).collect();
    for _ in 0..2 {
        for c in ["small", "other"] {
            let out = build(&p, &format!("config/experiments/{c}.yaml"), &[]);
            assert!(built_nodes(&out).is_empty(), "{}", stderr_of(&out));
        }
    }
    let after: Vec<_> = files.iter().map(|f| stamp(f)).collect();
    assert_eq!(before, after, "a no-op build rewrote an export");
}

/// A tokenizer.json counting whitespace-separated words (offline, tiny).
fn word_tokenizer(p: &Project) {
    p.write(
        "tok/tokenizer.json",
        &serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}
        })
        .to_string(),
    );
}

/// Issue #26, finding 1: bytes flipped inside stored counts (the SQLite file
/// stays well-formed) once moved examples to other bins. Now every row
/// carries a checksum: the damaged rows are recounted, the bins and the
/// report do not move, and `cache verify` names the damage.
#[test]
fn regression_flipped_bytes_in_the_token_count_cache_change_no_bin() {
    let p = project();
    word_tokenizer(&p);
    let hf = [
        "--set",
        "tokenizer.kind=hf",
        "--set",
        "tokenizer.name=tok/tokenizer.json",
    ];
    let run = |extra: &[&str]| {
        let out = p
            .kvt()
            .args(["build", "report", "-c", "config/experiments/small.yaml"])
            .args(hf)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        out
    };
    run(&[]);
    let manifest = p.manifest("synthetic__needle");
    let report = p.read("runs/small/report.md");
    let db_path = p.path("cache/v1/token_counts.sqlite");
    let digests: Vec<String> = {
        let db = rusqlite::Connection::open(&db_path).unwrap();
        let mut st = db.prepare("SELECT digest FROM counts2").unwrap();
        let rows = st.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert!(digests.len() >= 6, "{} counts stored", digests.len());
    // Flip the high byte of the stored count in each table row: the row is
    // digest (64 hex characters), count (a 2-byte integer), checksum (hex).
    let mut bytes = std::fs::read(&db_path).unwrap();
    let mut flipped = 0;
    for d in &digests {
        let needle = d.as_bytes();
        let mut at = 0;
        while let Some(i) = bytes[at..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + at)
        {
            let end = i + needle.len();
            at = end;
            let after = bytes.get(end + 2..end + 18).unwrap_or_default();
            if after.len() == 16 && after.iter().all(u8::is_ascii_hexdigit) {
                bytes[end] ^= 0x01;
                flipped += 1;
            }
        }
    }
    assert!(flipped >= 6, "only {flipped} counts found to flip");
    std::fs::write(&db_path, &bytes).unwrap();
    // The file is still well-formed SQLite, and the values did change.
    {
        let db = rusqlite::Connection::open(&db_path).unwrap();
        let ok: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
    let out = p.kvt().args(["cache", "verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.contains("damaged: token-count cache") && text.contains("fail their checksum"),
        "{text}"
    );
    let out = run(&["--force", "prepare"]);
    assert!(
        stderr_of(&out).contains("damaged entr"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(p.manifest("synthetic__needle"), manifest);
    assert_eq!(p.manifest_dirs("synthetic__needle").len(), 1);
    assert_eq!(p.read("runs/small/report.md"), report);
    // The recount rewrote the rows: the cache verifies clean again.
    let out = p.kvt().args(["cache", "verify"]).output().unwrap();
    assert!(out.status.success(), "{}", stdout_of(&out));
}

/// Flips one byte in the middle of every object in the store and puts each
/// file's modification time back, so the cheap freshness check passes.
fn corrupt_every_object_keeping_mtimes(p: &Project) -> usize {
    let objects = p.objects();
    for o in &objects {
        let mtime = std::fs::metadata(o).unwrap().modified().unwrap();
        let mut bytes = std::fs::read(o).unwrap();
        if bytes.is_empty() {
            continue;
        }
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x20;
        std::fs::write(o, &bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(o)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }
    objects.len()
}

/// Issue #26, finding 3: after damage that keeps file times, the first build
/// failed ("… is missing from the cache" after another node quarantined it,
/// or "… is corrupt" at `-j 1`) and it took 3–5 builds to heal. Now the
/// first build heals, at one job and at two, and gives the same report.
#[test]
fn regression_the_first_build_after_corruption_with_kept_mtimes_heals() {
    for jobs in ["1", "2"] {
        let p = project();
        let out = build(&p, "config/experiments/small.yaml", &[]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        // Node keys in the provenance may change (a rebuilt `infer` output
        // records when it was rebuilt); every result must not.
        let results = |p: &Project| {
            let r = p.read("runs/small/report.md");
            r[..r.find("## Provenance").unwrap()].to_string()
        };
        let report = results(&p);
        let n = corrupt_every_object_keeping_mtimes(&p);
        assert!(n > 10, "{n} objects");
        // Every export is written again (each fresh node reads its outputs)
        // and analysis runs again (reading its inputs).
        std::fs::remove_dir_all(p.path("runs")).unwrap();
        let out = p
            .kvt()
            .args(["build", "report", "-c", "config/experiments/small.yaml"])
            .args(["-j", jobs, "--force", "analyze"])
            .output()
            .unwrap();
        assert!(out.status.success(), "-j {jobs}: {}", stderr_of(&out));
        assert!(stderr_of(&out).contains("corrupt"), "{}", stderr_of(&out));
        assert_eq!(results(&p), report, "-j {jobs}");
        // And it stays healed.
        let out = build(&p, "config/experiments/small.yaml", &[]);
        assert!(out.status.success(), "-j {jobs}: {}", stderr_of(&out));
        assert_eq!(results(&p), report, "-j {jobs}");
    }
}
