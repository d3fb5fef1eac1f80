//! What a queue-proxy request holds until its response is over.

use thaw_shared::stats::InFlight;

use crate::metrics::RequestRecord;

/// Everything a request holds until its response is over. Fields drop in order: the
/// latency is recorded, then the breaker slot and the in-flight count are released,
/// then the request's span ends (only while tracing is on), covering the whole body.
#[derive(Debug)]
pub struct RequestGuard {
    pub record: Option<RequestRecord>,
    pub permit: Option<thaw_shared::breaker::BreakerPermit>,
    pub in_flight: Option<InFlight>,
    /// Boxed so that, with tracing off, it costs the request one null pointer.
    pub span: Option<Box<tracing::Span>>,
}

/// The queue-proxy's response body.
pub type ResponseBody = thaw_shared::body::ResponseBody<RequestGuard>;
