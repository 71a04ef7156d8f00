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

/// Any error, boxed: what an op returns (kvt's ops use `anyhow`, whose
/// errors convert with `?`; the engine itself does not depend on it).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The engine's results.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What an op's methods return: any error, boxed.
pub type OpResult<T = ()> = std::result::Result<T, BoxError>;

/// The engine's error: the variants a caller branches on, plus the causes
/// below them. [`EngineError::kind`] says which kind a chain is.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A node or check failed.
    #[error("{0}")]
    Failed(String),
    /// Bad configuration, pipeline definition or usage.
    #[error("{0}")]
    Usage(String),
    /// The user interrupted; finished work is kept.
    #[error("{0}")]
    Interrupted(String),
    /// The cache is locked by another process and waiting was declined.
    #[error("{0}")]
    Locked(String),
    /// What the engine was doing when `source` happened (reading a file,
    /// keying a node): the kind is the source's.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: BoxError,
    },
    /// An op's own error, as the op returned it (its kind is found inside).
    #[error(transparent)]
    Op(BoxError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A cache object that is corrupt or missing.
    #[error(transparent)]
    Object(#[from] super::store::ObjectError),
    /// The remote cache's object store failed.
    #[error(transparent)]
    Remote(#[from] object_store::Error),
}

impl From<BoxError> for EngineError {
    fn from(e: BoxError) -> Self {
        match e.downcast::<EngineError>() {
            Ok(own) => *own,
            Err(other) => EngineError::Op(other),
        }
    }
}

impl EngineError {
    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }
    pub fn locked(message: impl Into<String>) -> Self {
        Self::Locked(message.into())
    }
    pub fn interrupted(message: impl Into<String>) -> Self {
        Self::Interrupted(message.into())
    }
    /// `source`, explained by what the engine was doing.
    pub fn context(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Context {
            what: what.into(),
            source: source.into(),
        }
    }
    /// The kind of this error: a wrapper's is its cause's.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Failed(_) | Self::Io(_) | Self::Json(_) | Self::Object(_) | Self::Remote(_) => {
                ErrorKind::Failed
            }
            Self::Usage(_) => ErrorKind::Usage,
            Self::Interrupted(_) => ErrorKind::Interrupted,
            Self::Locked(_) => ErrorKind::Locked,
            Self::Context { source, .. } | Self::Op(source) => kind_of(source.as_ref()),
        }
    }
    /// The error a transparent variant stands for (it has no words of its own).
    fn transparent(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Op(e) => Some(e.as_ref()),
            Self::Io(e) => Some(e),
            Self::Json(e) => Some(e),
            Self::Object(e) => Some(e),
            Self::Remote(e) => Some(e),
            _ => None,
        }
    }
    /// Whether this error or a cause of it is a `T`.
    pub fn find<T: std::error::Error + 'static>(&self) -> Option<&T> {
        chain(self).find_map(|c| c.downcast_ref::<T>())
    }
}

/// The kind of an error chain: the first `EngineError` in it decides (any
/// other error counts as `Failed`).
pub fn kind_of(err: &(dyn std::error::Error + 'static)) -> ErrorKind {
    chain(err)
        .find_map(|c| c.downcast_ref::<EngineError>().map(EngineError::kind))
        .unwrap_or(ErrorKind::Failed)
}

/// An error and its causes, outermost first; an op's error wrapped by the
/// engine is seen as itself (the wrapper says nothing of its own).
pub fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    fn unwrap<'a>(
        mut e: &'a (dyn std::error::Error + 'static),
    ) -> &'a (dyn std::error::Error + 'static) {
        while let Some(inner) = e
            .downcast_ref::<EngineError>()
            .and_then(EngineError::transparent)
        {
            e = inner;
        }
        e
    }
    std::iter::successors(Some(unwrap(err)), |e| e.source().map(unwrap))
}

/// An error chain as one line, causes joined by ": ".
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    chain(err)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// `anyhow`-like context for the engine's own results.
pub trait Context<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T>;
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<BoxError>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| EngineError::context(what.to_string(), e))
    }
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| EngineError::context(what().to_string(), e))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T> {
        self.ok_or_else(|| EngineError::Failed(what.to_string()))
    }
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| EngineError::Failed(what().to_string()))
    }
}

/// Returns early with an [`EngineError::Failed`] made from a format string.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::EngineError::Failed(format!($($arg)*)).into())
    };
}
/// An [`EngineError::Failed`] made from a format string.
macro_rules! failure {
    ($($arg:tt)*) => {
        $crate::error::EngineError::Failed(format!($($arg)*))
    };
}
pub(crate) use {bail, failure};

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
