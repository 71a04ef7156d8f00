//! kvt — KV Transition: measures what KV-cache compression does to a language
//! model across context lengths. The crate is a library with a thin binary:
//! `engine` is a domain-free incremental build engine, `config` loads and
//! validates the layered YAML configuration, `stages` holds kvt's ops, and
//! `cli` wires them to the command line.

// kvt's own `println!` and `eprintln!` for every module below: a write to a
// closed stdout or stderr (`kvt build … 2>&1 | head -1`) is dropped instead
// of panicking, so the build goes on and records what it answers (std's
// macros panic on EPIPE).
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

pub mod cli;
/// The configuration layer (the `kvt-config` crate), under its old path.
pub use kvt_config as config;
/// The build engine (the `kvt-engine` crate), under its old path.
pub use kvt_engine as engine;
pub mod data;
pub mod llm;
pub mod metrics;
pub use kvt_config::redact;
pub mod render;
pub mod stages;
pub mod stats;
pub mod table;

pub use engine::error::{EngineError as KvtError, ErrorKind};

/// The exit code for an error chain (part of kvt's interface): 2 for
/// configuration and usage, 130 for an interrupt, 1 for everything else.
pub fn exit_code_for(err: &anyhow::Error) -> i32 {
    match kind_of(err) {
        ErrorKind::Failed | ErrorKind::Locked => 1,
        ErrorKind::Usage => 2,
        ErrorKind::Interrupted => 130,
    }
}

/// The kind of an error chain: the first engine or configuration error in
/// it decides (a configuration file, key or value at fault is usage).
pub fn kind_of(err: &anyhow::Error) -> ErrorKind {
    err.chain()
        .find_map(|c| {
            c.downcast_ref::<config::ConfigError>()
                .map(|c| match c {
                    config::ConfigError::Invalid(_) => ErrorKind::Usage,
                    _ => ErrorKind::Failed,
                })
                .or_else(|| c.downcast_ref::<KvtError>().map(KvtError::kind))
        })
        .unwrap_or(ErrorKind::Failed)
}
