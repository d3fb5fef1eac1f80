//! Time-weighted request concurrency, cut into one `Stat` report per window (CONTRACT §1.6).
//!
//! The autoscaler wants the *average* number of requests in flight over a window, not a
//! sample: every change of the in-flight count first adds `concurrency × elapsed` to a
//! running sum, and a report divides that sum by the window's length. The lock is held
//! for a handful of arithmetic operations and never across an `.await`.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::{Duration, Instant};

use crate::proto::Stat;

/// One window's figures before they are turned into a `Stat`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowReport {
    /// Time-weighted average of all requests in flight.
    pub average_concurrency: f64,
    /// Time-weighted average of requests that came through the activator.
    pub average_proxied_concurrency: f64,
    /// Arrivals in the window.
    pub request_count: u64,
    /// Arrivals in the window that came through the activator.
    pub proxied_request_count: u64,
    /// Length of the window.
    pub window: Duration,
}

impl WindowReport {
    /// The `Stat` Knative's autoscaler expects: counts are per second of the reporting period.
    pub fn to_stat(&self, pod_name: &str, reporting_period: Duration, uptime: Duration) -> Stat {
        let period = reporting_period.as_secs_f64().max(f64::MIN_POSITIVE);
        Stat {
            pod_name: pod_name.to_owned(),
            average_concurrent_requests: self.average_concurrency,
            average_proxied_concurrent_requests: self.average_proxied_concurrency,
            request_count: self.request_count as f64 / period,
            proxied_request_count: self.proxied_request_count as f64 / period,
            process_uptime: uptime.as_secs_f64(),
            timestamp: 0,
        }
    }
}

#[derive(Debug)]
struct Window {
    in_flight: u64,
    proxied_in_flight: u64,
    last_change: Instant,
    started: Instant,
    weighted: f64,
    proxied_weighted: f64,
    requests: u64,
    proxied_requests: u64,
    /// Not in its collector's set (see [`ConcurrencyRecorder::arrive_tracked`]).
    untracked: bool,
}

impl Window {
    /// Adds the area under the concurrency curve since the last change.
    fn advance(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.last_change)
            .as_secs_f64();
        if elapsed > 0.0 {
            self.weighted += self.in_flight as f64 * elapsed;
            self.proxied_weighted += self.proxied_in_flight as f64 * elapsed;
        }
        self.last_change = now;
    }
}

/// Records arrivals and departures; shared by every request of a process (or of a revision,
/// in the activator).
#[derive(Debug)]
pub struct ConcurrencyRecorder {
    window: Mutex<Window>,
}

impl Default for ConcurrencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl ConcurrencyRecorder {
    pub fn new() -> Self {
        Self::with_tracking(false)
    }

    /// A recorder its collector does not track yet: its first
    /// [`arrive_tracked`](Self::arrive_tracked) says so.
    pub fn untracked() -> Self {
        Self::with_tracking(true)
    }

    fn with_tracking(untracked: bool) -> Self {
        let now = Instant::now();
        Self {
            window: Mutex::new(Window {
                in_flight: 0,
                proxied_in_flight: 0,
                last_change: now,
                started: now,
                weighted: 0.0,
                proxied_weighted: 0.0,
                requests: 0,
                proxied_requests: 0,
                untracked,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        // A panic while holding this lock leaves only plain numbers behind, which are
        // still usable, so poisoning is ignored rather than spread to every request.
        self.window
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a request as arrived; the returned guard counts its departure when dropped,
    /// so a cancelled request can never stay counted.
    pub fn arrive(self: &Arc<Self>, proxied: bool) -> InFlight {
        self.enter(proxied).0
    }

    /// For a collector that keeps only the recorders with load and forgets idle ones (the
    /// activator's, one recorder per revision): counts an arrival as
    /// [`arrive`](Self::arrive) does, and says whether the collector must track this
    /// recorder again because [`report_or_retire_at`](Self::report_or_retire_at) let it go
    /// (or it was made [`untracked`](Self::untracked)). Both happen under one lock, so an
    /// arrival either lands in the window the collector cuts or is told; only one
    /// arrival is told. A window that restarts here starts at this arrival, as a new
    /// recorder's would.
    pub fn arrive_tracked(self: &Arc<Self>) -> (InFlight, bool) {
        self.enter(false)
    }

    /// Counts an arrival; `true` if the recorder was untracked (never, for a recorder
    /// made with [`new`](Self::new) and cut with [`report_at`](Self::report_at)).
    fn enter(self: &Arc<Self>, proxied: bool) -> (InFlight, bool) {
        let now = Instant::now();
        let mut w = self.lock();
        let untracked = std::mem::take(&mut w.untracked);
        if untracked {
            // Retired only when idle: nothing in flight, nothing counted since the cut.
            w.started = now;
        }
        w.advance(now);
        w.in_flight += 1;
        w.requests += 1;
        if proxied {
            w.proxied_in_flight += 1;
            w.proxied_requests += 1;
        }
        drop(w);
        let guard = InFlight {
            recorder: Arc::clone(self),
            proxied,
        };
        (guard, untracked)
    }

    fn depart(&self, proxied: bool) {
        let now = Instant::now();
        let mut w = self.lock();
        w.advance(now);
        w.in_flight = w.in_flight.saturating_sub(1);
        if proxied {
            w.proxied_in_flight = w.proxied_in_flight.saturating_sub(1);
        }
    }

    /// Requests in flight right now.
    pub fn in_flight(&self) -> u64 {
        self.lock().in_flight
    }

    /// Closes the current window, returns its figures and starts the next one. Requests in
    /// flight carry over into the new window.
    pub fn report(&self) -> WindowReport {
        self.report_at(Instant::now())
    }

    /// As [`report`](Self::report), at a given instant (for callers that cut several
    /// recorders at one tick).
    pub fn report_at(&self, now: Instant) -> WindowReport {
        Self::cut(&mut self.lock(), now)
    }

    /// As [`report_at`](Self::report_at); if the window was idle (no load, no arrival,
    /// nothing in flight) the recorder is also marked untracked, under the same lock, and
    /// `true` is returned: its collector may drop it, and the next arrival is told to
    /// track it again ([`arrive_tracked`](Self::arrive_tracked)).
    pub fn report_or_retire_at(&self, now: Instant) -> (WindowReport, bool) {
        let mut w = self.lock();
        let report = Self::cut(&mut w, now);
        let idle =
            report.average_concurrency == 0.0 && report.request_count == 0 && w.in_flight == 0;
        if idle {
            w.untracked = true;
        }
        (report, idle)
    }

    fn cut(w: &mut Window, now: Instant) -> WindowReport {
        w.advance(now);
        let window = now.saturating_duration_since(w.started);
        let secs = window.as_secs_f64();
        let (avg, proxied_avg) = if secs > 0.0 {
            (w.weighted / secs, w.proxied_weighted / secs)
        } else {
            (w.in_flight as f64, w.proxied_in_flight as f64)
        };
        let report = WindowReport {
            average_concurrency: avg,
            average_proxied_concurrency: proxied_avg,
            request_count: w.requests,
            proxied_request_count: w.proxied_requests,
            window,
        };
        w.started = now;
        w.weighted = 0.0;
        w.proxied_weighted = 0.0;
        w.requests = 0;
        w.proxied_requests = 0;
        report
    }
}

/// A request counted as in flight; dropping it counts the departure.
#[derive(Debug)]
pub struct InFlight {
    recorder: Arc<ConcurrencyRecorder>,
    proxied: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.recorder.depart(self.proxied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn average_is_weighted_by_time() {
        let rec = Arc::new(ConcurrencyRecorder::new());
        let a = rec.arrive(false);
        tokio::time::advance(Duration::from_millis(500)).await;
        let b = rec.arrive(true);
        tokio::time::advance(Duration::from_millis(500)).await;
        let r = rec.report();
        // 1 for 0.5 s, then 2 for 0.5 s → 1.5 on average; proxied 1 for half the window.
        assert!((r.average_concurrency - 1.5).abs() < 1e-9, "{r:?}");
        assert!((r.average_proxied_concurrency - 0.5).abs() < 1e-9, "{r:?}");
        assert_eq!(r.request_count, 2);
        assert_eq!(r.proxied_request_count, 1);

        // Both still in flight: the next window sees 2 throughout and no new arrivals.
        tokio::time::advance(Duration::from_secs(1)).await;
        let r = rec.report();
        assert!((r.average_concurrency - 2.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.request_count, 0);

        drop(a);
        drop(b);
        tokio::time::advance(Duration::from_secs(1)).await;
        let r = rec.report();
        assert_eq!(r.average_concurrency, 0.0);
        assert_eq!(rec.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn short_request_inside_window() {
        let rec = Arc::new(ConcurrencyRecorder::new());
        tokio::time::advance(Duration::from_millis(250)).await;
        let g = rec.arrive(false);
        tokio::time::advance(Duration::from_millis(250)).await;
        drop(g);
        tokio::time::advance(Duration::from_millis(500)).await;
        let r = rec.report();
        assert!((r.average_concurrency - 0.25).abs() < 1e-9, "{r:?}");
        let stat = r.to_stat("pod", Duration::from_secs(1), Duration::from_secs(7));
        assert_eq!(stat.request_count, 1.0);
        assert_eq!(stat.pod_name, "pod");
        assert_eq!(stat.process_uptime, 7.0);
        assert_eq!(stat.timestamp, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn counts_are_per_second_of_the_period() {
        let r = WindowReport {
            request_count: 10,
            proxied_request_count: 4,
            ..Default::default()
        };
        let stat = r.to_stat("p", Duration::from_secs(2), Duration::ZERO);
        assert_eq!(stat.request_count, 5.0);
        assert_eq!(stat.proxied_request_count, 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_cut_retires_the_recorder_and_one_arrival_is_told() {
        let rec = Arc::new(ConcurrencyRecorder::untracked());
        let (held, told) = rec.arrive_tracked();
        assert!(told, "a new untracked recorder's first arrival is told");
        let (quick, told) = rec.arrive_tracked();
        assert!(!told, "only once");
        drop(quick);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (r, retired) = rec.report_or_retire_at(Instant::now());
        assert!(!retired, "load in the window");
        assert_eq!((r.average_concurrency, r.request_count), (1.0, 2));

        // Still one in flight through a window with no arrivals: kept.
        tokio::time::advance(Duration::from_secs(1)).await;
        let (r, retired) = rec.report_or_retire_at(Instant::now());
        assert!(!retired);
        assert_eq!((r.average_concurrency, r.request_count), (1.0, 0));

        // The window the request ends in has load; the next one is idle.
        tokio::time::advance(Duration::from_millis(500)).await;
        drop(held);
        tokio::time::advance(Duration::from_millis(500)).await;
        let (r, retired) = rec.report_or_retire_at(Instant::now());
        assert!(!retired);
        assert_eq!(r.average_concurrency, 0.5);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (r, retired) = rec.report_or_retire_at(Instant::now());
        assert!(retired, "{r:?}");

        // Long after, an arrival is told, and its window starts with it: half a second
        // in flight over the half second since it came is an average of 1.
        tokio::time::advance(Duration::from_secs(30)).await;
        let (held, told) = rec.arrive_tracked();
        assert!(told, "an arrival after an idle cut is told");
        tokio::time::advance(Duration::from_millis(500)).await;
        let (r, retired) = rec.report_or_retire_at(Instant::now());
        assert!(!retired);
        assert_eq!((r.average_concurrency, r.request_count), (1.0, 1));
        assert_eq!(r.window, Duration::from_millis(500));
        drop(held);
    }

    #[test]
    fn a_plain_recorder_is_tracked_from_the_start() {
        let rec = Arc::new(ConcurrencyRecorder::new());
        assert!(!rec.arrive_tracked().1);
    }
}
