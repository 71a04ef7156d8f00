//! A remote cache on object storage (`cache.remote`: `s3://bucket/prefix`,
//! `gs://`, `az://`, or `file:///shared/dir`), shared by machines and people.
//!
//! Layout under the prefix (content-addressed, written create-only, so two
//! writers racing on one key are safe and nothing is ever overwritten):
//!
//! * `v1/objects/<blake3>`: the bytes of a store object;
//! * `v1/actions/<node key>.json`: an action record (its outputs pushed first);
//! * `<dir>/<blake3>.<ext>`: a caller's content-named objects (`put_named`;
//!   kvt keeps its request journal's batches in `v1/journal/`, and the
//!   engine knows nothing of what they hold).
//!
//! Everything pulled is verified against its digest before use: a corrupt
//! remote object is reported and never used. Credentials come from the usual
//! environment variables and instance configuration (object_store's
//! `from_env`), never from the config file, and never appear in kvt's keys,
//! logs, reports or databases: kvt names a remote by its URL, which holds
//! none. A remote that cannot be reached is a warning and a local build,
//! unless it is required (`--remote required`).

use super::action::ActionRecord;
use super::digest::Digest;
use super::error::{bail, failure, Context, EngineError, Result};
use super::store::ContentStore;
use futures_util::TryStreamExt;
use object_store::path::Path as RPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    rt: tokio::runtime::Runtime,
    /// The URL as configured (no credentials are ever part of it).
    pub url: String,
    /// Failures are errors instead of a warning and a local build.
    pub required: bool,
    /// Set after the first failure of an optional remote: it is not tried again.
    down: AtomicBool,
    warned: AtomicBool,
    /// The first failure of a required remote where it could not be
    /// returned (while deciding what is fresh); the build fails with it.
    error: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// How a build treats `cache.remote`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteMode {
    /// Use it; if it fails, warn and go on locally.
    Optional,
    /// Use it; if it fails, the build fails.
    Required,
    /// Ignore it.
    Off,
}

/// A remote that does not answer is given up on in seconds, not minutes:
/// the build goes on locally (or fails, when the remote is required).
#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 2,
        retry_timeout: std::time::Duration::from_secs(15),
        ..Default::default()
    }
}

#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
fn client_options() -> object_store::ClientOptions {
    let mut o = object_store::ClientOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(3))
        .with_timeout(std::time::Duration::from_secs(120));
    // A loopback or in-cluster endpoint may speak plain HTTP.
    if std::env::var("AWS_ENDPOINT_URL")
        .or_else(|_| std::env::var("AWS_ENDPOINT"))
        .is_ok_and(|e| e.starts_with("http://"))
    {
        o = o.with_allow_http(true);
    }
    o
}

// Without a cloud feature the bucket and prefix have no store to go to.
#[cfg_attr(
    not(any(feature = "s3", feature = "gcs", feature = "azure")),
    allow(unused_variables)
)]
fn store_for(url: &str, root: &std::path::Path) -> Result<(Arc<dyn ObjectStore>, String)> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| failure!("`{url}` is not a URL (s3://bucket/prefix, file:///dir, …)"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/').to_string();
    match scheme {
        "file" => {
            let dir = std::path::Path::new(rest);
            let dir = if dir.is_absolute() {
                dir.to_path_buf()
            } else {
                root.join(dir)
            };
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating the remote cache directory `{}`", dir.display()))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
            Ok((Arc::new(fs), String::new()))
        }
        #[cfg(feature = "s3")]
        "s3" => {
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry())
                .with_client_options(client_options())
                .build()?;
            Ok((Arc::new(s3), prefix))
        }
        #[cfg(feature = "gcs")]
        "gs" => {
            let gcs = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_retry(retry())
                .with_client_options(client_options())
                .with_bucket_name(bucket)
                .build()?;
            Ok((Arc::new(gcs), prefix))
        }
        #[cfg(feature = "azure")]
        "az" => {
            let az = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_retry(retry())
                .with_client_options(client_options())
                .with_container_name(bucket)
                .build()?;
            Ok((Arc::new(az), prefix))
        }
        #[allow(unreachable_patterns)]
        "s3" | "gs" | "az" => bail!(
            "this kvt was built without `{scheme}://` support: rebuild with `cargo install --path . --features {}`",
            match scheme {
                "s3" => "s3",
                "gs" => "gcs",
                _ => "azure",
            }
        ),
        other => bail!("unknown remote scheme `{other}://` (s3, gs, az or file)"),
    }
}

impl Remote {
    pub fn open(url: &str, root: &std::path::Path, required: bool) -> Result<Remote> {
        let (store, prefix) = store_for(url, root)
            .with_context(|| format!("config `cache.remote`: cannot use `{url}`"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kvt-remote")
            .enable_all()
            .build()?;
        Ok(Remote {
            store,
            prefix,
            rt,
            url: url.to_string(),
            required,
            down: AtomicBool::new(false),
            warned: AtomicBool::new(false),
            error: std::sync::Mutex::new(None),
        })
    }

    /// Keeps the first error a caller could not return.
    pub fn note_error(&self, e: impl Into<super::error::BoxError>) {
        let text = super::error::chain_text(e.into().as_ref());
        tracing::error!("{text}");
        let mut slot = self.error.lock().expect("remote error");
        slot.get_or_insert(text);
    }

    /// The first error kept by [`Remote::note_error`].
    pub fn take_error(&self) -> Option<String> {
        self.error.lock().expect("remote error").take()
    }

    /// One listing, to fail early when a required remote cannot be reached.
    pub fn probe(&self) -> Result<()> {
        let path = self.path("v1");
        self.rt
            .block_on(async {
                let mut s = self.store.list(Some(&path));
                s.try_next().await.map(|_| ())
            })
            .with_context(|| format!("remote cache `{}` cannot be reached", self.url))
    }

    /// Runs a future to completion on the remote's own runtime. Called from
    /// inside another runtime (an HTTP backend's task records an answer and
    /// pushes a batch), it runs on a helper thread: a runtime cannot be
    /// blocked on from a thread that drives one.
    fn block<T: Send>(&self, fut: impl std::future::Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.rt.block_on(fut))
                    .join()
                    .expect("remote cache thread")
            })
        } else {
            self.rt.block_on(fut)
        }
    }

    fn path(&self, key: &str) -> RPath {
        if self.prefix.is_empty() {
            RPath::from(key)
        } else {
            RPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Runs a remote operation under the remote's policy: an optional
    /// remote that fails warns once and is skipped from then on.
    fn guard<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
        if self.down.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match f() {
            Ok(v) => Ok(Some(v)),
            Err(e) if self.required => Err(EngineError::context(
                format!("remote cache `{}`: {what}", self.url),
                e,
            )),
            Err(e) => {
                self.down.store(true, Ordering::Relaxed);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "remote cache `{}` unavailable ({what}: {e:#}); building with the local cache only (`--remote required` makes this an error)",
                        self.url
                    );
                }
                Ok(None)
            }
        }
    }

    /// The bytes at `key`, or None when there is none.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let r = self.guard(&format!("reading `{key}`"), || {
            self.block(async {
                match self.store.get(&path).await {
                    Ok(g) => Ok(Some(g.bytes().await?.to_vec())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            })
        })?;
        Ok(r.flatten())
    }

    /// Writes `bytes` at `key` unless something is there already (a
    /// content-addressed key holds the same bytes whoever wrote it).
    pub fn put_create(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(key);
        let payload = PutPayload::from(bytes.to_vec());
        self.guard(&format!("writing `{key}`"), || {
            self.block(async {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match self.store.put_opts(&path, payload.clone(), opts).await {
                    Ok(_) => Ok(()),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Ok(()),
                    // A store without conditional writes: content-addressed
                    // keys are safe to write twice.
                    Err(object_store::Error::NotImplemented { .. }) => self
                        .store
                        .put(&path, payload)
                        .await
                        .map(|_| ())
                        .map_err(Into::into),
                    Err(e) => Err(e.into()),
                }
            })
        })?;
        Ok(())
    }

    /// The keys under `dir` (relative to the prefix), e.g. `v1/actions`.
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        let path = self.path(dir);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let r = self.guard(&format!("listing `{dir}`"), || {
            self.block(async {
                let metas: Vec<_> = self.store.list(Some(&path)).try_collect().await?;
                Ok(metas
                    .into_iter()
                    .map(|m| {
                        let s = m.location.to_string();
                        s.strip_prefix(&strip).unwrap_or(&s).to_string()
                    })
                    .collect())
            })
        })?;
        Ok(r.unwrap_or_default())
    }

    /// The keys under `dir` with their sizes in bytes.
    pub fn list_sized(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let path = self.path(dir);
        let r = self.guard(&format!("listing `{dir}`"), || {
            self.block(async {
                let metas: Vec<_> = self.store.list(Some(&path)).try_collect().await?;
                Ok(metas
                    .into_iter()
                    .map(|m| (m.location.to_string(), m.size))
                    .collect())
            })
        })?;
        Ok(r.unwrap_or_default())
    }

    /// Pushes every record of `actions` with its outputs, skipping what the
    /// remote lists already; returns (records, objects) pushed.
    pub fn push_all(
        &self,
        store: &ContentStore,
        actions: &super::action::ActionCache,
    ) -> Result<(usize, usize)> {
        let have = |dir: &str| -> Result<std::collections::HashSet<String>> {
            Ok(self
                .list(dir)?
                .into_iter()
                .filter_map(|k| k.rsplit('/').next().map(str::to_string))
                .collect())
        };
        let (have_objects, have_actions) = (have("v1/objects")?, have("v1/actions")?);
        let (mut records, mut objects) = (0, 0);
        let mut pushed = std::collections::HashSet::new();
        for (rec, _, _) in actions.list() {
            if have_actions.contains(&format!("{}.json", rec.key.hex())) {
                continue;
            }
            for out in &rec.outputs {
                let hex = out.digest.hex();
                if !have_objects.contains(&hex) && pushed.insert(hex) {
                    let bytes = store.get(&out.digest)?;
                    self.put_create(&Self::object_key(&out.digest), &bytes)?;
                    objects += 1;
                }
            }
            self.put_create(&Self::action_key(&rec.key), &serde_json::to_vec(&rec)?)?;
            records += 1;
        }
        Ok((records, objects))
    }

    /// Pulls every record the local cache lacks, with its outputs
    /// (verified); returns how many.
    pub fn pull_all(
        &self,
        store: &ContentStore,
        actions: &super::action::ActionCache,
    ) -> Result<usize> {
        let mut n = 0;
        for k in self.list("v1/actions")? {
            let Some(hex) = k.rsplit('/').next().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            let Some(key) = Digest::from_hex(hex) else {
                continue;
            };
            if actions.get(&key).is_some() {
                continue;
            }
            if let Some(rec) = self.pull_record(store, &key)? {
                actions.put(&rec)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn object_key(d: &Digest) -> String {
        format!("v1/objects/{}", d.hex())
    }

    fn action_key(key: &Digest) -> String {
        format!("v1/actions/{}.json", key.hex())
    }

    /// Pushes a built node: its outputs (create-only), then its record.
    pub fn push_record(&self, store: &ContentStore, rec: &ActionRecord) -> Result<()> {
        for out in &rec.outputs {
            let bytes = store.get(&out.digest)?;
            self.put_create(&Self::object_key(&out.digest), &bytes)?;
        }
        self.put_create(&Self::action_key(&rec.key), &serde_json::to_vec(rec)?)
    }

    /// The record of `key` from the remote, with every output pulled into
    /// `store` and verified; None when the remote has no (usable) record.
    pub fn pull_record(&self, store: &ContentStore, key: &Digest) -> Result<Option<ActionRecord>> {
        let Some(bytes) = self.get(&Self::action_key(key))? else {
            return Ok(None);
        };
        let rec: ActionRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    "remote cache `{}`: the record of {} is not valid ({e}); ignoring it",
                    self.url,
                    key.hex()
                );
                return Ok(None);
            }
        };
        if rec.key != *key {
            tracing::warn!(
                "remote cache `{}`: the record at {} is for another key; ignoring it",
                self.url,
                key.hex()
            );
            return Ok(None);
        }
        for out in &rec.outputs {
            if store.verify(&out.digest).is_ok() {
                continue;
            }
            if !self.pull_object(store, &out.digest)? {
                return Ok(None);
            }
        }
        Ok(Some(rec))
    }

    /// Pulls one object into `store` if its bytes hash to `d`; a missing or
    /// corrupt remote object is reported and not used (false).
    pub fn pull_object(&self, store: &ContentStore, d: &Digest) -> Result<bool> {
        let Some(bytes) = self.get(&Self::object_key(d))? else {
            return Ok(false);
        };
        let actual = Digest::of(&bytes);
        if actual != *d {
            let msg = format!(
                "remote cache `{}`: object {} is corrupt (its bytes hash to {}); not used — delete it from the remote",
                self.url,
                d.hex(),
                actual.hex()
            );
            if self.required {
                bail!("{msg}");
            }
            tracing::warn!("{msg}");
            return Ok(false);
        }
        store.put(&bytes)?;
        Ok(true)
    }

    /// Puts `bytes` under `dir/<blake3 of the bytes>.ext`: a content-named
    /// object, written once (a caller's own records, such as kvt's request
    /// journal batches).
    pub fn put_named(&self, dir: &str, ext: &str, bytes: &[u8]) -> Result<()> {
        let name = format!("{dir}/{}.{ext}", Digest::of(bytes).hex());
        self.put_create(&name, bytes)
    }

    /// The content-named objects under `dir` with extension `ext`: (key,
    /// the digest its name claims).
    pub fn list_named(&self, dir: &str, ext: &str) -> Result<Vec<(String, String)>> {
        let suffix = format!(".{ext}");
        Ok(self
            .list(dir)?
            .into_iter()
            .filter_map(|k| {
                let file = k.rsplit('/').next()?.to_string();
                let hex = file.strip_suffix(&suffix)?.to_string();
                Some((k, hex))
            })
            .collect())
    }

    /// A content-named object's bytes, verified against the digest in its
    /// name. A corrupt one is reported once per process and not fetched
    /// again (several nodes of a build may read the same objects).
    pub fn get_named(&self, key: &str, hex: &str) -> Result<Option<Vec<u8>>> {
        let seen = format!("{}/{key}", self.url);
        if known_corrupt().lock().expect("corrupt set").contains(&seen) {
            return Ok(None);
        }
        let Some(bytes) = self.get(key)? else {
            return Ok(None);
        };
        if Digest::of(&bytes).hex() != hex {
            let msg = format!(
                "remote cache `{}`: `{key}` is corrupt (its bytes do not hash to the digest in its name); not used — delete it from the remote",
                self.url
            );
            if self.required {
                bail!("{msg}");
            }
            // Two nodes may find it at once: the first to note it warns.
            if known_corrupt().lock().expect("corrupt set").insert(seen) {
                tracing::warn!("{msg}");
            }
            return Ok(None);
        }
        Ok(Some(bytes))
    }
}

/// Content-named objects this process found corrupt (`url/key`): skipped,
/// and warned about once.
fn known_corrupt() -> &'static std::sync::Mutex<std::collections::HashSet<String>> {
    static SET: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    SET.get_or_init(Default::default)
}
