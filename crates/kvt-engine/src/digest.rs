//! Content digests (blake3) and the canonical encoding that turns a config slice
//! into the same bytes on every run and machine.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A blake3 digest, shown and stored as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }
    pub fn hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s)
            .ok()
            .map(|h| Digest(*h.as_bytes()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a blake3 hex digest")))
    }
}

/// The blake3 of the bytes of `files`, one after another (hex); an error
/// names the file that could not be read.
pub fn files_digest<P: AsRef<std::path::Path>>(files: &[P]) -> super::error::Result<String> {
    use super::error::Context;
    let mut h = blake3::Hasher::new();
    for path in files {
        let path = path.as_ref();
        let f =
            std::fs::File::open(path).with_context(|| format!("reading `{}`", path.display()))?;
        h.update_reader(f)
            .with_context(|| format!("reading `{}`", path.display()))?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The blake3 of the bytes of `files`, one after another (hex), remembered
/// under `cache_root` by each file's size, modification time and inode, as
/// git and DVC keep stat caches: a large dataset is read once, not on every
/// build. Files changed in the last two seconds are hashed but not
/// remembered (a second change within the same clock tick would not move
/// a modification time).
pub fn files_digest_cached(
    cache_root: &std::path::Path,
    files: &[std::path::PathBuf],
) -> super::error::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let read = || files_digest(files);
    let (mut names, mut stamp, mut newest) = (String::new(), String::new(), 0i64);
    for path in files {
        let Ok(meta) = std::fs::metadata(path) else {
            return read(); // names the file in its error
        };
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        names.push_str(&abs.to_string_lossy());
        names.push('\n');
        stamp.push_str(&format!(
            "{}:{}.{}:{}:{};",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino(),
            meta.dev()
        ));
        newest = newest.max(meta.mtime());
    }
    let entry = cache_root
        .join("v1")
        .join("digests")
        .join(&blake3::hash(names.as_bytes()).to_hex()[..32]);
    if let Ok(text) = std::fs::read_to_string(&entry) {
        if let Some((s, d)) = text.trim_end().rsplit_once(' ') {
            if s == stamp && d.len() == 64 {
                return Ok(d.to_string());
            }
        }
    }
    let digest = read()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if newest < now - 2 {
        // Best effort: a cache that cannot be written is only slower.
        let dir = entry.parent().expect("a parent");
        let line = format!("{stamp} {digest}\n");
        let _ = super::store::write_atomic_named(dir, &entry, line.as_bytes());
    }
    Ok(digest)
}

/// Canonical bytes of a JSON value: object keys sorted, no whitespace, numbers
/// in serde_json's shortest round-trip form. `serde_json::Value` keeps objects
/// in a `BTreeMap` (the `preserve_order` feature is off), so plain serialization
/// is already canonical; this function is the one place that relies on it.
pub fn canonical_json(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a JSON value always serializes")
}

/// Length-prefixed fields for a hasher, so `("ab","c")` and `("a","bc")` differ.
pub fn hash_field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_and_is_stable() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": [1.0, 0.5]}"#).unwrap();
        let b = json!({"a": [1.0, 0.5], "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), br#"{"a":[1.0,0.5],"b":1}"#.to_vec());
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = Digest::of(b"kvt");
        assert_eq!(Digest::from_hex(&d.hex()), Some(d));
        assert_eq!(d.hex().len(), 64);
    }

    #[test]
    fn file_digests_are_remembered_by_size_time_and_inode() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let write = |p: &std::path::Path, text: &str| {
            std::fs::write(p, text).unwrap();
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap();
        };
        write(&a, "first\n");
        write(&b, "second\n");
        let both = vec![a.clone(), b.clone()];
        let d = files_digest_cached(&cache, &both).unwrap();
        assert_eq!(d, blake3::hash(b"first\nsecond\n").to_hex().to_string());
        // Remembered: a planted digest under the same stamps is what comes back.
        let entries: Vec<_> = std::fs::read_dir(cache.join("v1/digests"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(entries.len(), 1);
        let text = std::fs::read_to_string(&entries[0]).unwrap();
        let planted = text.replace(&d, &"0".repeat(64));
        std::fs::write(&entries[0], planted).unwrap();
        assert_eq!(files_digest_cached(&cache, &both).unwrap(), "0".repeat(64));
        // A changed file (new size and time) is read again.
        write(&b, "second, longer\n");
        assert_eq!(
            files_digest_cached(&cache, &both).unwrap(),
            blake3::hash(b"first\nsecond, longer\n")
                .to_hex()
                .to_string()
        );
        // Just written: hashed, not remembered.
        let fresh = dir.path().join("fresh.jsonl");
        std::fs::write(&fresh, "x").unwrap();
        let d = files_digest_cached(&cache, std::slice::from_ref(&fresh)).unwrap();
        assert_eq!(d, blake3::hash(b"x").to_hex().to_string());
        assert_eq!(
            std::fs::read_dir(cache.join("v1/digests")).unwrap().count(),
            1
        );
        // A missing file is an error that names it.
        let err = files_digest_cached(&cache, &[dir.path().join("gone.jsonl")]).unwrap_err();
        assert!(format!("{err:#}").contains("gone.jsonl"), "{err:#}");
    }
}
