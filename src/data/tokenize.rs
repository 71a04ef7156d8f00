//! Token counting. Three kinds of tokenizer (`tokenizer.kind`):
//!
//! * `tiktoken` — `cl100k_base` (default) or `o200k_base`, compiled in;
//! * `hf` — a Hugging Face `tokenizer.json`, from a path or from the hub cache
//!   by model id (`models--ORG--NAME/snapshots/*/tokenizer.json`), offline;
//! * `server` — the serving engine's `/tokenize` endpoint (llama.cpp's
//!   `{"content"}` and vLLM's `{"prompt"}` forms both), so bins are counted
//!   in the model's own tokens.
//!
//! Counts of the slower kinds are cached per (tokenizer identity, text digest)
//! in `cache/v1/token_counts.sqlite`. Every row carries a checksum of its own
//! fields: a row whose bytes were damaged is a miss that is counted again and
//! rewritten, never a value (SQLite checks its pages' structure, not the
//! numbers in them). `kvt cache verify` checks every row.

use super::pretok;
use crate::config::schema::TokenizerKind;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use tiktoken_rs::CoreBPE;

/// A loaded tiktoken encoding by name.
pub fn encoding(name: &str) -> Result<&'static CoreBPE> {
    Ok(match name {
        "cl100k_base" => tiktoken_rs::cl100k_base_singleton(),
        "o200k_base" => tiktoken_rs::o200k_base_singleton(),
        other => bail!("unknown tiktoken encoding `{other}`; use `cl100k_base` or `o200k_base`"),
    })
}

pub fn count_tokens(bpe: &CoreBPE, text: &str) -> usize {
    bpe.encode_ordinary(text).len()
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(1)
}

/// Counts tokens of many texts on all cores, in input order.
pub fn count_many(bpe: &CoreBPE, texts: &[&str]) -> Vec<usize> {
    crate::engine::par_map(texts, |t| count_tokens(bpe, t))
}

/// The fast counter of a built-in encoding (`pretok`): its rank table is
/// read out of tiktoken_rs's once per process.
pub fn counter(name: &str) -> Result<pretok::Counter> {
    static CL100K: OnceLock<pretok::Ranks> = OnceLock::new();
    static O200K: OnceLock<pretok::Ranks> = OnceLock::new();
    let (cell, pattern) = match pretok::Pattern::of(name) {
        Some(p @ pretok::Pattern::Cl100k) => (&CL100K, p),
        Some(p @ pretok::Pattern::O200k) => (&O200K, p),
        // Not a built-in encoding: `encoding` says which names are.
        None => {
            return Err(encoding(name)
                .err()
                .unwrap_or_else(|| anyhow!("unknown encoding `{name}`")))
        }
    };
    let ranks = match cell.get() {
        Some(r) => r,
        None => {
            let t0 = std::time::Instant::now();
            let bpe = encoding(name)?;
            let loaded = t0.elapsed();
            let r = cell.get_or_init(|| pretok::ranks_from_tiktoken(bpe));
            tracing::debug!(
                "tokenize: {name} loaded in {loaded:?}, its ranks read out by {:?}",
                t0.elapsed()
            );
            r
        }
    };
    Ok(pretok::Counter { pattern, ranks })
}

/// Starts loading the counter of `name` on another core, so that it is
/// ready (or nearly) when the input has been read.
pub fn prefetch(name: &str) {
    if pretok::Pattern::of(name).is_some() {
        let name = name.to_string();
        std::thread::spawn(move || counter(&name).map(|_| ()));
    }
}

/// Inputs at least this large are tokenized on every core.
pub const PARALLEL_BYTES: u64 = 1 << 20;

/// Counts tokens of many texts with the built-in encoding `name`, in input
/// order; large inputs on all cores, each thread with its own memo of merged
/// pieces (texts are handed out in small batches).
pub fn count_many_named(name: &str, texts: &[&str]) -> Result<Vec<usize>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let counter = counter(name)?;
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    let workers = threads().min(texts.len());
    if workers < 2 || (bytes as u64) < PARALLEL_BYTES {
        let mut memo = pretok::Memo::default();
        return Ok(texts.iter().map(|t| counter.count(t, &mut memo)).collect());
    }
    const BATCH: usize = 8;
    let next = AtomicUsize::new(0);
    let work = || {
        let mut memo = pretok::Memo::default();
        let mut got = Vec::new();
        loop {
            let start = next.fetch_add(BATCH, Ordering::Relaxed);
            if start >= texts.len() {
                return got;
            }
            for (i, t) in texts.iter().enumerate().skip(start).take(BATCH) {
                got.push((i, counter.count(t, &mut memo)));
            }
        }
    };
    let work = &work;
    let parts: Vec<Vec<(usize, usize)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (1..workers).map(|_| s.spawn(work)).collect();
        let mut parts = vec![work()];
        parts.extend(hs.into_iter().map(|h| h.join().expect("tokenizer thread")));
        parts
    });
    let mut out = vec![0usize; texts.len()];
    for (i, n) in parts.into_iter().flatten() {
        out[i] = n;
    }
    Ok(out)
}

/// A tokenizer of any kind.
#[derive(Clone)]
pub enum Tok {
    /// A built-in encoding, by name (`cl100k_base`, `o200k_base`).
    Tiktoken(String),
    Hf(Arc<tokenizers::Tokenizer>, String),
    Server {
        url: String,
        model: String,
    },
}

/// The hub cache's `tokenizer.json` for a model id such as `org/name`.
pub fn hub_tokenizer(model: &str) -> Option<PathBuf> {
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HF_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface"))
                })
                .map(|h| h.join("hub"))
        })?;
    let snaps = hub
        .join(format!("models--{}", model.replace('/', "--")))
        .join("snapshots");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snaps)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .map(|d| d.join("tokenizer.json"))
        .find(|p| p.is_file())
}

/// The `tokenizer.json` a `tokenizer.kind: hf` config names: a file, a
/// directory holding one, or a model id in the Hugging Face hub cache.
pub fn resolve_hf(name: &str, root: &Path) -> Result<PathBuf> {
    let local = root.join(name);
    if local.is_file() {
        return Ok(local);
    }
    if local.join("tokenizer.json").is_file() {
        return Ok(local.join("tokenizer.json"));
    }
    hub_tokenizer(name).ok_or_else(|| {
        anyhow!(
            "config `tokenizer.name`: `{}` is neither a tokenizer.json file nor a model in the Hugging Face hub cache (looked for {} and models--{}/snapshots/*/tokenizer.json); nothing is downloaded",
            name,
            local.display(),
            name.replace('/', "--")
        )
    })
}

/// blake3 of a file's bytes, as hex.
pub fn file_digest(path: &Path) -> Result<String> {
    Ok(crate::engine::digest::files_digest(&[path])?)
}

/// What identifies a configured tokenizer's files, for node keys: the bytes
/// of an `hf` tokenizer.json (a changed file makes `prepare` stale); nothing
/// for tiktoken (built into kvt) or a server (its model name is in the config).
pub fn file_identity(
    cfg: &crate::config::schema::Tokenizer,
    root: &Path,
) -> Result<Option<String>> {
    if cfg.kind != TokenizerKind::Hf {
        return Ok(None);
    }
    let path = resolve_hf(&cfg.name, root)?;
    Ok(Some(format!("tokenizer {}", file_digest(&path)?)))
}

type Loaded = Vec<(PathBuf, Arc<tokenizers::Tokenizer>)>;

fn load_hf(path: &Path) -> Result<Arc<tokenizers::Tokenizer>> {
    static CACHE: OnceLock<Mutex<Loaded>> = OnceLock::new();
    let mut c = CACHE
        .get_or_init(Default::default)
        .lock()
        .expect("tokenizer cache");
    if let Some((_, t)) = c.iter().find(|(p, _)| p == path) {
        return Ok(t.clone());
    }
    let t = Arc::new(
        tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("`{}` is not a usable tokenizer.json: {e}", path.display()))?,
    );
    c.push((path.to_path_buf(), t.clone()));
    Ok(t)
}

impl Tok {
    /// Loads the tokenizer a config names; `root` resolves relative paths,
    /// `engine_url` is the fallback for a server tokenizer.
    pub fn load(
        cfg: &crate::config::schema::Tokenizer,
        root: &Path,
        engine_url: Option<&str>,
    ) -> Result<Tok> {
        match cfg.kind {
            TokenizerKind::Tiktoken => {
                pretok::Pattern::of(&cfg.name)
                    .map_or_else(|| encoding(&cfg.name).map(drop), |_| Ok(()))?;
                Ok(Tok::Tiktoken(cfg.name.clone()))
            }
            TokenizerKind::Hf => {
                let path = resolve_hf(&cfg.name, root)?;
                // The file's bytes are the identity (cached counts), not its name.
                let digest = file_digest(&path)?;
                Ok(Tok::Hf(
                    load_hf(&path)?,
                    format!("{}#{}", cfg.name, &digest[..16]),
                ))
            }
            TokenizerKind::Server => {
                let url = cfg
                    .url
                    .clone()
                    .or_else(|| engine_url.map(|u| u.trim_end_matches('/').trim_end_matches("/v1").to_string()))
                    .ok_or_else(|| anyhow!("config `tokenizer.url` (or `engine.base_url`) is required for `tokenizer.kind: server`"))?;
                Ok(Tok::Server {
                    url,
                    model: cfg.name.clone(),
                })
            }
        }
    }

    /// LongBench's middle truncation in this tokenizer's tokens: a text longer
    /// than `max` tokens keeps its first and last `max / 2` tokens. Returns the
    /// cut text and the original token count, or `None` when it fits.
    pub fn truncate_middle(&self, text: &str, max: usize) -> Result<Option<(String, usize)>> {
        let half = max / 2;
        match self {
            Tok::Tiktoken(name) => {
                let bpe = encoding(name)?;
                let toks = bpe.encode_ordinary(text);
                if toks.len() <= max {
                    return Ok(None);
                }
                let decode = |t: &[u32]| {
                    String::from_utf8_lossy(&bpe.decode_bytes(t).unwrap_or_default()).into_owned()
                };
                Ok(Some((
                    format!("{}{}", decode(&toks[..half]), decode(&toks[toks.len() - half..])),
                    toks.len(),
                )))
            }
            Tok::Hf(t, _) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| anyhow!("tokenizing for truncation: {e}"))?;
                let ids = enc.get_ids();
                if ids.len() <= max {
                    return Ok(None);
                }
                let decode = |part: &[u32]| {
                    t.decode(part, false)
                        .map_err(|e| anyhow!("decoding for truncation: {e}"))
                };
                Ok(Some((
                    format!("{}{}", decode(&ids[..half])?, decode(&ids[ids.len() - half..])?),
                    ids.len(),
                )))
            }
            Tok::Server { .. } => bail!(
                "`prompt.max_tokens` needs a local tokenizer to cut prompts (`tokenizer.kind: tiktoken` or `hf`); a server tokenizer only counts"
            ),
        }
    }

    /// What identifies the tokenizer in cached counts.
    pub fn identity(&self) -> String {
        match self {
            Tok::Tiktoken(n) => format!("tiktoken:{n}"),
            Tok::Hf(_, n) => format!("hf:{n}"),
            Tok::Server { model, .. } => format!("server:{model}"),
        }
    }

    /// Token counts of many texts, in order; slow kinds go through the count cache.
    pub fn count_many(&self, texts: &[&str], cache_root: Option<&Path>) -> Result<Vec<usize>> {
        if let Tok::Tiktoken(name) = self {
            return count_many_named(name, texts);
        }
        // The count cache is only a cache: if it cannot be opened or read
        // (damaged, say), counting goes on without it.
        let cache = cache_root.and_then(|r| {
            let path = r.join("v1").join("token_counts.sqlite");
            CountCache::open(&path)
                .map_err(|e| warn_count_cache(&path, &e))
                .ok()
        });
        let id = self.identity();
        let digests: Vec<String> = texts
            .iter()
            .map(|t| blake3::hash(t.as_bytes()).to_hex().to_string())
            .collect();
        let mut damaged = 0usize;
        let mut out: Vec<Option<usize>> = match &cache {
            Some(c) => digests
                .iter()
                .map(|d| match c.get(&id, d) {
                    Ok(n) => n,
                    Err(_) => {
                        damaged += 1;
                        None
                    }
                })
                .collect(),
            None => vec![None; texts.len()],
        };
        if damaged > 0 {
            tracing::warn!(
                "token-count cache: {damaged} damaged entr{} ignored and counted again (`kvt cache verify` lists them)",
                if damaged == 1 { "y" } else { "ies" }
            );
        }
        let todo: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
        if !todo.is_empty() {
            let todo_texts: Vec<&str> = todo.iter().map(|&i| texts[i]).collect();
            let counted = match self {
                Tok::Hf(t, _) => crate::engine::par_map(&todo_texts, |s| {
                    t.encode(*s, false)
                        .map(|e| e.len())
                        .map_err(|e| anyhow!("tokenizing: {e}"))
                })
                .into_iter()
                .collect::<Result<Vec<_>>>()?,
                Tok::Server { url, model } => server_counts(url, model, &todo_texts)?,
                Tok::Tiktoken(..) => unreachable!(),
            };
            for (k, &i) in todo.iter().enumerate() {
                out[i] = Some(counted[k]);
            }
            if let Some(c) = &cache {
                let rows = todo
                    .iter()
                    .map(|&i| (digests[i].as_str(), out[i].unwrap_or(0)));
                if let Err(e) = c.put_many(&id, rows) {
                    tracing::warn!("token-count cache: could not store counts ({e:#}); they will be counted again next time");
                }
            }
        }
        Ok(out.into_iter().map(|x| x.unwrap_or(0)).collect())
    }
}

/// Asks `/tokenize` for each text (8 at a time).
fn server_counts(url: &str, model: &str, texts: &[&str]) -> Result<Vec<usize>> {
    use futures_util::StreamExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()?;
    let endpoint = format!("{}/tokenize", url.trim_end_matches('/'));
    rt.block_on(async {
        let results: Vec<Result<usize>> = futures_util::stream::iter(texts.iter())
            .map(|t| {
                let (http, endpoint) = (&http, &endpoint);
                async move {
                    let body = serde_json::json!({"content": t, "prompt": t, "model": model, "add_special": false, "add_special_tokens": false});
                    let resp = http.post(endpoint).json(&body).send().await.with_context(|| {
                        format!("asking {endpoint} for token counts (is the server up? `tokenizer.kind: server` needs it during prepare)")
                    })?;
                    let status = resp.status();
                    let v: serde_json::Value = resp.json().await.with_context(|| format!("{endpoint} answered HTTP {status} without JSON"))?;
                    v.get("count")
                        .and_then(serde_json::Value::as_u64)
                        .map(|c| c as usize)
                        .or_else(|| v.get("tokens").and_then(serde_json::Value::as_array).map(Vec::len))
                        .ok_or_else(|| anyhow!("{endpoint} answered HTTP {status} with neither `count` nor `tokens`: {v}"))
                }
            })
            .buffered(8)
            .collect()
            .await;
        results.into_iter().collect()
    })
}

fn warn_count_cache(path: &Path, e: &anyhow::Error) {
    tracing::warn!(
        "token-count cache `{}` is unusable ({e:#}); counting without it. `kvt cache verify` checks it; delete the file to start it afresh",
        path.display()
    );
}

/// The checksum a count row carries: its own fields, hashed.
fn row_check(tok: &str, digest: &str, n: i64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"kvt token count v2\0");
    h.update(tok.as_bytes());
    h.update(b"\0");
    h.update(digest.as_bytes());
    h.update(b"\0");
    h.update(&n.to_le_bytes());
    h.finalize().to_hex()[..16].to_string()
}

/// What `kvt cache verify` finds in the token-count cache: the rows read
/// and how many of them fail their checksum. SQLite errors (a damaged page)
/// are errors.
pub fn verify_count_cache(path: &Path) -> Result<(usize, usize)> {
    let c =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let has_table: bool = c.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'counts2'",
        [],
        |r| r.get(0),
    )?;
    if !has_table {
        return Ok((0, 0));
    }
    let mut st = c.prepare("SELECT tokenizer, digest, n, \"check\" FROM counts2")?;
    let mut rows = st.query([])?;
    let (mut read, mut bad) = (0, 0);
    while let Some(r) = rows.next()? {
        read += 1;
        let ok = (|| -> rusqlite::Result<bool> {
            let (tok, digest, n, check): (String, String, i64, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            Ok(row_check(&tok, &digest, n) == check)
        })()
        .unwrap_or(false);
        if !ok {
            bad += 1;
        }
    }
    Ok((read, bad))
}

/// Cached token counts: (tokenizer identity, text digest) → count, each row
/// with its checksum. (Rows of the first layout, table `counts`, had none and
/// are not read.)
struct CountCache(rusqlite::Connection);

impl CountCache {
    fn open(path: &Path) -> Result<CountCache> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let c = rusqlite::Connection::open(path)?;
        c.busy_timeout(std::time::Duration::from_secs(30))?;
        // Reading the schema is where a damaged file shows itself.
        c.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))?;
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS counts2 (tokenizer TEXT NOT NULL, digest TEXT NOT NULL,
             n INTEGER NOT NULL, \"check\" TEXT NOT NULL, PRIMARY KEY (tokenizer, digest));",
        )?;
        Ok(CountCache(c))
    }
    /// A count, `None` when absent; an error when the row fails its checksum
    /// or cannot be read.
    fn get(&self, tok: &str, digest: &str) -> Result<Option<usize>> {
        use rusqlite::OptionalExtension;
        let row = self
            .0
            .prepare_cached(
                "SELECT tokenizer, digest, n, \"check\" FROM counts2 WHERE tokenizer = ?1 AND digest = ?2",
            )?
            .query_row([tok, digest], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .optional()?;
        let Some((t, d, n, check)) = row else {
            return Ok(None);
        };
        anyhow::ensure!(
            t == tok && d == digest && n >= 0 && row_check(&t, &d, n) == check,
            "token-count row for {digest} fails its checksum"
        );
        Ok(Some(n as usize))
    }
    fn put_many<'a>(&self, tok: &str, rows: impl Iterator<Item = (&'a str, usize)>) -> Result<()> {
        let tx = self.0.unchecked_transaction()?;
        {
            let mut st =
                tx.prepare_cached("INSERT OR REPLACE INTO counts2 VALUES (?1, ?2, ?3, ?4)")?;
            for (d, n) in rows {
                let n = n as i64;
                st.execute(rusqlite::params![tok, d, n, row_check(tok, d, n)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_the_encodings() {
        let cl = encoding("cl100k_base").unwrap();
        // "hello world" is two tokens in both encodings; digits split in threes in cl100k.
        assert_eq!(count_tokens(cl, "hello world"), 2);
        assert_eq!(count_tokens(cl, "918273"), 2);
        assert_eq!(count_tokens(cl, ""), 0);
        let o2 = encoding("o200k_base").unwrap();
        assert_eq!(count_tokens(o2, "hello world"), 2);
        assert!(encoding("gpt2").is_err());
        // Parallel counting keeps input order. Numbers take no leading space:
        // "918273 918273" is 918 · 273 · " " · 918 · 273.
        let texts = ["a", "hello world", "", "918273 918273"];
        assert_eq!(count_many(cl, &texts), vec![1, 2, 0, 5]);
        // The fast counter agrees with tiktoken_rs, on small inputs (one
        // thread) and large ones (every core, a memo per thread).
        let small = ["a", "hello world", "", "918273 918273", "don't\n\n  stop"];
        assert_eq!(
            count_many_named("cl100k_base", &small).unwrap(),
            count_many(cl, &small)
        );
        let big: Vec<String> = (0..600)
            .map(|i| format!("{i} {}", "token counting at scale, ".repeat(80)))
            .collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        assert!(big.iter().map(|t| t.len()).sum::<usize>() as u64 > PARALLEL_BYTES);
        prefetch("o200k_base");
        for (name, bpe) in [("cl100k_base", cl), ("o200k_base", o2)] {
            assert_eq!(count_many_named(name, &big).unwrap(), count_many(bpe, &big));
        }
        assert!(count_many_named("gpt2", &small).is_err());
    }
}
