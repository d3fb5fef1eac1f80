//! The activator's request stack, assembled in one place and in the order of CONTRACT
//! §2.2, plus its metrics endpoint.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, HOST, RETRY_AFTER, USER_AGENT};
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Empty};
use thaw_shared::conn::Connection;
use thaw_shared::drain::UpgradeTracker;
use thaw_shared::framing;
use thaw_shared::headers::{self, Carried};
use thaw_shared::proxy::{self, AddedLines, ProxyError, Upstream, UpstreamBody};
use thaw_shared::serve::RequestBody;
use thaw_shared::stats::InFlight;
use thaw_shared::timeout::TimedOut;
use thaw_shared::trace;
use tokio::time::Instant;

use thaw_shared::body::{self, local, text, PROMETHEUS_TEXT};

use crate::metrics::{self, RevisionGauges};
use crate::parking::Admission;
use crate::platform::Platform;
use crate::reporter::{Reporter, RevisionStats};
use crate::revision::{Registry, Revision};
use crate::throttler::{PodPermit, ThrottleError};

/// The body sent to pods: the client's, or nothing (which lets a request that could not
/// connect be sent again to another pod).
pub use thaw_shared::proxy::OutboundBody;

/// The activator's response body.
pub type ResponseBody = thaw_shared::body::ResponseBody<RequestGuard>;

/// Body text for a request that timed out before its response started (CONTRACT §2.2).
pub const TIMEOUT_BODY: &str = "activator request timeout";

/// What a chunked request body may cost the buffer budget while it waits: the most the
/// server reads ahead of the app.
pub const CHUNKED_BODY_COST: u64 = 64 * 1024;

/// How often a request whose connection to a pod failed may be tried on another pod.
const CONNECT_ATTEMPTS: usize = 3;

/// Everything the request path reads.
pub struct State {
    pub registry: Arc<Registry>,
    pub platform: Arc<dyn Platform>,
    pub stats: Arc<RevisionStats>,
    pub reporter: Option<Reporter>,
    pub upstream: Upstream,
    pub upgrades: UpgradeTracker,
    pub draining: AtomicBool,
    pub cluster_domain: String,
    /// Whether requests get spans (`--tracing-endpoint`).
    pub tracing: bool,
}

/// What a request holds until its response is over; fields drop in order.
pub struct RequestGuard {
    revision: Arc<Revision>,
    started: Instant,
    status: StatusCode,
    /// Only while the request log is on: what its line says of the request.
    log: Option<Box<LogInfo>>,
    _permit: Option<PodPermit>,
    _in_flight: InFlight,
    /// Only while tracing is on: the request's span, which ends with the response.
    /// Boxed so that, with tracing off, it costs the request one null pointer.
    span: Option<Box<tracing::Span>>,
}

/// The request, as its log line shows it.
struct LogInfo {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(span) = &self.span {
            trace::record_status(span, self.status);
        }
        let elapsed = self.started.elapsed();
        self.revision.metrics.response(self.status, elapsed);
        if let Some(info) = self.log.take() {
            // The fields of Knative's default request-log template, as JSON fields.
            tracing::info!(
                revision = %self.revision.spec.id,
                method = %info.method,
                uri = %info.uri,
                protocol = ?info.version,
                status = self.status.as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        }
    }
}

/// The user-traffic stack, outermost first.
///
/// A function returning one `async move` block rather than an `async fn`: an `async fn`
/// keeps a second copy of its arguments in its future (the request head alone is 264
/// bytes), and hyper moves the future it is given.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn handle(
    state: Arc<State>,
    conn: Arc<Connection>,
    mut req: Request<RequestBody>,
) -> impl Future<Output = Response<ResponseBody>> + Send {
    async move {
        // A request that waited before hyper parsed it (`crate::parking`) brings its
        // revision and the wait's outcome; only ever a connection's first request.
        let admission = conn.take_admission::<Admission>();
        // 0. A request whose target is ambiguous goes no further.
        if let Err(err) = framing::check_target(&mut req) {
            return framing::refuse(err);
        }
        // Which of the contract's headers the request carries, so the layers below look
        // up only those it has.
        let carried = Carried::scan(req.headers());
        // 1. Kubelet probes ask whether this activator can take traffic at all.
        if is_kubelet_probe(&req, carried) {
            return readiness(&state);
        }
        // 2 + 3. Network probes from the ingress and the autoscaler are answered here.
        if carried.has(Carried::NETWORK_PROBE) {
            if let Some(probe) = req.headers().get(headers::K_NETWORK_PROBE) {
                return network_probe(&state, probe, &req);
            }
        }
        // 4. Which revision: unknown ones are 404.
        let revision = match &admission {
            Some(parked) => Arc::clone(&parked.revision),
            None => match state.registry.identify(
                req.headers(),
                carried,
                req.uri(),
                &state.cluster_domain,
            ) {
                Some(revision) => revision,
                None => return text(StatusCode::NOT_FOUND, "unknown revision"),
            },
        };
        // 5. Tracing, only when on: the request's server span, a child of the caller's
        //    `traceparent`, with the revision. Its children name it as their parent, so
        //    the path is never wrapped in it: off, nothing is created or read, and the
        //    request holds one null pointer for it. Probes above are not traced, as in
        //    Knative.
        let span = state.tracing.then(|| {
            let id = &revision.spec.id;
            Box::new(trace::server_span(
                "activator",
                &req,
                trace::RevisionAttrs {
                    namespace: &id.namespace,
                    name: &id.name,
                },
            ))
        });
        // 6. Concurrency is reported for every request, waiting ones included: that is the
        //    demand the autoscaler scales on. A parked request was counted on arrival.
        let (started, in_flight, parked) = match admission {
            Some(parked) => {
                let Admission {
                    started,
                    in_flight,
                    cold,
                    outcome,
                    ..
                } = *parked;
                (started, in_flight, Some((cold, outcome)))
            }
            None => (
                Instant::now(),
                state.stats.arrive(&revision.spec.id, &revision.load),
                None,
            ),
        };
        // 7. The revision's timeouts; the wait in the throttler counts.
        let timeouts = revision.spec.timeouts;
        let log = state.platform.request_log().then(|| {
            Box::new(LogInfo {
                method: req.method().clone(),
                uri: req.uri().clone(),
                version: req.version(),
            })
        });
        let mut guard = RequestGuard {
            revision: Arc::clone(&revision),
            started,
            status: StatusCode::OK,
            log,
            _permit: None,
            _in_flight: in_flight,
            span,
        };
        let version = req.version();
        // 8 + 9. The throttler, then the proxy; a parked request has been through the
        //    throttler already, and may have run out of time there.
        let (slot, timed_out) = match parked {
            Some((cold, Ok(slot))) => (Some((cold, slot)), false),
            Some((_, Err(TimedOut))) => (None, true),
            None => (None, false),
        };
        let result = if timed_out {
            Err(TimedOut)
        } else {
            // Pinned where it is made: the timeout then holds a pointer to it, where it
            // would otherwise copy the whole future at each layer.
            let head = std::pin::pin!(throttle_and_proxy(
                &state,
                &revision,
                &conn,
                req,
                carried,
                started,
                guard.span.as_deref(),
                slot,
            ));
            timeouts.before_first_byte(started, head).await
        };
        let resp = match result {
            Ok(Ok((resp, permit, cold_wait))) => {
                let (mut parts, body) = resp.into_parts();
                if let Some(waited) = cold_wait {
                    revision.metrics.cold_start(waited);
                    if revision.backends.first_cold_response() {
                        let ms = waited.as_millis();
                        tracing::info!(revision = %revision.spec.id, cold_start_ms = ms as u64, "served after cold start of {ms} ms");
                    }
                    if let Ok(v) = HeaderValue::from_str(&waited.as_millis().to_string()) {
                        parts.headers.insert(headers::THAW_COLD_START, v);
                    }
                }
                guard.status = parts.status;
                guard._permit = Some(permit);
                // An upgraded connection keeps its pod permit until it closes; a client that
                // stops reading does not keep it past the timeouts.
                let resp = Response::from_parts(parts, body);
                return body::proxied_response(resp, guard, &conn, version, &timeouts, started);
            }
            Ok(Err(Refused::Throttled(e @ ThrottleError::Unavailable { .. }))) => {
                tracing::warn!(revision = %revision.spec.id, error = %e, "revision unavailable");
                text(StatusCode::BAD_GATEWAY, e.to_string())
            }
            Ok(Err(Refused::Throttled(e))) => {
                revision.metrics.rejected();
                let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                resp
            }
            Ok(Err(Refused::Upstream(e))) if e.is_client_fault() => {
                tracing::debug!(revision = %revision.spec.id, error = %e, "client sent a malformed body");
                text(e.status(), e.to_string())
            }
            Ok(Err(Refused::Upstream(e))) => {
                tracing::warn!(revision = %revision.spec.id, error = %e, "pod unreachable");
                text(StatusCode::BAD_GATEWAY, e.to_string())
            }
            Err(_) => text(StatusCode::GATEWAY_TIMEOUT, TIMEOUT_BODY),
        };
        guard.status = resp.status();
        resp
    }
}

enum Refused {
    Throttled(ThrottleError),
    Upstream(ProxyError),
}

type Proxied = (Response<UpstreamBody>, PodPermit, Option<Duration>);

/// What a request parked before hyper got from the throttler, and whether it arrived cold.
type ParkedSlot = (bool, Result<PodPermit, ThrottleError>);

/// Waits for a pod with a free slot (unless `parked` already did), then proxies.
///
/// An `async move` block rather than an `async fn`, which would keep the request twice in
/// its future.
#[allow(clippy::manual_async_fn)] // on purpose: see above
#[allow(clippy::too_many_arguments)] // the request's own inputs, each used once; a struct would only rename them
fn throttle_and_proxy<'a>(
    state: &'a State,
    revision: &'a Revision,
    conn: &'a Arc<Connection>,
    req: Request<RequestBody>,
    carried: Carried,
    started: Instant,
    span: Option<&'a tracing::Span>,
    parked: Option<ParkedSlot>,
) -> impl Future<Output = Result<Proxied, Refused>> + Send + 'a {
    async move {
        let (mut parts, body) = req.into_parts();
        let (permit, cold) = match parked {
            Some((cold, slot)) => (slot.map_err(Refused::Throttled)?, cold),
            None => wait_for_slot(state, revision, &mut parts, &body, span).await?,
        };
        let cold_wait = cold.then(|| started.elapsed());
        // Rewritten once a pod is found, so that a parked request holds only its head.
        let added = rewrite_for_pod(&mut parts, conn.client_ip(), carried);
        // With tracing on, the pod's parent is this activator's span; off, the caller's
        // `traceparent` and `tracestate` pass untouched like any other header. After the
        // rewrite, whose hop-by-hop pass would drop a `traceparent` the client listed in
        // `Connection`.
        if let Some(span) = span {
            trace::inject(span, &mut parts.headers);
        }
        // The proxying state (the pooled client's futures) is several kilobytes. Boxing it
        // here, once a pod is found, keeps it out of every parked request: a parked request
        // holds only its head and its place in the queue.
        let (resp, permit) = Box::pin(proxy_with_retry(
            state, revision, conn, parts, body, &added, permit,
        ))
        .await?;
        Ok((resp, permit, cold_wait))
    }
}

/// Takes a free slot on one of the revision's pods, waiting in its queue if none is free;
/// also says whether the revision was cold (no ready pod) when the request arrived.
async fn wait_for_slot(
    state: &State,
    revision: &Revision,
    parts: &mut Parts,
    body: &RequestBody,
    span: Option<&tracing::Span>,
) -> Result<(PodPermit, bool), Refused> {
    let cost = body_cost(parts, body);
    let cold = revision.throttler.ready_pods() == 0;
    if cold {
        state.platform.need_capacity(&revision.spec.id);
    }
    // Knative's name for the wait for a pod (a cold start, or a busy revision), a child
    // of the request span; it ends once a pod's slot is this request's.
    let wait = span.map(|parent| {
        tracing::info_span!(
            target: trace::TARGET,
            parent: parent,
            "throttler_try",
            thaw.cold_start = cold
        )
    });
    let permit = match revision
        .throttler
        .try_acquire()
        .map_err(Refused::Throttled)?
    {
        Some(permit) => permit,
        None => {
            // About to wait, perhaps for long: hold the head in its own small allocation
            // rather than keep the server's whole read buffer alive through it.
            compact_head(parts);
            revision
                .throttler
                .acquire(cost)
                .await
                .map_err(Refused::Throttled)?
        }
    };
    drop(wait);
    Ok((permit, cold))
}

/// Proxies to the permit's pod. A request with no body is tried on another ready pod when
/// it could not connect (nothing reached the first one), or when it may be repeated and
/// the connection was lost before any answer: a pooled connection to a pod that just died
/// fails that way. Go's `http.Transport`, under Knative's activator, retries the same two.
async fn proxy_with_retry(
    state: &State,
    revision: &Revision,
    conn: &Arc<Connection>,
    parts: Parts,
    body: RequestBody,
    added: &AddedLines,
    mut permit: PodPermit,
) -> Result<(Response<UpstreamBody>, PodPermit), Refused> {
    let bodiless = body.is_end_stream() && !proxy::is_upgrade(parts.version, &parts.headers);
    let replayable = thaw_shared::pool::is_replayable(&parts.method, &parts.headers);
    // A copy for a retry is only worth making when another pod could take it.
    let template = (bodiless && revision.throttler.ready_pods() > 1).then(|| clone_parts(&parts));
    // hyper's empty body is swapped for ours, which the upstream exchange needs no
    // connection for.
    let body = if bodiless {
        Either::Right(Empty::new())
    } else {
        body
    };
    let mut req = Request::from_parts(parts, body);
    let mut attempt = 1;
    loop {
        let addr = permit.addr();
        let sent = state
            .upstream
            .forward_to(addr, req, added, &state.upgrades, Some(conn));
        let err = match sent.await {
            Ok(resp) => return Ok((resp, permit)),
            Err(e) => e,
        };
        // A pod that refused the connection, or dropped it before answering (its
        // queue-proxy is likely gone), is probed before the next request goes there.
        if err.is_connect() || err.is_connection_lost() {
            revision.backends.unreachable(addr);
        }
        // Only a request that never reached the pod, or that may be repeated and got no
        // answer, is sent to another.
        if !(err.is_connect() || (replayable && err.is_connection_lost())) {
            return Err(Refused::Upstream(err));
        }
        // With no other ready pod, waiting for one would turn a clear 502 into a timeout.
        let Some(template) = &template else {
            return Err(Refused::Upstream(err));
        };
        if attempt >= CONNECT_ATTEMPTS || revision.throttler.ready_pods() == 0 {
            return Err(Refused::Upstream(err));
        }
        tracing::debug!(%addr, error = %err, "pod unreachable; trying another");
        attempt += 1;
        drop(permit);
        permit = revision
            .throttler
            .acquire(0)
            .await
            .map_err(Refused::Throttled)?;
        req = Request::from_parts(clone_parts(template), Either::Right(Empty::new()));
    }
}

/// CONTRACT §2.2 outbound rules: `Host` moves to `K-Original-Host`, the request is marked
/// as coming from the activator, Knative routing and hop-by-hop headers go. The headers
/// the activator adds are returned beside the request rather than put in its map (see
/// [`AddedLines`]); any copy the client sent of them is removed.
fn rewrite_for_pod(parts: &mut Parts, client_ip: &HeaderValue, carried: Carried) -> AddedLines {
    let mut added = AddedLines::new();
    let headers = &mut parts.headers;
    let host = headers.remove(HOST).or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if carried.has(Carried::ORIGINAL_HOST) {
        headers.remove(headers::K_ORIGINAL_HOST);
    }
    if let Some(host) = host {
        added.push(headers::K_ORIGINAL_HOST, host);
    }
    if carried.has(Carried::PROXY_REQUEST) {
        headers.remove(headers::K_PROXY_REQUEST);
    }
    added.push(
        headers::K_PROXY_REQUEST,
        HeaderValue::from_static(headers::PROXY_REQUEST_ACTIVATOR),
    );
    if carried.has(Carried::ROUTING) {
        let knative: Vec<_> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("knative-serving-"))
            .cloned()
            .collect();
        for k in knative {
            headers.remove(k);
        }
    }
    // Kubelet probes reach the queue-proxy directly; one arriving here came from a
    // client, and would let it past the pod's breaker. [beyond]: Knative forwards it.
    if carried.has(Carried::KUBELET_PROBE) {
        headers.remove(headers::K_KUBELET_PROBE);
    }
    let upgrade = proxy::is_upgrade(parts.version, headers);
    proxy::strip_hop_by_hop(headers, upgrade);
    if carried.has(Carried::FORWARDED_FOR) {
        proxy::append_forwarded_for(headers, client_ip);
    } else {
        added.push(headers::X_FORWARDED_FOR, client_ip.clone());
    }
    added
}

/// Copies the request head out of the server's read buffer. hyper parses header values
/// and the URI without copying, so they share (and keep alive) the connection's 8 KiB
/// read buffer; a parked request needs only its few hundred bytes.
fn compact_head(parts: &mut Parts) {
    let mut headers = http::HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
            headers.append(name.clone(), v);
        }
    }
    parts.headers = headers;
    if let Ok(uri) = http::Uri::try_from(parts.uri.to_string()) {
        parts.uri = uri;
    }
}

fn clone_parts(parts: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// What a waiting request costs the byte budget: its declared length, or the read-ahead
/// cap for a chunked body.
fn body_cost(parts: &Parts, body: &RequestBody) -> u64 {
    if body.is_end_stream() {
        return 0;
    }
    parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(CHUNKED_BODY_COST, |n| n.min(CHUNKED_BODY_COST))
}

fn is_kubelet_probe<B>(req: &Request<B>, carried: Carried) -> bool {
    carried.has(Carried::KUBELET_PROBE)
        || req.headers().get(USER_AGENT).is_some_and(|ua| {
            ua.as_bytes()
                .starts_with(headers::KUBE_PROBE_UA_PREFIX.as_bytes())
        })
}

/// CONTRACT §2.2.1: ready unless draining or cut off from (Knative's) autoscaler; a
/// reporter that follows the activators' elected leader never blocks readiness.
fn readiness(state: &State) -> Response<ResponseBody> {
    if state.draining.load(Ordering::Relaxed) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "activator is draining");
    }
    if state
        .reporter
        .as_ref()
        .is_some_and(Reporter::blocks_readiness)
    {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "not connected to the autoscaler",
        );
    }
    match state.platform.readiness() {
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
        Ok(Some(warning)) => text(StatusCode::OK, format!("ok; {warning}")),
        Ok(None) => text(StatusCode::OK, "ok"),
    }
}

/// CONTRACT §2.2.2–3: the ingress probe as in the queue-proxy; `activator` probes from
/// the autoscaler; anything else is a client error.
fn network_probe(
    state: &State,
    probe: &HeaderValue,
    req: &Request<RequestBody>,
) -> Response<ResponseBody> {
    match probe.as_bytes() {
        b"probe" => {
            if state.draining.load(Ordering::Relaxed) {
                return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            }
            let Some(hash) = req.headers().get(headers::K_NETWORK_HASH) else {
                return text(StatusCode::BAD_REQUEST, "missing K-Network-Hash header");
            };
            let mut resp = Response::new(ResponseBody::empty());
            resp.headers_mut()
                .insert(headers::K_NETWORK_HASH, hash.clone());
            resp
        }
        v if v == headers::PROBE_ACTIVATOR.as_bytes() => {
            text(StatusCode::OK, headers::PROBE_ACTIVATOR)
        }
        other => text(
            StatusCode::BAD_REQUEST,
            format!(
                "unexpected probe header value: {:?}",
                String::from_utf8_lossy(other)
            ),
        ),
    }
}

/// The metrics port: Prometheus text.
pub fn metrics(state: &State, req: &Request<RequestBody>) -> Response<ResponseBody> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let revisions = state.registry.all();
    let body = metrics::render(revisions.iter().map(|r| {
        (
            &r.metrics,
            RevisionGauges {
                waiting: r.throttler.waiting(),
                in_flight: r.throttler.in_flight(),
                ready_pods: r.throttler.ready_pods(),
                capacity: (r.throttler.container_concurrency() > 0).then(|| r.throttler.capacity()),
            },
        )
    }));
    local(StatusCode::OK, PROMETHEUS_TEXT, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_goes_to_a_pod_carries_no_routing_or_probe_headers() {
        let req = Request::get("/")
            .header(HOST, "hello.local")
            .header("knative-serving-revision", "hello")
            .header("knative-serving-namespace", "default")
            .header("knative-serving-anything", "x")
            .header("k-kubelet-probe", "queue")
            .header("k-original-host", "spoofed.example")
            .header("k-proxy-request", "spoofed")
            .header("connection", "keep-alive")
            .header("x-kept", "1")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        let carried = Carried::scan(&parts.headers);
        let added = rewrite_for_pod(&mut parts, &HeaderValue::from_static("10.0.0.7"), carried);
        assert_eq!(added.get(&headers::K_ORIGINAL_HOST).unwrap(), "hello.local");
        assert_eq!(added.get(&headers::K_PROXY_REQUEST).unwrap(), "activator");
        assert_eq!(added.get(&headers::X_FORWARDED_FOR).unwrap(), "10.0.0.7");
        let h = &parts.headers;
        assert_eq!(h["x-kept"], "1");
        for gone in [
            "host",
            "knative-serving-revision",
            "knative-serving-namespace",
            "knative-serving-anything",
            "k-kubelet-probe",
            "connection",
            // The client's own copies: only the activator's are sent.
            "k-original-host",
            "k-proxy-request",
        ] {
            assert!(!h.contains_key(gone), "{gone} was forwarded: {h:?}");
        }
        assert_eq!(added.iter().count(), 3);
    }

    #[test]
    fn a_client_x_forwarded_for_is_appended_to_in_the_map() {
        let req = Request::get("/")
            .header(HOST, "hello.local")
            .header("x-forwarded-for", "203.0.113.5")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        let carried = Carried::scan(&parts.headers);
        let added = rewrite_for_pod(&mut parts, &HeaderValue::from_static("10.0.0.7"), carried);
        assert_eq!(parts.headers["x-forwarded-for"], "203.0.113.5, 10.0.0.7");
        assert!(added.get(&headers::X_FORWARDED_FOR).is_none());
    }
}
