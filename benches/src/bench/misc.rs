//! The small sections: binary sizes, idle RSS, and the load generator's check against wrk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use thaw_benches::harness::{self, Activator, QueueProxy};
use thaw_benches::load::Scheduler;

use super::{
    cpu_time, group, mib, ms, progress, run_with_rss, static_revision_yaml, wait_ok, Ctx, Section,
    Table,
};

/// Stripped sizes of the release binaries.
pub async fn sizes(_ctx: Arc<Ctx>) -> Section {
    let mut section = Section::new("Binary sizes");
    let dir = harness::bin_dir();
    let mut table = Table::new(&["binary", "size MiB", "target"]);
    for (name, target) in [("queue-proxy", "≤ 10 MiB"), ("activator", "")] {
        let path = dir.join(name);
        match std::fs::metadata(&path) {
            Ok(m) => table.row(vec![
                format!("`{name}`"),
                format!("{:.2}", m.len() as f64 / (1024.0 * 1024.0)),
                target.to_owned(),
            ]),
            Err(e) => section.fail(format!("size of {}: {e}", path.display())),
        }
    }
    section.line(&table.render());
    let profile = if dir.ends_with("release") {
        "the release profile (fat LTO, codegen-units 1, symbols stripped)"
    } else {
        "NOT a release build: run with --release for meaningful sizes"
    };
    section.line(&format!(
        "File sizes of `{}/{{queue-proxy,activator}}`, built with {profile}.",
        dir.display()
    ));
    section
}

/// RSS of an idle queue-proxy and an idle activator.
pub async fn idle_rss(ctx: Arc<Ctx>) -> Section {
    let mut section = Section::new("Idle RSS");
    progress("idle-rss: queue-proxy and activator at rest");
    let settle = if ctx.smoke {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let app = ctx.start_app().await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    tokio::time::sleep(settle).await;
    let qp_idle = harness::rss_kib(qp.pid() as u32);
    if let Err(e) = wait_ok(qp.serving, "/", None).await {
        section.fail(format!("idle-rss: queue-proxy: {e}"));
    }
    tokio::time::sleep(settle).await;
    let qp_after = harness::rss_kib(qp.pid() as u32);

    let behind = QueueProxy::start(app.port(), &[]).await;
    let act = Activator::start(&static_revision_yaml(behind.serving.port(), 0), &[]).await;
    tokio::time::sleep(settle).await;
    let act_idle = harness::rss_kib(act.pid());
    if let Err(e) = wait_ok(act.http, "/", Some("hello.local")).await {
        section.fail(format!("idle-rss: activator: {e}"));
    }
    tokio::time::sleep(settle).await;
    let act_after = harness::rss_kib(act.pid());

    let mut table = Table::new(&[
        "process",
        "RSS after start MiB",
        "RSS after one request MiB",
        "target",
    ]);
    table.row(vec![
        "queue-proxy (CC=0)".to_owned(),
        mib(qp_idle),
        mib(qp_after),
        "≤ 6 MiB idle".to_owned(),
    ]);
    table.row(vec![
        "activator (one static revision)".to_owned(),
        mib(act_idle),
        mib(act_after),
        String::new(),
    ]);
    section.line(&table.render());
    section.line(&format!(
        "VmRSS from /proc, {} ms after the process reported its listeners, then {} ms after one `GET /` through it (which opens the upstream connection and touches the request path). Default worker threads (one per CPU).",
        settle.as_millis(),
        settle.as_millis()
    ));
    section
}

/// wrk's figures from its `--latency` output.
struct Wrk {
    rps: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
}

fn parse_wrk_latency(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|x| x * scale)
}

fn parse_wrk(out: &str) -> Option<Wrk> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let pct = |p: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(parse_wrk_latency)
    };
    Some(Wrk {
        rps,
        p50_us: pct("50%"),
        p99_us: pct("99%"),
    })
}

fn find_wrk() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("wrk"))
        .find(|p| p.is_file())
}

/// The in-tree generator and wrk against the same test app.
pub async fn wrk_check(ctx: Arc<Ctx>) -> Section {
    let conns = 32;
    let mut section = Section::new("Load generator check: in-tree vs wrk, direct, 32 connections");
    let app = ctx.start_app().await;
    let me = std::process::id();
    let wall = ctx.warmup + ctx.duration;

    let pct = |d: Duration, over: Duration| {
        format!("{:.0} %", d.as_secs_f64() / over.as_secs_f64() * 100.0)
    };
    let mut table = Table::new(&[
        "generator",
        "rps",
        "p50 ms",
        "p99 ms",
        "errors",
        "generator CPU",
        "app CPU",
    ]);
    // The configuration every other section uses, then one thread per CPU.
    let nproc = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut configs = vec![(
        ctx.load_threads,
        ctx.load_scheduler,
        "as used by every table",
    )];
    if ctx.load_threads != nproc || ctx.load_scheduler != Scheduler::MultiThread {
        configs.push((nproc, Scheduler::MultiThread, "one worker per CPU"));
    }
    for (threads, scheduler, why) in configs {
        progress(&format!(
            "wrk-check: the in-tree generator, {threads} thread(s), {scheduler:?}"
        ));
        super::wait_quiet(&ctx).await;
        let mut spec = ctx.spec(app.addr, "/", conns);
        spec.threads = threads;
        spec.scheduler = scheduler;
        let (app0, me0) = (cpu_time(app.pid()), cpu_time(me));
        let r = run_with_rss(&spec, &[]).await.result;
        let (app1, me1) = (cpu_time(app.pid()), cpu_time(me));
        if let Err(e) = super::check_some_ok("wrk-check", &r) {
            section.fail(e);
        }
        let sched = match scheduler {
            Scheduler::MultiThread => "multi-threaded runtime",
            Scheduler::PerThread => "current-thread runtime per thread",
        };
        table.row(vec![
            format!("in-tree: raw HTTP/1.1, {sched}, {threads} thread(s) ({why})"),
            group(r.rps().round() as u64),
            ms(r.p50_us() as f64),
            ms(r.p99_us() as f64),
            r.errors.to_string(),
            pct(me1 - me0, wall),
            pct(app1 - app0, wall),
        ]);
    }

    let secs = ctx.duration.as_secs_f64().ceil().max(1.0) as u64;
    match find_wrk() {
        None => {
            section.line(
                "wrk not found: only the in-tree generator was measured (apt-get install wrk)\n",
            );
            progress("wrk not found: skipping its row");
        }
        Some(wrk) => {
            super::wait_quiet(&ctx).await;
            progress(&format!("wrk-check: wrk -t1 -c{conns} -d{secs}s"));
            let url = format!("http://{}/", app.addr);
            let app0 = cpu_time(app.pid());
            let started = Instant::now();
            let child = tokio::process::Command::new(&wrk)
                .args([
                    "-t1",
                    &format!("-c{conns}"),
                    &format!("-d{secs}s"),
                    "--latency",
                    &url,
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn();
            match child {
                Err(e) => section.fail(format!("wrk-check: start wrk: {e}")),
                Ok(child) => {
                    let wrk_pid = child.id().unwrap_or(0);
                    // Sample wrk's CPU just before it exits: poll until it is gone.
                    let cpu_probe = tokio::spawn(async move {
                        let mut last = Duration::ZERO;
                        loop {
                            let t = cpu_time(wrk_pid);
                            if t.is_zero() && !last.is_zero() {
                                return last;
                            }
                            if !t.is_zero() {
                                last = t;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    });
                    match child.wait_with_output().await {
                        Err(e) => section.fail(format!("wrk-check: wrk: {e}")),
                        Ok(out) => {
                            let elapsed = started.elapsed();
                            let app1 = cpu_time(app.pid());
                            let wrk_cpu = tokio::time::timeout(Duration::from_secs(1), cpu_probe)
                                .await
                                .ok()
                                .and_then(Result::ok);
                            let text = String::from_utf8_lossy(&out.stdout);
                            match parse_wrk(&text) {
                                None => section.fail(format!(
                                    "wrk-check: could not parse wrk's output:\n{text}{}",
                                    String::from_utf8_lossy(&out.stderr)
                                )),
                                Some(w) => table.row(vec![
                                    "wrk 4 (-t1, epoll, C)".to_owned(),
                                    group(w.rps.round() as u64),
                                    w.p50_us.map_or("?".to_owned(), ms),
                                    w.p99_us.map_or("?".to_owned(), ms),
                                    "—".to_owned(),
                                    wrk_cpu.map_or("?".to_owned(), |c| pct(c, elapsed)),
                                    pct(app1 - app0, elapsed),
                                ]),
                            }
                        }
                    }
                }
            }
        }
    }
    section.line(&table.render());
    section.line(&format!(
        "Both against the same test app process ({}), GET /, 32 keep-alive connections. The in-tree generator: {} warm-up + {} measured; wrk: `wrk -t1 -c{conns} -d{secs}s --latency` (no warm-up). CPU is the process's user + system time over the run's wall time (100 % = one core; the in-tree figure is the whole bench process). Here the generator and the app share this machine's cores, so direct is bounded by the generator's cost per request: when the in-tree rps is close to wrk's, the generator costs about what wrk does, and in the proxied rows (a fraction of direct's rps) it takes a correspondingly small share of the CPU.",
        app_desc(&ctx),
        super::proxies::humantime(ctx.warmup),
        super::proxies::humantime(ctx.duration),
    ));
    section
}

pub fn app_desc(ctx: &Ctx) -> String {
    if ctx.app_threads == 0 {
        "`thaw-testapp`, default threads (one per core)".to_owned()
    } else if ctx.app_threads == 1 {
        "`thaw-testapp --threads 1`, a current-thread runtime".to_owned()
    } else {
        format!("`thaw-testapp --threads {}`", ctx.app_threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n  Latency Distribution\n     50%  155.00us\n     75%  200.00us\n     90%  250.00us\n     99%    1.20ms\n  900000 requests in 5.00s, 100.00MB read\nRequests/sec: 180000.50\nTransfer/sec:     20.00MB\n";
        let w = parse_wrk(out).unwrap();
        assert_eq!(w.rps, 180000.50);
        assert_eq!(w.p50_us, Some(155.0));
        assert_eq!(w.p99_us, Some(1200.0));
        assert_eq!(parse_wrk_latency("2.00s"), Some(2e6));
    }
}
