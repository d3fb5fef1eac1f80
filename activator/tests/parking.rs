//! Requests parked before hyper (the first request of a connection, for a revision that
//! must wait) keep every guarantee of requests parked inside it: their place in line,
//! their bodies, pipelined requests behind them, timeouts, websockets and the drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use thaw_benches::harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(cc: usize, timeout_secs: u64, port: u16) -> String {
    format!(
        "revisions:\n  - name: hello\n    hosts: [hello.local]\n    containerConcurrency: {cc}\n    timeoutSeconds: {timeout_secs}\n    endpoints: [\"127.0.0.1:{port}\"]\n"
    )
}

async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (StatusCode, Bytes) {
    let req = http::Request::get(path)
        .header("host", "hello.local")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

async fn waiting(act: &Activator) -> f64 {
    act.metric("activator_requests_waiting", "").await
}

#[tokio::test]
async fn requests_parked_before_and_inside_hyper_share_one_line() {
    let port = free_port();
    let _pod = Pod::start(port, 1, &[]).await;
    let act = Activator::start(&config(1, 60, port), &[]).await;
    eventually("pod ready", || async {
        act.metric("activator_ready_pods", "").await == 1.0
    })
    .await;
    // A connection that has served a request: its next one waits inside hyper.
    let mut kept = http1_conn(act.http).await;
    assert_eq!(get_on(&mut kept, "/").await.0, StatusCode::OK);
    // The only slot is taken for a while.
    let mut busy = http1_conn(act.http).await;
    let holder = tokio::spawn(async move { get_on(&mut busy, "/delay?ms=1500").await.0 });
    eventually("the slot is taken", || async {
        act.metric("activator_requests_in_flight", "").await >= 1.0
    })
    .await;

    // Arrivals, in this order: a new connection (parked before hyper), the kept
    // connection's second request (parked inside hyper), another new connection.
    let started = Instant::now();
    let mut done = Vec::new();
    let mut first = http1_conn(act.http).await;
    done.push(tokio::spawn(async move {
        let r = get_on(&mut first, "/delay?ms=200").await;
        (1, r.0, started.elapsed())
    }));
    eventually("one waits", || async { waiting(&act).await == 1.0 }).await;
    done.push(tokio::spawn(async move {
        let r = get_on(&mut kept, "/delay?ms=200").await;
        (2, r.0, started.elapsed())
    }));
    eventually("two wait", || async { waiting(&act).await == 2.0 }).await;
    let mut third = http1_conn(act.http).await;
    done.push(tokio::spawn(async move {
        let r = get_on(&mut third, "/delay?ms=200").await;
        (3, r.0, started.elapsed())
    }));
    eventually("three wait", || async { waiting(&act).await == 3.0 }).await;

    assert_eq!(holder.await.unwrap(), StatusCode::OK);
    let mut finished = Vec::new();
    for d in done {
        finished.push(d.await.unwrap());
    }
    for (n, status, _) in &finished {
        assert_eq!(*status, StatusCode::OK, "request {n}");
    }
    // CC=1 serves them one at a time, so they finish in the order they were let in.
    finished.sort_by_key(|(_, _, at)| *at);
    let order: Vec<u32> = finished.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(order, vec![1, 2, 3]);
    assert_eq!(waiting(&act).await, 0.0);
}

#[tokio::test]
async fn a_parked_body_and_a_pipelined_request_behind_it_are_both_served() {
    let port = free_port();
    let act = Activator::start(&config(10, 60, port), &[]).await;
    let mut conn = raw(act.http).await;
    // One write: a POST with its body, then a GET right behind it on the same connection.
    conn.write_all(
        b"POST /echo HTTP/1.1\r\nHost: hello.local\r\nContent-Length: 11\r\n\r\nhello there\
          GET / HTTP/1.1\r\nHost: hello.local\r\n\r\n",
    )
    .await
    .unwrap();
    eventually("parked", || async { waiting(&act).await == 1.0 }).await;

    let _pod = Pod::start(port, 10, &[]).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("hello world\n") {
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&got)
        );
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let echo = text.find("hello there").expect("the POST's body echoed");
    let second = text.rfind("HTTP/1.1 200").unwrap();
    assert!(echo < second, "answers out of order: {text}");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
}

#[tokio::test]
async fn a_parked_request_runs_out_of_time_with_504_and_leaves_the_queue() {
    let act = Activator::start(&config(1, 1, free_port()), &[]).await;
    let mut conn = http1_conn(act.http).await;
    let started = Instant::now();
    let (status, body) = get_on(&mut conn, "/").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(&body[..], b"activator request timeout");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(waiting(&act).await, 0.0);
    // The connection goes on, its next request inside hyper.
    let (status, _) = get_on(&mut conn, "/").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn a_parked_websocket_is_upgraded_once_a_pod_is_ready() {
    let port = free_port();
    let act = Activator::start(&config(1, 60, port), &[]).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", act.http),
    )
    .unwrap();
    req.headers_mut()
        .insert("host", "hello.local".parse().unwrap());
    let connecting = tokio::spawn(tokio_tungstenite::connect_async(req));
    eventually("parked", || async { waiting(&act).await == 1.0 }).await;

    let _pod = Pod::start(port, 1, &[]).await;
    let (mut ws, _) = connecting.await.unwrap().unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        "after the wait",
    ))
    .await
    .unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "after the wait");
    // The websocket holds the pod's only slot while it lives.
    assert_eq!(act.metric("activator_requests_in_flight", "").await, 1.0);
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_request_parked_past_the_drain_period_is_still_served() {
    let port = free_port();
    let mut act = Activator::start(&config(1, 60, port), &["--drain-period", "1s"]).await;
    let mut conn = http1_conn(act.http).await;
    let parked = tokio::spawn(async move { get_on(&mut conn, "/").await });
    eventually("parked", || async { waiting(&act).await == 1.0 }).await;

    act.signal("TERM");
    // Past the drain period the listeners close; the parked request keeps waiting, and
    // the process with it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(act.try_exit().is_none(), "exited with a request waiting");
    let _pod = Pod::start(port, 1, &[]).await;
    let (status, body) = parked.await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello world\n"[..]));
    let status = act.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
}
