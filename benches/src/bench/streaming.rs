//! Streaming: 1 MiB response bodies through each path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use thaw_benches::harness::QueueProxy;

use super::nginx::Nginx;
use super::{
    check_some_ok, median, mib, panic_message, progress, run_with_rss, spread, Ctx, Section, Table,
};

const BODY: usize = 1 << 20;
const CONNS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Path {
    Direct,
    Nginx,
    QueueProxy,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct (test app)",
            Path::Nginx => "nginx, 1 worker",
            Path::QueueProxy => "queue-proxy CC=0",
        }
    }
}

struct Sample {
    mib_s: f64,
    rps: f64,
    errors: u64,
    rss: Option<u64>,
}

async fn cell(ctx: Arc<Ctx>, path: Path, app: SocketAddr) -> Result<Sample, String> {
    let url = format!("/bytes?n={BODY}");
    let (r, rss) = match path {
        Path::Direct => {
            let m = run_with_rss(&ctx.spec(app, &url, CONNS), &[]).await;
            (m.result, None)
        }
        Path::Nginx => {
            let bin = ctx.nginx.clone().ok_or("nginx not found")?;
            let nginx = Nginx::start(&bin, app).await?;
            let worker = nginx.worker_pid().ok_or("no nginx worker process")?;
            let m = run_with_rss(&ctx.spec(nginx.addr, &url, CONNS), &[worker]).await;
            nginx.stop().await;
            (m.result, Some(m.peaks[0]))
        }
        Path::QueueProxy => {
            let qp = QueueProxy::start(app.port(), &[]).await;
            let m = run_with_rss(&ctx.spec(qp.serving, &url, CONNS), &[qp.pid() as u32]).await;
            (m.result, Some(m.peaks[0]))
        }
    };
    check_some_ok(path.label(), &r)?;
    let short = r.ok * BODY as u64 != r.bytes && r.transport_errors == 0;
    if short {
        return Err(format!(
            "{}: read {} bytes for {} responses of {BODY}",
            path.label(),
            r.bytes,
            r.ok
        ));
    }
    Ok(Sample {
        mib_s: r.mib_per_sec(),
        rps: r.rps(),
        errors: r.errors,
        rss,
    })
}

fn fmt_spread(values: &[f64], digits: usize) -> String {
    let (m, lo, hi) = spread(values);
    if values.len() < 2 {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
    }
}

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let mut section = Section::new("Streaming: 1 MiB responses, 8 connections");
    let mut paths = vec![Path::Direct, Path::Nginx, Path::QueueProxy];
    if ctx.nginx.is_none() {
        paths.retain(|p| *p != Path::Nginx);
        section.line("nginx not found: its rows are skipped (apt-get install nginx)\n");
    }
    let mut samples: BTreeMap<Path, Vec<Sample>> = BTreeMap::new();
    let mut failed: BTreeMap<Path, String> = BTreeMap::new();
    for rep in 1..=ctx.reps {
        let app = ctx.start_app().await;
        for &path in &paths {
            progress(&format!(
                "rep {rep}/{}: streaming 1 MiB bodies, {}",
                ctx.reps,
                path.label()
            ));
            super::wait_quiet(&ctx).await;
            let outcome = match tokio::spawn(cell(Arc::clone(&ctx), path, app.addr)).await {
                Ok(r) => r,
                Err(e) => Err(panic_message(e)),
            };
            match outcome {
                Ok(s) => samples.entry(path).or_default().push(s),
                Err(e) => {
                    section.fail(format!("streaming via {}: {e}", path.label()));
                    failed.entry(path).or_insert(e);
                }
            }
        }
    }
    let mut table = Table::new(&[
        "path",
        "MiB/s: median (min–max)",
        "rps: median (min–max)",
        "errors",
        "peak RSS MiB",
        "MiB/s ÷ nginx",
    ]);
    let nginx = samples
        .get(&Path::Nginx)
        .map(|s| median(&s.iter().map(|x| x.mib_s).collect::<Vec<_>>()));
    for &path in &paths {
        let Some(s) = samples.get(&path) else {
            let why = failed.get(&path).cloned().unwrap_or_default();
            table.row(vec![
                path.label().to_owned(),
                format!("FAILED: {why}"),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
            continue;
        };
        let mib_s: Vec<f64> = s.iter().map(|x| x.mib_s).collect();
        let rps: Vec<f64> = s.iter().map(|x| x.rps).collect();
        let ratio = match (path, nginx) {
            (Path::QueueProxy, Some(n)) => format!("{:.2}×", median(&mib_s) / n),
            _ => "—".to_owned(),
        };
        table.row(vec![
            path.label().to_owned(),
            fmt_spread(&mib_s, 0),
            fmt_spread(&rps, 0),
            s.iter().map(|x| x.errors).sum::<u64>().to_string(),
            s.iter()
                .filter_map(|x| x.rss)
                .max()
                .map_or("—".to_owned(), mib),
            ratio,
        ]);
    }
    section.line(&table.render());
    section.line(&format!(
        "GET /bytes?n=1048576 (content-length set), {CONNS} keep-alive connections, closed loop; MiB/s is response body bytes read in the measured window ÷ its length. {} repetition(s) interleaved, {} warm-up + {} measured each.",
        ctx.reps,
        super::proxies::humantime(ctx.warmup),
        super::proxies::humantime(ctx.duration),
    ));
    section
}
