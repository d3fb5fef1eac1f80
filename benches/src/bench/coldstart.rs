//! Cold-start pickup: from the instant the app starts accepting to the instant the
//! request the activator held for it is answered.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use thaw_benches::harness::{self, Activator, QueueProxy};
use tokio::net::TcpStream;

use super::{activator_metric, progress, spread, static_revision_yaml, Ctx, Section, Table};

/// The app sleeps this long after it starts before it binds, so that its process start-up
/// is over by the time it listens.
const SLOW_START_MS: u64 = 200;

struct Run {
    pickup: Duration,
    total: Duration,
    header: Option<String>,
}

/// Polls `addr` with a connect every 100 µs from a plain thread until one succeeds, and
/// returns that instant (the app is accepting from then on).
fn watch_listen(addr: SocketAddr, limit: Duration) -> std::thread::JoinHandle<Option<Instant>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        None
    })
}

/// How the queue-proxy of a variant is configured.
struct Variant {
    label: &'static str,
    env: &'static [(&'static str, &'static str)],
}

const VARIANTS: [Variant; 2] = [
    Variant {
        label: "probe pace 50 ms (Knative's default)",
        env: &[],
    },
    Variant {
        label: "probe pace 2 ms, 1 thread (as the local platform runs it)",
        env: &[
            ("THAW_AGGRESSIVE_PROBE_INTERVAL", "2ms"),
            ("THAW_WORKER_THREADS", "1"),
        ],
    },
];

/// A fresh keep-alive connection to the activator at `addr`, and a `GET /` for
/// `hello.local` to send on it.
async fn hello_request(
    addr: SocketAddr,
) -> Result<(SendRequest<Empty<Bytes>>, Request<Empty<Bytes>>), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to the activator: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get("/")
        .header("host", "hello.local")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    Ok((sender, req))
}

/// The activator's own figure for the wait, `Thaw-Cold-Start`.
fn cold_start_header<B>(resp: &http::Response<B>) -> Option<String> {
    resp.headers()
        .get("thaw-cold-start")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn one(n: usize, variant: usize) -> Result<Run, String> {
    let app_port = harness::free_port();
    let app_addr = SocketAddr::from(([127, 0, 0, 1], app_port));
    let probe = format!(r#"{{"tcpSocket":{{"port":{app_port}}}}}"#);
    let mut env = vec![("SERVING_READINESS_PROBE", probe.as_str())];
    env.extend_from_slice(VARIANTS[variant].env);
    let qp = QueueProxy::start(app_port, &env).await;
    let act = Activator::start(&static_revision_yaml(qp.serving.port(), 0), &[]).await;

    // The request, on its own connection, parked in the activator.
    let (mut sender, req) = hello_request(act.http).await?;
    let sent = Instant::now();
    let response = tokio::spawn(async move {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let at = Instant::now();
        let status = resp.status();
        let header = cold_start_header(&resp);
        let _ = resp.into_body().collect().await;
        Ok::<_, String>((status, header, at))
    });
    let deadline = tokio::time::Instant::now() + harness::EVENTUALLY;
    while activator_metric(&act, "activator_requests_waiting")
        .await
        .unwrap_or(0.0)
        < 1.0
    {
        if tokio::time::Instant::now() > deadline {
            return Err("the request never showed as waiting in the activator".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Start the app; it binds SLOW_START_MS later. Watch for that instant.
    let watcher = watch_listen(app_addr, harness::EVENTUALLY);
    let mut app = harness::child(harness::bin("thaw-testapp"))
        .args([
            "--port",
            &app_port.to_string(),
            "--slow-start-ms",
            &SLOW_START_MS.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start thaw-testapp: {e}"))?;
    let listen = tokio::task::spawn_blocking(move || watcher.join().ok().flatten())
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the app never accepted a connection")?;
    let (status, header, at) = tokio::time::timeout(harness::EVENTUALLY, response)
        .await
        .map_err(|_| "no response within 15 s of the app listening".to_owned())?
        .map_err(|e| e.to_string())??;
    let _ = app.kill().await;
    drop(act);
    drop(qp);
    if status != http::StatusCode::OK {
        return Err(format!("run {n}: status {status}"));
    }
    Ok(Run {
        pickup: at.saturating_duration_since(listen),
        total: at - sent,
        header,
    })
}

/// One cold start on the local platform: a fresh activator whose revision runs the test
/// app (which listens at once) behind a queue-proxy the activator starts for it. From
/// the request sent to its response: both processes' start included.
async fn local_one(n: usize) -> Result<(Duration, Option<String>), String> {
    let app = harness::bin("thaw-testapp");
    let yaml = format!(
        "revisions:\n  - name: hello\n    namespace: default\n    hosts: [hello.local]\n    command: [{:?}, \"--threads\", \"1\"]\n    containerConcurrency: 0\n    minScale: 0\n    readinessProbe:\n      tcpSocket: {{}}\n",
        app.display().to_string()
    );
    let act = Activator::start(&yaml, &[]).await;
    let (mut sender, req) = hello_request(act.http).await?;
    let sent = Instant::now();
    let resp = tokio::time::timeout(harness::EVENTUALLY, sender.send_request(req))
        .await
        .map_err(|_| "no response within 15 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let took = sent.elapsed();
    let header = cold_start_header(&resp);
    if resp.status() != http::StatusCode::OK {
        return Err(format!("local run {n}: status {}", resp.status()));
    }
    let _ = resp.into_body().collect().await;
    drop(act);
    Ok((took, header))
}

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let runs = ctx.coldstart_runs.max(1);
    let mut section = Section::new(&format!(
        "Cold-start pickup ({runs} runs per queue-proxy setting)"
    ));
    let mut results: Vec<Vec<Run>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    for i in 1..=runs {
        // Interleaved: one run of each setting per round.
        for (v, variant) in VARIANTS.iter().enumerate() {
            super::wait_quiet(&ctx).await;
            progress(&format!("coldstart: run {i}/{runs}, {}", variant.label));
            match tokio::spawn(one(i, v)).await {
                Ok(Ok(r)) => results[v].push(r),
                Ok(Err(e)) => section.fail(format!("coldstart run {i} ({}): {e}", variant.label)),
                Err(e) => section.fail(format!(
                    "coldstart run {i} ({}): {}",
                    variant.label,
                    super::panic_message(e)
                )),
            }
        }
    }
    let mut local = Vec::new();
    for i in 1..=runs {
        super::wait_quiet(&ctx).await;
        progress(&format!("coldstart: run {i}/{runs}, local platform"));
        match tokio::spawn(local_one(i)).await {
            Ok(Ok(r)) => local.push(r),
            Ok(Err(e)) => section.fail(format!("coldstart local run {i}: {e}")),
            Err(e) => section.fail(format!(
                "coldstart local run {i}: {}",
                super::panic_message(e)
            )),
        }
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let mut table = Table::new(&[
        "queue-proxy",
        "measure",
        "median ms",
        "min ms",
        "max ms",
        "runs",
    ]);
    for (variant, results) in VARIANTS.iter().zip(&results) {
        if results.is_empty() {
            continue;
        }
        let pickup: Vec<f64> = results.iter().map(|r| ms(&r.pickup)).collect();
        let total: Vec<f64> = results.iter().map(|r| ms(&r.total)).collect();
        let headers: Vec<f64> = results
            .iter()
            .filter_map(|r| r.header.as_deref()?.trim().parse().ok())
            .collect();
        let mut rows = vec![
            ("**app accepting → response (pickup)**", pickup, 1),
            ("request sent → response", total, 0),
        ];
        if !headers.is_empty() {
            rows.push(("`Thaw-Cold-Start` header", headers, 0));
        }
        for (what, values, digits) in rows {
            let (m, lo, hi) = spread(&values);
            table.row(vec![
                variant.label.to_owned(),
                what.to_owned(),
                format!("{m:.digits$}"),
                format!("{lo:.digits$}"),
                format!("{hi:.digits$}"),
                values.len().to_string(),
            ]);
        }
    }
    if !local.is_empty() {
        let total: Vec<f64> = local.iter().map(|(d, _)| ms(d)).collect();
        let headers: Vec<f64> = local
            .iter()
            .filter_map(|(_, h)| h.as_deref()?.trim().parse().ok())
            .collect();
        for (what, values, digits) in [
            ("**request sent → response**", total, 1),
            ("`Thaw-Cold-Start` header", headers, 0),
        ] {
            if values.is_empty() {
                continue;
            }
            let (m, lo, hi) = spread(&values);
            table.row(vec![
                "local platform, an app that listens at once".to_owned(),
                what.to_owned(),
                format!("{m:.digits$}"),
                format!("{lo:.digits$}"),
                format!("{hi:.digits$}"),
                values.len().to_string(),
            ]);
        }
    }
    section.line(&table.render());
    section.line(
        "The local platform rows: a fresh activator per run whose one revision runs `thaw-testapp --threads 1` (it listens at once) with `minScale: 0` and a `tcpSocket` readiness probe; one `GET /` is sent, and the time is until its response head arrives: the activator starting the queue-proxy and app processes, the queue-proxy seeing the app, the activator seeing the queue-proxy, and the request (target ≤ 15 ms median)."
    );
    section.line(&format!(
        "Each run starts a fresh queue-proxy (CC=0, readiness probe `{{\"tcpSocket\":{{\"port\":<app port>}}}}`, i.e. `periodSeconds: 0`: aggressive probing at the pace shown) for an app port nothing listens on yet, and a fresh activator whose one revision has that queue-proxy as its static endpoint. One `GET /` (Host: hello.local) is sent to the activator and the bench waits until `activator_requests_waiting` reads 1. Then it starts `thaw-testapp --slow-start-ms {SLOW_START_MS}` on the app port, and a plain thread connects to the app port every 100 µs: **T_listen** is the first connect that succeeds (the app is accepting; resolution ≈ 0.1 ms plus scheduling). **T_resp** is when the response headers of the parked request reach the bench. The pickup is T_resp − T_listen: the queue-proxy noticing the app (its probe pace; with either setting an attempt the app's port refuses is followed by the next at the runtime's next 1 ms timer tick), the activator noticing the queue-proxy (its probe waits in the queue-proxy's health check, which answers as soon as the app is seen), and the proxied request itself ([beyond] target ≤ 2 ms median with the default settings; Knative's probe tick alone is 200 ms). \"request sent → response\" also includes the app's process start and its {SLOW_START_MS} ms slow start. `Thaw-Cold-Start` is the activator's own figure for the wait. The two settings alternate run by run; the second is `THAW_AGGRESSIVE_PROBE_INTERVAL=2ms THAW_WORKER_THREADS=1`, what the local platform gives its pods."
    ));
    section
}
