//! What crosses machines: `--shard I/N` (which requests this process
//! sends) and the request journal's batches in a remote cache (pulled before
//! a node sends, pushed as answers arrive and when it ends).

use super::*;

/// The shard (of `n`) a request key belongs to: stable on every machine.
pub fn shard_of(key: &str, n: u64) -> u64 {
    let d = crate::engine::Digest::of(key.as_bytes());
    let b = &d.0;
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) % n.max(1)
}

/// How many new answers make a journal batch for the remote cache
/// (`KVT_REMOTE_BATCH`, default 1024), or how long the oldest of them has
/// waited ([`remote_batch_wait`]), whichever comes first.
pub(super) fn remote_batch() -> usize {
    std::env::var("KVT_REMOTE_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(1024)
}

/// Answers (key, outcome JSON) waiting to go to the remote cache, and when
/// the oldest of them arrived.
#[derive(Default)]
pub(super) struct Outbox {
    rows: Vec<(String, String)>,
    oldest: Option<std::time::Instant>,
}

impl Outbox {
    /// Adds an answer; the batch when it is full.
    pub(super) fn push(
        &mut self,
        row: (String, String),
        batch: usize,
    ) -> Option<Vec<(String, String)>> {
        self.oldest.get_or_insert_with(std::time::Instant::now);
        self.rows.push(row);
        (self.rows.len() >= batch).then(|| self.take())
    }

    /// The batch when its oldest answer has waited `wait`.
    pub(super) fn due(&mut self, wait: Duration) -> Option<Vec<(String, String)>> {
        self.oldest
            .is_some_and(|t| t.elapsed() >= wait)
            .then(|| self.take())
    }

    pub(super) fn take(&mut self) -> Vec<(String, String)> {
        self.oldest = None;
        std::mem::take(&mut self.rows)
    }
}

/// How long a batch's oldest answer waits before the batch goes up anyway
/// (`KVT_REMOTE_BATCH_MS`, default 5 s): a slow server's answers still
/// reach the remote within seconds.
pub(super) fn remote_batch_wait() -> Duration {
    Duration::from_millis(
        std::env::var("KVT_REMOTE_BATCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000),
    )
}

/// Answers other machines put in the remote cache, into the local journal
/// (each batch verified and read once).
pub fn pull_journal(remote: &Remote, journal: &Mutex<Journal>) -> Result<usize> {
    let mut added = 0;
    for (name, hex) in remote.list_named(JOURNAL_DIR, "jsonl")? {
        if journal
            .lock()
            .expect("journal")
            .batch_seen(&remote.url, &name)?
        {
            continue;
        }
        let Some(bytes) = remote.get_named(&name, &hex)? else {
            continue;
        };
        let mut rows = Vec::new();
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let entry: JournalEntry = serde_json::from_slice(line).with_context(|| {
                format!(
                    "remote cache `{}`: batch `{name}` has a bad line",
                    remote.url
                )
            })?;
            rows.push((entry.key, entry.outcome));
        }
        added += journal
            .lock()
            .expect("journal")
            .import_batch(&remote.url, &name, &rows)?;
    }
    Ok(added)
}

/// One answer as a remote journal batch holds it.
#[derive(serde::Serialize, serde::Deserialize)]
struct JournalEntry {
    key: String,
    outcome: Outcome,
}

/// Pushes answers (key, outcome JSON) as one batch, then notes them synced.
pub fn push_entries(
    remote: &Remote,
    journal: &Mutex<Journal>,
    rows: &[(String, String)],
) -> Result<()> {
    for chunk in rows.chunks(4096) {
        push_batch(remote, chunk)?;
        journal
            .lock()
            .expect("journal")
            .mark_synced(&remote.url, chunk.iter().map(|(k, _)| k.as_str()))?;
    }
    Ok(())
}

/// One journal batch (key, outcome JSON) to the remote, as JSON lines.
pub(super) fn push_batch(remote: &Remote, rows: &[(String, String)]) -> Result<()> {
    let mut body = Vec::with_capacity(rows.iter().map(|(k, o)| k.len() + o.len() + 24).sum());
    for (key, outcome) in rows {
        body.extend_from_slice(br#"{"key":"#);
        body.extend_from_slice(serde_json::to_string(key)?.as_bytes());
        body.extend_from_slice(br#","outcome":"#);
        body.extend_from_slice(outcome.as_bytes());
        body.extend_from_slice(b"}\n");
    }
    Ok(remote.put_named(JOURNAL_DIR, "jsonl", &body)?)
}

/// Where the request journal's batches live in a remote cache (the engine
/// stores them as content-named objects and knows nothing of journals).
const JOURNAL_DIR: &str = "v1/journal";

/// Every final answer of `keys` the remote lacks (also those a killed run
/// never pushed).
pub(super) fn push_journal(
    remote: &Remote,
    journal: &Mutex<Journal>,
    keys: &[String],
) -> Result<()> {
    let rows = journal
        .lock()
        .expect("journal")
        .unsynced_final(&remote.url, keys)?;
    if rows.is_empty() {
        return Ok(());
    }
    push_entries(remote, journal, &rows)
}
