//! Client-side limits: an adaptive concurrency gate (halved on HTTP 429,
//! grown back by one after as many successes as the current limit — additive
//! increase, multiplicative decrease) and pacing for requests and tokens per
//! minute. Used by `llm::client` around every attempt.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
// tokio's clock: the real one, or in tests a paused one that only moves
// when every task waits (so pacing is tested without wall-clock bounds).
use tokio::time::Instant;

/// Limits as configured (`engine.concurrency`, `engine.rpm`, `engine.tpm`).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub concurrency: usize,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
}

struct State {
    limit: usize,
    inflight: usize,
    successes: usize,
    last_shrink: Option<Instant>,
    next_start: Option<Instant>,
    tokens: VecDeque<(Instant, u64)>,
}

pub struct Gate {
    max: usize,
    rpm: Option<u32>,
    tpm: Option<u64>,
    st: Mutex<State>,
    notify: tokio::sync::Notify,
}

/// A held slot; released on drop.
pub struct Permit<'a>(&'a Gate);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.st.lock().expect("gate").inflight -= 1;
        self.0.notify.notify_waiters();
    }
}

impl Gate {
    pub fn new(l: &Limits) -> Gate {
        let max = l.concurrency.max(1);
        Gate {
            max,
            rpm: l.rpm.filter(|r| *r > 0),
            tpm: l.tpm.filter(|t| *t > 0),
            st: Mutex::new(State {
                limit: max,
                inflight: 0,
                successes: 0,
                last_shrink: None,
                next_start: None,
                tokens: VecDeque::new(),
            }),
            notify: tokio::sync::Notify::new(),
        }
    }

    /// The current concurrency limit.
    pub fn limit(&self) -> usize {
        self.st.lock().expect("gate").limit
    }

    /// Waits for a slot under the current limit and for the pacing of
    /// requests and (estimated) tokens per minute.
    pub async fn acquire(&self, tokens: u64) -> Permit<'_> {
        loop {
            let notified = self.notify.notified();
            let wait = {
                let mut st = self.st.lock().expect("gate");
                let now = Instant::now();
                if st.inflight >= st.limit {
                    None
                } else {
                    let mut at = now;
                    if let (Some(_), Some(n)) = (self.rpm, st.next_start) {
                        at = at.max(n);
                    }
                    if let Some(tpm) = self.tpm {
                        while st
                            .tokens
                            .front()
                            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(60))
                        {
                            st.tokens.pop_front();
                        }
                        let used: u64 = st.tokens.iter().map(|(_, n)| n).sum();
                        if used + tokens > tpm && !st.tokens.is_empty() {
                            // Wait until the oldest entry leaves the window.
                            let oldest = st.tokens.front().map(|(t, _)| *t).unwrap_or(now);
                            at = at.max(oldest + Duration::from_secs(60));
                        }
                    }
                    if at <= now {
                        st.inflight += 1;
                        if let Some(rpm) = self.rpm {
                            st.next_start = Some(now + Duration::from_secs_f64(60.0 / rpm as f64));
                        }
                        if self.tpm.is_some() {
                            st.tokens.push_back((now, tokens));
                        }
                        return Permit(self);
                    }
                    Some(at - now)
                }
            };
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => notified.await,
            }
        }
    }

    /// HTTP 429: halve the limit (at most once a second).
    pub fn rate_limited(&self) {
        let mut st = self.st.lock().expect("gate");
        let now = Instant::now();
        if st
            .last_shrink
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        let before = st.limit;
        st.limit = (st.limit / 2).max(1);
        st.successes = 0;
        st.last_shrink = Some(now);
        if st.limit < before {
            tracing::info!("rate limited: concurrency {before} → {}", st.limit);
        }
    }

    /// A success: after `limit` of them, allow one more request at a time.
    pub fn succeeded(&self) {
        let mut st = self.st.lock().expect("gate");
        if st.limit >= self.max {
            return;
        }
        st.successes += 1;
        if st.successes >= st.limit {
            st.successes = 0;
            st.limit += 1;
            drop(st);
            self.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_halves_on_429_and_grows_back_additively() {
        let g = Gate::new(&Limits {
            concurrency: 8,
            ..Default::default()
        });
        g.rate_limited();
        assert_eq!(g.limit(), 4);
        g.rate_limited(); // within a second: ignored
        assert_eq!(g.limit(), 4);
        for _ in 0..4 {
            g.succeeded();
        }
        assert_eq!(g.limit(), 5);
        for _ in 0..100 {
            g.succeeded();
        }
        assert_eq!(g.limit(), 8, "never above the configured concurrency");
    }

    #[test]
    fn requests_per_minute_are_paced() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let g = Gate::new(&Limits {
            concurrency: 8,
            rpm: Some(1200), // one start every 50 ms
            tpm: None,
        });
        // The clock is paused: it moves only by the waits the gate asks
        // for, so four gaps of 50 ms are exactly 200 ms of virtual time.
        let e = rt.block_on(async {
            let t0 = Instant::now();
            for _ in 0..5 {
                drop(g.acquire(0).await);
            }
            t0.elapsed()
        });
        assert_eq!(e, Duration::from_millis(200));
    }

    #[test]
    fn concurrency_is_capped_by_the_current_limit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let g = Gate::new(&Limits {
            concurrency: 2,
            ..Default::default()
        });
        rt.block_on(async {
            let a = g.acquire(0).await;
            let _b = g.acquire(0).await;
            let third = tokio::time::timeout(Duration::from_millis(50), g.acquire(0)).await;
            assert!(third.is_err(), "a third slot while two are held");
            drop(a);
            let third = tokio::time::timeout(Duration::from_millis(50), g.acquire(0)).await;
            assert!(third.is_ok());
        });
    }
}
