//! Overload: more connections than the queue-proxy's breaker admits.

use std::sync::Arc;

use thaw_benches::harness::QueueProxy;

use super::{group, mib, ms, progress, run_with_rss, Ctx, Section, Table};

const CC: usize = 10;
const DELAY_MS: u64 = 20;

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let mut section = Section::new("Overload: queue-proxy CC=10, 200 connections to /delay?ms=20");
    let conns = 200;
    progress(&format!(
        "overload: queue-proxy CC={CC}, {conns} connections"
    ));
    let app = ctx.start_app().await;
    let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", &CC.to_string())]).await;
    let path = format!("/delay?ms={DELAY_MS}");
    super::wait_quiet(&ctx).await;
    let spec = ctx.spec(qp.serving, &path, conns);
    let m = run_with_rss(&spec, &[qp.pid() as u32]).await;
    let (r, peaks) = (m.result, m.peaks);
    if r.ok == 0 {
        section.fail(format!(
            "overload: no request was accepted (statuses {}, {} transport errors)",
            r.statuses_text(),
            r.transport_errors
        ));
    }
    let admitted = 11 * CC;
    // In service: CC at a time, each for DELAY_MS; the last of the admitted waits for
    // (admitted / CC) rounds.
    let bound_ms = (admitted / CC) as u64 * DELAY_MS;
    let mut table = Table::new(&[
        "conns",
        "200/s",
        "503s",
        "other statuses",
        "accepted p50 ms",
        "accepted p99 ms",
        "accepted max ms",
        "transport errors",
        "queue-proxy peak RSS MiB",
    ]);
    let other: Vec<String> = r
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200 && **s != 503)
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    table.row(vec![
        conns.to_string(),
        group(r.ok_rps().round() as u64),
        group(r.status_count(503)),
        if other.is_empty() {
            "none".to_owned()
        } else {
            other.join(", ")
        },
        ms(r.ok_latency.value_at_quantile(0.5) as f64),
        ms(r.ok_latency.value_at_quantile(0.99) as f64),
        ms(r.ok_latency.max() as f64),
        group(r.transport_errors),
        mib(peaks[0]),
    ]);
    section.line(&table.render());
    section.line(&format!(
        "The breaker admits 11 × CC = {admitted} requests (CC={CC} in service, {} queued); the rest are answered 503 at once and the client sends again at once (closed loop), so the 503 count measures how fast overload is refused. Latencies are of the accepted (200) requests only: the ideal is 200/s = CC / {DELAY_MS} ms = {} and a wait of at most about ({admitted} / CC) × {DELAY_MS} ms ≈ {bound_ms} ms. {} warm-up + {} measured.",
        admitted - CC,
        CC as u64 * 1000 / DELAY_MS,
        super::proxies::humantime(ctx.warmup),
        super::proxies::humantime(ctx.duration),
    ));
    section
}
