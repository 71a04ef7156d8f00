//! Durations as people read them, for progress lines (an `infer` node's
//! answered count); drawing stays with the caller.

/// Seconds as a person reads them: `45s`, `3m05s`, `1h02m`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
