//! The request journal: every response is recorded the moment it arrives, keyed
//! by the request's identity, in SQLite (WAL mode) inside the cache. A build
//! sends only requests without a final answer; a transient failure (timeout,
//! 429, 5xx, connection error) is kept but retried on the next build, and a
//! final answer is never overwritten.
//!
//! Durability: group commit. Outcomes are buffered and committed by one
//! writer in batches (at most `KVT_JOURNAL_BATCH` outcomes, default 64, or
//! `KVT_JOURNAL_BATCH_MS` milliseconds after the oldest, default 5; a flusher
//! thread enforces the time bound, every read flushes first). A killed process
//! loses at most the open batch: those requests are sent again on the next
//! build and recorded once. WAL with `synchronous = NORMAL` survives a killed
//! process; a power cut may lose the last few batches, sent again likewise.
//!
//! Batches are appended to `arrivals`, a log in arrival order, and moved into
//! `responses` (keyed by request) in key order, in one transaction, before
//! anything reads the journal and when it closes; a log a killed process
//! left is moved when the journal is next opened. Written one batch at a
//! time, each batch of random keys would rewrite pages all over the key
//! index: ten times the data in write-ahead log, and as much to sync when
//! the build checkpoints. A build holds the cache's lock, so no other
//! process writes the journal meanwhile.

use super::Outcome;
use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A journal error, named: the file, and what to do. Never a silent re-payment:
/// the build stops instead of asking the engine again.
fn damaged(path: &Path, e: anyhow::Error) -> anyhow::Error {
    e.context(format!(
        "the request journal `{}` is damaged or unreadable. Its answers are paid-for work: \
         copy it somewhere safe, then try `sqlite3 {} .recover`; to start over instead, \
         move it aside (answers only it holds will be requested again)",
        path.display(),
        path.display()
    ))
}

pub struct Journal {
    conn: Connection,
    path: PathBuf,
    /// Outcomes not yet committed: (key, is_final, outcome JSON, recorded at).
    buffer: Vec<(String, bool, String, f64)>,
    /// When the oldest buffered outcome arrived.
    oldest: Option<std::time::Instant>,
    batch: usize,
    batch_wait: Duration,
    /// `arrivals` holds committed outcomes not yet moved into `responses`.
    unmerged: bool,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Journal {
    /// One connection per journal file per process, shared by all nodes
    /// (SQLite allows one writer at a time anyway).
    pub fn shared(path: &Path) -> Result<std::sync::Arc<std::sync::Mutex<Journal>>> {
        use std::sync::{Arc, Mutex, OnceLock};
        type Map = Mutex<HashMap<PathBuf, Arc<Mutex<Journal>>>>;
        static OPEN: OnceLock<Map> = OnceLock::new();
        let mut map = OPEN
            .get_or_init(Default::default)
            .lock()
            .expect("journal map");
        if let Some(j) = map.get(path) {
            return Ok(j.clone());
        }
        let j = Arc::new(Mutex::new(Journal::open(path)?));
        map.insert(path.to_path_buf(), j.clone());
        // The flusher: commits a batch once its oldest outcome is due, so a
        // quiet spell never leaves answers uncommitted for long.
        let weak = Arc::downgrade(&j);
        let wait = j.lock().expect("journal").batch_wait;
        std::thread::Builder::new()
            .name("journal-flush".into())
            .spawn(move || loop {
                std::thread::sleep(wait.max(Duration::from_millis(1)));
                let Some(j) = weak.upgrade() else { return };
                let mut j = j.lock().expect("journal");
                if j.oldest.is_some_and(|t| t.elapsed() >= j.batch_wait) {
                    if let Err(e) = j.flush() {
                        tracing::error!("{e:#}");
                    }
                }
            })?;
        Ok(j)
    }

    pub fn open(path: &Path) -> Result<Journal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening the request journal {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        let setup = |conn: &Connection| -> rusqlite::Result<()> {
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            // Answers arrive in small commits, each touching pages all over
            // the key index: copying the log back every 1,000 pages (SQLite's
            // default) rewrites the same pages again and again. The build
            // checkpoints once at its end; this bounds the log in between.
            conn.pragma_update(None, "wal_autocheckpoint", 16384)?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS responses (
                request_key TEXT PRIMARY KEY,
                is_final    INTEGER NOT NULL,
                attempts    INTEGER NOT NULL,
                outcome     TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS arrivals (
                seq         INTEGER PRIMARY KEY,
                request_key TEXT NOT NULL,
                is_final    INTEGER NOT NULL,
                outcome     TEXT NOT NULL,
                recorded_at REAL NOT NULL
            );
            CREATE TABLE IF NOT EXISTS pending (
                node_slice  TEXT PRIMARY KEY,
                n           INTEGER NOT NULL
            );
            -- What a remote cache already holds: answers pushed or pulled, batches read.
            CREATE TABLE IF NOT EXISTS remote_synced (
                remote      TEXT NOT NULL,
                request_key TEXT NOT NULL,
                PRIMARY KEY (remote, request_key)
            );
            CREATE TABLE IF NOT EXISTS remote_batches (
                remote      TEXT NOT NULL,
                name        TEXT NOT NULL,
                PRIMARY KEY (remote, name)
            );",
            )?;
            // When each answer was recorded (unix seconds), for `kvt cache gc --max-age`.
            let has_time: bool = conn
                .prepare("SELECT 1 FROM pragma_table_info('responses') WHERE name = 'recorded_at'")?
                .exists([])?;
            if !has_time {
                conn.execute_batch(
                    "ALTER TABLE responses ADD COLUMN recorded_at REAL NOT NULL DEFAULT 0",
                )?;
            }
            Ok(())
        };
        setup(&conn).map_err(|e| damaged(path, e.into()))?;
        let mut j = Journal {
            conn,
            path: path.to_path_buf(),
            buffer: Vec::new(),
            oldest: None,
            batch: env_or("KVT_JOURNAL_BATCH", 64).max(1) as usize,
            batch_wait: Duration::from_millis(env_or("KVT_JOURNAL_BATCH_MS", 5)),
            unmerged: false,
        };
        // What a killed process committed but did not move.
        j.unmerged = j
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM arrivals)", [], |r| r.get(0))
            .map_err(|e| damaged(path, e.into()))?;
        j.settle()?;
        Ok(j)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves everything in the write-ahead log into the journal file itself,
    /// so that `journal.sqlite` alone holds every answer (run at the end of a build).
    pub fn checkpoint(&mut self) -> Result<()> {
        self.settle()?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| damaged(&self.path, e.into()))
    }

    /// Deletes answers recorded before `cutoff` (unix seconds) and compacts
    /// the file; returns how many went. Answers already in cached `infer`
    /// outputs stay there; a rebuilt `infer` would ask for them again.
    pub fn forget_before(&self, cutoff: f64) -> Result<usize> {
        let n = self
            .conn
            .execute("DELETE FROM responses WHERE recorded_at < ?1", [cutoff])
            .map_err(|e| damaged(&self.path, e.into()))?;
        self.conn
            .execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(|e| damaged(&self.path, e.into()))?;
        Ok(n)
    }

    /// Records an outcome (committed with its batch); a final answer already
    /// in the journal is kept.
    pub fn record(&mut self, key: &str, o: &Outcome) -> Result<()> {
        self.record_json(key, o.is_final, serde_json::to_string(o)?)
    }

    /// [`Journal::record`] for an outcome already serialized.
    pub fn record_json(&mut self, key: &str, is_final: bool, text: String) -> Result<()> {
        self.buffer
            .push((key.to_string(), is_final, text, unix_now()));
        let oldest = *self.oldest.get_or_insert_with(std::time::Instant::now);
        if self.buffer.len() >= self.batch || oldest.elapsed() >= self.batch_wait {
            self.flush()?;
        }
        Ok(())
    }

    /// Commits the buffered outcomes in one transaction.
    pub fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let commit =
            |conn: &Connection, rows: &[(String, bool, String, f64)]| -> rusqlite::Result<()> {
                let tx = conn.unchecked_transaction()?;
                {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO arrivals (request_key, is_final, outcome, recorded_at)
                         VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for (key, fin, text, at) in rows {
                        st.execute(params![key, *fin as i64, text, at])?;
                    }
                }
                tx.commit()
            };
        commit(&self.conn, &self.buffer).map_err(|e| damaged(&self.path, e.into()))?;
        self.buffer.clear();
        self.oldest = None;
        self.unmerged = true;
        Ok(())
    }

    /// Commits the open batch and moves every committed outcome into
    /// `responses`, in key order: the same rules as recording them one by
    /// one in arrival order (a final answer is kept; each later outcome
    /// for a key without one replaces it and counts an attempt).
    pub fn settle(&mut self) -> Result<()> {
        self.flush()?;
        if !self.unmerged {
            return Ok(());
        }
        self.conn
            .execute_batch(
                "BEGIN IMMEDIATE;
                 INSERT INTO responses (request_key, is_final, attempts, outcome, recorded_at)
                 SELECT request_key, is_final, 1, outcome, recorded_at FROM arrivals
                 WHERE true ORDER BY request_key, seq
                 ON CONFLICT(request_key) DO UPDATE SET
                    is_final = excluded.is_final, outcome = excluded.outcome,
                    attempts = responses.attempts + 1, recorded_at = excluded.recorded_at
                 WHERE responses.is_final = 0;
                 DELETE FROM arrivals;
                 COMMIT;",
            )
            .map_err(|e| {
                let _ = self.conn.execute_batch("ROLLBACK");
                damaged(&self.path, e.into())
            })?;
        self.unmerged = false;
        Ok(())
    }

    /// How many requests of a node (by config slice) still lack a final answer.
    pub fn pending(&mut self, slice: &str) -> Result<i64> {
        self.settle()?;
        Ok(self
            .conn
            .query_row(
                "SELECT n FROM pending WHERE node_slice = ?1",
                [slice],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    pub fn set_pending(&mut self, slice: &str, n: i64) -> Result<()> {
        self.settle()?;
        self.conn.execute(
            "INSERT INTO pending (node_slice, n) VALUES (?1, ?2)
             ON CONFLICT(node_slice) DO UPDATE SET n = excluded.n",
            params![slice, n],
        )?;
        Ok(())
    }

    pub fn get(&mut self, key: &str) -> Result<Option<Outcome>> {
        self.settle()?;
        self.get_inner(key).map_err(|e| damaged(&self.path, e))
    }

    fn get_inner(&self, key: &str) -> Result<Option<Outcome>> {
        let row: Option<String> = self
            .conn
            .query_row(
                "SELECT outcome FROM responses WHERE request_key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?;
        row.map(|t| serde_json::from_str(&t).context("a journal record is not valid JSON"))
            .transpose()
    }

    /// Outcomes for many keys (missing keys are absent from the map).
    pub fn get_many(&mut self, keys: &[String]) -> Result<HashMap<String, Outcome>> {
        self.settle()?;
        self.get_many_inner(keys)
            .map_err(|e| damaged(&self.path, e))
    }

    fn get_many_inner(&self, keys: &[String]) -> Result<HashMap<String, Outcome>> {
        // One read transaction for all the lookups: SQLite otherwise takes
        // and drops its file locks (and checks the file) once per key.
        let tx = self.conn.unchecked_transaction()?;
        let mut stmt = tx.prepare_cached("SELECT outcome FROM responses WHERE request_key = ?1")?;
        let mut out = HashMap::new();
        // In key order, the lookups walk the key index front to back.
        let mut sorted: Vec<&String> = keys.iter().collect();
        sorted.sort_unstable();
        for k in sorted {
            let row: Option<String> = stmt.query_row([k], |r| r.get(0)).optional()?;
            if let Some(t) = row {
                out.insert(
                    k.clone(),
                    serde_json::from_str(&t).context("a journal record is not valid JSON")?,
                );
            }
        }
        Ok(out)
    }
}

/// Syncing with a remote cache (`remote` is its URL).
impl Journal {
    /// Final answers among `keys` that `remote` does not hold yet, as
    /// (key, outcome JSON).
    pub fn unsynced_final(
        &mut self,
        remote: &str,
        keys: &[String],
    ) -> Result<Vec<(String, String)>> {
        self.settle()?;
        let mut st = self.conn.prepare_cached(
            "SELECT outcome FROM responses WHERE request_key = ?1 AND is_final = 1
             AND NOT EXISTS (SELECT 1 FROM remote_synced WHERE remote = ?2 AND request_key = ?1)",
        )?;
        let mut out = Vec::new();
        for k in keys {
            if let Some(t) = st
                .query_row(params![k, remote], |r| r.get::<_, String>(0))
                .optional()?
            {
                out.push((k.clone(), t));
            }
        }
        Ok(out)
    }

    /// Every final answer `remote` does not hold yet.
    pub fn all_unsynced_final(&mut self, remote: &str) -> Result<Vec<(String, String)>> {
        self.settle()?;
        let mut st = self.conn.prepare(
            "SELECT request_key, outcome FROM responses WHERE is_final = 1
             AND NOT EXISTS (SELECT 1 FROM remote_synced s WHERE s.remote = ?1 AND s.request_key = responses.request_key)",
        )?;
        let rows = st
            .query_map([remote], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Notes that `remote` holds these answers.
    pub fn mark_synced<'k>(
        &mut self,
        remote: &str,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<()> {
        // In key order: the index is written front to back, each page once.
        let mut keys: Vec<&str> = keys.into_iter().collect();
        keys.sort_unstable();
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO remote_synced (remote, request_key) VALUES (?1, ?2)",
            )?;
            for k in keys {
                st.execute(params![remote, k])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Whether batch `name` of `remote` was read already.
    pub fn batch_seen(&self, remote: &str, name: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM remote_batches WHERE remote = ?1 AND name = ?2")?
            .exists(params![remote, name])?)
    }

    /// Takes a batch's answers (key, outcome JSON): a final answer is added
    /// unless one is here already; then the batch counts as read.
    pub fn import_batch(
        &mut self,
        remote: &str,
        name: &str,
        rows: &[(String, Outcome)],
    ) -> Result<usize> {
        self.settle()?;
        let tx = self.conn.unchecked_transaction()?;
        let mut added = 0;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO responses (request_key, is_final, attempts, outcome, recorded_at)
                 VALUES (?1, 1, 1, ?2, ?3)
                 ON CONFLICT(request_key) DO UPDATE SET
                    is_final = 1, outcome = excluded.outcome, recorded_at = excluded.recorded_at
                 WHERE responses.is_final = 0",
            )?;
            let mut synced = tx.prepare_cached(
                "INSERT OR IGNORE INTO remote_synced (remote, request_key) VALUES (?1, ?2)",
            )?;
            for (k, o) in rows.iter().filter(|(_, o)| o.is_final) {
                added += ins.execute(params![k, serde_json::to_string(o)?, unix_now()])?;
                synced.execute(params![remote, k])?;
            }
            tx.execute(
                "INSERT OR IGNORE INTO remote_batches (remote, name) VALUES (?1, ?2)",
                params![remote, name],
            )?;
        }
        tx.commit()?;
        Ok(added)
    }
}

impl Drop for Journal {
    /// Commits the open batch when the journal is closed normally.
    fn drop(&mut self) {
        if let Err(e) = self.settle() {
            tracing::error!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_moves_into_responses_as_if_recorded_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        let mut j = Journal::open(&path).unwrap();
        let o = |text: &str, is_final: bool| Outcome {
            text: text.into(),
            is_final,
            ..Default::default()
        };
        // One batch, nothing read in between: a transient failure, its
        // final answer, a later answer that must not replace it; another
        // key only ever transient.
        j.record("a", &o("", false)).unwrap();
        j.record("b", &o("", false)).unwrap();
        j.record("a", &o("first", true)).unwrap();
        j.record("a", &o("second", true)).unwrap();
        j.record("b", &o("", false)).unwrap();
        j.flush().unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        let count = |sql: &str| -> i64 { raw.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            count("SELECT COUNT(*) FROM arrivals"),
            5,
            "committed in the log"
        );
        assert_eq!(count("SELECT COUNT(*) FROM responses"), 0);
        // A killed process: committed, never moved; the next open moves it.
        std::mem::forget(j);
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(count("SELECT COUNT(*) FROM arrivals"), 0);
        assert_eq!(j.get("a").unwrap().unwrap().text, "first");
        assert!(!j.get("b").unwrap().unwrap().is_final);
        let attempts = |k: &str| -> i64 {
            raw.query_row(
                "SELECT attempts FROM responses WHERE request_key = ?1",
                [k],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!((attempts("a"), attempts("b")), (2, 2));
        // Reads see what is still in the open batch.
        j.record("c", &o("late", true)).unwrap();
        assert_eq!(j.get_many(&["c".into()]).unwrap()["c"].text, "late");
    }

    #[test]
    fn final_answers_are_never_overwritten_and_transient_ones_are() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let transient = Outcome {
            error_kind: Some(crate::llm::Failure::Timeout),
            ..Default::default()
        };
        j.record("k", &transient).unwrap();
        assert!(!j.get("k").unwrap().unwrap().is_final);
        let ok = Outcome {
            text: "42".into(),
            is_final: true,
            ..Default::default()
        };
        j.record("k", &ok).unwrap();
        let later = Outcome {
            text: "other".into(),
            is_final: true,
            ..Default::default()
        };
        j.record("k", &later).unwrap();
        assert_eq!(j.get("k").unwrap().unwrap().text, "42");
        drop(j);
        // Reopened: still there.
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let m = j.get_many(&["k".into(), "missing".into()]).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m["k"].text, "42");
    }
}
