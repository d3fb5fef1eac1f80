//! The activator as a strict, transparent HTTP/1.1 proxy (RFC 9110/9112), in front of a
//! real queue-proxy and an app written byte by byte: ambiguous targets refused, limits by
//! size, framing and trailers intact, 1xx passed on through both hops; and nothing a
//! client sends gets it past a pod's breaker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::StatusCode;
use thaw_benches::harness::*;
use thaw_benches::raw_app::{checks, exchange, status_of, RawApp};

const HOST: &str = "hello.local";

fn config(cc: usize, endpoint: u16) -> String {
    format!(
        "revisions:\n  - name: hello\n    namespace: default\n    hosts: [{HOST}]\n    containerConcurrency: {cc}\n    timeoutSeconds: 30\n    endpoints: [\"127.0.0.1:{endpoint}\"]\n"
    )
}

/// activator → queue-proxy → raw app, with the pod ready.
async fn start() -> (RawApp, QueueProxy, Activator) {
    let app = RawApp::start().await;
    let port = free_port();
    let qp = QueueProxy::start(app.port(), &[("QUEUE_SERVING_PORT", &port.to_string())]).await;
    let act = Activator::start(&config(0, port), &[]).await;
    let req = format!("GET /warm HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    let resp = exchange(act.http, req.as_bytes()).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    (app, qp, act)
}

#[tokio::test]
async fn ambiguous_targets_are_refused_and_absolute_form_names_the_host() {
    let (app, _qp, act) = start().await;
    checks::host_rules(act.http, HOST, &app).await;
    checks::absolute_form(act.http, HOST, &app).await;
    // An absolute-form target wins over Host: here it names no revision.
    let req =
        format!("GET http://nobody.local/ HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    let resp = exchange(act.http, req.as_bytes()).await;
    assert_eq!(status_of(&resp), Some(404), "{resp}");
}

#[tokio::test]
async fn header_limits_are_by_size_both_ways() {
    let (app, _qp, act) = start().await;
    checks::header_limits(act.http, HOST, &app).await;
}

#[tokio::test]
async fn framing_trailers_and_early_hints_pass_through_both_hops() {
    let (_app, _qp, act) = start().await;
    checks::stale_content_length(act.http, HOST).await;
    checks::trailers(act.http, HOST).await;
    checks::early_hints(act.http, HOST).await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_fault() {
    let (_app, _qp, act) = start().await;
    checks::malformed_chunked_body(act.http, HOST).await;
    // Not a pod failure: the pod keeps serving.
    let req = format!("GET /after HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    let resp = exchange(act.http, req.as_bytes()).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
}

#[tokio::test]
async fn a_client_sent_kubelet_probe_header_never_reaches_a_pod() {
    let (app, _qp, act) = start().await;
    let before = app.heads().len();
    let (status, _, body) = get_with(
        &act.url("/bypass"),
        &[("Host", HOST), ("K-Kubelet-Probe", "queue")],
    )
    .await;
    // The activator answers it with its own readiness; the pod never sees it.
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with(b"ok"), "{body:?}");
    assert_eq!(app.heads().len(), before);
    assert!(app.last_head("/bypass").is_none());
}

#[tokio::test]
async fn an_answers_lines_pass_on_as_they_came_through_both_hops() {
    let (_app, _qp, act) = start().await;
    checks::answer_lines(act.http, HOST).await;
}
