//! The activator end to end: activator → queue-proxy → test app, all real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use thaw_benches::harness::*;

fn config(cc: usize, timeout_secs: u64, endpoints: &[u16]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    format!(
        "revisions:\n  - name: hello\n    namespace: default\n    hosts: [hello.local]\n    containerConcurrency: {cc}\n    timeoutSeconds: {timeout_secs}\n    endpoints: [{}]\n",
        eps.join(", ")
    )
}

const HOST: (&str, &str) = ("Host", "hello.local");

#[tokio::test]
async fn probes_are_answered_by_the_activator() {
    let act = Activator::start(&config(1, 10, &[free_port()]), &[]).await;
    let url = act.url("/");
    let (s, _, b) = get_with(&url, &[("K-Network-Probe", "activator")]).await;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"activator"[..]));
    let (s, _, b) = get_with(&url, &[("K-Network-Probe", "queue")]).await;
    assert_eq!(
        (s, &b[..]),
        (
            StatusCode::BAD_REQUEST,
            &b"unexpected probe header value: \"queue\""[..]
        )
    );
    let (s, h, b) = get_with(
        &url,
        &[("K-Network-Probe", "probe"), ("K-Network-Hash", "h1")],
    )
    .await;
    assert_eq!((s, b.len()), (StatusCode::OK, 0));
    assert_eq!(h["k-network-hash"], "h1");
    let (s, _, _) = get_with(&url, &[("User-Agent", "kube-probe/1.30")]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = get_with(&url, &[("K-Kubelet-Probe", "1")]).await;
    assert_eq!(s, StatusCode::OK);
    // Unknown revisions, by every identification route.
    for headers in [
        vec![("Host", "nobody.local")],
        vec![
            ("Knative-Serving-Revision", "nope"),
            ("Knative-Serving-Namespace", "default"),
        ],
        vec![("Host", "nope.default.svc.cluster.local")],
    ] {
        let (s, _, _) = get_with(&url, &headers).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{headers:?}");
    }
}

#[tokio::test]
async fn cold_request_waits_for_the_pod_and_is_marked() {
    let port = free_port();
    let act = Activator::start(&config(2, 60, &[port]), &[]).await;
    let url = act.url("/headers");
    let waiting =
        tokio::spawn(
            async move { get_with(&url, &[HOST, ("Knative-Serving-Revision", "")]).await },
        );
    eventually("request parked", || async {
        act.metric("activator_requests_waiting", "").await == 1.0
    })
    .await;
    let pod_started = Instant::now();
    let _pod = Pod::start(port, 2, &[]).await;
    let (s, h, b) = waiting.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let cold_ms: u64 = h["thaw-cold-start"].to_str().unwrap().parse().unwrap();
    assert!(cold_ms > 0);
    assert!(pod_started.elapsed() < Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let headers = &v["headers"];
    assert_eq!(
        headers["host"][0], "hello.local",
        "the queue-proxy restores the original host"
    );
    assert_eq!(headers["k-proxy-request"][0], "activator");
    assert!(headers.get("knative-serving-revision").is_none());
    assert!(headers.get("k-original-host").is_none());
    assert_eq!(
        act.metric(
            "activator_cold_start_wait_seconds_count",
            "revision_name=\"hello\""
        )
        .await,
        1.0
    );
    assert_eq!(act.metric("activator_ready_pods", "").await, 1.0);

    // Warm now: no cold-start header, all three identification routes work.
    for headers in [
        vec![HOST],
        vec![
            ("Knative-Serving-Revision", "hello"),
            ("Knative-Serving-Namespace", "default"),
        ],
        vec![("Host", "hello.default.svc.cluster.local:8012")],
    ] {
        let (s, h, b) = get_with(&act.url("/"), &headers).await;
        assert_eq!(
            (s, &b[..]),
            (StatusCode::OK, &b"hello world\n"[..]),
            "{headers:?}"
        );
        assert!(!h.contains_key("thaw-cold-start"));
    }
}

#[tokio::test]
async fn h2c_websockets_and_streams_pass_through() {
    let port = free_port();
    let _pod = Pod::start(port, 0, &[]).await;
    let act = Activator::start(&config(0, 60, &[port]), &[]).await;

    // h2c from the client to the app.
    let req = Request::get(format!("http://{}/headers", act.h2c))
        .version(Version::HTTP_2)
        .header("host", "hello.local")
        .body(Full::<Bytes>::default())
        .unwrap();
    let (s, _, b) = send(&h2c_client(), req).await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["version"], "HTTP/2.0");

    // A request body streams through.
    let payload = Bytes::from(vec![b'q'; 300_000]);
    let req = Request::post(act.url("/echo"))
        .header("host", "hello.local")
        .body(Full::new(payload.clone()))
        .unwrap();
    let (s, _, b) = send(&http1_client(), req).await;
    assert_eq!((s, b), (StatusCode::OK, payload));

    // Websocket through activator and queue-proxy.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", act.http),
    )
    .unwrap();
    req.headers_mut()
        .insert("host", "hello.local".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        "ping through two proxies",
    ))
    .await
    .unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(
        echoed.into_text().unwrap().as_str(),
        "ping through two proxies"
    );
    ws.close(None).await.unwrap();

    // Server-sent events.
    let (s, _, b) = get_with(&act.url("/sse?events=3&interval_ms=50"), &[HOST]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        &b[..],
        b"data: event 0\n\ndata: event 1\n\ndata: event 2\n\n"
    );
}

#[tokio::test]
async fn waiting_requests_time_out_with_504() {
    let act = Activator::start(&config(1, 1, &[free_port()]), &[]).await;
    let started = Instant::now();
    let (s, _, b) = get_with(&act.url("/"), &[HOST]).await;
    assert_eq!(
        (s, &b[..]),
        (
            StatusCode::GATEWAY_TIMEOUT,
            &b"activator request timeout"[..]
        )
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(act.metric("activator_requests_waiting", "").await, 0.0);
}

#[tokio::test]
async fn queue_and_byte_bounds_answer_503_with_retry_after() {
    let act = Activator::start(
        &config(1, 30, &[free_port()]),
        &["--max-waiting", "2", "--buffer-budget", "1000"],
    )
    .await;
    let url = act.url("/");
    let parked: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get_with(&url, &[HOST]).await })
        })
        .collect();
    eventually("two parked", || async {
        act.metric("activator_requests_waiting", "").await == 2.0
    })
    .await;
    let started = Instant::now();
    let (s, h, b) = get_with(&url, &[HOST]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h["retry-after"], "1");
    assert!(String::from_utf8_lossy(&b).contains("queue full"), "{b:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "rejection must be immediate"
    );
    for p in parked {
        p.abort();
    }
    eventually("clients that left are gone", || async {
        act.metric("activator_requests_waiting", "").await == 0.0
    })
    .await;

    // One body larger than the budget cannot wait.
    let req = Request::post(act.url("/echo"))
        .header("host", "hello.local")
        .body(Full::new(Bytes::from(vec![b'x'; 5000])))
        .unwrap();
    let (s, h, b) = send(&http1_client(), req).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h["retry-after"], "1");
    assert!(String::from_utf8_lossy(&b).contains("budget"), "{b:?}");
    assert_eq!(
        act.metric("activator_throttler_rejected_total", "").await,
        2.0
    );
}

#[tokio::test]
async fn unreachable_pod_gives_502_and_requests_that_reached_a_pod_are_not_retried() {
    let port = free_port();
    let mut pod = Pod::start(port, 1, &[]).await;
    let act = Activator::start(&config(1, 30, &[port]), &[]).await;
    assert_eq!(get_with(&act.url("/"), &[HOST]).await.0, StatusCode::OK);

    // The app breaks mid-response: the client sees the break; the request is not sent again.
    let before = pod.app.stats().await["requests"].as_u64().unwrap();
    let resp = http1_client()
        .request(
            Request::get(act.url("/reset"))
                .header("host", "hello.local")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    if let Ok(resp) = resp {
        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(body.is_err(), "a broken upstream must not look complete");
    }
    let after = pod.app.stats().await["requests"].as_u64().unwrap();
    assert_eq!(
        after - before,
        1,
        "the request reached the app exactly once"
    );

    // The pod goes away entirely: 502 naming the pod, at once.
    drop(pod.queue_proxy);
    pod.app.kill().await;
    let started = Instant::now();
    let (s, _, b) = get_with(&act.url("/"), &[HOST]).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{b:?}");
    assert!(
        String::from_utf8_lossy(&b).contains(&port.to_string()),
        "{b:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    eventually("dead pod dropped", || async {
        act.metric("activator_ready_pods", "").await == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_request_that_could_not_connect_is_tried_on_another_pod() {
    let ports = [free_port(), free_port()];
    let mut first = Pod::start(ports[0], 10, &[]).await;
    let second = Pod::start(ports[1], 10, &[]).await;
    let act = Activator::start(&config(10, 30, &ports), &[]).await;
    eventually("both pods ready", || async {
        act.metric("activator_ready_pods", "").await == 2.0
    })
    .await;
    // The first pod dies without the activator being told.
    drop(first.queue_proxy);
    first.app.kill().await;
    for _ in 0..20 {
        let (s, _, b) = get_with(&act.url("/"), &[HOST]).await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"hello world\n"[..]));
    }
    assert_eq!(second.app.stats().await["requests"], 20);
    assert_eq!(act.metric("activator_ready_pods", "").await, 1.0);
}

/// A pod that answers the activator's probes, and that, once `die` is set, resets every
/// connection a request arrives on without answering it: what a pooled connection to a
/// pod that has just gone looks like, before the activator could see it close. Counts
/// the requests it reset.
async fn resetting_pod(
    die: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let reset = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&reset);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (die, counted) = (die.clone(), counted.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end + 4);
                    let answer: &[u8] = if head.contains("k-network-probe: queue") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nqueue"
                    } else if die.load(Ordering::SeqCst) {
                        counted.fetch_add(1, Ordering::SeqCst);
                        conn.set_zero_linger().unwrap();
                        return;
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nhello world\n"
                    };
                    if conn.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, reset)
}

#[tokio::test]
async fn a_get_whose_connection_is_reset_before_any_answer_is_replayed_on_another_pod() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let die = std::sync::Arc::new(AtomicBool::new(false));
    let (dying, reset) = resetting_pod(std::sync::Arc::clone(&die)).await;
    let healthy = free_port();
    let second = Pod::start(healthy, 10, &[]).await;
    let act = Activator::start(&config(10, 30, &[dying, healthy]), &[]).await;
    eventually("both pods ready", || async {
        act.metric("activator_ready_pods", "").await == 2.0
    })
    .await;
    // Pooled connections to both pods, kept alive.
    for _ in 0..10 {
        let (s, _, _) = get_with(&act.url("/"), &[HOST]).await;
        assert_eq!(s, StatusCode::OK);
    }
    die.store(true, Ordering::SeqCst);
    let second_before = second.app.stats().await["requests"].as_u64().unwrap();
    for _ in 0..20 {
        let (s, _, b) = get_with(&act.url("/"), &[HOST]).await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"hello world\n"[..]));
    }
    let second_after = second.app.stats().await["requests"].as_u64().unwrap();
    assert_eq!(
        second_after - second_before,
        20,
        "every GET served by the healthy pod"
    );
    assert!(
        reset.load(Ordering::SeqCst) >= 1,
        "no GET met the reset: the test did not exercise the replay"
    );
}
