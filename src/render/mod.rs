//! Output rendering: plots (PNG and SVG with an embedded font).

pub mod kerned;
pub mod plots;
