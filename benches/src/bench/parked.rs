//! Parked requests: many requests held by the activator for a revision with no ready pod,
//! then all served when the pod comes up.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use thaw_benches::harness::{self, Activator, Pod};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{activator_metric, group, mib, progress, static_revision_yaml, Ctx, Section, Table};

const BATCH: usize = 500;
const WAITING: &str = "activator_requests_waiting";

/// What one parked request ended with.
pub(super) enum End {
    Status(u16, Instant),
    Error(String),
}

pub(super) async fn parked_request(
    addr: std::net::SocketAddr,
    connected: mpsc::UnboundedSender<()>,
) -> End {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            let _ = connected.send(());
            return End::Error(format!("connect: {e}"));
        }
    };
    let _ = connected.send(());
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return End::Error(format!("handshake: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get("/")
        .header("host", "hello.local")
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    match sender.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.into_body().collect().await {
                Ok(_) => End::Status(status, Instant::now()),
                Err(e) => End::Error(format!("body: {e}")),
            }
        }
        Err(e) => End::Error(format!("request: {e}")),
    }
}

async fn waiting(act: &Activator) -> f64 {
    activator_metric(act, WAITING).await.unwrap_or(0.0)
}

/// Polls the waiting gauge until it reaches `n` or `limit` passes; returns the last value.
async fn wait_waiting(act: &Activator, n: usize, limit: Duration) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let w = waiting(act).await;
        if w >= n as f64 || Instant::now() > deadline {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let n = ctx.parked;
    let mut section = Section::new(&format!(
        "Parked: {} requests on a cold revision, then a pod comes up",
        group(n as u64)
    ));
    super::wait_quiet(&ctx).await;
    match measure(&ctx, n).await {
        Ok(table) => section.line(&table),
        Err(e) => section.fail(format!("parked: {e}")),
    }
    section
}

async fn measure(ctx: &Ctx, n: usize) -> Result<String, String> {
    let qp_port = harness::free_port();
    let act = Activator::start(&static_revision_yaml(qp_port, 100), &[]).await;
    let act_pid = act.pid();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = harness::rss_kib(act_pid);
    progress(&format!(
        "parked: opening {} connections, {BATCH} at a time, each with one GET /",
        group(n as u64)
    ));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(n);
    let opened = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch = BATCH.min(n - sent);
        for _ in 0..batch {
            tasks.push(tokio::spawn(parked_request(act.http, tx.clone())));
        }
        for _ in 0..batch {
            rx.recv().await.ok_or("connect tasks vanished")?;
        }
        sent += batch;
        // Pace on the activator: let it take this batch in before the next one comes.
        wait_waiting(&act, sent, Duration::from_secs(10)).await;
    }
    let w = wait_waiting(&act, n, Duration::from_secs(30)).await;
    if w < n as f64 {
        return Err(format!("{WAITING} reached only {w} of {n}"));
    }
    let parked_after = opened.elapsed();
    progress(&format!(
        "parked: {n} waiting after {} ms; sampling RSS",
        parked_after.as_millis()
    ));
    let mut rss_parked = 0;
    for _ in 0..5 {
        rss_parked = rss_parked.max(harness::rss_kib(act_pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    progress("parked: starting the pod");
    let t_start = Instant::now();
    let pod = Pod::start(qp_port, 100, &[]).await;
    let t_pod = Instant::now();
    let mut ok = 0u64;
    let mut non_200: std::collections::BTreeMap<u16, u64> = Default::default();
    let mut errors: Vec<String> = Vec::new();
    let mut last = t_pod;
    let limit = Duration::from_secs(if ctx.smoke { 60 } else { 180 });
    let deadline = Instant::now() + limit;
    for task in tasks {
        let end = match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => End::Error(super::panic_message(e)),
            Err(_) => End::Error(format!("no answer within {limit:?}")),
        };
        match end {
            End::Status(s, at) => {
                last = last.max(at);
                if s == 200 {
                    ok += 1;
                } else {
                    *non_200.entry(s).or_default() += 1;
                }
            }
            End::Error(e) => errors.push(e),
        }
    }
    let rss_after = harness::rss_kib(act_pid);
    let qp_rss = harness::rss_kib(pod.queue_proxy.pid() as u32);
    drop(pod);
    drop(act);

    let mut table = Table::new(&[
        "parked",
        "activator RSS idle MiB",
        "activator RSS parked MiB",
        "KiB per parked request",
        "pod start → all answered",
        "pod up → all answered",
        "200s",
        "non-200",
        "transport errors",
    ]);
    let per_req = (rss_parked.saturating_sub(rss_before)) as f64 / n as f64;
    let non_200_text = if non_200.is_empty() {
        "0".to_owned()
    } else {
        format!("{non_200:?}")
    };
    table.row(vec![
        group(n as u64),
        mib(rss_before),
        mib(rss_parked),
        format!("{per_req:.1}"),
        format!("{} ms", (last - t_start).as_millis()),
        format!("{} ms", (last.max(t_pod) - t_pod).as_millis()),
        group(ok),
        non_200_text.clone(),
        group(errors.len() as u64),
    ]);
    let mut out = table.render();
    out.push_str(&format!(
        "\nThe activator (one revision, static endpoint 127.0.0.1:{qp_port}, CC=100, `--max-waiting` 10000, default 64 MiB buffer budget) is sent {n} GETs on {n} connections, {BATCH} connects at a time, until `{WAITING}` reads {n} ({} ms); its RSS is then sampled 5 times over 500 ms (target ≤ 64 MiB for 10 000, about 6.5 KiB each). Each request is the first of its connection, so it waits parked before hyper (`activator/src/parking.rs`). \"pod start\" is when the bench starts the pod (test app, then a queue-proxy with CC=100 on the endpoint's port); \"pod up\" is when both are listening; \"all answered\" is when the last response body arrived. Activator RSS after the burst: {} MiB; the pod's queue-proxy: {} MiB.\n",
        parked_after.as_millis(),
        mib(rss_after),
        mib(qp_rss),
    ));
    if !errors.is_empty() {
        out.push_str(&format!("\nFirst transport error: {}\n", errors[0]));
    }
    if ok as usize != n {
        return Err(format!(
            "{ok} of {n} answered 200 (non-200: {non_200_text}, transport errors: {}{})\n{out}",
            errors.len(),
            errors
                .first()
                .map(|e| format!(", first: {e}"))
                .unwrap_or_default()
        ));
    }
    Ok(out)
}
