//! The request path end to end: probes, header rules, protocols, streaming, timeouts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};

#[tokio::test]
async fn health_checks_answer_with_the_exact_bodies_and_codes() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let url = qp.url("/");

    let (s, _, b) = get_with(
        &url,
        &[
            ("User-Agent", "kube-probe/1.30"),
            ("K-Network-Probe", "queue"),
        ],
    )
    .await;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"queue"[..]));
    let (s, h, b) = get_with(
        &url,
        &[
            ("User-Agent", "Knative-Activator-Probe"),
            ("K-Network-Probe", "queue"),
        ],
    )
    .await;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"queue"[..]));
    // [beyond] The answer names the revision, so the activator can tell whose pod it is.
    assert_eq!(h["thaw-revision"], "default/hello-00001");
    let (s, _, b) = get_with(
        &url,
        &[
            ("User-Agent", "Knative-Autoscaling-Probe"),
            ("K-Network-Probe", "bogus"),
        ],
    )
    .await;
    assert_eq!(
        (s, &b[..]),
        (
            StatusCode::BAD_REQUEST,
            &b"unexpected probe header value: bogus"[..]
        )
    );

    // Ingress probe: the hash is echoed, an empty 200.
    let (s, h, b) = get_with(
        &url,
        &[("K-Network-Probe", "probe"), ("K-Network-Hash", "abc123")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["k-network-hash"], "abc123");
    assert!(b.is_empty());
    let (s, _, _) = get_with(&url, &[("K-Network-Probe", "probe")]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // None of these reached the app or the stats.
    assert_eq!(app.stats().await["requests"], 0);
}

#[tokio::test]
async fn readiness_follows_the_app_probe() {
    // The app answers 503 on /healthz once readiness is switched off.
    let app = App::start(&[]).await;
    let probe = format!(
        r#"{{"httpGet":{{"path":"/healthz","port":{}}},"periodSeconds":1,"timeoutSeconds":1}}"#,
        app.port()
    );
    let qp = QueueProxy::start(app.port(), &[("SERVING_READINESS_PROBE", &probe)]).await;
    let probe_headers = [
        ("User-Agent", "kube-probe/1.30"),
        ("K-Network-Probe", "queue"),
    ];
    let (s, _, _) = get_with(&qp.url("/"), &probe_headers).await;
    assert_eq!(s, StatusCode::OK);
    get(&app.url("/ready?state=off")).await;
    let (s, _, b) = get_with(&qp.url("/"), &probe_headers).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(b.is_empty());
}

#[tokio::test]
async fn aggressive_probe_waits_for_a_slow_app() {
    // Nothing listens yet; the app starts 700 ms later on a port known in advance.
    let port = closed_port();
    let probe = format!(r#"{{"tcpSocket":{{"port":{port}}}}}"#);
    let qp = QueueProxy::start(port, &[("SERVING_READINESS_PROBE", &probe)]).await;
    let started = std::time::Instant::now();
    let app = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        App::start(&["--port", &port.to_string()]).await
    });
    let (s, _, b) = get_with(
        &qp.url("/"),
        &[
            ("User-Agent", "kube-probe/1.30"),
            ("K-Network-Probe", "queue"),
        ],
    )
    .await;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"queue"[..]));
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "answered before the app listened"
    );
    let app = app.await.unwrap();
    let (s, _, _) = get(&qp.url("/")).await;
    assert_eq!(s, StatusCode::OK);
    drop(app);
}

#[tokio::test]
async fn header_rules_for_the_app() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let (s, _, b) = get_with(
        &qp.url("/headers"),
        &[
            ("K-Original-Host", "original.example.com"),
            ("Knative-Serving-Revision", "hello-00001"),
            ("Knative-Serving-Namespace", "default"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("Connection", "x-hop"),
            ("X-Hop", "secret"),
            ("X-Kept", "yes"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let h = &v["headers"];
    assert_eq!(h["host"][0], "original.example.com");
    assert!(h.get("k-original-host").is_none());
    assert!(h.get("knative-serving-revision").is_none());
    assert!(h.get("knative-serving-namespace").is_none());
    assert!(
        h.get("x-hop").is_none(),
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(h["x-kept"][0], "yes");
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["forwarded"][0], "for=203.0.113.7;proto=https");
    assert_eq!(v["version"], "HTTP/1.1");
}

#[tokio::test]
async fn h2c_in_goes_out_as_h2c() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let client = h2c_client();
    let req = Request::get(qp.url("/headers"))
        .version(Version::HTTP_2)
        .body(Full::default())
        .unwrap();
    let (s, _, b) = send(&client, req).await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["version"], "HTTP/2.0");
    // The app sees the client's authority, not the sidecar's upstream address.
    assert_eq!(v["headers"]["host"][0], qp.serving.to_string());

    // A 1 MiB body streams both ways over h2c.
    let payload = Bytes::from(vec![b'z'; 1 << 20]);
    let req = Request::post(qp.url("/echo"))
        .version(Version::HTTP_2)
        .body(Full::new(payload.clone()))
        .unwrap();
    let (s, _, b) = send(&client, req).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b, payload);
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let resp = http1_client()
        .request(
            Request::get(qp.url("/sse?events=4&interval_ms=300"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let started = std::time::Instant::now();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            arrivals.push((started.elapsed(), data));
        }
    }
    let text: Vec<u8> = arrivals.iter().flat_map(|(_, d)| d.to_vec()).collect();
    assert_eq!(
        text,
        b"data: event 0\n\ndata: event 1\n\ndata: event 2\n\ndata: event 3\n\n"
    );
    // Four events 300 ms apart arrive as separate pieces spread over time, not as one
    // buffered lump at the end.
    assert!(arrivals.len() >= 4, "events were coalesced: {arrivals:?}");
    let first = arrivals.first().unwrap().0;
    let last = arrivals.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(600),
        "events were buffered: {arrivals:?}"
    );
}

#[tokio::test]
async fn websockets_pass_through_both_ways() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", qp.serving))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..5 {
        let msg = format!("message {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), msg);
    }
    ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        1u8, 2, 3,
    ]))
    .await
    .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[1, 2, 3]
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn app_refusing_connections_gives_502_with_a_clear_body() {
    let port = closed_port();
    let qp = QueueProxy::start(port, &[("CONTAINER_CONCURRENCY", "1")]).await;
    for _ in 0..3 {
        let (s, _, b) = get(&qp.url("/")).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }
    // CC=1: three failures in a row would hang if a slot leaked.
    assert_eq!(qp.user_metric("revision_requests_in_flight", "").await, 0.0);
    assert_eq!(
        qp.user_metric("revision_upstream_errors_total", "").await,
        3.0
    );
}

#[tokio::test]
async fn app_reset_mid_response_aborts_the_client_stream() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "1")]).await;
    let resp = http1_client()
        .request(
            Request::get(qp.url("/reset"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(EVENTUALLY, resp.into_body().collect())
        .await
        .expect("client hung");
    assert!(
        body.is_err(),
        "a reset upstream must not look like a complete body"
    );
    // The slot came back: the next request goes through at CC=1.
    let (s, _, _) = tokio::time::timeout(EVENTUALLY, get(&qp.url("/")))
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn timeout_before_first_byte_is_504_and_cancels_the_app_request() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(
        app.port(),
        &[
            ("REVISION_TIMEOUT_SECONDS", "1"),
            ("CONTAINER_CONCURRENCY", "2"),
        ],
    )
    .await;
    let started = std::time::Instant::now();
    let (s, _, b) = get(&qp.url("/hang")).await;
    assert_eq!(
        (s, &b[..]),
        (StatusCode::GATEWAY_TIMEOUT, &b"request timeout"[..])
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // The app saw the disconnect: nothing is left in flight there or here.
    eventually("app request cancelled", || async {
        app.stats().await["in_flight"] == 0
    })
    .await;
    assert_eq!(qp.user_metric("revision_requests_in_flight", "").await, 0.0);
}

#[tokio::test]
async fn response_start_and_idle_timeouts() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(
        app.port(),
        &[
            ("REVISION_RESPONSE_START_TIMEOUT_SECONDS", "1"),
            ("REVISION_IDLE_TIMEOUT_SECONDS", "2"),
        ],
    )
    .await;
    let (s, _, b) = get(&qp.url("/delay?ms=3000")).await;
    assert_eq!(
        (s, &b[..]),
        (StatusCode::GATEWAY_TIMEOUT, &b"request timeout"[..])
    );

    // After the first byte, the idle timeout ends the stream cleanly with the text.
    let (s, _, b) = get(&qp.url("/hang-body")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(&b[..], b"started\nrequest timeout");
    eventually("app request cancelled", || async {
        app.stats().await["in_flight"] == 0
    })
    .await;

    // A stream that keeps writing more often than the idle timeout is left alone.
    let (s, _, b) = get(&qp.url("/stream?chunks=5&interval_ms=500&size=8")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b.len(), 40);
}

#[tokio::test]
async fn revision_timeout_after_first_byte_ends_the_stream_cleanly() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[("REVISION_TIMEOUT_SECONDS", "1")]).await;
    let (s, _, b) = get(&qp.url("/stream?chunks=100&interval_ms=100&size=8")).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8_lossy(&b);
    assert!(text.ends_with("request timeout"), "{text}");
    assert!(b.len() < 800, "the stream was not cut: {} bytes", b.len());
    eventually("app request cancelled", || async {
        app.stats().await["in_flight"] == 0
    })
    .await;
}

#[tokio::test]
async fn nothing_is_logged_for_successful_requests_unless_asked() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let before = qp.logs().len();
    for _ in 0..20 {
        assert_eq!(get(&qp.url("/")).await.0, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(qp.logs().len(), before, "{:?}", &qp.logs()[before..]);

    let qp = QueueProxy::start(
        app.port(),
        &[("OBSERVABILITY_CONFIG", r#"{"enableRequestLog":true}"#)],
    )
    .await;
    let before = qp.logs().len();
    assert_eq!(get(&qp.url("/hello?x=1")).await.0, StatusCode::OK);
    eventually("request log line", || async { qp.logs().len() > before }).await;
    let line: serde_json::Value = serde_json::from_str(&qp.logs()[before]).unwrap();
    assert_eq!(line["message"], "request");
    assert_eq!(line["uri"], "/hello?x=1");
    assert_eq!(line["status_class"], "2xx");
}

/// An app that writes each response's head and body in two `write`s with Nagle on, as
/// Python's `BaseHTTPRequestHandler` does. Returns its port.
async fn split_writing_app() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
                        if s.write_all(head).await.is_err() || s.write_all(b"hello").await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Median time of warm requests on one kept-alive client connection.
async fn warm_median(qp: &QueueProxy) -> Duration {
    let client = http1_client();
    let mut times = Vec::new();
    for _ in 0..15 {
        let started = std::time::Instant::now();
        let req = Request::get(qp.url("/")).body(Full::default()).unwrap();
        let (status, _, body) = send(&client, req).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
        times.push(started.elapsed());
    }
    // The first requests open connections (quick-ACKed by the kernel anyway).
    let mut warm = times[5..].to_vec();
    warm.sort();
    warm[warm.len() / 2]
}

#[tokio::test]
async fn an_app_writing_head_and_body_apart_is_not_held_by_a_delayed_ack() {
    // [beyond]: Knative's queue-proxy leaves the kernel's delayed ACK (40 ms) on, so such
    // an app answers every warm request 40 ms late. Medians are compared, and the bound
    // is far from both, so a busy machine cannot flip the outcome.
    let port = split_writing_app().await;
    let plain = QueueProxy::start(port, &[("THAW_UPSTREAM_QUICK_ACK", "false")]).await;
    let slow = warm_median(&plain).await;
    assert!(
        slow >= Duration::from_millis(30),
        "the app no longer shows the delayed ACK ({slow:?}): the test proves nothing"
    );
    drop(plain);
    let quick = QueueProxy::start(port, &[]).await;
    let fast = warm_median(&quick).await;
    assert!(fast < Duration::from_millis(30), "{fast:?}");
}
