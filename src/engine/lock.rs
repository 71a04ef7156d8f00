//! The cache lock: one exclusive `flock` on `<cache>/v1/LOCK` held for a whole
//! build, gc or verify, so two processes never write the cache at once. The
//! holder writes its pid and command into the file so a waiter can say who.

use super::store::STORE_FORMAT;
use crate::KvtError;
use anyhow::{Context, Result};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

pub struct CacheLock {
    _file: File,
}

/// Takes the cache lock; waits (saying so) unless `no_wait`, then fails clearly.
pub fn acquire(cache_root: &Path, what: &str, no_wait: bool) -> Result<CacheLock> {
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
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "another kvt process".to_string()
            } else {
                holder.to_string()
            };
            if no_wait {
                return Err(KvtError::failed(format!(
                    "the cache `{}` is locked by {holder}; wait for it to finish, or run again without `--no-wait` to wait",
                    cache_root.display()
                ))
                .into());
            }
            eprintln!("kvt: waiting for the cache lock held by {holder} ...");
            file.lock().context("waiting for the cache lock")?;
        }
        Err(TryLockError::Error(e)) => return Err(e).context("locking the cache"),
    }
    file.set_len(0)?;
    file.rewind()?;
    let _ = write!(file, "pid {} (`kvt {what}`)", std::process::id());
    Ok(CacheLock { _file: file })
}
