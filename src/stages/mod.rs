//! kvt's ops: the stages of its pipelines. Each is a deterministic function of
//! its config slice and input artifacts. Today: `prepare`.

pub mod prepare;

use crate::engine::OpRegistry;

/// Registers every kvt op.
pub fn register(reg: &mut OpRegistry) {
    reg.register(prepare::Prepare);
}
