//! Nothing holds a breaker slot or a file descriptor forever: not a client that stops
//! reading its response, not a connection that never sends a request, not file
//! descriptors running out. And what should hold a slot does: a websocket, for its life.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Asks for a body far larger than the socket buffers, then never reads it.
async fn stop_reading(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /bytes?n=2000000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    stream
}

/// With CC=1, the next request can only be served once the stalled one let go. (A
/// request that waits past an idle timeout is answered `504`; the next one is tried.)
async fn next_request_is_served(qp: &QueueProxy) {
    eventually("the stalled client lets go of the only slot", || async {
        let served = tokio::time::timeout(Duration::from_secs(5), get(&qp.url("/"))).await;
        matches!(served, Ok((StatusCode::OK, _, _)))
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_slot_at_the_revision_timeout() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(
        app.port(),
        &[
            ("CONTAINER_CONCURRENCY", "1"),
            ("REVISION_TIMEOUT_SECONDS", "2"),
        ],
    )
    .await;
    let _stalled = stop_reading(qp.serving).await;
    eventually("the stalled request holds the slot", || async {
        qp.user_metric("revision_requests_in_flight", "").await == 1.0
    })
    .await;
    next_request_is_served(&qp).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_slot_at_the_idle_timeout() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(
        app.port(),
        &[
            ("CONTAINER_CONCURRENCY", "1"),
            ("REVISION_TIMEOUT_SECONDS", "600"),
            ("REVISION_IDLE_TIMEOUT_SECONDS", "1"),
        ],
    )
    .await;
    let _stalled = stop_reading(qp.serving).await;
    next_request_is_served(&qp).await;
}

#[tokio::test]
async fn an_h2_client_with_a_closed_window_loses_its_slot_at_the_revision_timeout() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(
        app.port(),
        &[
            ("CONTAINER_CONCURRENCY", "1"),
            ("REVISION_TIMEOUT_SECONDS", "2"),
        ],
    )
    .await;
    // A stream window of zero: the server may send headers, never a byte of body.
    let tcp = TcpStream::connect(qp.serving).await.unwrap();
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let req = http::Request::get(format!("http://{}/bytes?n=100000000", qp.serving))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(req, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _unread = response.into_body();
    eventually("the stalled stream holds the slot", || async {
        qp.user_metric("revision_requests_in_flight", "").await == 1.0
    })
    .await;
    next_request_is_served(&qp).await;
    drop(client);
}

/// Reads until the server closes the connection (an HTTP/2 server sends its SETTINGS
/// first); an error (reset) is a close too.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(EVENTUALLY, stream.read_to_end(&mut sink))
        .await
        .is_ok()
}

#[tokio::test]
async fn connections_that_send_no_request_are_closed_after_the_read_header_timeout() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[("THAW_READ_HEADER_TIMEOUT", "1s")]).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(qp.serving).await.unwrap());
    }
    // Part of the HTTP/2 preface, then nothing: version detection waits for the rest.
    let mut partial = TcpStream::connect(qp.serving).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    silent.push(partial);
    // The whole preface, then no SETTINGS and no request.
    let mut preface = TcpStream::connect(qp.serving).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    silent.push(preface);
    // Part of an HTTP/1.1 head.
    let mut head = TcpStream::connect(qp.serving).await.unwrap();
    head.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    silent.push(head);
    for (i, stream) in silent.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream).await,
            "connection {i} is still open"
        );
    }
    // A client that does send its request is served as ever.
    let (status, _, _) = get(&qp.url("/")).await;
    assert_eq!(status, StatusCode::OK);
}

/// The CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit(") ").next().unwrap();
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test]
async fn out_of_file_descriptors_the_server_neither_spins_nor_locks_clients_out() {
    let app = App::start(&[]).await;
    let mut env: HashMap<String, String> = knative_env(app.port());
    env.insert("THAW_READ_HEADER_TIMEOUT".into(), "2s".into());
    // 64 descriptors, hard and soft, so the queue-proxy cannot raise them.
    let mut child = child("prlimit")
        .args(["--nofile=64:64", "--"])
        .arg(bin("queue-proxy"))
        .env_clear()
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("prlimit (util-linux) runs");
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let serving: SocketAddr = loop {
        let line = tokio::time::timeout(EVENTUALLY, lines.next_line())
            .await
            .expect("the queue-proxy did not start")
            .unwrap()
            .expect("the queue-proxy exited");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "listening" && v["listener"] == "serving" {
            break v["address"].as_str().unwrap().parse().unwrap();
        }
    };
    let logs = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });
    // Far more silent connections than the process has descriptors.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(serving).await.unwrap());
    }
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds(pid) - before;
    // A loop retrying accept at once burns the whole second; backing off, almost none.
    assert!(used < 0.5, "the accept loop spins: {used} s of CPU in 1 s");
    // The silent ones are closed after the header timeout, and a real client gets in.
    let served = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(Ok((StatusCode::OK, _, _))) =
                tokio::time::timeout(Duration::from_secs(5), async {
                    Ok::<_, ()>(get(&format!("http://{serving}/")).await)
                })
                .await
            {
                return;
            }
        }
    })
    .await;
    assert!(served.is_ok(), "a real client never got in");
    child.kill().await.unwrap();
    let logs = logs.await.unwrap();
    let failures = logs.iter().filter(|l| l.contains("accept failed")).count();
    assert!(
        failures >= 1,
        "descriptors never ran out: the test proves nothing"
    );
    assert!(
        failures <= 5,
        "accept failures are logged per failure: {failures}"
    );
    drop(silent);
}

#[tokio::test]
async fn a_websocket_holds_its_breaker_slot_for_its_whole_life() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "1")]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", qp.serving))
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap(), "hi");
    // The only slot is the websocket's: a request waits in the breaker.
    let url = qp.url("/");
    let waiting = tokio::spawn(async move { get(&url).await });
    eventually("the request waits behind the websocket", || async {
        qp.user_metric("revision_queue_depth", "").await == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "CC=1 did not bound the websocket");
    ws.close(None).await.unwrap();
    drop(ws);
    let (status, _, _) = tokio::time::timeout(EVENTUALLY, waiting)
        .await
        .expect("the slot was not released when the websocket closed")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}
