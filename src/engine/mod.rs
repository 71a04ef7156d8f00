//! The build engine: generic and domain-free. It reads a pipeline, expands it
//! into a DAG of nodes, keys each node by what it depends on, keeps results in
//! a content-addressed store with an action cache, and runs only stale nodes.
//! It knows nothing of datasets, models or KV budgets.

pub mod action;
pub mod build;
pub mod digest;
pub mod error;
pub mod lock;
pub mod maintenance;
pub mod op;
pub mod pipeline;
pub mod remote;
pub mod state;
pub mod store;

pub use action::{ActionCache, ActionRecord};
pub use build::{build, BuildOptions, BuildSummary};
pub use digest::{canonical_json, Digest};
pub use error::{EngineError, ErrorKind, Reporter};
pub use op::{check_slices, typed_slice, KeyContext, Op, OpContext, OpRegistry, Upstream};
pub use pipeline::{PipelineDef, Plan};
pub use state::{explain, NodeState, StaleReason, Workspace};
pub use store::ContentStore;
