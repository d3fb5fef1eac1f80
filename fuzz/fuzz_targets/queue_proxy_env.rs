//! The queue-proxy's configuration (`thaw_queue_proxy::config::Config::from_env`, the
//! map-taking twin of `from_process_env`) from an arbitrary environment, then the state
//! the queue-proxy builds from it at start (`build_state`).
//!
//! Input: lines applied to the environment Knative's controller sets (see
//! `thaw_fuzz::lines`): `NAME=value` sets, `NAME` removes, `!` clears.
//!
//! Invariants for an accepted configuration (the bounds `config.rs` documents):
//! - `CONTAINER_CONCURRENCY` <= `MAX_CONTAINER_CONCURRENCY`; the user port is not 0;
//! - every timeout, period and interval is at most `MAX_DURATION`, so a deadline
//!   `now + timeout` cannot overflow (checked by computing it);
//! - the aggressive probe interval is > 0; worker threads are 1..=`MAX_WORKER_THREADS`;
//! - the TLS maximum is not below the minimum; the log level is one of the known ones;
//! - every readiness probe keeps `ProbeSpec`'s bounds;
//! - the state the queue-proxy starts with builds without error or panic.
//!
//! A refused one must name a variable the queue-proxy reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_queue_proxy::config::{Config, ConfigError, VARS};
use thaw_shared::limits::{MAX_CONTAINER_CONCURRENCY, MAX_DURATION, MAX_WORKER_THREADS};
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let Some(lines) = thaw_fuzz::lines(data) else {
        return;
    };
    let mut env = thaw_fuzz::knative_env();
    thaw_fuzz::apply(&mut env, lines);
    let config = match Config::from_env(&env) {
        Ok(c) => c,
        Err(ConfigError::Missing(var) | ConfigError::Invalid { var, .. }) => {
            assert!(VARS.iter().any(|v| v.name == var), "unknown variable {var}");
            return;
        }
    };
    assert!(config.container_concurrency as u64 <= MAX_CONTAINER_CONCURRENCY);
    assert_ne!(config.user_port, 0);
    let t = config.timeouts;
    for d in [t.total, t.response_start, t.idle].into_iter().flatten() {
        assert!(!d.is_zero() && d <= MAX_DURATION, "timeout {d:?}");
    }
    let now = Instant::now();
    if let Some(deadline) = t.head_deadline(now) {
        assert!(deadline > now);
    }
    for d in [
        config.drain_quiet_period,
        config.read_header_timeout,
        config.aggressive_probe_interval,
    ] {
        assert!(d <= MAX_DURATION, "duration {d:?}");
        assert!(now.checked_add(d).is_some());
    }
    assert!(!config.aggressive_probe_interval.is_zero());
    if let Some(n) = config.worker_threads {
        assert!((1..=MAX_WORKER_THREADS).contains(&n), "{n} worker threads");
    }
    if let Some(max) = config.tls_max_version {
        assert!(max >= config.tls_min_version);
    }
    assert!(matches!(
        config.logging_level.as_str(),
        "" | "debug" | "info" | "warn" | "warning" | "error" | "dpanic" | "panic" | "fatal"
    ));
    config
        .readiness_probes
        .iter()
        .for_each(thaw_fuzz::check_probe);
    if let Err(e) = thaw_queue_proxy::build_state(&config) {
        panic!("accepted config does not start: {e}");
    }
});
