//! Through the activator, nothing holds a pod's slot forever: not a client that stops
//! reading, not a connection that sends nothing. A websocket holds its slot for its life.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use thaw_benches::harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn config(timeout_secs: u64, endpoint: u16) -> String {
    format!(
        "revisions:\n  - name: hello\n    namespace: default\n    hosts: [hello.local]\n    containerConcurrency: 1\n    timeoutSeconds: {timeout_secs}\n    endpoints: [\"127.0.0.1:{endpoint}\"]\n"
    )
}

async fn start(timeout_secs: u64, flags: &[&str]) -> (Pod, Activator) {
    let port = free_port();
    let pod = Pod::start(port, 1, &[]).await;
    let act = Activator::start(&config(timeout_secs, port), flags).await;
    (pod, act)
}

/// The next request is served once the only pod slot is free again.
async fn next_request_is_served(act: &Activator) {
    eventually("the pod's only slot is free again", || async {
        let served = tokio::time::timeout(
            Duration::from_secs(5),
            get_with(&act.url("/"), &[("Host", "hello.local")]),
        )
        .await;
        matches!(served, Ok((StatusCode::OK, _, _)))
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_pod_slot_at_the_revision_timeout() {
    let (_pod, act) = start(2, &[]).await;
    let mut stalled = TcpStream::connect(act.http).await.unwrap();
    stalled
        .write_all(b"GET /bytes?n=2000000000 HTTP/1.1\r\nHost: hello.local\r\n\r\n")
        .await
        .unwrap();
    eventually("the stalled request holds the pod", || async {
        act.metric("activator_requests_in_flight", "").await == 1.0
    })
    .await;
    next_request_is_served(&act).await;
    drop(stalled);
}

#[tokio::test]
async fn connections_that_send_no_request_are_closed() {
    let (_pod, act) = start(30, &["--read-header-timeout", "1s"]).await;
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(TcpStream::connect(act.http).await.unwrap());
    }
    let mut partial = TcpStream::connect(act.h2c).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    silent.push(partial);
    for (i, stream) in silent.iter_mut().enumerate() {
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(EVENTUALLY, stream.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "connection {i} is still open");
    }
    next_request_is_served(&act).await;
}

#[tokio::test]
async fn a_websocket_holds_its_pod_slot_for_its_whole_life() {
    let (_pod, act) = start(30, &[]).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", act.http),
    )
    .unwrap();
    req.headers_mut()
        .insert("host", "hello.local".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap(), "hi");
    let url = act.url("/");
    let waiting = tokio::spawn(async move { get_with(&url, &[("Host", "hello.local")]).await });
    eventually("the request waits behind the websocket", || async {
        act.metric("activator_requests_waiting", "").await == 1.0
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
