//! Draining end to end (CONTRACT §1.8): probes fail but traffic flows after SIGTERM, the
//! quiet period restarts with every request, in-flight requests and websockets survive the
//! drain, `/wait-for-drain` blocks until it is over, and a second signal exits at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const HEALTH_CHECK: [(&str, &str); 2] = [
    ("User-Agent", "kube-probe/1.30"),
    ("K-Network-Probe", "queue"),
];
const INGRESS_PROBE: [(&str, &str); 2] =
    [("K-Network-Probe", "probe"), ("K-Network-Hash", "abc123")];

/// A GET on a fresh connection that reports failure instead of panicking.
async fn try_get(url: &str, headers: &[(&str, &str)]) -> Result<(StatusCode, Bytes), String> {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = http1_client()
        .request(req.body(Full::default()).unwrap())
        .await
        .map_err(|e| format!("request failed: {e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body failed: {e:?}"))?
        .to_bytes();
    Ok((parts.status, body))
}

/// One request on its own, unpooled HTTP/1 connection.
async fn get_on_own_connection(addr: SocketAddr, path: &str) -> (StatusCode, Bytes) {
    let mut sender = http1_conn(addr).await;
    let req = Request::get(path)
        .header("Host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    (parts.status, body)
}

/// Whether the process runs (not exited, not a zombie waiting to be reaped).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
            !matches!(state, Some('Z' | 'X') | None)
        }
        Err(_) => false,
    }
}

/// Waits until the queue-proxy reports itself as shutting down: it has seen the signal.
async fn wait_draining(qp: &QueueProxy) {
    let url = qp.url("/");
    eventually("health checks fail after SIGTERM", || {
        let url = url.clone();
        async move {
            matches!(try_get(&url, &HEALTH_CHECK).await, Ok((s, _)) if s == StatusCode::SERVICE_UNAVAILABLE)
        }
    })
    .await;
}

/// Whether a TCP connection to `addr` is refused. A successful connect is closed at once
/// without sending anything, so it does not count as a request (no quiet-period reset).
async fn refused(addr: SocketAddr) -> bool {
    match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            drop(stream);
            false
        }
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

/// Polls the app's in-flight count until it reaches `n`.
async fn wait_app_in_flight(app: &App, n: u64) {
    eventually(&format!("{n} request(s) in flight in the app"), || async {
        app.stats().await["in_flight"] == n
    })
    .await;
}

#[tokio::test]
async fn sigterm_fails_probes_but_keeps_serving_traffic() {
    let app = App::start(&[]).await;
    // Default 30 s quiet period: everything below happens well inside it.
    let mut qp = QueueProxy::start(app.port(), &[]).await;
    let url = qp.url("/");

    // Before the signal, both probes pass.
    let (s, b) = try_get(&url, &HEALTH_CHECK).await.unwrap();
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"queue"[..]));
    let (s, _) = try_get(&url, &INGRESS_PROBE).await.unwrap();
    assert_eq!(s, StatusCode::OK);

    qp.sigterm();
    wait_draining(&qp).await;

    for round in 0..3 {
        for ua in ["kube-probe/1.30", "Knative-Activator-Probe"] {
            let (s, b) = try_get(&url, &[("User-Agent", ua), ("K-Network-Probe", "queue")])
                .await
                .unwrap();
            assert_eq!(
                (s, &b[..]),
                (StatusCode::SERVICE_UNAVAILABLE, &b"shutting down"[..]),
                "health check from {ua}, round {round}"
            );
        }
        let (s, b) = try_get(&url, &INGRESS_PROBE).await.unwrap();
        assert_eq!(
            s,
            StatusCode::SERVICE_UNAVAILABLE,
            "ingress probe, round {round}"
        );
        assert_eq!(&b[..], b"shutting down", "ingress probe, round {round}");

        // Real traffic is still served, on new connections too.
        let (s, b) = try_get(&url, &[]).await.unwrap();
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"hello world\n"[..]));
        let (s, b) = try_get(&qp.url("/delay?ms=50"), &[]).await.unwrap();
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]));
    }
    assert!(
        running(qp.pid()),
        "queue-proxy exited during the quiet period"
    );
    // Traffic was proxied; the probes never reached the app.
    assert_eq!(app.stats().await["requests"], 6);

    // Not done yet: a second signal ends it (and is covered on its own below).
    qp.sigterm();
    qp.wait_exit(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn every_request_restarts_the_quiet_period() {
    let app = App::start(&[]).await;
    let mut qp = QueueProxy::start(app.port(), &[("THAW_DRAIN_QUIET_PERIOD", "1s")]).await;
    let url = qp.url("/");

    qp.sigterm();
    wait_draining(&qp).await;
    let drain_seen = Instant::now();

    // Keep the pod busy for 2.5 s: far more than the 1 s quiet period.
    let mut sent = 0;
    let mut last_sent = Instant::now();
    while drain_seen.elapsed() < Duration::from_millis(2500) {
        last_sent = Instant::now();
        let result = try_get(&url, &[]).await;
        assert!(
            matches!(&result, Ok((s, b)) if *s == StatusCode::OK && &b[..] == b"hello world\n"),
            "request {sent} at {:?} after the drain started was not served: {result:?}",
            drain_seen.elapsed()
        );
        assert!(running(qp.pid()), "queue-proxy exited while busy");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(sent >= 5, "only {sent} requests sent");

    // Once traffic stops, the quiet period runs out and the process exits cleanly.
    let status = qp.wait_exit(Duration::from_secs(10)).await;
    let quiet = last_sent.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        quiet >= Duration::from_millis(800),
        "exited {quiet:?} after the last request, before the 1 s quiet period"
    );
    assert!(
        quiet <= Duration::from_secs(6),
        "exited {quiet:?} after the last request"
    );
}

async fn in_flight_requests_survive_sigterm(cc: &str, delay_ms: u64) {
    const N: usize = 200;
    let app = App::start(&[]).await;
    let mut qp = QueueProxy::start(
        app.port(),
        &[
            ("CONTAINER_CONCURRENCY", cc),
            ("THAW_DRAIN_QUIET_PERIOD", "1s"),
        ],
    )
    .await;
    let cc: usize = cc.parse().unwrap();

    let path = format!("/delay?ms={delay_ms}");
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let path = path.clone();
            let addr = qp.serving;
            tokio::spawn(async move { get_on_own_connection(addr, &path).await })
        })
        .collect();

    // All of them have arrived at the queue-proxy, and as many as the breaker admits have
    // reached the app; the rest wait in the breaker.
    let in_app = if cc > 0 { cc } else { N };
    eventually(
        "all requests in flight in the queue-proxy and the app",
        || async {
            qp.user_metric("revision_requests_in_flight", "").await == N as f64
                && qp.user_metric("revision_queue_depth", "").await == (N - in_app) as f64
                && app.stats().await["in_flight"] == in_app as u64
        },
    )
    .await;

    qp.sigterm();
    // The 1 s quiet period ends while most requests still run or wait for a slot.
    let mut failures = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(30), t).await {
            Ok(Ok((s, b))) if s == StatusCode::OK && &b[..] == b"ok" => {}
            other => failures.push(format!("request {i}: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {N} in-flight requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let status = qp.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
    let stats = app.stats().await;
    assert_eq!(stats["requests"], N as u64);
    assert_eq!(stats["violations"], 0);
}

#[tokio::test]
async fn in_flight_requests_all_complete_after_sigterm_unlimited() {
    in_flight_requests_survive_sigterm("0", 3000).await;
}

#[tokio::test]
async fn in_flight_and_queued_requests_all_complete_after_sigterm_with_breaker() {
    // 50 in the app, 150 queued in the breaker (room for 11 × 50 = 550).
    in_flight_requests_survive_sigterm("50", 2000).await;
}

#[tokio::test]
async fn wait_for_drain_returns_soon_without_sigterm() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let started = Instant::now();
    let (s, _) = try_get(&format!("http://{}/wait-for-drain", qp.admin), &[])
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(s, StatusCode::OK);
    assert!(
        took >= Duration::from_millis(800) && took <= Duration::from_secs(5),
        "wait-for-drain took {took:?}"
    );
    // Nothing drains: the queue-proxy still reports ready and serves.
    let (s, b) = try_get(&qp.url("/"), &HEALTH_CHECK).await.unwrap();
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"queue"[..]));
    let (s, _) = try_get(&qp.url("/"), &[]).await.unwrap();
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn wait_for_drain_blocks_until_the_drain_is_over() {
    let app = App::start(&[]).await;
    let mut qp = QueueProxy::start(app.port(), &[("THAW_DRAIN_QUIET_PERIOD", "1s")]).await;

    let serving = qp.serving;
    let delay_sent = Instant::now();
    let in_flight =
        tokio::spawn(async move { get_on_own_connection(serving, "/delay?ms=2000").await });
    wait_app_in_flight(&app, 1).await;

    let admin = qp.admin;
    let waiter = tokio::spawn(async move {
        let r = try_get(&format!("http://{admin}/wait-for-drain"), &[]).await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sigterm_sent = Instant::now();
    qp.sigterm();

    // Past the 1 s grace for a SIGTERM to come: the caller is still held.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!waiter.is_finished(), "wait-for-drain returned early");

    let (result, returned) = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("wait-for-drain never returned")
        .unwrap();
    let (s, _) = result.unwrap();
    assert_eq!(s, StatusCode::OK);
    // Not before the quiet period...
    let after_sigterm = returned - sigterm_sent;
    assert!(
        after_sigterm >= Duration::from_secs(1),
        "wait-for-drain returned {after_sigterm:?} after SIGTERM, inside the 1 s quiet period"
    );
    // ...and not before the in-flight request was finished: the app answers it 2 s after
    // it arrived, which was after `delay_sent`.
    let after_delay = returned - delay_sent;
    assert!(
        after_delay >= Duration::from_millis(2000),
        "wait-for-drain returned {after_delay:?} after the 2 s request was sent"
    );
    assert_eq!(app.stats().await["in_flight"], 0);
    let (s, b) = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("in-flight request never completed")
        .unwrap();
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]));

    let status = qp.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
}

async fn second_signal_exits_at_once(second: &str) {
    let app = App::start(&[]).await;
    let mut qp = QueueProxy::start(app.port(), &[("THAW_DRAIN_QUIET_PERIOD", "30s")]).await;
    qp.sigterm();
    wait_draining(&qp).await;
    let sent = Instant::now();
    qp.signal(second);
    let status = qp.wait_exit(Duration::from_secs(3)).await;
    assert_eq!(
        status.code(),
        Some(1),
        "exit status after a second SIG{second}: {status:?}"
    );
    assert!(sent.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn second_sigterm_exits_at_once_with_status_1() {
    second_signal_exits_at_once("TERM").await;
}

#[tokio::test]
async fn sigint_after_sigterm_exits_at_once_with_status_1() {
    second_signal_exits_at_once("INT").await;
}

#[tokio::test]
async fn websocket_keeps_working_through_the_drain_until_closed() {
    let app = App::start(&[]).await;
    let mut qp = QueueProxy::start(app.port(), &[("THAW_DRAIN_QUIET_PERIOD", "1s")]).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", qp.serving))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "before"
    );

    let sigterm_sent = Instant::now();
    qp.sigterm();
    wait_draining(&qp).await;
    // The quiet period passes and the servers stop accepting.
    tokio::time::sleep(Duration::from_millis(2000).saturating_sub(sigterm_sent.elapsed())).await;
    eventually("the serving port refuses connections", || {
        refused(qp.serving)
    })
    .await;

    for i in 0..5 {
        let msg = format!("during drain {i}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no echo during the drain")
            .expect("websocket ended during the drain")
            .expect("websocket failed during the drain");
        assert_eq!(echoed.into_text().unwrap().as_str(), msg);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        running(qp.pid()),
        "queue-proxy exited with a websocket open"
    );
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[1, 2, 3]
    );
    assert!(
        running(qp.pid()),
        "queue-proxy exited with a websocket open"
    );

    // The client closes: the process finishes its drain.
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let status = qp.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn after_the_quiet_period_new_connections_are_refused_but_in_flight_completes() {
    let app = App::start(&[]).await;
    let mut qp = QueueProxy::start(app.port(), &[("THAW_DRAIN_QUIET_PERIOD", "1s")]).await;

    let serving = qp.serving;
    let in_flight =
        tokio::spawn(async move { get_on_own_connection(serving, "/delay?ms=4000").await });
    wait_app_in_flight(&app, 1).await;

    let sigterm_sent = Instant::now();
    qp.sigterm();
    eventually("the serving port refuses connections", || refused(serving)).await;
    let refused_after = sigterm_sent.elapsed();
    assert!(
        refused_after >= Duration::from_millis(900),
        "connections refused {refused_after:?} after SIGTERM, inside the 1 s quiet period"
    );
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before the servers stopped"
    );

    // A request on a new connection fails; it does not reach the app.
    let result = try_get(&qp.url("/"), &[]).await;
    assert!(result.is_err(), "a new request was served: {result:?}");
    assert_eq!(app.stats().await["requests"], 1);

    let (s, b) = tokio::time::timeout(Duration::from_secs(15), in_flight)
        .await
        .expect("in-flight request never completed")
        .unwrap();
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]));
    let status = qp.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn probes_do_not_restart_the_quiet_period() {
    let app = App::start(&[]).await;
    let mut qp = QueueProxy::start(app.port(), &[("THAW_DRAIN_QUIET_PERIOD", "1s")]).await;
    let url = qp.url("/");
    qp.sigterm();
    wait_draining(&qp).await;
    // The kubelet and the ingress keep probing a terminating pod; that is not traffic.
    let prober = tokio::spawn(async move {
        loop {
            let _ = try_get(&url, &HEALTH_CHECK).await;
            let _ = try_get(&url, &INGRESS_PROBE).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let status = qp.wait_exit(Duration::from_secs(8)).await;
    prober.abort();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(app.stats().await["requests"], 0);
}

#[tokio::test]
async fn h2c_streams_in_flight_complete_after_sigterm() {
    const N: u64 = 20;
    let app = App::start(&[]).await;
    let mut qp = QueueProxy::start(app.port(), &[("THAW_DRAIN_QUIET_PERIOD", "1s")]).await;
    // One HTTP/2 connection carrying every stream: the drain's GOAWAY must let them finish.
    let client = h2c_client();
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let client = client.clone();
            let url = qp.url("/delay?ms=2500");
            tokio::spawn(async move {
                send(&client, Request::get(url).body(Full::default()).unwrap()).await
            })
        })
        .collect();
    wait_app_in_flight(&app, N).await;
    qp.sigterm();
    for t in tasks {
        let (s, _, b) = tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("h2c stream never completed")
            .unwrap();
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]));
    }
    let status = qp.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
}
