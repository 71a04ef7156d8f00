//! The content store: immutable objects named by their blake3 digest under
//! `objects/ab/cdef…`. Writes go to a temp file, are synced and renamed into
//! place; reads re-hash and refuse an object whose bytes do not match its name.

use super::digest::Digest;
use super::error::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bumped when the on-disk layout changes; old caches are then simply not read.
pub const STORE_FORMAT: &str = "v1";

#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object `{0}` is missing from the cache")]
    Missing(String),
    #[error("object `{digest}` is corrupt: its bytes hash to `{actual}`")]
    Corrupt { digest: String, actual: String },
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temp file name inside `dir` (pid + counter: no two writers collide).
pub fn temp_path(dir: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{}-{}.tmp", std::process::id(), n))
}

/// Writes `bytes` to `dest` atomically: temp file in `tmp_dir`, fsync, rename.
pub fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    write_via(tmp_dir, temp_path(tmp_dir), dest, bytes)
}

/// Like [`write_atomic`], the temporary file in `dir` (the destination's own
/// directory) named `.<file name>.<pid>-<n>.tmp`, hidden beside the file it becomes.
pub fn write_atomic_named(dir: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dest
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
    write_via(dir, tmp, dest, bytes)
}

fn write_via(tmp_dir: &Path, tmp: PathBuf, dest: &Path, bytes: &[u8]) -> Result<()> {
    fs::create_dir_all(tmp_dir).with_context(|| format!("creating `{}`", tmp_dir.display()))?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating `{}`", parent.display()))?;
    }
    let result = (|| -> Result<()> {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating `{}`", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dest).with_context(|| format!("renaming into `{}`", dest.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl ContentStore {
    /// `cache_root` is the cache directory; objects live in `<cache_root>/v1/objects`.
    pub fn new(cache_root: &Path) -> Self {
        Self {
            root: cache_root.join(STORE_FORMAT),
        }
    }

    pub fn objects_dir(&self) -> PathBuf {
        self.root.join("objects")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn path_of(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.objects_dir().join(&hex[..2]).join(&hex[2..])
    }

    /// Stores bytes and returns their digest: one write and one rename. An
    /// existing object is kept only when it re-hashes to its name (no write);
    /// a damaged copy is replaced, so it heals.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        let path = self.path_of(&d);
        let intact = fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64)
            && fs::read(&path).is_ok_and(|b| Digest::of(&b) == d);
        if !intact {
            write_atomic(&self.tmp_dir(), &path, bytes)?;
        }
        Ok(d)
    }

    /// Reads an object and checks its bytes against its name.
    pub fn get(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.path_of(d);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ObjectError::Missing(d.hex()).into())
            }
            Err(e) => return Err(e).with_context(|| format!("reading `{}`", path.display())),
        };
        let actual = Digest::of(&bytes);
        if actual != *d {
            return Err(ObjectError::Corrupt {
                digest: d.hex(),
                actual: actual.hex(),
            }
            .into());
        }
        Ok(bytes)
    }

    /// Re-hashes an object on disk: `Ok(())` when it matches its name.
    pub fn verify(&self, d: &Digest) -> std::result::Result<(), ObjectError> {
        match fs::read(self.path_of(d)) {
            Ok(bytes) => {
                let actual = Digest::of(&bytes);
                if actual == *d {
                    Ok(())
                } else {
                    Err(ObjectError::Corrupt {
                        digest: d.hex(),
                        actual: actual.hex(),
                    })
                }
            }
            Err(_) => Err(ObjectError::Missing(d.hex())),
        }
    }

    /// Moves a corrupt object aside so that nothing reads it again.
    pub fn quarantine(&self, d: &Digest) -> Result<()> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir)?;
        let src = self.path_of(d);
        if src.exists() {
            fs::rename(&src, dir.join(d.hex()))?;
        }
        Ok(())
    }

    /// Every object digest in the store, with its path.
    pub fn list(&self) -> Result<Vec<(Digest, PathBuf)>> {
        let mut out = Vec::new();
        let Ok(dirs) = fs::read_dir(self.objects_dir()) else {
            return Ok(out);
        };
        for dir in dirs {
            let dir = dir?;
            let prefix = dir.file_name().to_string_lossy().to_string();
            if !dir.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(dir.path())? {
                let f = f?;
                let name = format!("{prefix}{}", f.file_name().to_string_lossy());
                match Digest::from_hex(&name) {
                    Some(d) => out.push((d, f.path())),
                    None => bail!(
                        "unexpected file `{}` in the object store",
                        f.path().display()
                    ),
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes temp files left by a process that was killed mid-write.
    pub fn clean_tmp(&self) {
        if let Ok(entries) = fs::read_dir(self.tmp_dir()) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path());
        let d = store.put(b"hello").unwrap();
        assert_eq!(store.get(&d).unwrap(), b"hello");
        fs::write(store.path_of(&d), b"hellp").unwrap();
        let err = store.get(&d).unwrap_err();
        assert!(matches!(
            err.find::<ObjectError>(),
            Some(ObjectError::Corrupt { .. })
        ));
        store.quarantine(&d).unwrap();
        assert!(matches!(store.verify(&d), Err(ObjectError::Missing(_))));
    }
}
