//! kvt's ops: the stages of its pipelines. Each is a deterministic function of
//! its config slice and input artifacts: prepare → infer (per policy × budget)
//! → score (per policy × budget) → analyze → plots, sqlite → report.

pub mod analyze;
pub mod infer;
pub mod plots;
pub mod prepare;
pub mod report;
pub mod score;
pub mod sqlite;

use crate::engine::OpRegistry;

/// Registers every kvt op.
pub fn register(reg: &mut OpRegistry) {
    reg.register(prepare::Prepare);
    reg.register(infer::Infer);
    reg.register(score::Score);
    reg.register(analyze::Analyze);
    reg.register(plots::Plots);
    reg.register(sqlite::Sqlite);
    reg.register(report::Report);
}
