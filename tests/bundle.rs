//! `kvt bundle` and `kvt import`: a built experiment as one file, imported
//! into an empty cache in another project directory, rebuilt there with zero
//! requests; a changed or damaged bundle is refused and nothing is imported.

mod common;
use common::*;
use std::io::Write;

const SMALL: &str = "\
output:
  exp_group_id: small
dataset:
  lengths: [256, 1024]
  per_length: 4
binning:
  n_bins: 2
  edges: [0, 600, 2000]
sampling:
  n_per_bin: 4
engine:
  kind: serve
  api_key_env: KVT_TEST_SECRET_KEY
kv:
  policies: [snapkv]
  budgets: [1.0, 0.3]
analysis:
  bootstrap:
    iters: 100
";

fn served(p: &Project) -> usize {
    std::fs::read_to_string(p.path("requests.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains("\"replay\":true"))
        .count()
}

fn run(p: &Project, args: &[&str]) -> std::process::Output {
    p.kvt()
        .args(args)
        .env("KVT_SERVE_REQUEST_LOG", p.path("requests.log"))
        .env("KVT_TEST_SECRET_KEY", "sk-SENTINEL-bundle-0f3a")
        .output()
        .unwrap()
}

/// The bundle's entries, by name.
fn write_entries(path: &std::path::Path, entries: &[(String, Vec<u8>)]) {
    let enc = zstd::Encoder::new(std::fs::File::create(path).unwrap(), 3).unwrap();
    let mut tar = tar::Builder::new(enc);
    for (name, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

#[test]
fn a_bundle_round_trips_into_an_empty_cache_with_zero_requests() {
    let a = Project::new();
    a.write("config/experiments/small.yaml", SMALL);
    let cfg = ["-c", "config/experiments/small.yaml"];

    // Not built yet: refused, naming the build to run.
    let out = run(&a, &["bundle", cfg[0], cfg[1], "-o", "run.tar.zst"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("kvt build report -c config/experiments/small.yaml"));

    let out = run(&a, &["build", "report", cfg[0], cfg[1]]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let sent = served(&a);
    assert_eq!(sent, 16, "4 examples per bin x 2 bins, at 1.0 and 0.3");
    let out = run(&a, &["bundle", cfg[0], cfg[1], "-o", "out/run.tar.zst"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("16 answers"),
        "{}",
        stderr_of(&out)
    );
    let bundle = a.path("out/run.tar.zst");
    let names: Vec<String> = bundle_entries(&bundle)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for want in [
        "kvt-bundle.json",
        "config.json",
        "journal.jsonl",
        "digests.txt",
        "files/runs/small/report.md",
        "files/runs/small/kv_transition.sqlite",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("actions/")));
    assert!(names.iter().any(|n| n.starts_with("objects/")));
    // The config is in it, its secret is not (only the variable's name).
    let all: Vec<u8> = bundle_entries(&bundle)
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    let secret = b"sk-SENTINEL-bundle-0f3a";
    assert!(!all.windows(secret.len()).any(|w| w == secret));

    // Another project directory with the same config and an empty cache.
    let b = Project::new();
    b.write("config/experiments/small.yaml", SMALL);
    let out = run(&b, &["import", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("every digest checked"));
    let out = run(&b, &["build", "report", cfg[0], cfg[1]]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(built_nodes(&out).is_empty(), "{}", stderr_of(&out));
    assert_eq!(served(&b), 0, "the imported build sent requests");
    assert_eq!(
        b.read("runs/small/report.md"),
        a.read("runs/small/report.md")
    );
    // An analysis change rebuilds from the imported answers, still sending nothing.
    let out = run(
        &b,
        &[
            "build",
            "report",
            cfg[0],
            cfg[1],
            "--set",
            "analysis.bootstrap.iters=50",
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!built_nodes(&out).is_empty());
    assert_eq!(served(&b), 0);
    // And so does an infer node rebuilt from scratch (its answers came in the journal).
    let out = run(&b, &["build", "report", cfg[0], cfg[1], "--force", "infer"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(served(&b), 0);
}

#[test]
fn a_changed_or_damaged_bundle_is_refused_and_nothing_is_imported() {
    let a = Project::new();
    a.write("config/experiments/small.yaml", SMALL);
    let out = run(
        &a,
        &["build", "report", "-c", "config/experiments/small.yaml"],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = run(
        &a,
        &[
            "bundle",
            "-c",
            "config/experiments/small.yaml",
            "-o",
            "run.tar.zst",
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let good = bundle_entries(&a.path("run.tar.zst"));

    let b = Project::new();
    let refused = |label: &str, entries: &[(String, Vec<u8>)], want: &str| {
        let path = b.path(&format!("{label}.tar.zst"));
        write_entries(&path, entries);
        let out = run(&b, &["import", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{label}: {}", stderr_of(&out));
        let err = stderr_of(&out);
        assert!(
            err.contains("is damaged or was changed") && err.contains(want),
            "{label}: {err}"
        );
        assert!(err.contains("nothing was imported"), "{err}");
        assert!(
            !b.path("cache/v1").exists(),
            "{label}: something was imported"
        );
    };
    // A report edited inside the bundle.
    let mut edited = good.clone();
    for (name, bytes) in &mut edited {
        if name == "files/runs/small/report.md" {
            bytes.extend_from_slice(b"\nall budgets are safe\n");
        }
    }
    refused(
        "edited",
        &edited,
        "`files/runs/small/report.md` does not match its digest",
    );
    // An object swapped, with digests.txt made to match: the object's name gives it away.
    let mut swapped = good.clone();
    let victim = swapped
        .iter()
        .position(|(n, _)| n.starts_with("objects/"))
        .unwrap();
    swapped[victim].1 = b"not the original bytes".to_vec();
    let new_hex = blake3::hash(&swapped[victim].1).to_hex().to_string();
    let victim_name = swapped[victim].0.clone();
    for (name, bytes) in &mut swapped {
        if name == "digests.txt" {
            let text = String::from_utf8(bytes.clone()).unwrap();
            let fixed: String = text
                .lines()
                .map(|l| {
                    if l.ends_with(&format!("  {victim_name}")) {
                        format!("{new_hex}  {victim_name}\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            *bytes = fixed.into_bytes();
        }
    }
    refused("swapped", &swapped, "does not hash to its name");
    // An entry removed.
    let missing: Vec<_> = good
        .iter()
        .filter(|(n, _)| n != "journal.jsonl")
        .cloned()
        .collect();
    refused("missing", &missing, "`journal.jsonl` is listed but missing");
    // Not a bundle at all.
    std::fs::write(b.path("garbage.tar.zst"), b"garbage").unwrap();
    let out = run(&b, &["import", b.path("garbage.tar.zst").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("is damaged or was changed"));
}
