//! kvt's ops: the stages of its pipelines (`prepare`, `infer`, `score`, ...).
//! Each is a deterministic function of its config slice and input artifacts.

use crate::engine::OpRegistry;

/// Registers every kvt op.
pub fn register(_reg: &mut OpRegistry) {}
