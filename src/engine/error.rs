//! The engine's own error type. It says what kind of failure happened; the
//! caller decides what that means (kvt maps the kinds to exit codes).

/// What kind of failure an [`EngineError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A node or check failed.
    Failed,
    /// Bad configuration, pipeline definition or usage: fix the input, not the run.
    Usage,
    /// The user interrupted; finished work is kept.
    Interrupted,
    /// The cache is locked by another process and waiting was declined
    /// (`no_wait`): a failure, which a caller may explain in its own words.
    Locked,
}

/// An error that carries its kind. Any other error counts as `Failed`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    pub kind: ErrorKind,
    pub message: String,
}

impl EngineError {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Usage,
            message: message.into(),
        }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Failed,
            message: message.into(),
        }
    }
    pub fn locked(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Locked,
            message: message.into(),
        }
    }
    pub fn interrupted(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Interrupted,
            message: message.into(),
        }
    }
}

/// The kind of an error chain: the first `EngineError` in it decides.
pub fn kind_of(err: &anyhow::Error) -> ErrorKind {
    err.chain()
        .find_map(|c| c.downcast_ref::<EngineError>().map(|e| e.kind))
        .unwrap_or(ErrorKind::Failed)
}

/// The candidate closest to `word` by edit distance, if close enough to be a
/// plausible typo (used for "did you mean" hints).
pub fn closest<'a>(word: &str, candidates: &'a [String]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (word.len().max(c.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

/// What a build reports while it runs; the caller draws it (a progress bar,
/// log lines, nothing). The engine itself never writes to the terminal.
pub trait Reporter: Sync {
    /// The build is about to visit `total` nodes.
    fn start(&self, _total: usize) {}
    /// A node was found fresh (reused from the cache).
    fn fresh(&self, _node: &str) {}
    /// A stale node starts running.
    fn running(&self, _node: &str) {}
    /// A node finished: `Ok(ms)` or `Err(the error chain)`.
    fn finished(&self, _node: &str, _result: Result<f64, &str>) {}
    /// A line for the user (waiting for a lock, an interrupt).
    fn note(&self, _message: &str) {}
    /// The build is over.
    fn finish(&self) {}
}

/// A reporter that says nothing.
pub struct Silent;
impl Reporter for Silent {}

/// A node that did its part and stops short of a result on purpose (a
/// sharded `infer` that sent only its shard's requests): not a failure, not
/// recorded; what depends on it does not run in this build.
#[derive(Debug)]
pub struct Unfinished(pub String);

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unfinished {}
