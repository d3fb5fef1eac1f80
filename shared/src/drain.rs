//! Draining without dropping requests (CONTRACT §1.8).
//!
//! On SIGTERM the process keeps serving but reports itself as shutting down, so Kubernetes
//! and the ingress take it out of rotation. Every request resets a quiet timer; once the
//! quiet period passes with no request, the servers stop accepting and finish what they
//! have. Upgraded connections (websockets) are tracked separately because they outlive
//! the HTTP exchange that opened them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tokio::time::{Duration, Instant};

/// Where the process is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// SIGTERM arrived: still serving, probes fail.
    Draining,
    /// Servers stopped; `wait-for-drain` callers are released.
    Drained,
}

#[derive(Debug)]
pub struct Drainer {
    /// Mirrors `phase != Serving` so the hot path pays one relaxed load.
    draining: AtomicBool,
    /// Milliseconds since `base` of the last request seen while draining.
    last_request_ms: AtomicU64,
    base: Instant,
    quiet_period: Duration,
    phase: watch::Sender<Phase>,
}

impl Drainer {
    /// Knative's quiet period.
    pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_secs(30);
    /// How long `wait-for-drain` waits for a SIGTERM before deciding it was a restart.
    pub const WAIT_FOR_SIGTERM: Duration = Duration::from_secs(1);

    pub fn new(quiet_period: Duration) -> Self {
        Self {
            draining: AtomicBool::new(false),
            last_request_ms: AtomicU64::new(0),
            base: Instant::now(),
            quiet_period,
            phase: watch::Sender::new(Phase::Serving),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Called for every request that is not a probe: while draining it restarts the quiet
    /// period.
    pub fn touch(&self) {
        if self.is_draining() {
            self.last_request_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// SIGTERM: start failing probes; the quiet period starts now.
    pub fn start(&self) {
        self.last_request_ms.store(self.now_ms(), Ordering::Relaxed);
        self.draining.store(true, Ordering::Relaxed);
        self.phase.send_if_modified(|p| {
            let was_serving = *p == Phase::Serving;
            if was_serving {
                *p = Phase::Draining;
            }
            was_serving
        });
    }

    /// Resolves once draining started and the quiet period passed with no request.
    pub async fn quiet(&self) {
        let mut rx = self.phase.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|p| *p != Phase::Serving).await;
        loop {
            let last = self.last_request_ms.load(Ordering::Relaxed);
            let due = self.base + Duration::from_millis(last) + self.quiet_period;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }

    /// The servers are done: release everyone blocked in [`wait_for_drain`](Self::wait_for_drain).
    pub fn finish(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.phase.send_replace(Phase::Drained);
    }

    /// The admin `/wait-for-drain` semantics: block until the drain is over, unless no
    /// SIGTERM arrives within [`WAIT_FOR_SIGTERM`](Self::WAIT_FOR_SIGTERM) of the call (the
    /// user container is restarting, not the pod stopping).
    pub async fn wait_for_drain(&self) {
        let mut rx = self.phase.subscribe();
        let started = tokio::time::timeout(
            Self::WAIT_FOR_SIGTERM,
            rx.wait_for(|p| *p != Phase::Serving),
        )
        .await
        .is_ok();
        if !started {
            return;
        }
        let _ = rx.wait_for(|p| *p == Phase::Drained).await;
    }
}

/// Counts upgraded connections (websockets) so a drain can wait for them.
#[derive(Debug, Clone, Default)]
pub struct UpgradeTracker {
    inner: Arc<TrackerInner>,
}

#[derive(Debug, Default)]
struct TrackerInner {
    open: AtomicUsize,
    closed: Notify,
}

impl UpgradeTracker {
    /// Knative gives upgraded connections this much time after the servers stop.
    pub const GRACE: Duration = Duration::from_secs(60);

    pub fn track(&self) -> TrackedUpgrade {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        TrackedUpgrade {
            inner: Arc::clone(&self.inner),
        }
    }

    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Waits until no upgraded connection is open, or `limit` passes. Returns whether all
    /// closed.
    pub async fn wait_closed(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.inner.closed.notified();
            if self.open() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.open() == 0;
            }
        }
    }
}

/// One open upgraded connection; dropping it marks it closed.
#[derive(Debug)]
pub struct TrackedUpgrade {
    inner: Arc<TrackerInner>,
}

impl Drop for TrackedUpgrade {
    fn drop(&mut self) {
        if self.inner.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.closed.notify_waiters();
        }
    }
}

/// Which shutdown signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: Kubernetes stopping the pod; the full drain applies.
    Terminate,
    /// SIGINT: Ctrl-C at a terminal.
    Interrupt,
}

/// SIGTERM and SIGINT as one source of shutdown signals.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; from then on these signals no longer kill the process.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next signal.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Interrupt,
        }
    }

    /// After the first signal: a second one means "now". `before_exit` runs, then the
    /// process exits with status 1.
    pub fn exit_on_next(mut self, before_exit: impl FnOnce() + Send + 'static) {
        tokio::spawn(async move {
            self.next().await;
            tracing::warn!("second signal; exiting at once");
            before_exit();
            std::process::exit(1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_period_is_reset_by_requests() {
        let d = Arc::new(Drainer::new(Duration::from_secs(30)));
        d.touch(); // not draining yet: no effect
        let t0 = Instant::now();
        d.start();
        assert!(d.is_draining());
        let d2 = Arc::clone(&d);
        let toucher = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                d2.touch();
            }
        });
        d.quiet().await;
        // Last touch at 60 s, then 30 s quiet.
        assert_eq!(t0.elapsed(), Duration::from_secs(90));
        toucher.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_drain_returns_without_sigterm() {
        let d = Drainer::new(Duration::from_secs(30));
        let t0 = Instant::now();
        d.wait_for_drain().await;
        assert_eq!(t0.elapsed(), Drainer::WAIT_FOR_SIGTERM);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_drain_blocks_until_finished() {
        let d = Arc::new(Drainer::new(Duration::from_secs(30)));
        let d2 = Arc::clone(&d);
        let t0 = Instant::now();
        let waiter = tokio::spawn(async move { d2.wait_for_drain().await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        d.start();
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert!(!waiter.is_finished());
        d.finish();
        waiter.await.unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(40));
        assert_eq!(d.phase(), Phase::Drained);
    }

    #[tokio::test(start_paused = true)]
    async fn upgrade_tracker_waits_for_close_or_limit() {
        let t = UpgradeTracker::default();
        assert!(t.wait_closed(Duration::from_secs(1)).await);
        let a = t.track();
        let b = t.track();
        assert_eq!(t.open(), 2);
        let t2 = t.clone();
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(a);
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(b);
        });
        assert!(t2.wait_closed(Duration::from_secs(60)).await);
        closer.await.unwrap();
        let _c = t.track();
        assert!(!t.wait_closed(Duration::from_secs(2)).await);
    }
}
