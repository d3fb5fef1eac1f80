//! The queue-proxy as a strict, transparent HTTP/1.1 proxy (RFC 9110/9112): ambiguous
//! targets refused, limits by size, framing and trailers kept intact, 1xx passed on. The
//! app behind it is written byte by byte, so it can answer what real servers never do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use thaw_benches::raw_app::{checks, RawApp};

const HOST: &str = "hello.local";

async fn start() -> (RawApp, QueueProxy) {
    let app = RawApp::start().await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    (app, qp)
}

#[tokio::test]
async fn ambiguous_targets_are_refused_and_absolute_form_names_the_host() {
    let (app, qp) = start().await;
    checks::host_rules(qp.serving, HOST, &app).await;
    checks::absolute_form(qp.serving, HOST, &app).await;
    // HTTP/1.0 may leave Host out.
    let resp = thaw_benches::raw_app::exchange(qp.serving, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(thaw_benches::raw_app::status_of(&resp), Some(200), "{resp}");
}

#[tokio::test]
async fn h2_requests_follow_the_same_host_rules() {
    // HTTP/2 in goes out as h2c, which the raw app does not speak: use the test app.
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let client = h2c_client();
    let req = Request::get(format!("http://{}/", qp.serving))
        .header("host", "a.example")
        .header("host", "b.example")
        .body(Full::<Bytes>::default())
        .unwrap();
    let (status, _, body) = send(&client, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
    // One Host is the host the app is sent, as :authority.
    let req = Request::get(format!("http://{}/headers", qp.serving))
        .header("host", "a.example")
        .body(Full::<Bytes>::default())
        .unwrap();
    let (status, _, body) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(seen.to_string().contains("a.example"), "{seen}");
}

#[tokio::test]
async fn header_limits_are_by_size_both_ways() {
    let (app, qp) = start().await;
    checks::header_limits(qp.serving, HOST, &app).await;
}

#[tokio::test]
async fn framing_trailers_and_early_hints_pass_through() {
    let (_app, qp) = start().await;
    checks::stale_content_length(qp.serving, HOST).await;
    checks::trailers(qp.serving, HOST).await;
    checks::early_hints(qp.serving, HOST).await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_fault() {
    let (_app, qp) = start().await;
    checks::malformed_chunked_body(qp.serving, HOST).await;
    assert_eq!(
        qp.user_metric("revision_upstream_errors_total", "").await,
        0.0
    );
    assert_eq!(
        qp.user_metric("revision_request_count", "response_code_class=\"4xx\"")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_answers_lines_pass_on_as_they_came_on_the_plain_path() {
    let (_app, qp) = start().await;
    checks::answer_lines(qp.serving, HOST).await;
}
