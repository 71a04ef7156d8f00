//! How kvt shows a build: a progress bar on a terminal, one line per built or
//! failed node otherwise, nothing under `--quiet`. The engine reports through
//! [`Reporter`]; this is the only place that draws it.

use crate::engine::Reporter;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;
use std::time::Duration;

pub use crate::engine::progress::human_duration;

pub struct TermReporter {
    quiet: bool,
    bar_wanted: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl TermReporter {
    pub fn new(quiet: bool, bar: bool) -> Self {
        Self {
            quiet,
            bar_wanted: bar && !quiet,
            bar: Mutex::new(None),
        }
    }

    fn say(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match self.bar.lock().ok().as_deref() {
            Some(Some(pb)) => pb.println(msg),
            _ => eprintln!("{msg}"),
        }
    }

    fn with_bar(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(guard) = self.bar.lock() {
            if let Some(pb) = guard.as_ref() {
                f(pb);
            }
        }
    }
}

impl Reporter for TermReporter {
    fn start(&self, total: usize) {
        if !self.bar_wanted {
            return;
        }
        let pb = ProgressBar::new(total as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        if let Ok(mut g) = self.bar.lock() {
            *g = Some(pb);
        }
    }
    fn fresh(&self, _node: &str) {
        self.with_bar(|pb| pb.inc(1));
    }
    fn running(&self, node: &str) {
        self.with_bar(|pb| pb.set_message(node.to_string()));
    }
    fn finished(&self, node: &str, result: Result<f64, &str>) {
        self.with_bar(|pb| pb.inc(1));
        match result {
            Ok(ms) => self.say(&format!("   built {node} ({ms:.0} ms)")),
            Err(e) => self.say(&format!("  FAILED {node}: {e}")),
        }
    }
    fn note(&self, message: &str) {
        self.say(&format!("kvt: {message}"));
    }
    fn finish(&self) {
        if let Ok(mut g) = self.bar.lock() {
            if let Some(pb) = g.take() {
                pb.finish_and_clear();
            }
        }
    }
}
