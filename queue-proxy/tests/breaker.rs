//! The breaker end to end (CONTRACT §1.4): `11 × CC` admitted, the rest refused at once,
//! FIFO release, cancellation gives places back, and no breaker at CC = 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// Waits until the queue-proxy's user metrics show `in_flight` requests in its handler and
/// `queued` of them waiting in the breaker.
async fn wait_for_gauges(qp: &QueueProxy, in_flight: f64, queued: f64) {
    eventually(
        &format!("{in_flight} requests in flight, {queued} of them queued"),
        || async {
            let text = qp.user_metrics().await;
            metric_value(&text, "revision_requests_in_flight", "") == in_flight
                && metric_value(&text, "revision_queue_depth", "") == queued
        },
    )
    .await;
}

async fn app_stat(app: &App, key: &str) -> u64 {
    app.stats().await[key].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc2_admits_exactly_22_and_refuses_the_rest_at_once() {
    let app = App::start(&["--max-concurrency", "2"]).await;
    let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "2")]).await;

    // Two long requests take both slots...
    let mut held = Vec::new();
    for _ in 0..2 {
        let url = qp.url("/delay?ms=3000");
        held.push(tokio::spawn(async move { get(&url).await }));
    }
    eventually("both slots taken at the app", || async {
        app_stat(&app, "in_flight").await == 2
    })
    .await;
    // ...and twenty more fill the queue (10 × CC), each on its own connection.
    for _ in 0..20 {
        let url = qp.url("/delay?ms=100");
        held.push(tokio::spawn(async move { get(&url).await }));
    }
    // The in-flight gauge counts every request in the handler, queued ones included.
    wait_for_gauges(&qp, 22.0, 20.0).await;

    // The 23rd and 24th are refused without waiting for a slot.
    let extra = qp.url("/delay?ms=100");
    let started = Instant::now();
    let (a, b) = tokio::join!(get(&extra), get(&extra));
    let elapsed = started.elapsed();
    for (s, _, body) in [a, b] {
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(&body[..], b"pending request queue full");
    }
    assert!(
        elapsed < Duration::from_secs(1),
        "refusals took {elapsed:?}: they waited in the breaker"
    );
    assert_eq!(
        qp.user_metric("revision_queue_depth", "").await,
        20.0,
        "the queue drained while the refusals were tested: the hold was too short"
    );

    // Everything admitted completes.
    for h in held {
        let (s, _, body) = tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("admitted request never completed")
            .unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
    let stats = app.stats().await;
    assert_eq!(stats["max_in_flight"], 2, "{stats}");
    assert_eq!(stats["violations"], 0, "{stats}");
    assert_eq!(
        stats["requests"], 22,
        "refused requests reached the app: {stats}"
    );
    assert_eq!(
        qp.user_metric("revision_breaker_rejected_total", "").await,
        2.0
    );
    wait_for_gauges(&qp, 0.0, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_are_released_in_arrival_order() {
    let app = App::start(&["--max-concurrency", "1"]).await;
    let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "1")]).await;

    let head = {
        let url = qp.url("/delay?ms=3000");
        tokio::spawn(async move { get(&url).await })
    };
    eventually("the first request holds the slot", || async {
        app_stat(&app, "in_flight").await == 1
    })
    .await;

    // Ten requests, one after another; each is known to be queued before the next is sent.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..10u32 {
        let url = qp.url(&format!("/delay?ms=50&i={i}"));
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let (s, _, _) = get(&url).await;
            tx.send((i, s)).unwrap();
        }));
        wait_for_gauges(&qp, f64::from(i) + 2.0, f64::from(i) + 1.0).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tx);
    assert_eq!(
        app_stat(&app, "in_flight").await,
        1,
        "the first request finished before all ten were queued"
    );

    let (s, _, _) = head.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let mut order = Vec::new();
    while let Some((i, s)) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("queued requests never completed")
    {
        assert_eq!(s, StatusCode::OK, "request {i}");
        order.push(i);
    }
    assert_eq!(order, (0..10).collect::<Vec<_>>(), "completion order");
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(app.stats().await["violations"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_storm_leaks_no_slot() {
    let app = App::start(&["--max-concurrency", "2"]).await;
    let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "2")]).await;

    // 22 requests that never finish on their own: 2 running at the app, 20 queued.
    let mut clients = Vec::new();
    for _ in 0..22 {
        let url = qp.url("/hang");
        clients.push(tokio::spawn(async move { get(&url).await }));
    }
    wait_for_gauges(&qp, 22.0, 20.0).await;
    eventually("two requests hanging at the app", || async {
        app_stat(&app, "in_flight").await == 2
    })
    .await;

    // Every client goes away.
    for c in &clients {
        c.abort();
    }
    for c in clients {
        assert!(c.await.unwrap_err().is_cancelled());
    }

    // Meanwhile a burst of 200 clients that each give up after 0-50 ms, some while
    // queued, some while running at the app, some before they are even admitted.
    let mut burst = Vec::new();
    for i in 0..200u64 {
        let path = if i % 2 == 0 {
            "/hang".to_owned()
        } else {
            format!("/delay?ms={}", i % 40)
        };
        let url = qp.url(&path);
        let patience = Duration::from_millis((i * 37) % 51);
        burst.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(patience, get(&url)).await;
        }));
    }
    for b in burst {
        b.await.unwrap();
    }

    // Nothing is left behind, here or at the app.
    wait_for_gauges(&qp, 0.0, 0.0).await;
    eventually("app requests cancelled", || async {
        app_stat(&app, "in_flight").await == 0
    })
    .await;

    // The full capacity is back: 22 at once are all admitted, and both slots are used.
    get(&app.url("/stats/reset")).await;
    let fresh: Vec<_> = (0..22)
        .map(|_| {
            let url = qp.url("/delay?ms=50");
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for f in fresh {
        let (s, _, body) = tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("fresh request hung")
            .unwrap();
        assert_eq!(
            (s, &body[..]),
            (StatusCode::OK, &b"ok"[..]),
            "capacity did not come back"
        );
    }
    let stats = app.stats().await;
    assert_eq!(stats["violations"], 0, "{stats}");
    assert_eq!(stats["requests"], 22, "{stats}");
    assert_eq!(stats["max_in_flight"], 2, "a slot leaked: {stats}");
    wait_for_gauges(&qp, 0.0, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc0_has_no_breaker_and_never_refuses() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "0")]).await;

    let started = Instant::now();
    let all: Vec<_> = (0..300)
        .map(|_| {
            let url = qp.url("/delay?ms=200");
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for r in all {
        let (s, _, _) = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .expect("request hung")
            .unwrap();
        *statuses.entry(s.as_u16()).or_insert(0) += 1;
    }
    assert_eq!(statuses, [(200, 300)].into_iter().collect(), "{statuses:?}");
    let elapsed = started.elapsed();
    let stats = app.stats().await;
    // Serialised, 300 × 200 ms would take a minute.
    assert!(
        elapsed < Duration::from_secs(20),
        "took {elapsed:?}: {stats}"
    );
    assert!(
        stats["max_in_flight"].as_u64().unwrap() > 10,
        "requests were not run concurrently: {stats}"
    );
    assert_eq!(
        qp.user_metric("revision_breaker_rejected_total", "").await,
        0.0
    );
    assert_eq!(qp.user_metric("revision_queue_depth", "").await, 0.0);
}
