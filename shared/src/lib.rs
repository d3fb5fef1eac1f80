//! What Thaw's activator and queue-proxy share: the Knative header names, the stat
//! protobuf, time-weighted concurrency, the breaker, the streaming reverse proxy, the
//! three request timeouts, readiness probes and the drainer.
#![forbid(unsafe_code)]

pub mod annotations;
pub mod autoscale;
pub mod body;
pub mod breaker;
pub mod conn;
pub mod downstream_h1;
pub mod drain;
pub mod duration;
pub mod framing;
pub mod headers;
pub mod lifeline;
pub mod limits;
pub mod logging;
pub mod names;
pub mod pool;
pub mod probe;
pub mod proto;
pub mod proxy;
pub mod quickack;
pub mod runtime;
pub mod serve;
pub mod stats;
pub mod timeout;
pub mod tls;
pub mod trace;
pub mod upstream_h1;
