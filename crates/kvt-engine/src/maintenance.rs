//! Cache maintenance: `du` (size by op and age), `verify` (re-hash every
//! object, quarantine corrupt ones) and `gc` (remove what no live config needs,
//! by age and total size, oldest first).

use super::action::ActionCache;
use super::digest::Digest;
use super::error::Result;
use super::store::ContentStore;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

fn age_days(path: &Path, now: f64) -> f64 {
    let m = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(now);
    ((now - m) / 86_400.0).max(0.0)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Human-readable bytes in binary units (`1.5 MiB`), by `bytesize`.
pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// Parses a size by `bytesize`: `10GiB`, `500 MiB`, `2048` (bytes); a bare
/// `G`/`M`/`K` is binary too (`10G` = 10 GiB), as `du -h` and `ls -h` mean it.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let binary = match t.chars().last() {
        Some(c @ ('K' | 'M' | 'G' | 'T' | 'k' | 'm' | 'g' | 't')) => {
            format!("{}{}iB", &t[..t.len() - 1], c.to_ascii_uppercase())
        }
        _ => t.to_string(),
    };
    binary
        .parse::<bytesize::ByteSize>()
        .ok()
        .map(|b| b.as_u64())
}

/// Parses an age by `humantime` (`30d`, `12h`, `45m`, `90s`, `2w`, `1day 6h`) into days.
pub fn parse_age(s: &str) -> Option<f64> {
    humantime::parse_duration(s.trim())
        .ok()
        .map(|d| d.as_secs_f64() / 86_400.0)
}

pub struct DuRow {
    pub op: String,
    pub objects: usize,
    pub bytes: u64,
}

pub struct DuReport {
    pub by_op: Vec<DuRow>,
    /// (age bucket label, objects, bytes)
    pub by_age: Vec<(String, usize, u64)>,
    pub total_bytes: u64,
    pub objects: usize,
    pub actions: usize,
}

pub fn du(cache_root: &Path) -> Result<DuReport> {
    let store = ContentStore::new(cache_root);
    let actions = ActionCache::new(cache_root);
    let recs = actions.list();
    let mut owner: BTreeMap<Digest, String> = BTreeMap::new();
    for (rec, _, _) in &recs {
        for o in &rec.outputs {
            owner.entry(o.digest).or_insert_with(|| rec.op.clone());
        }
    }
    let now = now();
    let buckets = [
        ("< 1 day", 1.0),
        ("1–7 days", 7.0),
        ("7–30 days", 30.0),
        ("> 30 days", f64::MAX),
    ];
    let mut by_age: Vec<(String, usize, u64)> =
        buckets.iter().map(|(l, _)| (l.to_string(), 0, 0)).collect();
    let mut by_op: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut total = 0;
    let objects = store.list()?;
    for (d, path) in &objects {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        total += size;
        let op = owner
            .get(d)
            .cloned()
            .unwrap_or_else(|| "(unreferenced)".into());
        let e = by_op.entry(op).or_default();
        e.0 += 1;
        e.1 += size;
        let age = age_days(path, now);
        let b = buckets
            .iter()
            .position(|(_, lim)| age < *lim)
            .unwrap_or(buckets.len() - 1);
        by_age[b].1 += 1;
        by_age[b].2 += size;
    }
    let action_bytes: u64 = recs.iter().map(|(_, _, s)| *s).sum();
    total += action_bytes;
    let mut by_op: Vec<DuRow> = by_op
        .into_iter()
        .map(|(op, (objects, bytes))| DuRow { op, objects, bytes })
        .collect();
    by_op.push(DuRow {
        op: "(action records)".into(),
        objects: recs.len(),
        bytes: action_bytes,
    });
    Ok(DuReport {
        by_op,
        by_age,
        total_bytes: total,
        objects: objects.len(),
        actions: recs.len(),
    })
}

pub struct VerifyReport {
    pub checked: usize,
    pub corrupt: Vec<String>,
    pub missing: Vec<(String, String)>,
}

/// Re-hashes every object; corrupt ones are moved to `quarantine/` so no build
/// uses them, and the nodes that made them rebuild.
pub fn verify(cache_root: &Path) -> Result<VerifyReport> {
    let store = ContentStore::new(cache_root);
    let actions = ActionCache::new(cache_root);
    let mut corrupt = Vec::new();
    let objects = store.list()?;
    for (d, _) in &objects {
        if store.verify(d).is_err() {
            corrupt.push(d.hex());
            store.quarantine(d)?;
        }
    }
    let mut missing = Vec::new();
    for (rec, _, _) in actions.list() {
        for o in &rec.outputs {
            if !store.path_of(&o.digest).exists() && !corrupt.contains(&o.digest.hex()) {
                missing.push((rec.node.clone(), o.name.clone()));
            }
        }
    }
    Ok(VerifyReport {
        checked: objects.len(),
        corrupt,
        missing,
    })
}

pub struct GcReport {
    pub removed_actions: usize,
    pub removed_objects: usize,
    pub freed_bytes: u64,
    pub kept_live: usize,
    pub remaining_bytes: u64,
}

/// Removes cache entries no live config needs: unreferenced objects always;
/// dead action records (and the objects only they referenced) when older than
/// `max_age_days` or, oldest first, while the cache is larger than `max_size`.
pub fn gc(
    cache_root: &Path,
    live: &BTreeSet<Digest>,
    max_size: Option<u64>,
    max_age_days: Option<f64>,
) -> Result<GcReport> {
    let store = ContentStore::new(cache_root);
    let actions = ActionCache::new(cache_root);
    let now = now();
    store.clean_tmp();
    let recs = actions.list();
    let objects: BTreeMap<Digest, (std::path::PathBuf, u64)> = store
        .list()?
        .into_iter()
        .map(|(d, p)| {
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (d, (p, size))
        })
        .collect();
    let mut total: u64 = objects.values().map(|(_, s)| *s).sum::<u64>()
        + recs.iter().map(|(_, _, s)| s).sum::<u64>();
    let live_objects: BTreeSet<Digest> = recs
        .iter()
        .filter(|(r, _, _)| live.contains(&r.key))
        .flat_map(|(r, _, _)| r.outputs.iter().map(|o| o.digest))
        .collect();

    // Dead actions, oldest first.
    let mut dead: Vec<_> = recs
        .iter()
        .filter(|(r, _, _)| !live.contains(&r.key))
        .collect();
    dead.sort_by(|a, b| a.0.finished_at.total_cmp(&b.0.finished_at));
    let mut removed_keys: BTreeSet<Digest> = BTreeSet::new();
    let mut report = GcReport {
        removed_actions: 0,
        removed_objects: 0,
        freed_bytes: 0,
        kept_live: live.len(),
        remaining_bytes: 0,
    };
    let still_referenced = |removed: &BTreeSet<Digest>, d: &Digest| {
        recs.iter()
            .any(|(r, _, _)| !removed.contains(&r.key) && r.outputs.iter().any(|o| o.digest == *d))
    };
    for (rec, _, rec_size) in dead {
        let too_old = max_age_days.is_some_and(|a| (now - rec.finished_at) / 86_400.0 > a);
        let too_big = max_size.is_some_and(|m| total > m);
        if !(too_old || too_big) {
            continue;
        }
        actions.remove(&rec.key)?;
        removed_keys.insert(rec.key);
        report.removed_actions += 1;
        report.freed_bytes += rec_size;
        total -= rec_size;
        for o in &rec.outputs {
            if live_objects.contains(&o.digest) || still_referenced(&removed_keys, &o.digest) {
                continue;
            }
            if let Some((p, size)) = objects.get(&o.digest) {
                if std::fs::remove_file(p).is_ok() {
                    report.removed_objects += 1;
                    report.freed_bytes += size;
                    total -= size;
                }
            }
        }
    }
    // Objects no remaining record references.
    for (d, (p, size)) in &objects {
        if !p.exists() || live_objects.contains(d) || still_referenced(&removed_keys, d) {
            continue;
        }
        if std::fs::remove_file(p).is_ok() {
            report.removed_objects += 1;
            report.freed_bytes += size;
            total -= size;
        }
    }
    report.remaining_bytes = total;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_ages() {
        assert_eq!(parse_size("10G"), Some(10 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("2048"), Some(2048));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_age("30d"), Some(30.0));
        assert_eq!(parse_age("12h"), Some(0.5));
        assert_eq!(parse_age("3x"), None);
    }
}
