//! The cache lock: one exclusive `flock` on `<cache>/v1/LOCK` held for a whole
//! build, gc or verify, so two processes never write the cache at once. The
//! holder writes its pid and command into the file so a waiter can say who.

use super::error::EngineError as KvtError;
use super::error::Reporter;
use super::error::{Context, Result};
use super::store::STORE_FORMAT;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

pub struct CacheLock {
    _file: File,
}

/// Takes the cache lock; waits (saying so through `reporter`) unless
/// `no_wait`, in which case a held lock fails clearly. `holder` is what a
/// waiter is told about this process (e.g. the command it runs).
pub fn acquire(
    cache_root: &Path,
    holder: &str,
    no_wait: bool,
    reporter: &dyn Reporter,
) -> Result<CacheLock> {
    let dir = cache_root.join(STORE_FORMAT);
    fs::create_dir_all(&dir)
        .with_context(|| format!("creating the cache at `{}`", dir.display()))?;
    let path = dir.join("LOCK");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening the cache lock `{}`", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut other = String::new();
            let _ = file.read_to_string(&mut other);
            let other = other.trim();
            let other = if other.is_empty() {
                "another process".to_string()
            } else {
                other.to_string()
            };
            if no_wait {
                return Err(KvtError::locked(format!(
                    "the cache `{}` is locked by {other}; wait for it to finish, or run again and let it wait",
                    cache_root.display()
                )));
            }
            reporter.note(&format!("waiting for the cache lock held by {other} ..."));
            file.lock().context("waiting for the cache lock")?;
        }
        Err(TryLockError::Error(e)) => return Err(e).context("locking the cache"),
    }
    file.set_len(0)?;
    file.rewind()?;
    let _ = write!(file, "pid {} ({holder})", std::process::id());
    Ok(CacheLock { _file: file })
}
