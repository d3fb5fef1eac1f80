//! The queue-proxy's listeners and the user-traffic stack, assembled in one place and in
//! the order of CONTRACT §1.3.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT, HOST, USER_AGENT};
use http::{HeaderValue, Request, Response, StatusCode};
use thaw_shared::breaker::Breaker;
use thaw_shared::conn::Connection;
use thaw_shared::drain::{Drainer, UpgradeTracker};
use thaw_shared::framing;
use thaw_shared::headers::{self, Carried};
use thaw_shared::probe::Prober;
use thaw_shared::proxy::{self, ProxyError, Upstream};
use thaw_shared::serve::RequestBody;
use thaw_shared::stats::ConcurrencyRecorder;
use thaw_shared::timeout::{Timeouts, TIMEOUT_BODY};
use thaw_shared::trace;
use tokio::time::Instant;

use thaw_shared::body::{self, empty, local, text, PROMETHEUS_TEXT};

use crate::body::{RequestGuard, ResponseBody};
use crate::metrics::{AutoscalerStats, LogInfo, UserMetrics};

/// Everything the request path reads, shared by all connections.
pub struct State {
    pub timeouts: Timeouts,
    pub drainer: Arc<Drainer>,
    pub stats: Arc<ConcurrencyRecorder>,
    pub breaker: Option<Arc<Breaker>>,
    pub upstream: Upstream,
    pub upgrades: UpgradeTracker,
    pub prober: Prober,
    pub metrics: Arc<UserMetrics>,
    pub autoscaler: AutoscalerStats,
    pub request_log: bool,
    /// Only while tracing is on: what the request spans say of the revision.
    pub tracing: Option<TraceNames>,
    /// `Thaw-Revision` for health-check answers; `None` if the names cannot be a header.
    pub identity: Option<HeaderValue>,
}

/// The revision, as request spans name it.
#[derive(Debug, Clone)]
pub struct TraceNames {
    pub namespace: String,
    pub revision: String,
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
        // 0. A request whose target is ambiguous goes no further.
        if let Err(err) = framing::check_target(&mut req) {
            return framing::refuse(err);
        }
        // Which of the contract's headers the request carries, so the layers below look
        // up only those it has.
        let carried = Carried::scan(req.headers());
        // 1. Health checks from the kubelet, activator and autoscaler never reach the app.
        if req
            .headers()
            .get(USER_AGENT)
            .is_some_and(|ua| headers::is_health_check_user_agent(ua.as_bytes()))
        {
            return health_check(&state, &req).await;
        }
        // 2. The ingress prober checks the path through the mesh, not the app.
        if carried.has(Carried::NETWORK_PROBE) {
            if let Some(resp) = ingress_probe(&state, &req) {
                return resp;
            }
        }
        // 3. Real traffic keeps a draining pod alive until it has been quiet for a while.
        state.drainer.touch();
        // 4. Tracing, only when on: the request's server span, a child of the caller's
        //    `traceparent`. Its children name it as their parent, so the path is never
        //    wrapped in it: off, nothing is created or read, and the request holds one
        //    null pointer for it. Probes above are not traced, as in Knative.
        let span = state.tracing.as_ref().map(|names| {
            Box::new(trace::server_span(
                "queue",
                &req,
                trace::RevisionAttrs {
                    namespace: &names.namespace,
                    name: &names.revision,
                },
            ))
        });
        // 5. Timeouts start now, so the wait in the breaker counts.
        let started = Instant::now();
        let version = req.version();
        // 6. Apps that only read `Forwarded` still see where the request came from.
        if carried.has(Carried::FORWARDED_FOR) {
            proxy::forwarded_shim(req.headers_mut());
        }
        // 7. Count the arrival before the breaker so the autoscaler sees queued demand
        //    too; kubelet probes forwarded to the app are not demand.
        let kubelet = carried.has(Carried::KUBELET_PROBE);
        let proxied = carried.has(Carried::PROXY_REQUEST)
            && req
                .headers()
                .get(headers::K_PROXY_REQUEST)
                .is_some_and(|v| v.as_bytes() == headers::PROXY_REQUEST_ACTIVATOR.as_bytes());
        let mut guard = RequestGuard {
            record: Some(state.metrics.start(started)),
            permit: None,
            in_flight: (!kubelet).then(|| state.stats.arrive(proxied)),
            span,
        };
        if state.request_log {
            if let Some(record) = guard.record.as_mut() {
                record.log_with(LogInfo {
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    version: req.version(),
                });
            }
        }
        // 8. The activator moved the client's Host aside; restore it for the app.
        if carried.has(Carried::ORIGINAL_HOST) {
            if let Some(host) = req.headers_mut().remove(headers::K_ORIGINAL_HOST) {
                req.headers_mut().insert(HOST, host);
            }
        }
        // 9 + 10. Breaker, then the proxy, both under the timeouts.
        let breaker = if kubelet {
            None
        } else {
            state.breaker.as_ref()
        };
        let traced = guard.span.as_deref();
        // Pinned where it is made: the timeout then holds a pointer to it, where it would
        // otherwise copy the whole future (the proxy's own state inside) at each layer.
        let result = {
            let head = std::pin::pin!(async {
                let permit = match breaker {
                    Some(breaker) => {
                        // Knative's name for the wait in the breaker, a child of the request
                        // span.
                        let wait = traced.map(|parent| {
                            tracing::info_span!(
                                target: trace::TARGET,
                                parent: parent,
                                "kn.queueproxy.wait"
                            )
                        });
                        let acquired = breaker.acquire().await;
                        drop(wait);
                        Some(acquired.map_err(Refused::Full)?)
                    }
                    None => None,
                };
                if carried.has(Carried::ROUTING) {
                    req.headers_mut().remove(headers::KNATIVE_SERVING_REVISION);
                    req.headers_mut().remove(headers::KNATIVE_SERVING_NAMESPACE);
                }
                // With tracing on, the app's parent is this proxy's span; off, the caller's
                // `traceparent` and `tracestate` pass untouched like any other header.
                if let Some(span) = traced {
                    trace::inject(span, req.headers_mut());
                }
                proxy::prepare_request(&mut req, Some(conn.client_ip()));
                // The permit rides with the answer; on a timeout it drops with this future.
                let resp = state
                    .upstream
                    .forward(req, &state.upgrades, Some(&conn))
                    .await;
                resp.map(|resp| (resp, permit)).map_err(Refused::Upstream)
            });
            state.timeouts.before_first_byte(started, head).await
        };
        let resp = match result {
            Ok(Ok((resp, permit))) => {
                guard.permit = permit;
                if let Some(record) = guard.record.as_mut() {
                    record.status(resp.status());
                }
                if let Some(span) = &guard.span {
                    trace::record_status(span, resp.status());
                }
                // An upgraded connection keeps its slot until it closes (CONTRACT §1.4); a
                // client that stops reading does not keep it past the timeouts.
                return body::proxied_response(
                    resp,
                    guard,
                    &conn,
                    version,
                    &state.timeouts,
                    started,
                );
            }
            Ok(Err(Refused::Full(full))) => {
                state.metrics.breaker_rejected();
                text(StatusCode::SERVICE_UNAVAILABLE, static_reason(&full))
            }
            Ok(Err(Refused::Upstream(err))) if err.is_client_fault() => {
                tracing::debug!(error = %err, "client sent a malformed body");
                text(err.status(), err.to_string())
            }
            Ok(Err(Refused::Upstream(err))) => {
                state.metrics.upstream_error();
                bad_gateway(&err)
            }
            Err(_) => text(StatusCode::GATEWAY_TIMEOUT, TIMEOUT_BODY),
        };
        if let Some(record) = guard.record.as_mut() {
            record.status(resp.status());
        }
        if let Some(span) = &guard.span {
            trace::record_status(span, resp.status());
        }
        resp
    }
}

enum Refused {
    Full(thaw_shared::breaker::BreakerFull),
    Upstream(ProxyError),
}

fn static_reason(_: &thaw_shared::breaker::BreakerFull) -> &'static str {
    "pending request queue full"
}

fn bad_gateway(err: &ProxyError) -> Response<ResponseBody> {
    tracing::warn!(error = %err, "app unreachable");
    text(StatusCode::BAD_GATEWAY, err.to_string())
}

/// CONTRACT §1.3.1: `503 shutting down` while draining, `400` for a probe not meant for
/// the queue-proxy, else the app's readiness. Every answer names the revision
/// (`Thaw-Revision`, [beyond]) so the prober can tell it reached the pod it meant to.
async fn health_check(state: &State, req: &Request<RequestBody>) -> Response<ResponseBody> {
    let mut resp = health_answer(state, req).await;
    if let Some(identity) = &state.identity {
        resp.headers_mut()
            .insert(headers::THAW_REVISION, identity.clone());
    }
    resp
}

async fn health_answer(state: &State, req: &Request<RequestBody>) -> Response<ResponseBody> {
    if state.drainer.is_draining() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let probe = req
        .headers()
        .get(headers::K_NETWORK_PROBE)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if probe != headers::PROBE_QUEUE.as_bytes() {
        let body = format!(
            "unexpected probe header value: {}",
            String::from_utf8_lossy(probe)
        );
        return text(StatusCode::BAD_REQUEST, body);
    }
    if state.prober.is_ready().await {
        text(StatusCode::OK, headers::PROBE_QUEUE)
    } else {
        empty(StatusCode::SERVICE_UNAVAILABLE)
    }
}

/// CONTRACT §1.3.2: the ingress prober's `K-Network-Probe: probe`, answered with its hash.
fn ingress_probe(state: &State, req: &Request<RequestBody>) -> Option<Response<ResponseBody>> {
    let probe = req.headers().get(headers::K_NETWORK_PROBE)?;
    if probe.as_bytes() != headers::PROBE_INGRESS.as_bytes() {
        return None;
    }
    if state.drainer.is_draining() {
        return Some(text(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
    }
    let Some(hash) = req.headers().get(headers::K_NETWORK_HASH) else {
        return Some(text(
            StatusCode::BAD_REQUEST,
            "missing K-Network-Hash header",
        ));
    };
    let mut resp = empty(StatusCode::OK);
    resp.headers_mut()
        .insert(headers::K_NETWORK_HASH, hash.clone());
    Some(resp)
}

/// `:9090`: the autoscaler's scrape, or Prometheus text for anyone not asking for protobuf.
pub fn autoscaler_metrics(state: &State, req: &Request<RequestBody>) -> Response<ResponseBody> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let wants_protobuf = req
        .headers()
        .get_all(ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("application/protobuf")));
    let (body, content_type) = if wants_protobuf {
        (state.autoscaler.protobuf(), "application/protobuf")
    } else {
        (
            Bytes::from(state.autoscaler.prometheus_text()),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    local(StatusCode::OK, content_type, body)
}

/// `:9091`: user-facing Prometheus metrics.
pub fn user_metrics(state: &State, req: &Request<RequestBody>) -> Response<ResponseBody> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let depth = state.breaker.as_ref().map_or(0, |b| b.waiting());
    local(StatusCode::OK, PROMETHEUS_TEXT, state.metrics.render(depth))
}

/// `:8022`: only `/wait-for-drain`, the user container's preStop hook.
pub async fn admin(state: &State, req: &Request<RequestBody>) -> Response<ResponseBody> {
    if req.uri().path() != "/wait-for-drain" {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    state.drainer.wait_for_drain().await;
    empty(StatusCode::OK)
}
