//! The scheduler: runs stale nodes in dependency order, independent ones in
//! parallel (`jobs`), re-keying each node once its inputs are known so that an
//! upstream rebuilt to identical bytes leaves it fresh (early cutoff). A failed
//! node stops its dependents; every finished node stays cached.

use super::action::{ActionRecord, Export};
use super::error::Reporter;
use super::error::{chain_text, EngineError};
use super::error::{Context, Result};
use super::op::{KeyContext, OpContext};
use super::pipeline::Plan;
use super::state::{decide, key_node, upstream_of, NodeState, StaleReason, Workspace};
use super::store::write_atomic_named;
use petgraph::graph::NodeIndex;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub jobs: usize,
    pub keep_going: bool,
    /// Stage names or node ids to rerun even if fresh.
    pub force: Vec<String>,
    /// Recorded in every action record as the version of the program that
    /// produced it (provenance only; it never enters a key).
    pub producer_version: String,
    /// What the caller hands every op of this build (its own options and
    /// the state its nodes share, opaque to the engine): ops read it with
    /// [`OpContext::shared`]. Never part of a key.
    pub shared: Option<Shared>,
}

/// A caller's value shared by every op of one build (see
/// [`BuildOptions::shared`]).
#[derive(Clone)]
pub struct Shared(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared(..)")
    }
}

#[derive(Debug, Default)]
pub struct BuildSummary {
    pub built: Vec<String>,
    pub fresh: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// How many of the failures were configuration errors (exit code 2).
    pub usage_failed: usize,
    /// Not run because a node they depend on failed (or stopped short).
    pub skipped: Vec<String>,
    /// Not run because the build stopped at a failure elsewhere (without
    /// `--keep-going`), or was interrupted: they depend on nothing that failed.
    pub stopped: Vec<String>,
    /// Nodes that stopped short on purpose ([`super::error::Unfinished`]), with why.
    pub unfinished: Vec<(String, String)>,
    pub interrupted: bool,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Copies object `d` to `dest`, hashing as it goes: a damaged object is an
/// `ObjectError` (so the build quarantines it) and `dest` is removed.
fn copy_verified(ws: &Workspace, d: &super::digest::Digest, dest: &std::path::Path) -> Result<()> {
    use std::io::{Read, Write};
    let src = ws.store.path_of(d);
    let mut from = match std::fs::File::open(&src) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(super::store::ObjectError::Missing(d.hex()).into())
        }
        Err(e) => return Err(e).with_context(|| format!("reading `{}`", src.display())),
    };
    let mut to = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(dest)?);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
    to.flush()?;
    let actual = h.finalize().to_hex().to_string();
    if actual != d.hex() {
        let _ = std::fs::remove_file(dest);
        return Err(super::store::ObjectError::Corrupt {
            digest: d.hex(),
            actual,
        }
        .into());
    }
    Ok(())
}

/// What kvt remembers of an exported file as it last left it: its identity
/// (artifact digest, or base and overlays combined), "size mtime", and the
/// base artifact's digest (equal to the identity for a plain export).
struct Stamp {
    ident: String,
    file: String,
    base: String,
}

impl Stamp {
    fn line(&self) -> String {
        format!("{} {} {}", self.ident, self.file, self.base)
    }
    fn parse(line: &str) -> Option<Stamp> {
        let mut it = line.split(' ');
        let (ident, size, mtime) = (it.next()?, it.next()?, it.next()?);
        Some(Stamp {
            ident: ident.to_string(),
            file: format!("{size} {mtime}"),
            // Stamps from before the base was recorded: never in place.
            base: it.next().unwrap_or_default().to_string(),
        })
    }
}

/// Keeps exported files (sinks outside the cache) equal to their artifacts,
/// or to the op's composition of an artifact and its overlays.
pub fn materialize(ws: &Workspace, rec: &ActionRecord, op: &dyn super::op::AnyOp) -> Result<()> {
    for Export {
        artifact,
        path,
        overlays,
    } in &rec.exports
    {
        let out = rec
            .output(artifact)
            .with_context(|| format!("`{}` exports unknown artifact `{artifact}`", rec.node))?;
        let over = overlays
            .iter()
            .map(|o| {
                rec.output(o)
                    .with_context(|| format!("`{}` exports unknown artifact `{o}`", rec.node))
            })
            .collect::<Result<Vec<_>>>()?;
        let dest = ws.root.join(path);
        // The file's identity: the artifact's digest, or for a composed
        // export the digest of the base and its overlays, in order.
        let ident = if over.is_empty() {
            out.digest
        } else {
            let mut parts = out.digest.hex();
            for o in &over {
                parts.push(' ');
                parts.push_str(&o.digest.hex());
            }
            super::digest::Digest::of(parts.as_bytes())
        };
        // A stamp remembers (identity, size, mtime) of the file as kvt last
        // left it: an unchanged file is not read again on a no-op build.
        let stamp_path = ws
            .cache_root
            .join(super::store::STORE_FORMAT)
            .join("exports")
            .join(super::digest::Digest::of(path.as_bytes()).to_string());
        // The file as it is now: "size mtime", or None when it is missing.
        let file_now = || -> Option<String> {
            let m = std::fs::metadata(&dest).ok()?;
            let mtime = m
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            Some(format!("{} {}", m.len(), mtime.as_nanos()))
        };
        let stamp_then = std::fs::read_to_string(&stamp_path).ok();
        let stamp_then = stamp_then.as_deref().and_then(Stamp::parse);
        let untouched = stamp_then
            .as_ref()
            .is_some_and(|s| Some(s.file.as_str()) == file_now().as_deref());
        if untouched && stamp_then.as_ref().is_some_and(|s| s.ident == ident.hex()) {
            continue;
        }
        // The temporary file sits beside its destination, so the rename
        // never crosses filesystems (the cache may live on another disk).
        let dir = dest.parent().unwrap_or(&ws.root);
        if over.is_empty() {
            let current = std::fs::read(&dest).ok();
            if current.as_deref().map(super::digest::Digest::of) != Some(out.digest) {
                let bytes = ws.store.get(&out.digest)?;
                write_atomic_named(dir, &dest, &bytes)
                    .with_context(|| format!("writing `{path}`"))?;
            }
        } else if untouched
            && stamp_then
                .as_ref()
                .is_some_and(|s| s.base == out.digest.hex())
            && op
                .recompose_in_place(
                    &dest,
                    &over
                        .iter()
                        .map(|o| ws.store.get(&o.digest))
                        .collect::<Result<Vec<_>>>()?,
                )
                .with_context(|| format!("updating `{path}` in place"))?
        {
            // The file held this base, as kvt left it: only its overlays changed.
        } else {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(
                ".{}.{}.tmp",
                dest.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            let result = (|| -> Result<()> {
                copy_verified(ws, &out.digest, &tmp)?;
                let bytes = over
                    .iter()
                    .map(|o| ws.store.get(&o.digest))
                    .collect::<Result<Vec<_>>>()?;
                op.compose_export(&tmp, &bytes)
                    .with_context(|| format!("composing `{path}`"))?;
                std::fs::rename(&tmp, &dest).with_context(|| format!("writing `{path}`"))?;
                Ok(())
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result?;
        }
        if let Some(file) = file_now() {
            if let Some(d) = stamp_path.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let stamp = Stamp {
                ident: ident.hex(),
                file,
                base: out.digest.hex(),
            };
            let _ = std::fs::write(&stamp_path, stamp.line());
        }
    }
    Ok(())
}

fn is_forced(force: &[String], id: &str, stage: &str) -> bool {
    force.iter().any(|f| f == id || f == stage)
}

/// Runs one node's op and records its result.
/// Hands the heap a finished node freed back to the system. glibc keeps
/// freed small allocations in its arenas, so without this a build's resident
/// memory is the sum of its stages' peaks rather than the largest of them.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn run_node(
    ws: &Workspace,
    plan: &Plan,
    ix: NodeIndex,
    ups: Vec<super::op::Upstream>,
    keyed: super::state::KeyedNode,
    cancel: &AtomicBool,
    opts: &BuildOptions,
) -> Result<ActionRecord> {
    let spec = &plan.graph[ix];
    let started_at = now();
    let t0 = Instant::now();
    let scratch = super::store::temp_path(&ws.store.tmp_dir()).with_extension("scratch");
    let mut ctx = OpContext {
        key: KeyContext {
            cache_root: &ws.cache_root,
            node: &spec.id,
            config: &spec.config,
            optional: &spec.optional,
            bindings: &spec.bindings,
            transport: &spec.transport,
            root: &ws.root,
        },
        upstream: &ups,
        node_key: keyed.key,
        store: &ws.store,
        cache_root: &ws.cache_root,
        cancel,
        remote: ws.remote.as_deref(),
        shared: opts
            .shared
            .as_ref()
            .map(|s| &*s.0 as &(dyn std::any::Any + Send + Sync)),
        outputs: Vec::new(),
        exports: Vec::new(),
        scratch,
    };
    let result = spec.op.run(&mut ctx);
    let _ = std::fs::remove_dir_all(&ctx.scratch);
    release_freed_memory();
    result?;
    let mut outputs = ctx.outputs;
    outputs.sort_by(|a, b| a.name.cmp(&b.name));
    let rec = ActionRecord {
        key: keyed.key,
        op: spec.op.name().to_string(),
        op_version: spec.op.version(),
        node: spec.id.clone(),
        config: keyed.slice,
        fingerprint: keyed.fingerprint,
        inputs: keyed.inputs,
        outputs,
        exports: ctx.exports,
        started_at,
        finished_at: now(),
        duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
        producer_version: opts.producer_version.clone(),
    };
    // The action record is written last: until it exists, nothing is taken for a result.
    ws.actions.put(&rec)?;
    ws.actions.set_last(&ws.scope, &rec)?;
    if let Some(remote) = &ws.remote {
        let t0 = Instant::now();
        remote
            .push_record(&ws.store, &rec)
            .context("pushing the result to the remote cache")?;
        tracing::debug!(node = %spec.id, "result pushed in {:?}", t0.elapsed());
    }
    materialize(ws, &rec, spec.op.as_ref())?;
    Ok(rec)
}

/// Builds the plan: fresh nodes are reused, stale ones run. Fails (exit 1) when
/// any node failed, after every node that could run has finished.
pub fn build(
    ws: &Workspace,
    plan: &Plan,
    opts: &BuildOptions,
    cancel: &AtomicBool,
    reporter: &dyn Reporter,
) -> Result<BuildSummary> {
    let n = plan.graph.node_count();
    let jobs = opts.jobs.max(1);
    let mut records: Vec<Option<ActionRecord>> = vec![None; n];
    let mut waiting: Vec<usize> = vec![0; n];
    for &ix in &plan.order {
        waiting[ix.index()] = plan.deps(ix).len();
    }
    let rank: Vec<usize> = {
        let mut r = vec![0; n];
        for (i, ix) in plan.order.iter().enumerate() {
            r[ix.index()] = i;
        }
        r
    };
    let mut ready: VecDeque<NodeIndex> = plan
        .order
        .iter()
        .copied()
        .filter(|ix| waiting[ix.index()] == 0)
        .collect();
    let mut summary = BuildSummary::default();
    let mut blocked: BTreeSet<NodeIndex> = BTreeSet::new();
    // Producers running again because a consumer found their output damaged:
    // producer → the consumers that wait for it. Healing is coordinated here,
    // in the one thread that schedules: a damaged object is quarantined once,
    // its producer queued once, and every consumer that needs it waits.
    let mut reruns: BTreeMap<NodeIndex, Vec<NodeIndex>> = BTreeMap::new();
    // (consumer, producer) pairs healed in this build: each heals once, so a
    // producer that keeps writing damaged bytes cannot loop.
    let mut healed: BTreeSet<(NodeIndex, NodeIndex)> = BTreeSet::new();
    let mut stop = false;

    reporter.start(n);

    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = mpsc::channel::<(NodeIndex, Result<ActionRecord>, Duration)>();
        let mut running = 0usize;
        loop {
            if cancel.load(Ordering::Relaxed) && !summary.interrupted {
                summary.interrupted = true;
                stop = true;
                reporter.note("interrupted; waiting for running nodes to stop (press Ctrl-C again to quit now)");
            }
            while running < jobs && !stop {
                let Some(ix) = ready.pop_front() else { break };
                let spec = &plan.graph[ix];
                let Some(ups) = upstream_of(plan, ix, &records) else {
                    // A producer of this node is running again (a sibling
                    // found its output damaged): wait for it too.
                    wait_for_reruns(plan, ix, &records, &mut reruns, &mut waiting);
                    continue;
                };
                let keyed = match key_node(ws, spec, &ups) {
                    Ok(k) => k,
                    Err(e) => {
                        summary.failed.push((spec.id.clone(), chain_text(&e)));
                        if super::error::kind_of(&e) == super::error::ErrorKind::Usage {
                            summary.usage_failed += 1;
                        }
                        blocked.extend(descendants(plan, ix));
                        stop = !opts.keep_going;
                        continue;
                    }
                };
                let mut state = decide(
                    ws,
                    spec,
                    &keyed,
                    is_forced(&opts.force, &spec.id, &spec.stage),
                );
                let mut export_error = None;
                if let NodeState::Fresh(rec) = &state {
                    if let Err(e) = materialize(ws, rec, spec.op.as_ref()) {
                        // A fresh node whose output turns out damaged when it
                        // is exported: quarantine it and run the node now.
                        match damaged_output(&e, rec) {
                            Some((d, artifact)) => {
                                let _ = ws.store.quarantine(&d);
                                reporter.note(&format!("`{}`: output `{artifact}` is corrupt; quarantined and rebuilding", spec.id));
                                state =
                                    NodeState::Stale(vec![StaleReason::OutputCorrupt { artifact }]);
                            }
                            None => export_error = Some(e),
                        }
                    }
                }
                match state {
                    NodeState::Fresh(rec) => {
                        if let Some(e) = export_error {
                            summary.failed.push((spec.id.clone(), chain_text(&e)));
                            if super::error::kind_of(&e) == super::error::ErrorKind::Usage {
                                summary.usage_failed += 1;
                            }
                            blocked.extend(descendants(plan, ix));
                            stop = !opts.keep_going;
                            continue;
                        }
                        summary.fresh.push(spec.id.clone());
                        reporter.fresh(&spec.id);
                        // A fresh node is still what this build used: it is
                        // the "last build" `kvt graph` compares with.
                        if ws.actions.last(&ws.scope, &spec.id).map(|l| l.key) != Some(rec.key) {
                            let _ = ws.actions.set_last(&ws.scope, &rec);
                        }
                        records[ix.index()] = Some(*rec);
                        complete(
                            plan,
                            ix,
                            &mut reruns,
                            &mut waiting,
                            &mut ready,
                            &blocked,
                            &rank,
                        );
                    }
                    NodeState::Stale(reasons) => {
                        // Check the inputs before running: a damaged one is
                        // quarantined and its producer runs again first.
                        let damaged = damaged_inputs(ws, plan, ix, &ups, &healed);
                        if !damaged.is_empty() {
                            for (p, d, artifact) in &damaged {
                                let _ = ws.store.quarantine(d);
                                healed.insert((ix, *p));
                                reporter.note(&format!(
                                    "`{}`: input `{artifact}` from `{}` is corrupt or missing in the cache; quarantined, rebuilding it first",
                                    spec.id, plan.graph[*p].id
                                ));
                                let p_id = &plan.graph[*p].id;
                                summary.fresh.retain(|f| f != p_id);
                                summary.built.retain(|f| f != p_id);
                                if records[p.index()].take().is_some() {
                                    ready.push_front(*p);
                                }
                            }
                            wait_for_reruns(plan, ix, &records, &mut reruns, &mut waiting);
                            continue;
                        }
                        for r in &reasons {
                            if let StaleReason::OutputCorrupt { artifact } = r {
                                tracing::warn!("`{}`: output `{artifact}` is corrupt; quarantined and rebuilding", spec.id);
                                if let Some(d) = ws
                                    .actions
                                    .get(&keyed.key)
                                    .and_then(|rec| rec.output(artifact).map(|o| o.digest))
                                {
                                    let _ = ws.store.quarantine(&d);
                                }
                            }
                        }
                        let why: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                        tracing::info!("running `{}`: {}", spec.id, why.join("; "));
                        reporter.running(&spec.id);
                        let tx = tx.clone();
                        running += 1;
                        scope.spawn(move || {
                            let t0 = Instant::now();
                            let res = run_node(ws, plan, ix, ups, keyed, cancel, opts);
                            let _ = tx.send((ix, res, t0.elapsed()));
                        });
                    }
                    NodeState::Pending(_) => unreachable!("a ready node has all its inputs"),
                }
            }
            if running == 0 {
                break;
            }
            let Ok((ix, res, took)) = rx.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            running -= 1;
            let id = plan.graph[ix].id.clone();
            match res {
                Ok(rec) => {
                    reporter.finished(&id, Ok(took.as_secs_f64() * 1000.0));
                    summary.built.push(id);
                    records[ix.index()] = Some(rec);
                    complete(
                        plan,
                        ix,
                        &mut reruns,
                        &mut waiting,
                        &mut ready,
                        &blocked,
                        &rank,
                    );
                }
                Err(e) if damaged_object(&e).is_some() => {
                    // An input object was damaged on disk while the node ran:
                    // it is quarantined; its producer runs again (same
                    // bytes), then this node.
                    let Some(p) = heal_input(ws, plan, ix, &e, &mut records, &mut healed, &reruns)
                    else {
                        reporter.finished(&id, Err(&chain_text(&e)));
                        summary.failed.push((id, chain_text(&e)));
                        blocked.extend(descendants(plan, ix));
                        stop = !opts.keep_going;
                        continue;
                    };
                    reporter.note(&format!(
                        "`{id}`: an input from `{}` was corrupt in the cache; quarantined, rebuilding it, then `{id}`",
                        plan.graph[p].id
                    ));
                    summary.fresh.retain(|f| *f != plan.graph[p].id);
                    summary.built.retain(|f| *f != plan.graph[p].id);
                    if !reruns.contains_key(&p) {
                        ready.push_front(p);
                    }
                    wait_for_reruns(plan, ix, &records, &mut reruns, &mut waiting);
                }
                Err(e) if e.find::<super::error::Unfinished>().is_some() => {
                    reporter.note(&format!("`{id}`: {e}"));
                    summary.unfinished.push((id, e.to_string()));
                    blocked.extend(descendants(plan, ix));
                }
                Err(e) => {
                    reporter.finished(&id, Err(&chain_text(&e)));
                    summary.failed.push((id, chain_text(&e)));
                    if super::error::kind_of(&e) == super::error::ErrorKind::Usage {
                        summary.usage_failed += 1;
                    }
                    blocked.extend(descendants(plan, ix));
                    if !opts.keep_going {
                        stop = true;
                    }
                }
            }
        }
        Ok(())
    })?;
    reporter.finish();
    for &ix in &plan.order {
        let id = &plan.graph[ix].id;
        if records[ix.index()].is_none()
            && !summary.failed.iter().any(|(f, _)| f == id)
            && !summary.unfinished.iter().any(|(u, _)| u == id)
        {
            if blocked.contains(&ix) {
                summary.skipped.push(id.clone());
            } else {
                summary.stopped.push(id.clone());
            }
        }
    }
    Ok(summary)
}

/// The object (hex digest) an error chain says is damaged, corrupt or missing.
fn damaged_object(e: &EngineError) -> Option<String> {
    super::error::chain(e).find_map(|c| match c.downcast_ref::<super::store::ObjectError>()? {
        super::store::ObjectError::Corrupt { digest, .. }
        | super::store::ObjectError::Missing(digest) => Some(digest.clone()),
    })
}

/// A damaged object that is one of `rec`'s own outputs: (digest, artifact).
fn damaged_output(e: &EngineError, rec: &ActionRecord) -> Option<(super::digest::Digest, String)> {
    let hex = damaged_object(e)?;
    rec.outputs
        .iter()
        .find(|o| o.digest.hex() == hex)
        .map(|o| (o.digest, o.name.clone()))
}

/// The inputs of `ix` whose objects are corrupt or missing, with their
/// producer, digest and artifact name; pairs healed before are skipped (the
/// node then fails reading, with the object named).
fn damaged_inputs(
    ws: &Workspace,
    plan: &Plan,
    ix: NodeIndex,
    ups: &[super::op::Upstream],
    healed: &BTreeSet<(NodeIndex, NodeIndex)>,
) -> Vec<(NodeIndex, super::digest::Digest, String)> {
    let mut out = Vec::new();
    for p in plan.deps(ix) {
        if healed.contains(&(ix, p)) {
            continue;
        }
        let Some(up) = ups.iter().find(|u| u.node == plan.graph[p].id) else {
            continue;
        };
        for (name, d) in &up.outputs {
            if ws.store.verify(d).is_err() {
                out.push((p, *d, format!("{}/{name}", up.node)));
            }
        }
    }
    out
}

/// Makes `ix` wait for every producer of it that is running again (its
/// record forgotten): it joins their waiters and is queued when all finish.
fn wait_for_reruns(
    plan: &Plan,
    ix: NodeIndex,
    records: &[Option<ActionRecord>],
    reruns: &mut BTreeMap<NodeIndex, Vec<NodeIndex>>,
    waiting: &mut [usize],
) {
    let mut n = 0;
    for p in plan.deps(ix) {
        if records[p.index()].is_none() {
            let waiters = reruns.entry(p).or_default();
            if !waiters.contains(&ix) {
                waiters.push(ix);
            }
            n += 1;
        }
    }
    waiting[ix.index()] = n;
}

/// When node `ix` failed reading a damaged input object produced by one of
/// its dependencies, and that pair has not been healed before in this
/// build: quarantines the object and forgets the producer's record so that
/// it is decided again (and runs, its output being gone). A producer already
/// running again (its record forgotten by a sibling's heal) is found too.
fn heal_input(
    ws: &Workspace,
    plan: &Plan,
    ix: NodeIndex,
    e: &EngineError,
    records: &mut [Option<ActionRecord>],
    healed: &mut BTreeSet<(NodeIndex, NodeIndex)>,
    reruns: &BTreeMap<NodeIndex, Vec<NodeIndex>>,
) -> Option<NodeIndex> {
    let hex = damaged_object(e)?;
    let deps = plan.deps(ix);
    let found = deps.iter().find_map(|&p| {
        let r = records[p.index()].as_ref()?;
        let o = r.outputs.iter().find(|o| o.digest.hex() == hex)?;
        Some((p, Some(o.digest)))
    });
    // Not among the known records: a producer already queued to run again.
    let (producer, d) = found.or_else(|| {
        deps.iter()
            .find(|p| reruns.contains_key(p))
            .map(|&p| (p, None))
    })?;
    if !healed.insert((ix, producer)) {
        return None;
    }
    if let Some(d) = d {
        let _ = ws.store.quarantine(&d);
    }
    records[producer.index()] = None;
    Some(producer)
}

/// A node finished (fresh or built). Normally its dependents are released;
/// a producer run again to heal a damaged object releases only the consumer
/// that waits for it (its other dependents already ran).
fn complete(
    plan: &Plan,
    ix: NodeIndex,
    reruns: &mut BTreeMap<NodeIndex, Vec<NodeIndex>>,
    waiting: &mut [usize],
    ready: &mut VecDeque<NodeIndex>,
    blocked: &BTreeSet<NodeIndex>,
    rank: &[usize],
) {
    match reruns.remove(&ix) {
        Some(consumers) => {
            for c in consumers {
                waiting[c.index()] = waiting[c.index()].saturating_sub(1);
                if waiting[c.index()] == 0 && !ready.contains(&c) {
                    ready.push_front(c);
                }
            }
        }
        None => release(plan, ix, waiting, ready, blocked, rank),
    }
}

/// Marks `ix` done and queues dependents whose inputs are now all known.
fn release(
    plan: &Plan,
    ix: NodeIndex,
    waiting: &mut [usize],
    ready: &mut VecDeque<NodeIndex>,
    blocked: &BTreeSet<NodeIndex>,
    rank: &[usize],
) {
    for d in plan.dependents(ix) {
        waiting[d.index()] -= 1;
        if waiting[d.index()] == 0 && !blocked.contains(&d) {
            let pos = ready
                .iter()
                .position(|r| rank[r.index()] > rank[d.index()])
                .unwrap_or(ready.len());
            ready.insert(pos, d);
        }
    }
}

fn descendants(plan: &Plan, ix: NodeIndex) -> Vec<NodeIndex> {
    let mut out = Vec::new();
    let mut stack = plan.dependents(ix);
    while let Some(d) = stack.pop() {
        if !out.contains(&d) {
            out.push(d);
            stack.extend(plan.dependents(d));
        }
    }
    out
}

/// The error a build with failed nodes ends with (exit 1), or the interrupt (130).
pub fn outcome(summary: &BuildSummary) -> Result<()> {
    if summary.interrupted {
        return Err(EngineError::interrupted(format!(
            "interrupted: {} node(s) built and cached, {} not run; run the same command again to continue",
            summary.built.len(),
            summary.skipped.len() + summary.stopped.len()
        )));
    }
    if !summary.failed.is_empty() {
        let mut msg = format!("{} node(s) failed:", summary.failed.len());
        for (id, err) in &summary.failed {
            msg.push_str(&format!("\n  stage `{id}`: {err}"));
        }
        if !summary.skipped.is_empty() {
            msg.push_str(&format!(
                "\n  not run (upstream failed): {}",
                summary.skipped.join(", ")
            ));
        }
        if !summary.stopped.is_empty() {
            msg.push_str(&format!(
                "\n  not run (the build stopped at the failure; they depend on nothing that failed, and `--keep-going` runs them): {}",
                summary.stopped.join(", ")
            ));
        }
        msg.push_str("\nfinished nodes are cached; fix the cause and run the same command again");
        // Only configuration errors (a missing data file, say): exit 2, like any bad config.
        if summary.usage_failed == summary.failed.len() {
            return Err(EngineError::usage(msg));
        }
        return Err(EngineError::failed(msg));
    }
    Ok(())
}
