#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end checks of the `thaw-testapp` binary: each test starts it on an
//! ephemeral port and talks to it over real sockets.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running testapp; killed when dropped.
struct App {
    child: Child,
    addr: SocketAddr,
}

fn command(args: &[&str]) -> Command {
    let mut cmd = thaw_benches::harness::child(env!("CARGO_BIN_EXE_thaw-testapp"));
    cmd.args(args)
        .env_remove("PORT")
        .env_remove("SLOW_START_MS")
        .env_remove("MAX_CONCURRENCY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn start(extra: &[&str]) -> App {
    let mut args = vec!["--port", "0"];
    args.extend_from_slice(extra);
    let mut child = command(&args).spawn().expect("spawn thaw-testapp");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(STARTUP_TIMEOUT, lines.next_line())
        .await
        .expect("testapp did not announce itself in time")
        .expect("read stdout")
        .expect("stdout closed before the listening line");
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("listening address");
    App { child, addr }
}

impl App {
    async fn h1(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    }

    async fn h2(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    }

    async fn get(&self, path: &str) -> (StatusCode, Bytes) {
        let resp = self.h1(get(path)).await;
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn stats(&self) -> serde_json::Value {
        let (status, body) = self.get("/stats").await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).unwrap()
    }
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "testapp.local")
        .body(Full::default())
        .unwrap()
}

/// Absolute-form URI, which HTTP/2 needs for :scheme and :authority.
fn get_h2(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://testapp.local{path}"))
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn hello_and_not_found() {
    let app = start(&[]).await;
    for path in ["/", "/hello"] {
        let resp = app.h1(get(path)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/plain");
        assert_eq!(resp.headers()["content-length"], "12");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello world\n");
    }
    assert_eq!(
        app.get("/nope").await,
        (StatusCode::NOT_FOUND, Bytes::from("not found"))
    );
    assert_eq!(
        app.get("/status?code=418").await,
        (StatusCode::IM_A_TEAPOT, Bytes::from("status 418"))
    );
    assert_eq!(app.get("/delay?ms=abc").await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn echo_streams_a_large_body_back() {
    let app = start(&[]).await;
    let payload: Bytes = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let req = Request::post("/echo")
        .header("host", "testapp.local")
        .body(Full::new(payload.clone()))
        .unwrap();
    let resp = app.h1(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), payload.len());
    assert!(body == payload, "echoed body differs");
}

#[tokio::test]
async fn bytes_stream_and_sse() {
    let app = start(&[]).await;
    let resp = app.h1(get("/bytes?n=200000")).await;
    assert_eq!(resp.headers()["content-length"], "200000");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 200_000);
    assert!(body.iter().all(|&b| b == b'x'));

    let started = Instant::now();
    let resp = app.h1(get("/stream?chunks=3&interval_ms=30")).await;
    assert!(resp.headers().get("content-length").is_none());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(started.elapsed() >= Duration::from_millis(60));
    assert_eq!(body, "chunk 0........\nchunk 1........\nchunk 2........\n");

    let resp = app.h1(get("/sse?events=2")).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "data: event 0\n\ndata: event 1\n\n");
}

#[tokio::test]
async fn headers_reports_what_arrived() {
    let app = start(&[]).await;
    let req = Request::get("/headers?x=1")
        .header("host", "testapp.local")
        .header("x-test", "a")
        .header("X-Multi", "1")
        .header("x-multi", "2")
        .body(Full::default())
        .unwrap();
    let resp = app.h1(req).await;
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["method"], "GET");
    assert_eq!(doc["uri"], "/headers?x=1");
    assert_eq!(doc["version"], "HTTP/1.1");
    assert_eq!(doc["headers"]["host"], serde_json::json!(["testapp.local"]));
    assert_eq!(doc["headers"]["x-test"], serde_json::json!(["a"]));
    assert_eq!(doc["headers"]["x-multi"], serde_json::json!(["1", "2"]));
}

#[tokio::test]
async fn h2c_prior_knowledge_on_the_same_port() {
    let app = start(&[]).await;
    let resp = app.h2(get_h2("/headers")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["version"], "HTTP/2.0");
    assert_eq!(doc["headers"]["host"], serde_json::json!(["testapp.local"]));
}

#[tokio::test]
async fn websocket_echo() {
    let app = start(&[]).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    ws.send(Message::text("hi there")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi there"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );

    ws.close(None).await.unwrap();
    // The server answers the close, after which the stream ends.
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Close(_)) => {}
            Ok(other) => panic!("unexpected message after close: {other:?}"),
            Err(err) => panic!("close handshake failed: {err}"),
        }
    }

    // The upgraded connection no longer counts as in flight.
    let stats = app.stats().await;
    assert_eq!(stats["in_flight"], 0);
    assert_eq!(stats["requests"], 1);
}

#[tokio::test]
async fn concurrency_violation_is_recorded() {
    let app = start(&["--max-concurrency", "1"]).await;
    let (a, b) = tokio::join!(app.h1(get("/delay?ms=300")), app.h1(get("/delay?ms=300")));
    let mut statuses = [a.status(), b.status()];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::INTERNAL_SERVER_ERROR]
    );
    let rejected = if a.status() == StatusCode::OK { b } else { a };
    let body = rejected.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "concurrency exceeded");

    let stats = app.stats().await;
    assert_eq!(stats["violations"], 1);
    assert_eq!(stats["max_in_flight"], 2);
    assert_eq!(stats["requests"], 2);

    assert_eq!(app.get("/stats/reset").await.0, StatusCode::OK);
    // Sequential requests never overlap, so they are fine.
    for _ in 0..3 {
        assert_eq!(app.get("/delay?ms=1").await.0, StatusCode::OK);
    }
    let stats = app.stats().await;
    assert_eq!(stats["violations"], 0);
    assert_eq!(stats["max_in_flight"], 1);
    assert_eq!(stats["requests"], 3);
    assert_eq!(stats["in_flight"], 0);
}

fn grpc_check(service: &str) -> Request<Full<Bytes>> {
    // HealthCheckRequest { service = 1 }: tag 0x0a, length, bytes.
    let mut message = vec![0x0a, u8::try_from(service.len()).unwrap()];
    message.extend_from_slice(service.as_bytes());
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    Request::post("http://testapp.local/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .unwrap()
}

async fn grpc_status_of(app: &App, service: &str) -> Bytes {
    let resp = app.h2(grpc_check(service)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    collected.to_bytes()
}

#[tokio::test]
async fn grpc_health() {
    const SERVING: &[u8] = b"\0\0\0\0\x02\x08\x01";
    const NOT_SERVING: &[u8] = b"\0\0\0\0\x02\x08\x02";
    let app = start(&[]).await;
    assert_eq!(grpc_status_of(&app, "").await, SERVING);
    assert_eq!(grpc_status_of(&app, "notserving").await, NOT_SERVING);

    assert_eq!(app.get("/ready?state=off").await.0, StatusCode::OK);
    assert_eq!(
        app.get("/healthz").await,
        (StatusCode::SERVICE_UNAVAILABLE, Bytes::from("not ready"))
    );
    assert_eq!(grpc_status_of(&app, "").await, NOT_SERVING);
    assert_eq!(app.get("/ready?state=on").await.0, StatusCode::OK);
    assert_eq!(
        app.get("/healthz").await,
        (StatusCode::OK, Bytes::from("ok"))
    );
    // The activator's probe of a queue-proxy gets a queue-proxy's answer.
    let queue_probe = Request::get("/healthz")
        .header("host", "testapp.local")
        .header("k-network-probe", "queue")
        .body(Full::default())
        .unwrap();
    let resp = app.h1(queue_probe).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from("queue"));

    // None of the probes count as requests.
    assert_eq!(app.stats().await["requests"], 0);
}

#[tokio::test]
async fn slow_start_delays_binding() {
    let started = Instant::now();
    let _app = start(&["--slow-start-ms", "300"]).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "announced after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn reset_and_close_break_the_response() {
    let app = start(&[]).await;
    let resp = app.h1(get("/reset")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.into_body().collect().await.is_err(),
        "/reset must not look like a complete body"
    );

    let resp = app.h2(get_h2("/reset")).await;
    assert!(resp.into_body().collect().await.is_err());

    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert!(sender.send_request(get("/close")).await.is_err());
}

#[tokio::test]
async fn hang_is_released_when_the_client_leaves() {
    let app = start(&[]).await;
    let hung = tokio::time::timeout(Duration::from_millis(200), app.h1(get("/hang"))).await;
    assert!(hung.is_err(), "/hang answered");
    // The client side is gone; the app must notice and stop counting it.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if app.stats().await["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "/hang still in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn bad_flags_exit_64_and_help_lists_routes() {
    let out = command(&["--port", "abc"])
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--port"), "{stderr}");

    let out = command(&["--help"]).output().await.unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "/echo",
        "/ws",
        "/grpc.health.v1.Health/Check",
        "--max-concurrency",
    ] {
        assert!(help.contains(needle), "help lacks {needle}");
    }
}

#[tokio::test]
async fn crash_exits_with_status_3() {
    let mut app = start(&[]).await;
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert!(sender.send_request(get("/crash")).await.is_err());
    let status = tokio::time::timeout(Duration::from_secs(2), app.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(3));
}
