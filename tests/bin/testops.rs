//! `kvt-testops`: the kvt CLI with extra, test-only ops registered beside kvt's
//! own stages. The engine's integration tests drive it as a real process; its
//! ops do real work on real files and log each run to `<root>/oplog.txt`.

use anyhow::{bail, Result};
use kvt::engine::{KeyContext, Op, OpContext, OpRegistry};
use std::io::Write;

fn log_run(ctx: &OpContext) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.root().join("oplog.txt"))?;
    // One write per line: O_APPEND keeps concurrent lines whole.
    f.write_all(format!("{}\n", ctx.node()).as_bytes())?;
    Ok(())
}

fn version_from_env(var: &str) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Reads the text file at `dataset.path`; its content enters the key.
struct Read;
impl Op for Read {
    fn name(&self) -> &'static str {
        "t_read"
    }
    fn version(&self) -> u32 {
        1
    }
    fn fingerprint(&self, ctx: &KeyContext) -> Result<Option<String>> {
        let path: String = ctx.get("dataset.path")?;
        let bytes = std::fs::read(ctx.root.join(&path))?;
        Ok(Some(format!(
            "{path} blake3={}",
            &blake3::hash(&bytes).to_hex()[..12]
        )))
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()> {
        log_run(ctx)?;
        let path: String = ctx.get("dataset.path")?;
        let bytes = std::fs::read(ctx.root().join(path))?;
        ctx.put("text", &bytes)?;
        Ok(())
    }
}

/// Keeps the first `budget` fraction of the words, cased by `model.name`.
struct Scale;
impl Op for Scale {
    fn name(&self) -> &'static str {
        "t_scale"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()> {
        log_run(ctx)?;
        let budget: f64 = ctx.item("budget")?;
        let policy: String = ctx.get("model.name")?;
        let text = String::from_utf8(ctx.input("read", "text")?)?;
        let words: Vec<&str> = text.split_whitespace().collect();
        let keep = ((words.len() as f64) * budget).ceil() as usize;
        let kept = words[..keep.min(words.len())].join(" ");
        let out = match policy.as_str() {
            "upper" => kept.to_uppercase(),
            "lower" => kept.to_lowercase(),
            _ => kept,
        };
        ctx.put("words", out.as_bytes())?;
        Ok(())
    }
}

/// Counts the words of every `scale` instance; version from `KVT_TESTOPS_COUNT_VERSION`.
struct Count;
impl Op for Count {
    fn name(&self) -> &'static str {
        "t_count"
    }
    fn version(&self) -> u32 {
        version_from_env("KVT_TESTOPS_COUNT_VERSION")
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()> {
        log_run(ctx)?;
        let iters: u64 = ctx.get("analysis.bootstrap.iters")?;
        let mut lines = Vec::new();
        for up in ctx.upstream("scale") {
            let words = String::from_utf8(ctx.read(up, "words")?)?;
            lines.push(format!(
                "{} {}",
                up.node,
                words.split_whitespace().count() as u64 * iters
            ));
        }
        lines.sort();
        ctx.put("counts", lines.join("\n").as_bytes())?;
        Ok(())
    }
}

/// Writes the counts to `runs/<exp>/out.txt` through an export.
struct Report;
impl Op for Report {
    fn name(&self) -> &'static str {
        "t_report"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()> {
        log_run(ctx)?;
        let exp: String = ctx.get("output.exp_group_id")?;
        let counts = ctx.input("count", "counts")?;
        let mut report = b"counts:\n".to_vec();
        report.extend_from_slice(&counts);
        ctx.put("report", &report)?;
        ctx.export("report", format!("runs/{exp}/out.txt"));
        Ok(())
    }
}

/// Announces itself in `<root>/slow.started`, then works for `engine.timeout_s` seconds.
struct Slow;
impl Op for Slow {
    fn name(&self) -> &'static str {
        "t_slow"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()> {
        log_run(ctx)?;
        let secs: f64 = ctx.get("engine.timeout_s")?;
        let text = ctx.input("read", "text")?;
        std::fs::write(ctx.root().join("slow.started"), b"1")?;
        let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
        while std::time::Instant::now() < until {
            if ctx.is_cancelled() {
                bail!("cancelled");
            }
            // Simulated work that checks for cancellation (not a wait on
            // another process).
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ctx.put("slow", &text)?;
        Ok(())
    }
}

/// Fails when `engine.label` is `fail`, to test failure isolation.
struct MaybeFail;
impl Op for MaybeFail {
    fn name(&self) -> &'static str {
        "t_maybe_fail"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext) -> Result<()> {
        log_run(ctx)?;
        let label: Option<String> = ctx.get("engine.label")?;
        if label.as_deref() == Some("fail") {
            bail!("planted failure: engine.label is `fail`");
        }
        ctx.put("ok", b"ok")?;
        Ok(())
    }
}

fn register(reg: &mut OpRegistry) {
    kvt::stages::register(reg);
    reg.register(Read);
    reg.register(Scale);
    reg.register(Count);
    reg.register(Report);
    reg.register(Slow);
    reg.register(MaybeFail);
}

fn main() {
    std::process::exit(kvt::cli::main_with(register));
}
