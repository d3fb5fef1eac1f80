//! Bad input on the serving port: every case gets a precise answer (or a closed
//! connection), nothing panics, and no breaker slot leaks. CONTAINER_CONCURRENCY is 1
//! throughout, so a leaked slot shows as a hang.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;

/// A queue-proxy whose stdout *and* stderr are captured: a panic message goes to stderr,
/// which `common::QueueProxy` leaves inherited.
struct Qp {
    serving: SocketAddr,
    user_metrics: SocketAddr,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Qp {
    async fn start(user_port: u16, overrides: &[(&str, &str)]) -> Qp {
        let mut env: HashMap<String, String> = knative_env(user_port);
        env.insert("CONTAINER_CONCURRENCY".into(), "1".into());
        for (k, v) in overrides {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        let mut child = child(env!("CARGO_BIN_EXE_queue-proxy"))
            .env_clear()
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start queue-proxy");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&output);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line.clone());
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&output);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("queue-proxy stderr: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut found = HashMap::new();
        while !(found.contains_key("serving") && found.contains_key("user-metrics")) {
            let line = tokio::time::timeout(EVENTUALLY, rx.recv())
                .await
                .expect("queue-proxy did not report its listeners in time")
                .expect("queue-proxy exited before listening");
            let v: serde_json::Value = serde_json::from_str(&line).expect("log lines are JSON");
            if v["message"] == "listening" {
                let addr: SocketAddr = v["address"].as_str().unwrap().parse().unwrap();
                found.insert(v["listener"].as_str().unwrap().to_owned(), addr);
            }
        }
        Qp {
            serving: found["serving"],
            user_metrics: found["user-metrics"],
            child,
            output,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.serving, path)
    }

    async fn user_metric(&self, name: &str) -> f64 {
        let (_, _, body) = get(&format!("http://{}/metrics", self.user_metrics)).await;
        metric_value(std::str::from_utf8(&body).unwrap(), name, "")
    }

    /// After any bad input: nothing panicked, the process runs, no request is left in
    /// the handler, and the single breaker slot is free (a request goes through at once).
    async fn assert_healthy(&mut self, app: &App) {
        eventually("no request left in flight", || async {
            self.user_metric("revision_requests_in_flight").await == 0.0
        })
        .await;
        let (s, _, body) = tokio::time::timeout(Duration::from_secs(10), get(&self.url("/")))
            .await
            .expect("the next request hung: a breaker slot leaked");
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"hello world\n"[..]));
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the queue-proxy exited"
        );
        let output = self.output.lock().unwrap().clone();
        let panics: Vec<_> = output.iter().filter(|l| l.contains("panicked")).collect();
        assert!(panics.is_empty(), "{panics:#?}");
        assert_eq!(app.stats().await["in_flight"], 0);
    }
}

/// Reads the response's status line, or `None` if the connection closed (or failed)
/// without one.
async fn read_status(stream: &mut (impl AsyncRead + Unpin)) -> Option<u16> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(_) => return None,
            Err(_) => panic!("no response within 10 s; got {head:?}"),
        }
    }
    let line = String::from_utf8(head).unwrap();
    assert!(line.starts_with("HTTP/1.1 "), "{line:?}");
    Some(line[9..12].parse().unwrap())
}

async fn oversized_head_gets_431(qp: &Qp) {
    let mut stream = raw(qp.serving).await;
    let mut request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    request.resize(request.len() + 80 * 1024, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    let (mut reader, mut writer) = stream.split();
    let (status, _) = tokio::join!(read_status(&mut reader), async {
        let _ = writer.write_all(&request).await;
    });
    drop(stream);
    assert_eq!(status, Some(431));
}

/// The limit is not stricter than it says: a 60 KiB head goes through.
async fn large_head_under_the_limit_is_served(qp: &Qp) {
    let big = "a".repeat(60 * 1024);
    let (s, _, body) = get_with(&qp.url("/"), &[("X-Big", &big)]).await;
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"hello world\n"[..]));
}

async fn malformed_requests_get_400(qp: &Qp) {
    let cases: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n",
    ];
    for case in cases {
        let mut stream = raw(qp.serving).await;
        stream.write_all(case).await.unwrap();
        assert_eq!(
            read_status(&mut stream).await,
            Some(400),
            "{:?}",
            String::from_utf8_lossy(case)
        );
    }
}

async fn half_a_head_is_cut_off(qp: &Qp) {
    let mut stream = raw(qp.serving).await;
    let started = Instant::now();
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the server kept a half-sent request open for 10 s");
    let elapsed = started.elapsed();
    // Either a plain close or a 408 before it.
    if read.is_ok() && !rest.is_empty() {
        assert!(
            rest.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert!(
        elapsed >= Duration::from_millis(800),
        "closed after {elapsed:?}, before the 1 s header timeout"
    );
    assert!(
        elapsed <= Duration::from_secs(5),
        "closed only after {elapsed:?}"
    );
}

async fn partial_body_then_disconnect(qp: &Qp, app: &App) {
    let mut stream = raw(qp.serving).await;
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&[b'b'; 10_000]).await.unwrap();
    // The app streams the body back as it arrives, so the response has started.
    assert_eq!(read_status(&mut stream).await, Some(200));
    assert_eq!(app.stats().await["in_flight"], 1);
    drop(stream);
    within(
        Duration::from_secs(10),
        "the app's /echo was cancelled",
        || async { app.stats().await["in_flight"] == 0 },
    )
    .await;
}

async fn disconnect_mid_stream(qp: &Qp, app: &App) {
    let mut stream = raw(qp.serving).await;
    // 400 chunks 50 ms apart would run for 20 s if nobody cancelled them.
    stream
        .write_all(b"GET /stream?chunks=400&interval_ms=50 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_status(&mut stream).await, Some(200));
    let mut got = 0;
    let mut buf = [0u8; 1024];
    while got < 200 {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the stream ended early");
        got += n;
    }
    assert_eq!(app.stats().await["in_flight"], 1);
    drop(stream);
    within(
        Duration::from_secs(10),
        "the app's /stream was cancelled",
        || async { app.stats().await["in_flight"] == 0 },
    )
    .await;
}

/// Like `eventually`, with a bound of its own (shorter than what the condition would take
/// to come true by itself).
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(overrides: &[(&str, &str)]) -> (App, Qp) {
    let app = App::start(&["--max-concurrency", "1"]).await;
    let qp = Qp::start(app.port(), overrides).await;
    (app, qp)
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let (app, mut qp) = start(&[]).await;
    oversized_head_gets_431(&qp).await;
    large_head_under_the_limit_is_served(&qp).await;
    qp.assert_healthy(&app).await;
}

#[tokio::test]
async fn malformed_request_is_400() {
    let (app, mut qp) = start(&[]).await;
    malformed_requests_get_400(&qp).await;
    qp.assert_healthy(&app).await;
}

#[tokio::test]
async fn slow_client_is_cut_off_after_the_header_timeout() {
    let (app, mut qp) = start(&[("THAW_READ_HEADER_TIMEOUT", "1s")]).await;
    half_a_head_is_cut_off(&qp).await;
    qp.assert_healthy(&app).await;
}

#[tokio::test]
async fn client_leaving_mid_request_body_leaks_nothing() {
    let (app, mut qp) = start(&[]).await;
    partial_body_then_disconnect(&qp, &app).await;
    qp.assert_healthy(&app).await;
}

#[tokio::test]
async fn client_leaving_mid_response_cancels_the_app_request() {
    let (app, mut qp) = start(&[]).await;
    disconnect_mid_stream(&qp, &app).await;
    qp.assert_healthy(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_bad_inputs_on_one_process_never_panic() {
    let (app, mut qp) = start(&[("THAW_READ_HEADER_TIMEOUT", "1s")]).await;
    for _ in 0..2 {
        oversized_head_gets_431(&qp).await;
        malformed_requests_get_400(&qp).await;
        partial_body_then_disconnect(&qp, &app).await;
        disconnect_mid_stream(&qp, &app).await;
        qp.assert_healthy(&app).await;
    }
    // Several at once, too.
    tokio::join!(
        half_a_head_is_cut_off(&qp),
        oversized_head_gets_431(&qp),
        malformed_requests_get_400(&qp),
    );
    qp.assert_healthy(&app).await;
    let (s, _, _) = get(&qp.url("/delay?ms=10")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(qp.child.try_wait().unwrap().is_none());
}
