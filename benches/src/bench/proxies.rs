//! The main table: throughput, latency and memory of each path at each connection count,
//! interleaved over repetitions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use thaw_benches::harness::{Activator, QueueProxy};

use super::nginx::Nginx;
use super::{
    check_some_ok, group, median, mib, ms, ms_spread, panic_message, progress, rps_spread,
    run_with_rss, static_revision_yaml, wait_ok, Ctx, Measured, Section, Table,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Direct,
    Nginx,
    /// Two one-worker nginx in series: the reference for the activator → queue-proxy chain.
    NginxChain,
    QueueProxy {
        cc: usize,
    },
    /// The activator with the test app as its pod (the app answers the activator's
    /// probe as a queue-proxy would), no queue-proxy: compared with one nginx.
    ActivatorAlone {
        cc: usize,
    },
    Activator {
        cc: usize,
    },
    /// The activator path with tracing on in both proxies (every request sampled),
    /// exporting to a sink that answers every OTLP request at once.
    ActivatorTraced {
        cc: usize,
    },
}

/// Every scenario of the table, by its `--only` name, in order.
pub const SCENARIOS: [(&str, Path); 9] = [
    ("direct", Path::Direct),
    ("nginx", Path::Nginx),
    ("nginx-nginx", Path::NginxChain),
    ("qp-cc0", Path::QueueProxy { cc: 0 }),
    ("qp-cc100", Path::QueueProxy { cc: 100 }),
    ("activator-alone", Path::ActivatorAlone { cc: 0 }),
    ("activator-cc0", Path::Activator { cc: 0 }),
    ("activator-cc100", Path::Activator { cc: 100 }),
    ("activator-cc0-traced", Path::ActivatorTraced { cc: 0 }),
];

impl Path {
    pub fn label(self) -> String {
        match self {
            Path::Direct => "direct (test app)".to_owned(),
            Path::Nginx => "nginx, 1 worker".to_owned(),
            Path::NginxChain => "nginx → nginx, 1 worker each".to_owned(),
            Path::ActivatorAlone { cc } => format!("activator alone CC={cc}"),
            Path::QueueProxy { cc } => format!("queue-proxy CC={cc}"),
            Path::Activator { cc } => format!("activator → queue-proxy CC={cc}"),
            Path::ActivatorTraced { cc } => {
                format!("activator → queue-proxy CC={cc}, tracing on")
            }
        }
    }

    /// The reference row this path's ratios divide by: one nginx for one proxy, two in
    /// series for the activator → queue-proxy chain; none for the references themselves.
    fn reference(self) -> Option<Path> {
        match self {
            Path::Direct | Path::Nginx | Path::NginxChain => None,
            Path::QueueProxy { .. } | Path::ActivatorAlone { .. } => Some(Path::Nginx),
            Path::Activator { .. } | Path::ActivatorTraced { .. } => Some(Path::NginxChain),
        }
    }
}

/// One measured cell.
#[derive(Debug, Clone)]
struct Sample {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    /// Peak RSS (KiB) of the proxy (the activator on its rows).
    rss: Option<u64>,
    /// Peak RSS (KiB) of the queue-proxy behind the activator.
    behind_rss: Option<u64>,
    /// CPU (user + sys) the proxy processes used per request served, µs: every proxy
    /// of the path together (both nginx of the chain, activator plus queue-proxy).
    cpu_us: Option<f64>,
    /// Cores other processes used meanwhile.
    foreign: f64,
}

impl Sample {
    fn from(m: &Measured, rss: Option<u64>, behind_rss: Option<u64>) -> Sample {
        let r = &m.result;
        let cores: f64 = m.cores.iter().sum();
        let cpu_us = (!m.cores.is_empty() && r.rps() > 0.0).then(|| cores / r.rps() * 1e6);
        Sample {
            cpu_us,
            foreign: m.foreign,
            rps: r.rps(),
            p50: r.p50_us() as f64,
            p90: r.p90_us() as f64,
            p99: r.p99_us() as f64,
            max: r.max_us() as f64,
            errors: r.errors,
            statuses: r.statuses.clone(),
            rss,
            behind_rss,
        }
    }
}

/// The scenarios selected by `--only` (all by default).
pub fn selected(ctx: &Ctx) -> Result<Vec<Path>, String> {
    match &ctx.only {
        None => Ok(SCENARIOS.iter().map(|(_, p)| *p).collect()),
        Some(names) => {
            let mut out = Vec::new();
            for name in names {
                match SCENARIOS.iter().find(|(n, _)| n == name) {
                    Some((_, p)) => out.push(*p),
                    None => {
                        return Err(format!(
                            "unknown scenario {name:?}; the scenarios are: {}",
                            SCENARIOS.map(|(n, _)| n).join(", ")
                        ))
                    }
                }
            }
            // Keep the table's order whatever the order given.
            out.sort_by_key(|p| SCENARIOS.iter().position(|(_, q)| q == p));
            out.dedup();
            Ok(out)
        }
    }
}

/// Measures one cell: starts the path's fresh proxy processes in front of `app`, runs the
/// load, samples the proxy's RSS.
async fn cell(ctx: Arc<Ctx>, path: Path, app: SocketAddr, conns: usize) -> Result<Sample, String> {
    let flags = ctx.activator_args();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    match path {
        Path::Direct => {
            let spec = ctx.spec(app, "/", conns);
            let m = run_with_rss(&spec, &[]).await;
            check_some_ok("direct", &m.result)?;
            Ok(Sample::from(&m, None, None))
        }
        Path::Nginx => {
            let bin = ctx.nginx.clone().ok_or("nginx not found")?;
            let nginx = Nginx::start(&bin, app).await?;
            let worker = nginx.worker_pid().ok_or("no nginx worker process")?;
            let spec = ctx.spec(nginx.addr, "/", conns);
            let m = run_with_rss(&spec, &[worker]).await;
            nginx.stop().await;
            check_some_ok("nginx", &m.result)?;
            Ok(Sample::from(&m, Some(m.peaks[0]), None))
        }
        Path::NginxChain => {
            let bin = ctx.nginx.clone().ok_or("nginx not found")?;
            let back = Nginx::start(&bin, app).await?;
            let front = Nginx::start(&bin, back.addr).await?;
            let workers = [front.worker_pid(), back.worker_pid()];
            let [Some(front_worker), Some(back_worker)] = workers else {
                return Err("no nginx worker process".to_owned());
            };
            let spec = ctx.spec(front.addr, "/", conns);
            let m = run_with_rss(&spec, &[front_worker, back_worker]).await;
            front.stop().await;
            back.stop().await;
            check_some_ok(&path.label(), &m.result)?;
            Ok(Sample::from(&m, Some(m.peaks[0]), Some(m.peaks[1])))
        }
        Path::ActivatorAlone { cc } => {
            let act = Activator::start(&static_revision_yaml(app.port(), cc), &flags).await;
            wait_ok(act.http, "/", Some("hello.local")).await?;
            let spec = ctx.spec(act.http, "/", conns).header("host", "hello.local");
            let m = run_with_rss(&spec, &[act.pid()]).await;
            check_some_ok(&path.label(), &m.result)?;
            Ok(Sample::from(&m, Some(m.peaks[0]), None))
        }
        Path::QueueProxy { cc } => {
            let cc = cc.to_string();
            let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", &cc)]).await;
            let spec = ctx.spec(qp.serving, "/", conns);
            let m = run_with_rss(&spec, &[qp.pid() as u32]).await;
            check_some_ok(&path.label(), &m.result)?;
            Ok(Sample::from(&m, Some(m.peaks[0]), None))
        }
        Path::Activator { cc } => {
            let cc_s = cc.to_string();
            let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", &cc_s)]).await;
            let act = Activator::start(&static_revision_yaml(qp.serving.port(), cc), &flags).await;
            // The warm path: the activator has probed the pod and routes to it.
            wait_ok(act.http, "/", Some("hello.local")).await?;
            let spec = ctx.spec(act.http, "/", conns).header("host", "hello.local");
            let m = run_with_rss(&spec, &[act.pid(), qp.pid() as u32]).await;
            check_some_ok(&path.label(), &m.result)?;
            Ok(Sample::from(&m, Some(m.peaks[0]), Some(m.peaks[1])))
        }
        Path::ActivatorTraced { cc } => {
            let sink = OtlpSink::start().await?;
            let cc_s = cc.to_string();
            let observability = serde_json::json!({"tracing": {
                "protocol": "http/protobuf", "endpoint": sink.endpoint, "samplingRate": 1}})
            .to_string();
            let qp = QueueProxy::start(
                app.port(),
                &[
                    ("CONTAINER_CONCURRENCY", &cc_s),
                    ("OBSERVABILITY_CONFIG", &observability),
                ],
            )
            .await;
            let act = Activator::start(
                &static_revision_yaml(qp.serving.port(), cc),
                &[&flags[..], &["--tracing-endpoint", &sink.endpoint]].concat(),
            )
            .await;
            wait_ok(act.http, "/", Some("hello.local")).await?;
            let spec = ctx.spec(act.http, "/", conns).header("host", "hello.local");
            let m = run_with_rss(&spec, &[act.pid(), qp.pid() as u32]).await;
            check_some_ok(&path.label(), &m.result)?;
            let exported = sink.requests.load(std::sync::atomic::Ordering::Relaxed);
            if exported == 0 {
                return Err("no span reached the OTLP sink".to_owned());
            }
            Ok(Sample::from(&m, Some(m.peaks[0]), Some(m.peaks[1])))
        }
    }
}

/// A collector stand-in for the traced row: answers every request 200 at once, so the
/// row measures the proxies' tracing, not a collector. Counts the exports it received.
struct OtlpSink {
    endpoint: String,
    requests: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpSink {
    async fn start() -> Result<OtlpSink, String> {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("OTLP sink: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let counted = Arc::clone(&counted);
                            async move {
                                let _ = req.into_body().collect().await;
                                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(OtlpSink {
            endpoint: format!("http://{addr}"),
            requests,
            task,
        })
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let mut section = Section::new("Throughput, latency and memory per path");
    let paths = match selected(&ctx) {
        Ok(p) => p,
        Err(e) => {
            section.fail(e);
            return section;
        }
    };
    let paths: Vec<Path> = paths
        .into_iter()
        .filter(|p| !matches!(p, Path::Nginx | Path::NginxChain) || ctx.nginx.is_some())
        .collect();
    if ctx.nginx.is_none() {
        section.line("nginx not found: its rows are skipped (apt-get install nginx)\n");
        progress("nginx not found: its rows are skipped (apt-get install nginx)");
    }

    // samples[(path index, conns)] = one Sample per repetition.
    let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
    let mut failed: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for rep in 1..=ctx.reps {
        let app = ctx.start_app().await;
        for &conns in &ctx.connections {
            for (i, &path) in paths.iter().enumerate() {
                progress(&format!(
                    "rep {rep}/{}: {} at {conns} connections",
                    ctx.reps,
                    path.label()
                ));
                super::wait_quiet(&ctx).await;
                let task = tokio::spawn(cell(Arc::clone(&ctx), path, app.addr, conns));
                let outcome = match task.await {
                    Ok(r) => r,
                    Err(e) => Err(panic_message(e)),
                };
                match outcome {
                    Ok(s) => {
                        progress(&format!(
                            "  {} rps, p99 {} ms, errors {}, other processes' CPU {:.2} cores",
                            group(s.rps.round() as u64),
                            ms(s.p99),
                            s.errors,
                            s.foreign
                        ));
                        samples.entry((i, conns)).or_default().push(s);
                    }
                    Err(e) => {
                        let what = format!("{} at {conns} connections: {e}", path.label());
                        section.fail(what);
                        failed.entry((i, conns)).or_insert(e);
                    }
                }
            }
        }
        drop(app);
    }

    const COLUMNS: [&str; 15] = [
        "path",
        "conns",
        "CPU µs/req: median (min–max)",
        "CPU ÷ ref",
        "rps: median (min–max)",
        "rps ÷ ref",
        "p50 ms",
        "p90 ms",
        "p99 ms: median (min–max)",
        "p99 ÷ ref",
        "max ms",
        "errors",
        "peak RSS MiB",
        "ref",
        "other CPU",
    ];
    let mut table = Table::new(&COLUMNS);
    let mut notes = Vec::new();
    for &conns in &ctx.connections {
        // The medians of a path's cells at this connection count: (cpu, rps, p99).
        let medians = |path: Path| {
            let i = paths.iter().position(|p| *p == path)?;
            let s = samples.get(&(i, conns))?;
            let cpu: Vec<f64> = s.iter().filter_map(|x| x.cpu_us).collect();
            Some((
                (!cpu.is_empty()).then(|| median(&cpu)),
                median(&s.iter().map(|x| x.rps).collect::<Vec<_>>()),
                median(&s.iter().map(|x| x.p99).collect::<Vec<_>>()),
            ))
        };
        for (i, &path) in paths.iter().enumerate() {
            let Some(s) = samples.get(&(i, conns)) else {
                let why = failed.get(&(i, conns)).cloned().unwrap_or_default();
                let mut cells = vec![path.label(), conns.to_string(), format!("FAILED: {why}")];
                cells.resize(COLUMNS.len(), String::new());
                table.row(cells);
                continue;
            };
            let col = |f: fn(&Sample) -> f64| s.iter().map(f).collect::<Vec<f64>>();
            let rps = col(|x| x.rps);
            let p99 = col(|x| x.p99);
            let cpu: Vec<f64> = s.iter().filter_map(|x| x.cpu_us).collect();
            let max = s.iter().map(|x| x.max).fold(0.0, f64::max);
            let errors: u64 = s.iter().map(|x| x.errors).sum();
            let rss = s.iter().filter_map(|x| x.rss).max();
            let reference = path.reference().and_then(|r| Some((r, medians(r)?)));
            let ratio = |ours: f64, theirs: f64| format!("{:.2}×", ours / theirs);
            let dash = || "—".to_owned();
            let (cpu_ratio, rps_ratio, p99_ratio, ref_label) = match reference {
                None => (dash(), dash(), dash(), dash()),
                Some((r, (ref_cpu, ref_rps, ref_p99))) => (
                    match (cpu.is_empty(), ref_cpu) {
                        (false, Some(c)) => ratio(median(&cpu), c),
                        _ => dash(),
                    },
                    ratio(median(&rps), ref_rps),
                    ratio(median(&p99), ref_p99),
                    match r {
                        Path::NginxChain => "nginx → nginx".to_owned(),
                        _ => "nginx".to_owned(),
                    },
                ),
            };
            if errors > 0 {
                let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
                for x in s {
                    for (k, v) in &x.statuses {
                        *statuses.entry(*k).or_default() += v;
                    }
                }
                notes.push(format!(
                    "{} at {conns} connections: {errors} errors over {} runs; statuses {:?}",
                    path.label(),
                    s.len(),
                    statuses
                ));
            }
            if let Some(behind) = s.iter().filter_map(|x| x.behind_rss).max() {
                let (front, back) = match path {
                    Path::NginxChain => ("front nginx worker", "nginx worker behind it"),
                    _ => ("activator", "queue-proxy behind it"),
                };
                notes.push(format!(
                    "{} at {conns} connections: the RSS column is the {front}'s; the {back} peaked at {} MiB",
                    path.label(),
                    mib(behind)
                ));
            }
            table.row(vec![
                path.label(),
                conns.to_string(),
                if cpu.is_empty() {
                    dash()
                } else {
                    cpu_spread(&cpu)
                },
                cpu_ratio,
                rps_spread(&rps),
                rps_ratio,
                ms(median(&col(|x| x.p50))),
                ms(median(&col(|x| x.p90))),
                ms_spread(&p99),
                p99_ratio,
                ms(max),
                errors.to_string(),
                rss.map_or("—".to_owned(), mib),
                ref_label,
                format!("{:.2}", s.iter().map(|x| x.foreign).fold(0.0, f64::max)),
            ]);
        }
    }
    section.line(&table.render());
    section.line(&format!(
        "GET / (12-byte `hello world` body) over HTTP/1.1 keep-alive, closed loop, {} warm-up + {} measured per cell, {} repetition(s) interleaved (every path once per repetition, one test app process per repetition, a fresh proxy process per cell). rps and p99 show the median and the min–max over repetitions; p50 and p90 are medians; max is the worst of all repetitions; errors are summed; peak RSS is the highest of the 100 ms samples during the measured windows (nginx: its worker process). CPU µs/req is the user + sys CPU time (from `/proc/PID/stat`) of the path's proxy processes over the measured window, every proxy of the path added up (the activator and the queue-proxy behind it; both nginx workers of the chain), divided by the requests served in it; the load generator and the app are not counted. Ratios divide medians by the reference row's (`ref`) at the same connection count: one nginx for one proxy, nginx → nginx for the activator → queue-proxy chain. \"other CPU\" is the most CPU (in cores, of {}) that processes outside this bench and its children used during one of the cell's measured windows, plus hypervisor steal: well above 0 means the machine was not quiet and that cell's spread is noise.",
        humantime(ctx.warmup),
        humantime(ctx.duration),
        ctx.reps,
        std::thread::available_parallelism().map_or(2, |n| n.get())
    ));
    if !notes.is_empty() {
        section.line("");
        for n in notes {
            section.line(&format!("- {n}"));
        }
    }
    section
}

/// `21.4 (20.9–22.8)` µs per request.
pub(super) fn cpu_spread(values: &[f64]) -> String {
    let (m, lo, hi) = super::spread(values);
    if values.len() < 2 {
        format!("{m:.1}")
    } else {
        format!("{m:.1} ({lo:.1}–{hi:.1})")
    }
}

pub fn humantime(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
