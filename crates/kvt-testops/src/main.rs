//! `kvt-testops`: the kvt CLI with extra, test-only ops registered beside kvt's
//! own stages. The engine's integration tests drive it as a real process; its
//! ops do real work on real files and log each run to `<root>/oplog.txt`.

use kvt::engine::{KeyContext, NoTransport, Op, OpContext, OpRegistry, OpResult};
use serde::Deserialize;
use std::io::Write;

fn log_run(ctx: &OpContext) -> std::io::Result<()> {
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
/// What `Read` reads.
#[derive(Deserialize)]
pub struct ReadUses {
    /// Optional here so that `kvt validate` of a project without a data
    /// file passes the plan-time check; reading it then fails.
    #[serde(rename = "dataset.path")]
    path: Option<String>,
}
impl Op for Read {
    type Uses = ReadUses;
    type Transport = NoTransport;
    fn name(&self) -> &'static str {
        "t_read"
    }
    fn version(&self) -> u32 {
        1
    }
    fn fingerprint(
        &self,
        ctx: &KeyContext,
        u: &ReadUses,
        _: &NoTransport,
    ) -> OpResult<Option<String>> {
        let path = u
            .path
            .as_deref()
            .ok_or("config `dataset.path` is not set")?;
        let bytes = std::fs::read(ctx.root.join(path))?;
        Ok(Some(format!(
            "{path} blake3={}",
            &blake3::hash(&bytes).to_hex()[..12]
        )))
    }
    fn run(&self, ctx: &mut OpContext, u: Self::Uses, _: NoTransport) -> OpResult {
        log_run(ctx)?;
        let path = u.path.ok_or("config `dataset.path` is not set")?;
        let bytes = std::fs::read(ctx.root().join(path))?;
        ctx.put("text", &bytes)?;
        Ok(())
    }
}

/// Keeps the first `budget` fraction of the words, cased by `model.name`.
struct Scale;
/// What `Scale` reads.
#[derive(Deserialize)]
pub struct ScaleUses {
    #[serde(rename = "model.name")]
    policy: String,
}
impl Op for Scale {
    type Uses = ScaleUses;
    type Transport = NoTransport;
    fn name(&self) -> &'static str {
        "t_scale"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext, u: Self::Uses, _: NoTransport) -> OpResult {
        log_run(ctx)?;
        let budget: f64 = ctx.item("budget")?;
        let policy = u.policy;
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
/// What `Count` reads.
#[derive(Deserialize)]
pub struct CountUses {
    #[serde(rename = "analysis.bootstrap.iters")]
    iters: u64,
}
impl Op for Count {
    type Uses = CountUses;
    type Transport = NoTransport;
    fn name(&self) -> &'static str {
        "t_count"
    }
    fn version(&self) -> u32 {
        version_from_env("KVT_TESTOPS_COUNT_VERSION")
    }
    fn run(&self, ctx: &mut OpContext, u: Self::Uses, _: NoTransport) -> OpResult {
        log_run(ctx)?;
        let iters = u.iters;
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
/// What `Report` reads.
#[derive(Deserialize)]
pub struct ReportUses {
    #[serde(rename = "output.exp_group_id")]
    exp: String,
}
impl Op for Report {
    type Uses = ReportUses;
    type Transport = NoTransport;
    fn name(&self) -> &'static str {
        "t_report"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext, u: Self::Uses, _: NoTransport) -> OpResult {
        log_run(ctx)?;
        let exp = u.exp;
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
/// What `Slow` reads.
#[derive(Deserialize)]
pub struct SlowUses {
    #[serde(rename = "engine.timeout_s")]
    secs: f64,
}
impl Op for Slow {
    type Uses = SlowUses;
    type Transport = NoTransport;
    fn name(&self) -> &'static str {
        "t_slow"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext, u: Self::Uses, _: NoTransport) -> OpResult {
        log_run(ctx)?;
        let secs = u.secs;
        let text = ctx.input("read", "text")?;
        std::fs::write(ctx.root().join("slow.started"), b"1")?;
        let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
        while std::time::Instant::now() < until {
            if ctx.is_cancelled() {
                return Err("cancelled".into());
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
/// What `MaybeFail` reads.
#[derive(Deserialize)]
pub struct MaybeFailUses {
    #[serde(rename = "engine.label")]
    label: Option<String>,
}
impl Op for MaybeFail {
    type Uses = MaybeFailUses;
    type Transport = NoTransport;
    fn name(&self) -> &'static str {
        "t_maybe_fail"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut OpContext, u: Self::Uses, _: NoTransport) -> OpResult {
        log_run(ctx)?;
        let label = u.label;
        if label.as_deref() == Some("fail") {
            return Err("planted failure: engine.label is `fail`".into());
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
