//! What revisions cost the activator, the figures a team sizing it for a busy cluster
//! needs: RSS and CPU against how many revisions are registered, requests spread over
//! the ones with traffic while their pod sets keep changing, and the per-second stat
//! report for all of them.
//!
//! The activator runs as `thaw-scale-activator`: the activator's own server, registry,
//! probing and metrics on its in-memory platform, which registers the revisions and sends
//! the pod-set changes (a Kubernetes watch is not what is measured here).

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use thaw_activator::reporter::RevisionStats;
use thaw_activator::revision::RevisionId;
use thaw_benches::harness::{self, Activator, QueueProxy};
use thaw_shared::stats::ConcurrencyRecorder;

use super::{
    group, mib, ms_spread, progress, rps_spread, run_with_rss, spread, try_get, wait_ok,
    wait_quiet, Ctx, Section, Table,
};

/// Revisions with pods (and traffic) at most: the "1 000 of them with traffic".
const ACTIVE: usize = 1_000;
/// Pod-set changes per second, spread over the active revisions.
const UPDATES_PER_SEC: u32 = 100;
/// Connections of the load: the proxies table's smaller count.
const CONNECTIONS: usize = 32;
/// How long the CPU at rest is read over.
const AT_REST: Duration = Duration::from_secs(5);
/// Stat-report cuts timed per revision count.
const TICKS: usize = 50;

/// One row of the main table.
struct Row {
    revisions: usize,
    active: usize,
    ready_ms: f64,
    rest_rss: u64,
    rest_cpu_ms_per_s: f64,
    rps: Vec<f64>,
    p99_us: Vec<f64>,
    cpu_us: Vec<f64>,
    peak_rss: u64,
    failed: u64,
    metrics_bytes: usize,
}

/// Times what the reporter does once a second, a cut of every tracked revision's window
/// and its protobuf encoding, with `tracked` revisions in flight. Returns each cut's
/// wall time in µs (on one thread with nothing else runnable, it bounds the CPU time)
/// and the batch's size in bytes.
fn stat_report(tracked: usize) -> (Vec<f64>, usize) {
    let stats = RevisionStats::new();
    // Each revision with its own recorder, as the registry's revisions hold them.
    let ids: Vec<(RevisionId, Arc<ConcurrencyRecorder>)> = (0..tracked)
        .map(|i| {
            let id = RevisionId::new("bench", &format!("rev-{i}"));
            (id, Arc::new(ConcurrencyRecorder::untracked()))
        })
        .collect();
    // Requests held in flight keep every entry in each cut.
    let _in_flight: Vec<_> = ids
        .iter()
        .map(|(id, load)| stats.arrive(id, load))
        .collect();
    let _ = stats.take_pokes("activator-bench");
    let mut times = Vec::with_capacity(TICKS);
    let mut bytes = 0;
    for _ in 0..TICKS {
        // A request per revision since the last cut, as with traffic.
        for (id, load) in &ids {
            drop(stats.arrive(id, load));
        }
        let started = Instant::now();
        let batch = stats.tick("activator-bench", tokio::time::Instant::now());
        let encoded = batch.encode_to_vec();
        times.push(started.elapsed().as_secs_f64() * 1e6);
        bytes = encoded.len();
        std::hint::black_box(encoded);
    }
    (times, bytes)
}

/// Cores `pid` used over `window`.
async fn cores_over(pid: u32, window: Duration) -> f64 {
    let before = super::cpu_time(pid);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    super::cpu_time(pid).saturating_sub(before).as_secs_f64() / started.elapsed().as_secs_f64()
}

/// One revision count: a fresh activator, its figures at rest, then `ctx.reps` loads.
async fn measure(ctx: &Ctx, revisions: usize, active: usize, pods: &str) -> Result<Row, String> {
    let (n, a, per_sec) = (
        revisions.to_string(),
        active.to_string(),
        UPDATES_PER_SEC.to_string(),
    );
    let leading = [
        "--revisions",
        n.as_str(),
        "--active",
        a.as_str(),
        "--pods",
        pods,
        "--updates-per-sec",
        per_sec.as_str(),
        "--",
    ];
    wait_quiet(ctx).await;
    let started = Instant::now();
    let act = Activator::start_program("thaw-scale-activator", &leading, &[], &[]).await;
    // The last revision with pods answering means every one before it was applied too.
    let last = format!("rev-{}.local", active - 1);
    wait_ok(act.http, "/", Some(&last)).await?;
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    let pid = act.pid();
    let rest_rss = {
        tokio::time::sleep(Duration::from_secs(1)).await;
        harness::rss_kib(pid)
    };
    let rest_cpu_ms_per_s = cores_over(pid, AT_REST).await * 1e3;

    let hosts: Vec<String> = (0..active).map(|i| format!("rev-{i}.local")).collect();
    let mut row = Row {
        revisions,
        active,
        ready_ms,
        rest_rss,
        rest_cpu_ms_per_s,
        rps: Vec::new(),
        p99_us: Vec::new(),
        cpu_us: Vec::new(),
        peak_rss: 0,
        failed: 0,
        metrics_bytes: 0,
    };
    for rep in 0..ctx.reps {
        wait_quiet(ctx).await;
        progress(&format!(
            "revisions: {} registered, {active} with traffic, repetition {}",
            group(revisions as u64),
            rep + 1
        ));
        let mut spec = ctx.spec(act.http, "/", CONNECTIONS);
        spec.hosts.clone_from(&hosts);
        let m = run_with_rss(&spec, &[pid]).await;
        super::check_some_ok("revisions", &m.result)?;
        let r = &m.result;
        row.rps.push(r.rps());
        row.p99_us.push(r.p99_us() as f64);
        if let Some(&cores) = m.cores.first() {
            row.cpu_us.push(cores / r.rps() * 1e6);
        }
        row.peak_rss = row.peak_rss.max(m.peaks.first().copied().unwrap_or(0));
        row.failed += r.errors;
    }
    let (_, _, body) = try_get(act.metrics, "/metrics", None, Duration::from_secs(10)).await?;
    row.metrics_bytes = body.len();
    Ok(row)
}

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let mut section = Section::new("Revisions: what each one costs the activator");
    let (counts, active_max): (&[usize], usize) = if ctx.smoke {
        (&[1, 100], 20)
    } else {
        (&[1, 100, 1_000, 10_000], ACTIVE)
    };
    let app = ctx.start_app().await;
    // Two pods, both queue-proxies in front of the one test app: the churn moves each
    // revision between both and the first alone.
    let qp1 = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "0")]).await;
    let qp2 = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "0")]).await;
    let pods = format!("{},{}", qp1.serving, qp2.serving);

    let mut rows = Vec::new();
    for &n in counts {
        match measure(&ctx, n, n.min(active_max), &pods).await {
            Ok(row) => rows.push(row),
            Err(e) => section.fail(format!("revisions: {n} registered: {e}")),
        }
    }
    let base_rps = rows
        .first()
        .filter(|r| r.revisions == 1)
        .map(|r| spread(&r.rps).0);

    let mut table = Table::new(&[
        "revisions",
        "with traffic",
        "start → serving ms",
        "RSS at rest MiB",
        "CPU at rest ms/s",
        "rps: median (min–max)",
        "rps ÷ 1 revision",
        "p99 ms",
        "CPU µs/req",
        "peak RSS MiB",
        "errors",
        "`/metrics` KB",
    ]);
    for r in &rows {
        let rps = spread(&r.rps).0;
        table.row(vec![
            group(r.revisions as u64),
            group(r.active as u64),
            format!("{:.0}", r.ready_ms),
            mib(r.rest_rss),
            format!("{:.1}", r.rest_cpu_ms_per_s),
            rps_spread(&r.rps),
            base_rps.map_or("–".to_owned(), |b| format!("{:.2}×", rps / b)),
            ms_spread(&r.p99_us),
            format!("{:.1}", spread(&r.cpu_us).0),
            mib(r.peak_rss),
            r.failed.to_string(),
            format!("{:.0}", r.metrics_bytes as f64 / 1e3),
        ]);
    }
    section.line(&table.render());
    section.line(&format!(
        "A fresh `thaw-scale-activator` per row: the activator (its server, registry, probing and metrics) on its in-memory platform, with N revisions registered at start and the first min(N, {active_max}) given pods; all the while, {UPDATES_PER_SEC} pod-set changes a second, round robin over those, move each between two pods (queue-proxies, CC=0, in front of one test app) and one. Start → serving: from spawning the process to the last revision with pods answering 200. At rest: RSS 1 s after that, and the process's user + sys CPU over {} s with only the churn running. Load: GET / over {CONNECTIONS} keep-alive connections, each request naming the next revision with traffic as its Host (every connection starting elsewhere), {} warm-up + {} measured, {} repetition(s); CPU µs/req as in the proxies table, the activator only. `/metrics` is its size after the load. Targets at 10 000 revisions, 1 000 with traffic: RSS ≤ 64 MiB, rps within 10 % of the one-revision row.",
        AT_REST.as_secs(),
        super::proxies::humantime(ctx.warmup),
        super::proxies::humantime(ctx.duration),
        ctx.reps,
    ));

    let mut stats = Table::new(&[
        "revisions in flight",
        "cut + encode µs: median (min–max)",
        "batch bytes",
    ]);
    let tracked: &[usize] = if ctx.smoke {
        &[1, 100]
    } else {
        &[1, 100, 1_000, 10_000]
    };
    for &n in tracked {
        wait_quiet(&ctx).await;
        match tokio::task::spawn_blocking(move || stat_report(n)).await {
            Ok((times, bytes)) => {
                let (m, lo, hi) = spread(&times);
                stats.row(vec![
                    group(n as u64),
                    format!("{m:.1} ({lo:.1}–{hi:.1})"),
                    group(bytes as u64),
                ]);
            }
            Err(e) => section.fail(format!("revisions: stat report, {n}: {e}")),
        }
    }
    section.line("\n### The per-second stat report\n");
    section.line(&stats.render());
    section.line(&format!(
        "What the activator's reporter does each second for the autoscaler, timed in this process: `RevisionStats::tick` (cut every tracked revision's window) and the `WireStatMessages` protobuf encoding, with every revision holding a request in flight and one more arriving between cuts; {TICKS} cuts per row, on one thread with nothing else runnable, so wall time bounds the CPU. Shown in µs. Target: ≤ 5 000 µs (5 ms) for 1 000 revisions."
    ));
    drop((qp1, qp2, app));
    section
}
