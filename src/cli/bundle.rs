//! `kvt bundle` and `kvt import`: one experiment as one portable file
//! (`.tar.zst`), and back into a cache, so the same config rebuilds on the
//! importing machine with zero requests.
//!
//! A bundle holds `kvt-bundle.json` (what it is), `config.json` (the merged
//! configuration, secrets redacted), `actions/<node key>.json` (every node's
//! action record), `objects/<digest>` (every output: the Parquet artifacts,
//! manifest, report, plots, the SQLite sink's parts), `journal.jsonl` (the
//! experiment's answers, as the request journal holds them), `files/<path>`
//! (the exported files as they are on disk, for reading without kvt) and
//! `digests.txt` (the blake3 digest of every other entry). `kvt import`
//! checks every digest before it writes anything.

use crate::config::LoadedConfig;
use crate::engine::{self, ActionRecord, Digest, NodeState, OpRegistry};
use crate::llm::journal::Journal;
use crate::llm::Outcome;
use crate::stages::infer::ResponseRow;
use crate::table;
use crate::KvtError;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

const FORMAT: u32 = 1;

/// What a bundle holds, as counts.
pub struct Counts {
    pub records: usize,
    pub objects: usize,
    pub answers: usize,
    pub files: usize,
    pub bytes: u64,
}

/// Writes the experiment `loaded` describes, which must be built, to `out`.
pub fn bundle(loaded: &LoadedConfig, registry: &OpRegistry, out: &Path) -> Result<Counts> {
    let (plan, ws) = super::plan_for(loaded, registry, &[], super::RemoteArg::Optional)?;
    let reports = engine::explain(&ws, &plan, &|_| false)?;
    let stale: Vec<&str> = reports
        .iter()
        .filter(|r| !matches!(r.state, NodeState::Fresh(_)))
        .map(|r| plan.graph[r.index].id.as_str())
        .collect();
    if !stale.is_empty() {
        return Err(KvtError::usage(format!(
            "{} node(s) of `{}` are not built ({}): run `kvt build report -c {}` first",
            stale.len(),
            loaded.exp_group_id(),
            stale.join(", "),
            loaded.config_path.display()
        ))
        .into());
    }
    let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut answers: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut records = 0;
    let mut files = 0;
    for r in &reports {
        let NodeState::Fresh(rec) = &r.state else {
            continue;
        };
        records += 1;
        entries.insert(
            format!("actions/{}.json", rec.key.hex()),
            serde_json::to_vec_pretty(rec.as_ref())?,
        );
        for o in &rec.outputs {
            let name = format!("objects/{}", o.digest.hex());
            if let std::collections::btree_map::Entry::Vacant(v) = entries.entry(name) {
                v.insert(ws.store.get(&o.digest)?);
            }
        }
        if rec.op == "infer" {
            if let Some(o) = rec.output("responses") {
                for row in table::read::<ResponseRow>(&ws.store.get(&o.digest)?)? {
                    if row.outcome.is_final {
                        answers.insert(row.request_key, row.outcome);
                    }
                }
            }
        }
        for e in &rec.exports {
            if let Ok(bytes) = std::fs::read(ws.root.join(&e.path)) {
                entries.insert(format!("files/{}", e.path), bytes);
                files += 1;
            }
        }
    }
    let mut journal = Vec::new();
    for (key, outcome) in &answers {
        serde_json::to_writer(
            &mut journal,
            &serde_json::json!({"key": key, "outcome": outcome}),
        )?;
        journal.push(b'\n');
    }
    entries.insert("journal.jsonl".into(), journal);
    entries.insert(
        "config.json".into(),
        serde_json::to_vec_pretty(&loaded.redacted())?,
    );
    entries.insert(
        "kvt-bundle.json".into(),
        serde_json::to_vec_pretty(&serde_json::json!({
            "format": FORMAT,
            "kvt_version": env!("CARGO_PKG_VERSION"),
            "exp_group_id": loaded.exp_group_id(),
            "config": loaded.config_path.display().to_string(),
        }))?,
    );
    let objects = entries.keys().filter(|k| k.starts_with("objects/")).count();
    let mut digests = String::new();
    for (name, bytes) in &entries {
        digests.push_str(&format!("{}  {name}\n", Digest::of(bytes).hex()));
    }
    entries.insert("digests.txt".into(), digests.into_bytes());

    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        out.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let enc = zstd::Encoder::new(std::io::BufWriter::new(file), 3)?;
        let mut tar = tar::Builder::new(enc);
        for (name, bytes) in &entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, name, bytes.as_slice())?;
        }
        let enc = tar.into_inner()?;
        let mut w = enc.finish()?;
        w.flush()?;
        w.get_ref().sync_all()?;
        std::fs::rename(&tmp, out)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing `{}`", out.display()))?;
    Ok(Counts {
        records,
        objects,
        answers: answers.len(),
        files,
        bytes: std::fs::metadata(out)?.len(),
    })
}

/// Reads a bundle, checks every entry against `digests.txt` (and every
/// object against its name), then loads it into the cache at `cache_root`.
/// Nothing is written unless everything checks.
pub fn import(file: &Path, cache_root: &Path) -> Result<(Counts, String)> {
    let refuse = |why: String| -> anyhow::Error {
        anyhow::anyhow!(
            "bundle `{}` is damaged or was changed: {why}; nothing was imported",
            file.display()
        )
    };
    let f = std::fs::File::open(file).with_context(|| format!("opening `{}`", file.display()))?;
    let dec = zstd::Decoder::new(f).map_err(|e| refuse(format!("not a zstd stream ({e})")))?;
    let mut tar = tar::Archive::new(dec);
    let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for e in tar
        .entries()
        .map_err(|e| refuse(format!("not a tar archive ({e})")))?
    {
        let mut e = e.map_err(|e| refuse(format!("unreadable ({e})")))?;
        let name = e
            .path()
            .map_err(|e| refuse(format!("a bad entry name ({e})")))?
            .to_string_lossy()
            .to_string();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes)
            .map_err(|e| refuse(format!("`{name}` is unreadable ({e})")))?;
        entries.insert(name, bytes);
    }
    let digests = entries
        .remove("digests.txt")
        .ok_or_else(|| refuse("it has no digests.txt".into()))?;
    let digests =
        String::from_utf8(digests).map_err(|_| refuse("digests.txt is not text".into()))?;
    let mut listed = 0;
    for line in digests.lines() {
        let (hex, name) = line
            .split_once("  ")
            .ok_or_else(|| refuse(format!("digests.txt has a bad line `{line}`")))?;
        let bytes = entries
            .get(name)
            .ok_or_else(|| refuse(format!("`{name}` is listed but missing")))?;
        if Digest::of(bytes).hex() != hex {
            return Err(refuse(format!("`{name}` does not match its digest")));
        }
        listed += 1;
    }
    if listed != entries.len() {
        let extra: Vec<&String> = entries
            .keys()
            .filter(|k| !digests.lines().any(|l| l.ends_with(&format!("  {k}"))))
            .collect();
        return Err(refuse(format!("entries not in digests.txt: {extra:?}")));
    }
    for (name, bytes) in &entries {
        if let Some(hex) = name.strip_prefix("objects/") {
            if Digest::of(bytes).hex() != hex {
                return Err(refuse(format!("object `{hex}` does not hash to its name")));
            }
        }
    }
    let meta: serde_json::Value = serde_json::from_slice(
        entries
            .get("kvt-bundle.json")
            .ok_or_else(|| refuse("it has no kvt-bundle.json".into()))?,
    )?;
    if meta["format"].as_u64() != Some(FORMAT as u64) {
        bail!(
            "bundle `{}` has format {}; this kvt reads format {FORMAT}",
            file.display(),
            meta["format"]
        );
    }
    // Everything checks: load it.
    let store = engine::ContentStore::new(cache_root);
    let actions = engine::ActionCache::new(cache_root);
    let scope = meta["exp_group_id"].as_str().unwrap_or("").to_string();
    let (mut records, mut objects, mut files) = (0, 0, 0);
    for (name, bytes) in &entries {
        if name.starts_with("objects/") {
            store.put(bytes)?;
            objects += 1;
        } else if name.starts_with("files/") {
            files += 1;
        }
    }
    for (name, bytes) in &entries {
        if name.starts_with("actions/") {
            let rec: ActionRecord = serde_json::from_slice(bytes)
                .with_context(|| format!("`{name}` is not an action record"))?;
            actions.put(&rec)?;
            actions.set_last(&scope, &rec)?;
            records += 1;
        }
    }
    let mut rows = Vec::new();
    for line in entries
        .get("journal.jsonl")
        .map(Vec::as_slice)
        .unwrap_or_default()
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
    {
        #[derive(serde::Deserialize)]
        struct Entry {
            key: String,
            outcome: Outcome,
        }
        let e: Entry = serde_json::from_slice(line).context("journal.jsonl has a bad line")?;
        rows.push((e.key, e.outcome));
    }
    let answers = rows.len();
    if answers > 0 {
        let mut j = Journal::open(&crate::stages::infer::journal_path(cache_root))?;
        let id = Digest::of(digests.as_bytes()).hex();
        j.import_batch("bundle", &id, &rows)?;
        j.checkpoint()?;
    }
    let config = meta["config"].as_str().unwrap_or("").to_string();
    Ok((
        Counts {
            records,
            objects,
            answers,
            files,
            bytes: std::fs::metadata(file)?.len(),
        },
        config,
    ))
}
