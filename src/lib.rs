//! kvt — KV Transition: measures what KV-cache compression does to a language
//! model across context lengths. The crate is a library with a thin binary:
//! `engine` is a domain-free incremental build engine, `config` loads and
//! validates the layered YAML configuration, `stages` holds kvt's ops, and
//! `cli` wires them to the command line.

pub mod cli;
pub mod config;
pub mod data;
pub mod engine;
pub mod llm;
pub mod metrics;
pub mod render;
pub mod stages;
pub mod stats;
pub mod table;

/// How a failed command ends: the exit code is part of kvt's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// A stage (node) failed, or a cache check found corruption.
    Failed = 1,
    /// Bad configuration, pipeline definition or command-line usage.
    Usage = 2,
    /// The user pressed Ctrl-C; finished work is kept.
    Interrupted = 130,
}

/// An error that carries its exit code. Everything else exits 1.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct KvtError {
    pub kind: ExitKind,
    pub message: String,
}

impl KvtError {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            kind: ExitKind::Usage,
            message: message.into(),
        }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            kind: ExitKind::Failed,
            message: message.into(),
        }
    }
    pub fn interrupted(message: impl Into<String>) -> Self {
        Self {
            kind: ExitKind::Interrupted,
            message: message.into(),
        }
    }
}

/// The exit code for an error chain: the first `KvtError` in it decides.
pub fn exit_code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<KvtError>() {
            return e.kind as i32;
        }
    }
    ExitKind::Failed as i32
}
