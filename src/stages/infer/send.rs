//! Sending a node's requests once per build: claiming keys, waiting for
//! those another node sends, retrying transient failures, and recording
//! every answer in the journal (and pushing it to a remote cache).

use super::*;

/// Request keys in one build: those being sent, those with an outcome, and
/// the signal that some left the first set. Part of [`crate::stages::BuildEnv`].
#[derive(Default)]
pub struct Sending {
    /// Keys some node of this build has an outcome for — an answer or a
    /// failure after its retries — recorded before the key leaves
    /// `inflight`. A key is sent by one node per build: another node that
    /// needs it takes that outcome from the journal, even a failure (the
    /// next build retries it), so it is sent at most `max_retries + 1` times
    /// and has one outcome.
    attempted: Mutex<HashSet<String>>,
    /// Keys being sent by some node right now: identical requests of two
    /// nodes (the full-cache budget of two policies) go out once.
    inflight: Mutex<HashSet<String>>,
    /// Signalled whenever keys leave `inflight`: a node waiting for
    /// another's key wakes when it is released, not on a timer.
    released: std::sync::Condvar,
}

impl Infer {
    pub(super) fn send_all(
        &self,
        ctx: &OpContext,
        s: &Settings,
        shape: &Shape,
        pending: &[&Request],
        journal: &Mutex<Journal>,
        answered: &Answered,
    ) -> Result<()> {
        let sending = &crate::stages::BuildEnv::of(ctx)?.sending;
        // Claim keys; those another node is sending are waited for, not resent.
        let (mine, theirs): (Vec<&Request>, Vec<&Request>) = {
            let mut set = sending.inflight.lock().expect("inflight");
            let done = sending.attempted.lock().expect("attempted");
            // A key another node sent since this one read the journal is
            // theirs too: its outcome is the journal's, not sent again.
            pending
                .iter()
                .partition(|r| !done.contains(&r.key) && set.insert(r.key.clone()))
        };
        let release = |rs: &[&Request]| {
            let mut set = sending.inflight.lock().expect("inflight");
            for r in rs {
                set.remove(&r.key);
            }
            sending.released.notify_all();
        };
        let result = self.send_claimed(ctx, s, shape, &mine, journal, answered);
        release(&mine);
        result?;
        for r in theirs {
            let mut set = sending.inflight.lock().expect("inflight");
            while set.contains(&r.key) {
                if ctx.is_cancelled() {
                    return Ok(());
                }
                // Woken by the owner's release; the timeout only bounds how
                // long an interrupt (which signals nothing here) goes unseen.
                set = sending
                    .released
                    .wait_timeout(set, Duration::from_millis(250))
                    .expect("inflight")
                    .0;
            }
            drop(set);
            // The owner's outcome, answer or failure, stands for this build;
            // only a key the owner never got to (its server did not start,
            // say) is sent here.
            let done = sending
                .attempted
                .lock()
                .expect("attempted")
                .contains(&r.key);
            if !done {
                self.send_claimed(ctx, s, shape, &[r], journal, answered)?;
            }
        }
        Ok(())
    }

    pub(super) fn send_claimed(
        &self,
        ctx: &OpContext,
        s: &Settings,
        shape: &Shape,
        reqs: &[&Request],
        journal: &Mutex<Journal>,
        answered: &Answered,
    ) -> Result<()> {
        if reqs.is_empty() {
            return Ok(());
        }
        let env = crate::stages::BuildEnv::of(ctx)?;
        let sending = &env.sending;
        let concurrency = s.transport.concurrency.max(1) as usize;
        // New final answers waiting to go to the remote cache as one batch;
        // full batches go to a pusher thread, so answering never waits on
        // the remote.
        let outbox: Mutex<Outbox> = Mutex::default();
        let (batch, batch_wait) = (remote_batch(), remote_batch_wait());
        let (tx, rx) = std::sync::mpsc::channel::<Vec<(String, String)>>();
        let tx = Mutex::new(Some(tx));
        let record = |key: &str, o: &Outcome| -> Result<()> {
            let text = serde_json::to_string(o)?;
            let copy = (ctx.remote.is_some() && o.is_final).then(|| text.clone());
            journal
                .lock()
                .expect("journal")
                .record_json(key, o.is_final, text)?;
            sending
                .attempted
                .lock()
                .expect("attempted")
                .insert(key.to_string());
            answered
                .fresh
                .lock()
                .expect("answers")
                .insert(key.to_string(), o.clone());
            answered.sent.fetch_add(1, Ordering::Relaxed);
            if let Some(text) = copy {
                let full = outbox
                    .lock()
                    .expect("outbox")
                    .push((key.to_string(), text), batch);
                if let (Some(rows), Some(tx)) = (full, &*tx.lock().expect("pusher")) {
                    // The pusher only stops early after an error, which it reports.
                    let _ = tx.send(rows);
                }
            }
            Ok(())
        };
        let backend = self.backend(ctx, s, concurrency)?;
        let queries: Vec<Query<'_>> = reqs.iter().map(|r| r.query(shape)).collect();
        // Cleared when answering ends: the progress ticker stops.
        let answering = AtomicBool::new(true);
        let (result, pushed) = std::thread::scope(|scope| {
            let outbox = &outbox;
            let pusher = ctx.remote.map(|remote| {
                scope.spawn(move || -> Result<()> {
                    // Noted synced once at the end, in one transaction, so
                    // the pusher never holds the journal while answers
                    // arrive. A killed run's pushed answers go up again on
                    // restart: a batch more in the remote, nothing wrong.
                    let mut pushed: Vec<String> = Vec::new();
                    let mut result = Ok(());
                    // Full batches arrive on the channel; a batch that does
                    // not fill goes up once its oldest answer has waited
                    // (looked at four times per wait).
                    loop {
                        use std::sync::mpsc::RecvTimeoutError;
                        let rows =
                            match rx.recv_timeout((batch_wait / 4).max(Duration::from_millis(1))) {
                                Ok(rows) => rows,
                                Err(RecvTimeoutError::Disconnected) => break,
                                Err(RecvTimeoutError::Timeout) => {
                                    match outbox.lock().expect("outbox").due(batch_wait) {
                                        Some(rows) => rows,
                                        None => continue,
                                    }
                                }
                            };
                        result = push_batch(remote, &rows);
                        if result.is_err() {
                            break;
                        }
                        pushed.extend(rows.into_iter().map(|(k, _)| k));
                    }
                    journal
                        .lock()
                        .expect("journal")
                        .mark_synced(&remote.url, pushed.iter().map(String::as_str))?;
                    result
                })
            });
            // Progress while answering: a line every `progress_every` with
            // how many are answered, the rate and an estimate of what is left.
            let ticker = progress_every(env.quiet).map(|every| {
                let (answering, sent) = (&answering, &answered.sent);
                let (node, total) = (ctx.node(), reqs.len());
                scope.spawn(move || {
                    let t0 = std::time::Instant::now();
                    let base = sent.load(Ordering::Relaxed);
                    let mut next = every;
                    while answering.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20).min(every));
                        if t0.elapsed() < next {
                            continue;
                        }
                        next += every;
                        let done = sent.load(Ordering::Relaxed).saturating_sub(base);
                        eprintln!("{}", progress_line(node, done, total, t0.elapsed()));
                    }
                })
            });
            let result = backend.answer_all(&queries, concurrency, &|| ctx.is_cancelled(), &record);
            answering.store(false, Ordering::Relaxed);
            if let Some(t) = ticker {
                let _ = t.join();
            }
            // The last, partial batch; closing the channel then ends the
            // pusher once it has sent everything.
            let rest = outbox.lock().expect("outbox").take();
            if let (false, Some(tx)) = (rest.is_empty(), tx.lock().expect("pusher").take()) {
                let _ = tx.send(rest);
            }
            let pushed = match pusher {
                Some(h) => h.join().expect("remote pusher"),
                None => Ok(()),
            };
            (result, pushed)
        });
        // Commit the open batch, also when the node failed or was cancelled.
        let flushed = journal.lock().expect("journal").flush();
        result.and(flushed).and(pushed)
    }
}
