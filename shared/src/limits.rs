//! The largest values Thaw accepts from configuration (env, flags, YAML, annotations,
//! Revision specs). Each is far beyond any sane setting, and small enough that arithmetic
//! on it cannot overflow: a deadline `now + MAX_SECONDS`, a breaker queue of
//! `10 × MAX_CONTAINER_CONCURRENCY`, a semaphore of that many permits. Parsers check
//! against these and name the setting in the error, so nothing past a parser can panic.

use std::time::Duration;

/// Seconds in any timeout, period or window: one year.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// [`MAX_SECONDS`] as a duration.
pub const MAX_DURATION: Duration = Duration::from_secs(MAX_SECONDS);

/// Requests one pod may run at once. Knative's own default ceiling
/// (`container-concurrency-max-limit`) is 1000.
pub const MAX_CONTAINER_CONCURRENCY: u64 = 1_000_000;

/// Runtime worker threads: more than any machine has cores, so that a typo such as
/// 100000 is an error rather than thousands of threads.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Concurrency (or request count) one stat may report. Far beyond any real pod or activator
/// (Knative's concurrency ceiling is 1000 per pod, an activator buffers 10 000 requests per
/// revision), and small enough that a sum over every sender and pod stays finite: two
/// senders reporting `1.7e308` each summed to infinity, which the autoscaler reads as no
/// traffic at all.
pub const MAX_REPORTED_CONCURRENCY: f64 = 1e9;
