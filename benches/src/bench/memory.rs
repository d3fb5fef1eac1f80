//! Memory a platform team sizes for: what each idle keep-alive connection holds, and
//! how much of a burst's memory each binary gives back 10 s after the burst ends.
//!
//! A burst is either idle keep-alive connections (each has served one request, then
//! sits) or requests parked on a cold revision whose clients then leave. "Given back"
//! is the RSS 10 s after the last connection closed, against the RSS before the burst.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use thaw_benches::harness::{self, Activator, QueueProxy};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    activator_metric, group, mib, progress, static_revision_yaml, wait_ok, Ctx, Section, Table,
};

/// Connections opened at once: the accept backlog and the test app stay unhurried.
const BATCH: usize = 500;
/// How long after a burst the RSS is read.
const AFTER: Duration = Duration::from_secs(10);

/// One row of the table.
struct Row {
    binary: &'static str,
    burst: String,
    idle: u64,
    held: u64,
    per_conn: f64,
    after: u64,
}

/// Opens one keep-alive connection to `addr`, sends one GET, reads the answer, and
/// keeps the connection open for as long as the returned sender lives.
async fn idle_connection(
    addr: SocketAddr,
    host: Option<&'static str>,
) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get("/");
    if let Some(host) = host {
        req = req.header("host", host);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    Ok(sender)
}

/// The RSS of `pid` a moment after the process settled: the highest of 5 samples over
/// 500 ms, so a sample taken mid-free does not flatter it.
async fn settled_rss(pid: u32) -> u64 {
    let mut rss = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = rss.max(harness::rss_kib(pid));
    }
    rss
}

/// File descriptors `pid` holds open: sockets that outlive the burst show here.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `n` idle keep-alive connections to the proxy `pid` listening on `addr`.
async fn idle_burst(
    binary: &'static str,
    pid: u32,
    addr: SocketAddr,
    host: Option<&'static str>,
    n: usize,
) -> Result<Row, String> {
    let idle = settled_rss(pid).await;
    progress(&format!(
        "memory: {binary}: opening {} idle keep-alive connections",
        group(n as u64)
    ));
    let mut senders = Vec::with_capacity(n);
    while senders.len() < n {
        let batch = BATCH.min(n - senders.len());
        let opened: Vec<_> = (0..batch)
            .map(|_| tokio::spawn(idle_connection(addr, host)))
            .collect();
        for task in opened {
            let sender = task.await.map_err(super::panic_message)??;
            senders.push(sender);
        }
    }
    let held = settled_rss(pid).await;
    drop(senders);
    progress(&format!(
        "memory: {binary}: connections closed; waiting {AFTER:?}"
    ));
    tokio::time::sleep(AFTER).await;
    let after = settled_rss(pid).await;
    progress(&format!(
        "memory: {binary}: {} fds open after",
        open_fds(pid)
    ));
    Ok(Row {
        binary,
        burst: format!("{} idle keep-alive connections", group(n as u64)),
        idle,
        held,
        per_conn: held.saturating_sub(idle) as f64 / n as f64,
        after,
    })
}

/// `n` requests parked on a revision with no pod, whose clients then all leave.
async fn parked_burst(n: usize) -> Result<Row, String> {
    const WAITING: &str = "activator_requests_waiting";
    let act = Activator::start(&static_revision_yaml(harness::closed_port(), 100), &[]).await;
    let pid = act.pid();
    let idle = settled_rss(pid).await;
    progress(&format!(
        "memory: activator: parking {} requests",
        group(n as u64)
    ));
    let (connected, mut connects) = mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(n);
    while tasks.len() < n {
        let batch = BATCH.min(n - tasks.len());
        for _ in 0..batch {
            tasks.push(tokio::spawn(super::parked::parked_request(
                act.http,
                connected.clone(),
            )));
        }
        for _ in 0..batch {
            connects.recv().await.ok_or("connect tasks vanished")?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting = activator_metric(&act, WAITING).await.unwrap_or(0.0);
        if waiting >= n as f64 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{WAITING} reached only {waiting} of {n}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = settled_rss(pid).await;
    // The clients leave: aborting a task drops its connection.
    for task in &tasks {
        task.abort();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = activator_metric(&act, WAITING).await.unwrap_or(f64::NAN);
        if waiting == 0.0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{WAITING} still {waiting} 30 s after every client left"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress(&format!(
        "memory: activator: every parked client left; waiting {AFTER:?}"
    ));
    tokio::time::sleep(AFTER).await;
    let after = settled_rss(pid).await;
    Ok(Row {
        binary: "activator",
        burst: format!("{} parked requests whose clients leave", group(n as u64)),
        idle,
        held,
        per_conn: held.saturating_sub(idle) as f64 / n as f64,
        after,
    })
}

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let mut section =
        Section::new("Memory: idle connections, and what is given back after a burst");
    let (idle_counts, parked): (&[usize], usize) = if ctx.smoke {
        (&[100, 300], 200)
    } else {
        (&[1_000, 10_000], 5_000)
    };
    let mut rows = Vec::new();
    for &n in idle_counts {
        super::wait_quiet(&ctx).await;
        let app = ctx.start_app().await;
        let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "0")]).await;
        match u32::try_from(qp.pid()) {
            Ok(pid) => match idle_burst("queue-proxy", pid, qp.serving, Some("localhost"), n).await
            {
                Ok(row) => rows.push(row),
                Err(e) => section.fail(format!("memory: queue-proxy, {n} connections: {e}")),
            },
            Err(e) => section.fail(format!("memory: queue-proxy pid: {e}")),
        }
        drop(qp);

        super::wait_quiet(&ctx).await;
        let act = Activator::start(&static_revision_yaml(app.port(), 0), &[]).await;
        let outcome = match wait_ok(act.http, "/", Some("hello.local")).await {
            Ok(()) => idle_burst("activator", act.pid(), act.http, Some("hello.local"), n).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(row) => rows.push(row),
            Err(e) => section.fail(format!("memory: activator, {n} connections: {e}")),
        }
    }
    super::wait_quiet(&ctx).await;
    match parked_burst(parked).await {
        Ok(row) => rows.push(row),
        Err(e) => section.fail(format!("memory: activator, {parked} parked: {e}")),
    }

    let mut table = Table::new(&[
        "binary",
        "burst",
        "RSS before MiB",
        "RSS during MiB",
        "KiB each",
        "RSS 10 s after MiB",
        "after ÷ before",
    ]);
    for r in &rows {
        table.row(vec![
            format!("`{}`", r.binary),
            r.burst.clone(),
            mib(r.idle),
            mib(r.held),
            format!("{:.1}", r.per_conn),
            mib(r.after),
            format!("{:.2}×", r.after as f64 / r.idle.max(1) as f64),
        ]);
    }
    section.line(&table.render());
    section.line(&format!(
        "A fresh process per row. Idle connections: each is opened, serves one `GET /` (the queue-proxy in front of the test app, the activator with the test app as its static pod), and then sits; {BATCH} are opened at a time. Parked: GETs for a revision whose only endpoint refuses connections, until `activator_requests_waiting` counts them all; then every client closes its connection. RSS is the highest of 5 samples over 500 ms; \"during\" is with every connection open, \"10 s after\" is {} s after the last one closed. KiB each = (during − before) ÷ connections. Target: after ÷ before ≤ 2×.",
        AFTER.as_secs()
    ));
    section
}
