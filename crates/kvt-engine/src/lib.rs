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
pub mod progress;
pub mod remote;
pub mod state;
pub mod store;

pub use action::{ActionCache, ActionRecord};
pub use build::{build, BuildOptions, BuildSummary, Shared};
pub use digest::{canonical_json, Digest};
pub use error::{BoxError, OpResult};
pub use error::{EngineError, ErrorKind, Reporter};
pub use op::{typed_slice, AnyOp, KeyContext, NoTransport, Op, OpContext, OpRegistry, Upstream};
pub use pipeline::{PipelineDef, Plan};
pub use state::{explain, NodeState, StaleReason, Workspace};
pub use store::ContentStore;

/// CPU time this process has used so far (user + system), for debug timings.
pub fn cpu_time() -> std::time::Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return std::time::Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec as u64)
            + std::time::Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Applies `f` to every item on all cores (one contiguous chunk per core)
/// and returns the results in input order.
pub fn par_map<I: Sync, T: Send>(items: &[I], f: impl Fn(&I) -> T + Sync) -> Vec<T> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = items.len().div_ceil(cores).max(1);
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<_>>()))
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("worker thread"))
            .collect()
    })
}
