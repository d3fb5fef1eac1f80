//! In-flight accounting: the concurrency guard that lets tests prove a proxy
//! never sends the app more concurrent requests than it was told to.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Process-wide state shared by every connection.
///
/// It is leaked once at startup so handlers and in-flight guards can hold a
/// `&'static` to it: that keeps a shared reference-count cache line out of
/// every request's hot path.
#[derive(Debug)]
pub struct App {
    pub counters: Counters,
    ready: AtomicBool,
}

impl App {
    pub fn new(max_concurrency: usize) -> Self {
        Self {
            counters: Counters::new(max_concurrency),
            ready: AtomicBool::new(true),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Counters {
    /// 0 means unchecked.
    limit: usize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    violations: AtomicU64,
    requests: AtomicU64,
}

/// Whether a request arriving fit under the concurrency limit. Either way it
/// is in flight until the guard is dropped.
pub enum Admission {
    Admitted(InFlight),
    Exceeded(InFlight),
}

/// Holds one request in flight; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(&'static Counters);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Counters {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            violations: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// Counts a request arriving.
    pub fn enter(&'static self) -> Admission {
        // AcqRel so a request that ended (as seen through the proxy) before
        // this one arrived is never still counted here.
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let guard = InFlight(self);
        self.requests.fetch_add(1, Ordering::Relaxed);
        // The plain load first avoids a contended read-modify-write on every
        // request once the maximum has settled.
        if now > self.max_in_flight.load(Ordering::Relaxed) {
            self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        }
        if self.limit != 0 && now > self.limit {
            self.violations.fetch_add(1, Ordering::Relaxed);
            Admission::Exceeded(guard)
        } else {
            Admission::Admitted(guard)
        }
    }

    /// The `/stats` document.
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"in_flight":{},"max_in_flight":{},"violations":{},"requests":{}}}"#,
            self.in_flight.load(Ordering::Acquire),
            self.max_in_flight.load(Ordering::Relaxed),
            self.violations.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    /// Starts a new measurement window; requests still in flight stay counted.
    pub fn reset(&self) {
        self.max_in_flight.store(0, Ordering::Relaxed);
        self.violations.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked(limit: usize) -> &'static Counters {
        Box::leak(Box::new(Counters::new(limit)))
    }

    #[test]
    fn counts_and_releases() {
        let c = leaked(1);
        let first = c.enter();
        assert!(matches!(first, Admission::Admitted(_)));
        let second = c.enter();
        assert!(matches!(second, Admission::Exceeded(_)));
        assert_eq!(
            c.to_json(),
            r#"{"in_flight":2,"max_in_flight":2,"violations":1,"requests":2}"#
        );
        drop(second);
        drop(first);
        assert!(matches!(c.enter(), Admission::Admitted(_)));
        c.reset();
        assert_eq!(
            c.to_json(),
            r#"{"in_flight":0,"max_in_flight":0,"violations":0,"requests":0}"#
        );
    }

    #[test]
    fn unchecked_when_zero() {
        let c = leaked(0);
        let guards: Vec<_> = (0..10).map(|_| c.enter()).collect();
        assert!(guards.iter().all(|g| matches!(g, Admission::Admitted(_))));
    }
}
