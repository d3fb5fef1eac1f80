//! HTTP/2 without TLS (h2c, prior knowledge) through the queue-proxy against nginx's
//! `http2` listener, driven by h2load: 1 and 8 connections, 100 streams each.
//!
//! nginx speaks HTTP/1.1 keep-alive to the test app; the queue-proxy forwards each h2
//! request as h2c on one shared connection, as Knative's queue-proxy does, so the app
//! serves h2 behind it and HTTP/1.1 behind nginx. h2load drives the load because the
//! in-tree generator speaks HTTP/1.1 only; it is a C client, so the generator's cost is the
//! same for both.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use thaw_benches::harness::{self, QueueProxy};

use super::nginx::{Listen, Nginx};
use super::{group, median, mib, ms, progress, rps_spread, sample_during, Ctx, Section, Table};

/// Connections per cell, each with [`STREAMS`] concurrent streams.
const CONNECTIONS: [usize; 2] = [1, 8];
/// Concurrent streams per connection (h2load `-m`); nginx allows 128 by default.
const STREAMS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2Path {
    Nginx,
    QueueProxy,
}

impl H2Path {
    fn label(self) -> &'static str {
        match self {
            H2Path::Nginx => "nginx `listen … http2`, 1 worker",
            H2Path::QueueProxy => "queue-proxy CC=0",
        }
    }
}

/// The h2load binary, if installed (Debian's `nghttp2-client`).
pub fn find_h2load() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("h2load"))
        .find(|p| p.is_file())
}

/// The figures read from h2load's report.
#[derive(Debug, Clone, PartialEq)]
struct H2loadReport {
    rps: f64,
    succeeded: u64,
    /// failed + errored + timed out.
    failed: u64,
    /// Responses that were not 2xx.
    not_2xx: u64,
    mean_us: f64,
    max_us: f64,
}

/// `91us`, `5.12ms`, `1.2s` → µs.
fn parse_h2load_time(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// Reads the `finished in`, `requests:`, `status codes:` and `time for request:` lines.
fn parse_h2load(text: &str) -> Option<H2loadReport> {
    let line = |prefix: &str| text.lines().find(|l| l.trim_start().starts_with(prefix));
    // `finished in 5.00s, 52345.60 req/s, 1.84MB/s`
    let rps = line("finished in")?
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" req/s"))?
        .trim()
        .parse()
        .ok()?;
    // `requests: 10 total, 10 started, 10 done, 9 succeeded, 1 failed, 0 errored, 0 timeout`
    let requests = line("requests:")?;
    let count = |what: &str| -> Option<u64> {
        requests.split(',').find_map(|part| {
            let part = part.trim().trim_start_matches("requests:").trim();
            let (n, name) = part.split_once(' ')?;
            (name == what).then(|| n.parse().ok()).flatten()
        })
    };
    // `status codes: 9 2xx, 0 3xx, 1 4xx, 0 5xx`
    let statuses = line("status codes:")?;
    let mut not_2xx = 0;
    for part in statuses
        .trim_start()
        .trim_start_matches("status codes:")
        .split(',')
    {
        let (n, class) = part.trim().split_once(' ')?;
        if class != "2xx" {
            not_2xx += n.parse::<u64>().ok()?;
        }
    }
    // `time for request:       91us      5.12ms      3.20ms      1.47ms    81.54%`
    // (min, max, mean, sd, +/- sd)
    let times: Vec<&str> = line("time for request:")?
        .trim_start()
        .trim_start_matches("time for request:")
        .split_whitespace()
        .collect();
    Some(H2loadReport {
        rps,
        succeeded: count("succeeded")?,
        failed: count("failed")? + count("errored")? + count("timeout")?,
        not_2xx,
        max_us: parse_h2load_time(times.get(1)?)?,
        mean_us: parse_h2load_time(times.get(2)?)?,
    })
}

/// h2load's duration syntax, in milliseconds so that smoke runs' fractions survive.
fn h2load_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Runs h2load against `addr` for the context's warm-up and measured window.
async fn h2load(
    bin: &PathBuf,
    ctx: &Ctx,
    addr: SocketAddr,
    conns: usize,
) -> Result<H2loadReport, String> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = match ctx.load_threads {
        0 => cpus,
        n => n,
    }
    .min(conns);
    let out = harness::child(bin)
        .args([
            "-c",
            &conns.to_string(),
            "-m",
            &STREAMS.to_string(),
            "-t",
            &threads.to_string(),
            "--warm-up-time",
            &h2load_duration(ctx.warmup),
            "-D",
            &h2load_duration(ctx.duration),
            &format!("http://{addr}/"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| format!("start {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&text).ok_or_else(|| {
        format!(
            "could not read h2load's report ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One measured cell.
#[derive(Debug, Clone)]
struct Sample {
    report: H2loadReport,
    cpu_us: Option<f64>,
    rss: u64,
    foreign: f64,
}

async fn cell(
    ctx: Arc<Ctx>,
    h2load_bin: PathBuf,
    path: H2Path,
    app: SocketAddr,
    conns: usize,
) -> Result<Sample, String> {
    let (report, sampled) = match path {
        H2Path::Nginx => {
            let bin = ctx.nginx.clone().ok_or("nginx not found")?;
            let nginx = Nginx::start_with(&bin, app, Listen::H2c).await?;
            let worker = nginx.worker_pid().ok_or("no nginx worker process")?;
            let run = h2load(&h2load_bin, &ctx, nginx.addr, conns);
            let measured = sample_during(ctx.warmup, &[worker], run).await;
            nginx.stop().await;
            measured
        }
        H2Path::QueueProxy => {
            let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "0")]).await;
            let pid = u32::try_from(qp.pid()).map_err(|e| e.to_string())?;
            let run = h2load(&h2load_bin, &ctx, qp.serving, conns);
            sample_during(ctx.warmup, &[pid], run).await
        }
    };
    let report = report?;
    if report.succeeded == 0 {
        return Err(format!("no request succeeded: {report:?}"));
    }
    let cores: f64 = sampled.cores.iter().sum();
    Ok(Sample {
        cpu_us: (report.rps > 0.0).then(|| cores / report.rps * 1e6),
        rss: sampled.peaks.first().copied().unwrap_or(0),
        foreign: sampled.foreign,
        report,
    })
}

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let mut section = Section::new(&format!(
        "HTTP/2 (h2c, prior knowledge): {STREAMS} streams per connection"
    ));
    let Some(h2load_bin) = find_h2load() else {
        section
            .line("h2load not found: this section is skipped (apt-get install nghttp2-client)\n");
        progress("h2load not found: the h2c section is skipped (apt-get install nghttp2-client)");
        return section;
    };
    let paths: Vec<H2Path> = [H2Path::Nginx, H2Path::QueueProxy]
        .into_iter()
        .filter(|p| *p != H2Path::Nginx || ctx.nginx.is_some())
        .collect();
    if ctx.nginx.is_none() {
        section.line("nginx not found: its row is skipped (apt-get install nginx)\n");
    }

    let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
    let mut failed: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for rep in 1..=ctx.reps {
        let app = ctx.start_app().await;
        for conns in CONNECTIONS {
            for (i, &path) in paths.iter().enumerate() {
                progress(&format!(
                    "rep {rep}/{}: h2c {} at {conns} connections × {STREAMS} streams",
                    ctx.reps,
                    path.label()
                ));
                super::wait_quiet(&ctx).await;
                let task = tokio::spawn(cell(
                    Arc::clone(&ctx),
                    h2load_bin.clone(),
                    path,
                    app.addr,
                    conns,
                ));
                let outcome = match task.await {
                    Ok(r) => r,
                    Err(e) => Err(super::panic_message(e)),
                };
                match outcome {
                    Ok(s) => {
                        progress(&format!(
                            "  {} rps, mean {} ms, failed {}, other processes' CPU {:.2} cores",
                            group(s.report.rps.round() as u64),
                            ms(s.report.mean_us),
                            s.report.failed,
                            s.foreign
                        ));
                        samples.entry((i, conns)).or_default().push(s);
                    }
                    Err(e) => {
                        section.fail(format!("h2c {} at {conns} connections: {e}", path.label()));
                        failed.entry((i, conns)).or_insert(e);
                    }
                }
            }
        }
        drop(app);
    }

    const COLUMNS: [&str; 11] = [
        "path",
        "conns × streams",
        "CPU µs/req: median (min–max)",
        "CPU ÷ nginx",
        "rps: median (min–max)",
        "rps ÷ nginx",
        "mean ms",
        "max ms",
        "failed + non-2xx",
        "peak RSS MiB",
        "other CPU",
    ];
    let mut table = Table::new(&COLUMNS);
    let nginx_index = paths.iter().position(|p| *p == H2Path::Nginx);
    for conns in CONNECTIONS {
        let reference = nginx_index.and_then(|i| samples.get(&(i, conns))).map(|s| {
            let cpu: Vec<f64> = s.iter().filter_map(|x| x.cpu_us).collect();
            (
                (!cpu.is_empty()).then(|| median(&cpu)),
                median(&s.iter().map(|x| x.report.rps).collect::<Vec<_>>()),
            )
        });
        for (i, &path) in paths.iter().enumerate() {
            let shape = format!("{conns} × {STREAMS}");
            let Some(s) = samples.get(&(i, conns)) else {
                let why = failed.get(&(i, conns)).cloned().unwrap_or_default();
                let mut cells = vec![path.label().to_owned(), shape, format!("FAILED: {why}")];
                cells.resize(COLUMNS.len(), String::new());
                table.row(cells);
                continue;
            };
            let rps: Vec<f64> = s.iter().map(|x| x.report.rps).collect();
            let cpu: Vec<f64> = s.iter().filter_map(|x| x.cpu_us).collect();
            let dash = || "—".to_owned();
            let ratio = |ours: f64, theirs: f64| format!("{:.2}×", ours / theirs);
            let (cpu_ratio, rps_ratio) = match (path, reference) {
                (H2Path::QueueProxy, Some((ref_cpu, ref_rps))) => (
                    match (cpu.is_empty(), ref_cpu) {
                        (false, Some(c)) => ratio(median(&cpu), c),
                        _ => dash(),
                    },
                    ratio(median(&rps), ref_rps),
                ),
                _ => (dash(), dash()),
            };
            table.row(vec![
                path.label().to_owned(),
                shape,
                if cpu.is_empty() {
                    dash()
                } else {
                    super::proxies::cpu_spread(&cpu)
                },
                cpu_ratio,
                rps_spread(&rps),
                rps_ratio,
                ms(median(
                    &s.iter().map(|x| x.report.mean_us).collect::<Vec<_>>(),
                )),
                ms(s.iter().map(|x| x.report.max_us).fold(0.0, f64::max)),
                s.iter()
                    .map(|x| x.report.failed + x.report.not_2xx)
                    .sum::<u64>()
                    .to_string(),
                mib(s.iter().map(|x| x.rss).max().unwrap_or(0)),
                format!("{:.2}", s.iter().map(|x| x.foreign).fold(0.0, f64::max)),
            ]);
        }
    }
    section.line(&table.render());
    section.line(&format!(
        "GET / (12-byte body) over h2c with prior knowledge: `h2load -c <conns> -m {STREAMS} -t <min(conns, cores)> --warm-up-time {} -D {}`, {} repetition(s) interleaved, a fresh proxy process per cell, the same test app behind both (nginx speaks HTTP/1.1 keep-alive to it; the queue-proxy forwards h2 as h2c, as Knative's does). h2load reports no percentiles, so latency is its mean and max; the target is rps. CPU µs/req is the proxy's user + sys CPU (nginx: its worker) over the measured window ÷ requests served. Ratios divide medians by nginx's at the same shape.",
        h2load_duration(ctx.warmup),
        h2load_duration(ctx.duration),
        ctx.reps,
    ));
    section
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "starting benchmark...
spawning thread #0: 8 total client(s). Timing-based test with 1s of warm-up time and 5s of main duration for measurements.
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 6.00s, 52345.60 req/s, 1.84MB/s
requests: 261728 total, 262528 started, 261728 done, 261720 succeeded, 5 failed, 2 errored, 1 timeout
status codes: 261700 2xx, 0 3xx, 20 4xx, 3 5xx
traffic: 9.21MB (9657152) total, 1.50MB (1570368) headers (space savings 90.14%), 3.00MB (3140736) data
                     min         max         mean         sd        +/- sd
time for request:       91us      1.02s      3.20ms      1.47ms    81.54%
time for connect:      131us       512us       267us       115us    87.50%
";

    #[test]
    fn reads_h2loads_report() {
        let r = parse_h2load(REPORT).unwrap();
        assert_eq!(r.rps, 52345.60);
        assert_eq!(r.succeeded, 261720);
        assert_eq!(r.failed, 8);
        assert_eq!(r.not_2xx, 23);
        assert_eq!(r.mean_us, 3200.0);
        assert_eq!(r.max_us, 1.02e6);
    }

    #[test]
    fn an_unfinished_report_is_none() {
        assert_eq!(parse_h2load("starting benchmark...\n"), None);
        let no_times = REPORT.replace("time for request:", "time for nothing:");
        assert_eq!(parse_h2load(&no_times), None);
    }

    #[test]
    fn durations_keep_fractions() {
        assert_eq!(h2load_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(h2load_duration(Duration::from_secs(10)), "10000ms");
        assert_eq!(parse_h2load_time("91us"), Some(91.0));
        assert_eq!(parse_h2load_time("5.12ms"), Some(5120.0));
        assert_eq!(parse_h2load_time("2s"), Some(2e6));
        assert_eq!(parse_h2load_time("fast"), None);
    }
}
