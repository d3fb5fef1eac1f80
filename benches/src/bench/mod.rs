//! The bench binary's scenarios and the helpers they share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod coldstart;
pub mod h2c;
pub mod memory;
pub mod misc;
pub mod nginx;
pub mod overload;
pub mod parked;
pub mod proxies;
pub mod revisions;
pub mod soak;
pub mod streaming;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use thaw_benches::harness;
use thaw_benches::load::{self, LoadResult, LoadSpec};

/// Settings every scenario reads.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub duration: Duration,
    pub warmup: Duration,
    pub reps: usize,
    pub connections: Vec<usize>,
    pub only: Option<Vec<String>>,
    pub smoke: bool,
    pub parked: usize,
    pub coldstart_runs: usize,
    /// `--threads` of the test app; 0 = its default (one per core).
    pub app_threads: usize,
    /// Worker threads of the activator in the main table; 0 = its default (one per CPU).
    pub activator_threads: usize,
    /// Worker threads of the load generator; 0 = one per CPU.
    pub load_threads: usize,
    pub load_scheduler: load::Scheduler,
    /// Longest wait for a quiet machine before each measurement; zero = none.
    pub quiet_wait: Duration,
    /// The nginx binary, if installed.
    pub nginx: Option<PathBuf>,
    /// The soak's seed.
    pub seed: u64,
}

impl Ctx {
    /// A load spec with this context's timing and generator threads.
    pub fn spec(&self, addr: SocketAddr, path: &str, connections: usize) -> LoadSpec {
        let mut spec = LoadSpec::get(addr, path, connections).timing(self.warmup, self.duration);
        spec.threads = self.load_threads;
        spec.scheduler = self.load_scheduler;
        spec
    }

    /// Arguments for the test app.
    pub fn app_args(&self) -> Vec<String> {
        if self.app_threads == 0 {
            Vec::new()
        } else {
            vec!["--threads".to_owned(), self.app_threads.to_string()]
        }
    }

    /// The activator's flags for its runtime in the main table.
    pub fn activator_args(&self) -> Vec<String> {
        match self.activator_threads {
            0 => Vec::new(),
            n => vec!["--worker-threads".to_owned(), n.to_string()],
        }
    }

    pub async fn start_app(&self) -> harness::App {
        let args = self.app_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        harness::App::start(&args).await
    }
}

/// One printed section of the report.
#[derive(Debug, Default)]
pub struct Section {
    pub markdown: String,
    pub failures: Vec<String>,
}

impl Section {
    pub fn new(title: &str) -> Section {
        Section {
            markdown: format!("## {title}\n\n"),
            failures: Vec::new(),
        }
    }

    pub fn line(&mut self, text: &str) {
        self.markdown.push_str(text);
        self.markdown.push('\n');
    }

    pub fn fail(&mut self, what: String) {
        progress(&format!("FAILED: {what}"));
        self.failures.push(what);
    }
}

/// A progress line on stderr.
pub fn progress(text: &str) {
    eprintln!("[thaw-benches] {text}");
}

/// A markdown table.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("| {} |\n", self.header.join(" | ")));
        out.push_str(&format!(
            "|{}\n",
            self.header
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        ));
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------

/// `41230` → `41 230`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let head = match s.len() % 3 {
        0 => 3,
        r => r,
    };
    let mut out = s[..head].to_owned();
    let mut rest = &s[head..];
    while !rest.is_empty() {
        out.push(' ');
        out.push_str(&rest[..3]);
        rest = &rest[3..];
    }
    out
}

/// Microseconds as milliseconds with a precision that suits the size.
pub fn ms(us: f64) -> String {
    let v = us / 1000.0;
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The median (mean of the middle two for an even count), min and max.
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// `41 230 (39 800–42 100)`, or just the value for one sample.
pub fn rps_spread(values: &[f64]) -> String {
    let (m, lo, hi) = spread(values);
    if values.len() < 2 {
        group(m.round() as u64)
    } else {
        format!(
            "{} ({}–{})",
            group(m.round() as u64),
            group(lo.round() as u64),
            group(hi.round() as u64)
        )
    }
}

/// `1.31 (1.20–1.45)` in ms from µs values.
pub fn ms_spread(values_us: &[f64]) -> String {
    let (m, lo, hi) = spread(values_us);
    if values_us.len() < 2 {
        ms(m)
    } else {
        format!("{} ({}–{})", ms(m), ms(lo), ms(hi))
    }
}

pub fn median(values: &[f64]) -> f64 {
    spread(values).0
}

// ---------------------------------------------------------------------------------------
// Processes and HTTP
// ---------------------------------------------------------------------------------------

/// What [`run_with_rss`] measured.
pub struct Measured {
    pub result: LoadResult,
    /// Peak RSS (KiB) per pid given, over the measured window.
    pub peaks: Vec<u64>,
    /// Cores (user + sys CPU time ÷ wall time) per pid given, over the measured window.
    pub cores: Vec<f64>,
    /// CPU (in cores) that processes other than this bench and its children used during
    /// the measured window, plus time stolen by the hypervisor: the machine's noise.
    pub foreign: f64,
}

/// Runs `spec` while sampling the peak RSS of `pids` every 100 ms during the measured
/// window, and how busy the rest of the machine was meanwhile.
pub async fn run_with_rss(spec: &LoadSpec, pids: &[u32]) -> Measured {
    let (result, sampled) = sample_during(spec.warmup, pids, load::run_async(spec)).await;
    Measured {
        result,
        peaks: sampled.peaks,
        cores: sampled.cores,
        foreign: sampled.foreign,
    }
}

/// What [`sample_during`] saw of `pids` from the end of the warm-up to the end of the load.
pub struct Sampled {
    /// Peak RSS (KiB) per pid.
    pub peaks: Vec<u64>,
    /// Cores (user + sys CPU time ÷ wall time) per pid.
    pub cores: Vec<f64>,
    /// Cores used by processes outside this bench's tree, plus hypervisor steal.
    pub foreign: f64,
}

/// Drives `load` (which warms up for `warmup` before it measures) while sampling `pids`
/// over its measured window: the in-tree generator and an external one such as h2load
/// are measured the same way.
pub async fn sample_during<F: std::future::Future>(
    warmup: Duration,
    pids: &[u32],
    load: F,
) -> (F::Output, Sampled) {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        let pids = pids.to_vec();
        tokio::spawn(async move {
            let mut peaks = vec![0u64; pids.len()];
            tokio::time::sleep(warmup).await;
            let started = std::time::Instant::now();
            let cpu0 = CpuSnapshot::take();
            let own0: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
            loop {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    *peak = (*peak).max(harness::rss_kib(*pid));
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let elapsed = started.elapsed();
            let cores = pids
                .iter()
                .zip(&own0)
                .map(|(p, t0)| {
                    cpu_time(*p).saturating_sub(*t0).as_secs_f64() / elapsed.as_secs_f64()
                })
                .collect();
            let foreign = CpuSnapshot::take().foreign_since(&cpu0, elapsed);
            Sampled {
                peaks,
                cores,
                foreign,
            }
        })
    };
    let output = load.await;
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.await.expect("rss sampler");
    (output, sampled)
}

/// CPU time of the whole machine and of this process tree at one instant.
struct CpuSnapshot {
    /// user + nice + system of every CPU, from `/proc/stat`.
    busy: Duration,
    /// Time stolen by the hypervisor.
    steal: Duration,
    /// CPU time of this process and its descendants.
    ours: Duration,
}

impl CpuSnapshot {
    fn take() -> CpuSnapshot {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let tick = |i: usize| Duration::from_millis(fields.get(i).copied().unwrap_or(0) * 10);
        let ours = process_tree(std::process::id())
            .into_iter()
            .map(cpu_time)
            .sum();
        CpuSnapshot {
            busy: tick(0) + tick(1) + tick(2),
            steal: tick(7),
            ours,
        }
    }

    /// Cores used by others between `earlier` and now.
    fn foreign_since(&self, earlier: &CpuSnapshot, wall: Duration) -> f64 {
        let busy = self.busy.saturating_sub(earlier.busy);
        let ours = self.ours.saturating_sub(earlier.ours);
        let steal = self.steal.saturating_sub(earlier.steal);
        (busy.saturating_sub(ours) + steal).as_secs_f64() / wall.as_secs_f64().max(1e-3)
    }
}

/// Cores that processes other than this bench and its children use, over `window`.
pub async fn foreign_cpu(window: Duration) -> f64 {
    let before = CpuSnapshot::take();
    let started = std::time::Instant::now();
    tokio::time::sleep(window).await;
    CpuSnapshot::take().foreign_since(&before, started.elapsed())
}

/// Waits (at most `ctx.quiet_wait`) until other processes use less than 0.15 cores, so
/// that a measurement does not share the machine with, say, a compiler.
pub async fn wait_quiet(ctx: &Ctx) {
    if ctx.quiet_wait.is_zero() {
        return;
    }
    let deadline = std::time::Instant::now() + ctx.quiet_wait;
    let mut said = false;
    loop {
        let busy = foreign_cpu(Duration::from_millis(500)).await;
        if busy < 0.15 {
            return;
        }
        if std::time::Instant::now() >= deadline {
            progress(&format!(
                "  the machine is still busy ({busy:.2} cores used by other processes); measuring anyway"
            ));
            return;
        }
        if !said {
            progress(&format!(
                "  waiting up to {:?} for other processes to quieten (they use {busy:.2} cores)",
                ctx.quiet_wait
            ));
            said = true;
        }
    }
}

/// `root` and every process descending from it.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// One GET with optional Host, on a fresh connection, with a timeout.
pub async fn try_get(
    addr: SocketAddr,
    path: &str,
    host: Option<&str>,
    limit: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(host) = host {
        req = req.header("host", host);
    }
    let req = req
        .body(Full::<Bytes>::default())
        .map_err(|e| e.to_string())?;
    let client = harness::http1_client();
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((parts.status, parts.headers, body))
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("GET {path} timed out after {limit:?}"))?
}

/// Waits until a GET answers 200 (the warm path is up).
pub async fn wait_ok(addr: SocketAddr, path: &str, host: Option<&str>) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + harness::EVENTUALLY;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match try_get(addr, path, host, Duration::from_secs(5)).await {
            Ok((status, _, _)) if status == StatusCode::OK => return Ok(()),
            Ok((status, _, body)) => {
                last = format!("{status} {}", String::from_utf8_lossy(&body).trim())
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!(
        "no 200 from {addr}{path} within {:?}; last: {last}",
        harness::EVENTUALLY
    ))
}

/// The sum of every sample of `name` in Prometheus text, if any.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let rest = match line.strip_prefix(name) {
            Some(rest) if rest.starts_with('{') || rest.starts_with(' ') => rest,
            _ => continue,
        };
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// The activator's `name` metric (summed over revisions), without panicking.
pub async fn activator_metric(act: &harness::Activator, name: &str) -> Option<f64> {
    let (status, _, body) = try_get(act.metrics, "/metrics", None, Duration::from_secs(5))
        .await
        .ok()?;
    if status != StatusCode::OK {
        return None;
    }
    metric_sum(&String::from_utf8_lossy(&body), name)
}

/// The local platform YAML for one revision `hello` (Host `hello.local`) served by the
/// queue-proxy at `127.0.0.1:port` (static endpoints, no scaling).
pub fn static_revision_yaml(port: u16, cc: usize) -> String {
    format!(
        "revisions:\n  - name: hello\n    namespace: default\n    hosts: [hello.local]\n    containerConcurrency: {cc}\n    timeoutSeconds: 300\n    endpoints: [\"127.0.0.1:{port}\"]\n"
    )
}

/// Checks a load result: a scenario "errors out" when not one request succeeded.
pub fn check_some_ok(what: &str, r: &LoadResult) -> Result<(), String> {
    if r.ok == 0 {
        Err(format!(
            "{what}: no successful request ({} transport errors; statuses {})",
            r.transport_errors,
            r.statuses_text()
        ))
    } else {
        Ok(())
    }
}

/// The message of a panic caught from a task.
pub fn panic_message(err: tokio::task::JoinError) -> String {
    match err.try_into_panic() {
        Ok(payload) => {
            if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_owned()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "panicked".to_owned()
            }
        }
        Err(e) => e.to_string(),
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = ticks(11) + ticks(12);
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(total * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1 000");
        assert_eq!(group(41230), "41 230");
        assert_eq!(group(1234567), "1 234 567");
    }

    #[test]
    fn spreads() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0]), (2.5, 1.0, 4.0));
        assert_eq!(rps_spread(&[41230.0]), "41 230");
        assert_eq!(
            rps_spread(&[39800.0, 41230.0, 42100.0]),
            "41 230 (39 800–42 100)"
        );
    }

    #[test]
    fn sums_metrics() {
        let text = "# HELP x\nactivator_requests_waiting{revision=\"a\"} 3\nactivator_requests_waiting{revision=\"b\"} 4\nactivator_requests_waiting_total 9\n";
        assert_eq!(metric_sum(text, "activator_requests_waiting"), Some(7.0));
        assert_eq!(metric_sum(text, "nope"), None);
    }
}
