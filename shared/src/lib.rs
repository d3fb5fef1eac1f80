//! What Thaw's activator and queue-proxy share: the Knative header names, the stat
//! protobuf, time-weighted concurrency, the breaker, the streaming reverse proxy, the
//! three request timeouts, readiness probes and the drainer.
#![forbid(unsafe_code)]

pub mod headers;
