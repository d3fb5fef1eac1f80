//! `thaw-benches`: measures Thaw's queue-proxy and activator against the test app alone
//! (direct) and Debian's nginx, and prints markdown tables.
//!
//! It starts the real binaries from its own target directory, so build them all first:
//!
//! ```sh
//! cargo build --release --workspace
//! cargo run --release -p thaw-benches -- all
//! ```
//!
//! `soak` is not part of `all`: it runs the local platform for 10 minutes at mixed load
//! while killing its processes (`cargo run --release -p thaw-benches -- soak`).
//!
//! Tables go to stdout, progress to stderr. The exit status is non-zero when a scenario
//! failed (a process did not start, no request succeeded, …); timings are never judged.
#![forbid(unsafe_code)]

mod bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use thaw_benches::harness;
use thaw_benches::load::Scheduler;

use crate::bench::{panic_message, progress, Ctx, Section};

#[derive(Parser, Debug)]
#[command(
    name = "thaw-benches",
    about = "Thaw's benchmarks: queue-proxy and activator against direct and nginx, as markdown tables",
    after_help = "Requires the release binaries: run `cargo build --release --workspace` first, then \
                  `cargo run --release -p thaw-benches -- all`. Tables go to stdout, progress to stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,

    /// Measured time per run (`5s`, `300ms`, `1m`; a bare number is seconds); the whole
    /// run for `soak` [default: 5s; soak: 10m, or 15s with --smoke]
    #[arg(long, global = true, value_parser = parse_duration)]
    duration: Option<Duration>,

    /// Warm-up per run, not recorded
    #[arg(long, global = true, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,

    /// Repetitions, interleaved (every path once per repetition); tables show the median
    /// and the min–max
    #[arg(long, global = true, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,

    /// Connection counts of the main table, comma-separated
    #[arg(long, global = true, default_value = "32,256", value_parser = parse_connections)]
    connections: Connections,

    /// Main-table scenarios to run, comma-separated: direct, nginx, nginx-nginx, qp-cc0,
    /// qp-cc100, activator-alone, activator-cc0, activator-cc100, activator-cc0-traced
    /// (default: all)
    #[arg(long, global = true, value_delimiter = ',')]
    only: Option<Vec<String>>,

    /// Also write the whole report (markdown) to this file
    #[arg(long, global = true)]
    markdown_out: Option<PathBuf>,

    /// Tiny durations for CI: duration 300ms, warm-up 100ms, 1 repetition, 4 connections,
    /// 200 parked requests, 2 cold starts. Fails on errors, judges no timing.
    #[arg(long, global = true)]
    smoke: bool,

    /// Requests the `parked` scenario parks
    #[arg(long, global = true, default_value_t = 10_000)]
    parked: usize,

    /// Runs of the `coldstart` scenario
    #[arg(long, global = true, default_value_t = 20)]
    coldstart_runs: usize,

    /// `--threads` of the test app (1 = current-thread runtime; 0 = one per core)
    #[arg(long, global = true, default_value_t = 1)]
    app_threads: usize,

    /// Worker threads of the activator in the main table (0 = its default, one per CPU).
    /// One by default, as nginx runs one worker and the queue-proxy one thread: on a
    /// small machine an idle second thread costs wake-ups per request, not throughput
    #[arg(long, global = true, default_value_t = 1)]
    activator_threads: usize,

    /// Before each measurement, wait at most this long for other processes on the
    /// machine to use less than 0.15 cores (0 = do not wait)
    #[arg(long, global = true, default_value = "20s", value_parser = parse_wait)]
    quiet_wait: Duration,

    /// The nginx binary (default: /usr/sbin/nginx, else `nginx` on PATH); `none` skips
    /// nginx's rows
    #[arg(long, global = true)]
    nginx: Option<PathBuf>,

    /// Worker threads of the load generator (0 = half the CPUs, at least 1: on a small
    /// machine the generator shares the cores with the app and the proxy, and one
    /// thread leaves them the most; `wrk-check` shows the measurement)
    #[arg(long, global = true, default_value_t = 0)]
    load_threads: usize,

    /// The load generator's scheduling: `multi` (one multi-threaded tokio runtime) or
    /// `per-thread` (one current-thread runtime per thread, wrk's model)
    #[arg(long, global = true, default_value = "multi", value_parser = parse_scheduler)]
    load_scheduler: Scheduler,
}

/// Half the CPUs, at least one.
fn default_load_threads() -> usize {
    (std::thread::available_parallelism().map_or(2, |n| n.get()) / 2).max(1)
}

fn parse_scheduler(s: &str) -> Result<Scheduler, String> {
    match s {
        "multi" => Ok(Scheduler::MultiThread),
        "per-thread" => Ok(Scheduler::PerThread),
        _ => Err(format!("expected multi or per-thread, got {s:?}")),
    }
}

#[derive(Debug, Clone)]
struct Connections(Vec<usize>);

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// Everything below except `soak`, the main table first
    All,
    /// The main table: direct, nginx, queue-proxy CC=0/100, activator → queue-proxy
    Proxies,
    /// h2c with prior knowledge through the queue-proxy and nginx's http2 listener, 1 and
    /// 8 connections × 100 streams (h2load)
    H2c,
    /// queue-proxy CC=10 under 200 connections to /delay?ms=20
    Overload,
    /// 1 MiB bodies direct, via nginx and via the queue-proxy, 8 connections
    Streaming,
    /// 10 000 requests parked in the activator, then a pod comes up
    Parked,
    /// RSS per idle keep-alive connection (1 000 and 10 000) for both binaries, and the
    /// RSS 10 s after a burst (those connections, 5 000 parked clients that leave)
    Memory,
    /// 1, 100, 1 000 and 10 000 revisions registered in the activator (up to 1 000 with
    /// traffic, 100 pod-set changes a second): RSS, CPU, rps; and the stat report's cost
    Revisions,
    /// Cold-start pickup: app starts accepting → parked request answered
    Coldstart,
    /// Stripped sizes of the release binaries
    Sizes,
    /// RSS of an idle queue-proxy and activator
    IdleRss,
    /// The in-tree load generator against wrk, direct
    WrkCheck,
    /// The local platform for `--duration` (default 10 minutes) at mixed load while apps
    /// and queue-proxies are killed and revisions scale; counts every request's fate and
    /// samples RSS. Not part of `all`.
    Soak {
        /// Seeds the choices of the load and the chaos (which request, which process to
        /// kill, when), so a run can be repeated; timings still differ run to run
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration like 5s or 300ms, got {s:?}"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        other => return Err(format!("unknown unit {other:?} in {s:?} (use ms, s or m)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("the duration must be positive, got {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        Ok(Duration::ZERO)
    } else {
        parse_duration(s)
    }
}

fn parse_connections(s: &str) -> Result<Connections, String> {
    let v: Result<Vec<usize>, _> = s.split(',').map(|x| x.trim().parse::<usize>()).collect();
    match v {
        Ok(v) if !v.is_empty() && v.iter().all(|&n| n > 0) => Ok(Connections(v)),
        _ => Err(format!(
            "expected comma-separated positive counts like 32,256, got {s:?}"
        )),
    }
}

fn cmd_name(c: Cmd) -> &'static str {
    match c {
        Cmd::All => "all",
        Cmd::Proxies => "proxies",
        Cmd::H2c => "h2c",
        Cmd::Overload => "overload",
        Cmd::Streaming => "streaming",
        Cmd::Parked => "parked",
        Cmd::Memory => "memory",
        Cmd::Revisions => "revisions",
        Cmd::Coldstart => "coldstart",
        Cmd::Sizes => "sizes",
        Cmd::IdleRss => "idle-rss",
        Cmd::WrkCheck => "wrk-check",
        Cmd::Soak { .. } => "soak",
    }
}

async fn run_section(cmd: Cmd, ctx: Arc<Ctx>) -> Section {
    let task = match cmd {
        Cmd::Proxies => tokio::spawn(bench::proxies::run(ctx)),
        Cmd::H2c => tokio::spawn(bench::h2c::run(ctx)),
        Cmd::Overload => tokio::spawn(bench::overload::run(ctx)),
        Cmd::Streaming => tokio::spawn(bench::streaming::run(ctx)),
        Cmd::Parked => tokio::spawn(bench::parked::run(ctx)),
        Cmd::Memory => tokio::spawn(bench::memory::run(ctx)),
        Cmd::Revisions => tokio::spawn(bench::revisions::run(ctx)),
        Cmd::Coldstart => tokio::spawn(bench::coldstart::run(ctx)),
        Cmd::Sizes => tokio::spawn(bench::misc::sizes(ctx)),
        Cmd::IdleRss => tokio::spawn(bench::misc::idle_rss(ctx)),
        Cmd::WrkCheck => tokio::spawn(bench::misc::wrk_check(ctx)),
        Cmd::Soak { .. } => tokio::spawn(bench::soak::run(ctx)),
        Cmd::All => unreachable!("expanded by the caller"),
    };
    match task.await {
        Ok(section) => section,
        Err(e) => {
            let mut s = Section::new(cmd_name(cmd));
            s.fail(format!("{}: {}", cmd_name(cmd), panic_message(e)));
            s
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn header(ctx: &Ctx, cmd: Cmd) -> String {
    let nproc = sh("nproc", &[]).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or("?".to_owned(), |n| n.get().to_string())
    });
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_owned(), |(_, v)| v.trim().to_owned());
    let kernel = sh("uname", &["-srm"]).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("unknown".to_owned(), |s| s.trim().to_owned())
    });
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_else(|| "unknown".into());
    let args: Vec<String> = std::env::args().collect();
    let dir = harness::bin_dir();
    let build = if dir.ends_with("release") {
        "release"
    } else {
        "NOT release (debug binaries: figures are meaningless; use --release)"
    };
    let nginx = ctx.nginx.as_deref().map_or(
        "not found: its rows are skipped (apt-get install nginx)".to_owned(),
        |p| format!("{} ({})", bench::nginx::version(p), p.display()),
    );
    let h2load = bench::h2c::find_h2load().map_or(
        "not found: the h2c section is skipped (apt-get install nghttp2-client)".to_owned(),
        |p| {
            let version = sh(&p.to_string_lossy(), &["--version"]).unwrap_or_default();
            format!("{version} ({})", p.display())
        },
    );
    let settings = match cmd {
        // The soak has no measurement windows or repetitions: one long run, seeded.
        Cmd::Soak { seed } => format!(
            "one run of {}, seed {seed}",
            bench::proxies::humantime(ctx.duration)
        ),
        _ => format!(
            "duration {}, warm-up {}, {} repetition(s), connections {:?}{}; each measurement waits up to {} for other processes to use < 0.15 cores",
            bench::proxies::humantime(ctx.duration),
            bench::proxies::humantime(ctx.warmup),
            ctx.reps,
            ctx.connections,
            if ctx.smoke { " (--smoke)" } else { "" },
            bench::proxies::humantime(ctx.quiet_wait),
        ),
    };
    let load_threads = ctx.load_threads;
    let activator = match ctx.activator_threads {
        0 => "its default runtime".to_owned(),
        1 => "one worker thread (`--worker-threads 1`)".to_owned(),
        n => format!("{n} worker threads"),
    };
    let scheduler = match ctx.load_scheduler {
        Scheduler::MultiThread => "a multi-threaded tokio runtime",
        Scheduler::PerThread => "one current-thread tokio runtime per thread",
    };
    format!(
        "# Thaw benchmarks\n\n\
         - command: `{}`\n\
         - date: {date}\n\
         - machine: nproc {nproc}, CPU {cpu}, kernel {kernel}\n\
         - build: {build}; binaries from `{}`\n\
         - settings: {settings}\n\
         - test app: {}\n\
         - load generator: in-tree, raw HTTP/1.1 client (request bytes built once, responses parsed with httparse), one connection per task, closed loop, {scheduler} with {load_threads} worker thread(s)\n\
         - queue-proxy and activator: the queue-proxy its default single-threaded runtime; the activator {activator} in the main table (as nginx runs one worker), its default (one worker thread per CPU) elsewhere\n\
         - nginx: {nginx}\n\
         - h2load (the h2c section's generator): {h2load}\n\
         - everything (generator, proxies, app) runs on this one machine over loopback and shares its cores\n",
        args.join(" "),
        dir.display(),
        bench::misc::app_desc(ctx),
    )
}

/// Under `cargo run`, builds the binaries the benches start, in the same profile, so that
/// one command runs everything. cargo has released its build lock by the time this runs.
fn build_siblings() {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return;
    };
    let release = harness::bin_dir().ends_with("release");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "thaw-queue-proxy",
        "-p",
        "thaw-activator",
        "-p",
        "thaw-benches",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    progress("building the queue-proxy, activator and test app (cargo build --bins)");
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => progress(&format!(
            "cargo build failed ({status}); using whatever binaries exist"
        )),
        Err(e) => progress(&format!(
            "cannot run cargo ({e}); using whatever binaries exist"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    build_siblings();
    let missing: Vec<String> = ["queue-proxy", "activator", "thaw-testapp"]
        .iter()
        .map(|b| harness::bin_dir().join(b))
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "thaw-benches: missing {}.\nThe benches start the real binaries from their own target directory; build them first:\n    cargo build --release --workspace\nthen run:\n    cargo run --release -p thaw-benches -- {}",
            missing.join(", "),
            cmd_name(cli.command)
        );
        return ExitCode::from(2);
    }
    if !harness::bin_dir().ends_with("release") {
        progress("warning: not a release build; the figures mean nothing (use --release)");
    }
    let soak_seed = match cli.command {
        Cmd::Soak { seed } => Some(seed),
        _ => None,
    };
    let mut ctx = Ctx {
        duration: cli.duration.unwrap_or(Duration::from_secs(5)),
        warmup: cli.warmup,
        reps: cli.reps as usize,
        connections: cli.connections.0.clone(),
        only: cli.only.clone(),
        smoke: cli.smoke,
        parked: cli.parked,
        coldstart_runs: cli.coldstart_runs,
        app_threads: cli.app_threads,
        activator_threads: cli.activator_threads,
        load_threads: if cli.load_threads == 0 {
            default_load_threads()
        } else {
            cli.load_threads
        },
        load_scheduler: cli.load_scheduler,
        quiet_wait: cli.quiet_wait,
        seed: 1,
        nginx: match &cli.nginx {
            None => bench::nginx::find(),
            Some(p) if p.as_os_str() == "none" => None,
            Some(p) => Some(p.clone()),
        },
    };
    if cli.smoke {
        ctx.duration = Duration::from_millis(300);
        ctx.warmup = Duration::from_millis(100);
        ctx.reps = 1;
        ctx.connections = vec![4];
        ctx.parked = 200;
        ctx.coldstart_runs = 2;
        ctx.quiet_wait = Duration::ZERO;
    }
    if let Some(seed) = soak_seed {
        ctx.seed = seed;
        // The soak is one long run: its duration is the run's, not a measurement window,
        // so --smoke shortens it to seconds rather than to 300 ms.
        ctx.duration = cli.duration.unwrap_or(if cli.smoke {
            Duration::from_secs(15)
        } else {
            Duration::from_secs(600)
        });
        ctx.quiet_wait = Duration::ZERO;
    }
    if ctx.nginx.is_none() {
        progress("nginx not found: its rows are skipped (apt-get install nginx)");
    }
    let commands = match cli.command {
        Cmd::All => vec![
            Cmd::Proxies,
            Cmd::H2c,
            Cmd::Overload,
            Cmd::Streaming,
            Cmd::Parked,
            Cmd::Memory,
            Cmd::Revisions,
            Cmd::Coldstart,
            Cmd::Sizes,
            Cmd::IdleRss,
            Cmd::WrkCheck,
        ],
        c => vec![c],
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("thaw-benches: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let ctx = Arc::new(ctx);
    let mut report = header(&ctx, cli.command);
    println!("{report}");
    let mut failures = Vec::new();
    for cmd in commands {
        progress(&format!("== {} ==", cmd_name(cmd)));
        let section = runtime.block_on(run_section(cmd, Arc::clone(&ctx)));
        println!("{}", section.markdown);
        report.push('\n');
        report.push_str(&section.markdown);
        failures.extend(section.failures);
    }
    let mut footer = format!("\nTotal time: {:.0} s.\n", started.elapsed().as_secs_f64());
    if !failures.is_empty() {
        footer.push_str(&format!("\n**{} failure(s):**\n\n", failures.len()));
        for f in &failures {
            footer.push_str(&format!("- {}\n", f.replace('\n', " ")));
        }
    }
    println!("{footer}");
    report.push_str(&footer);
    if let Some(path) = &cli.markdown_out {
        if let Err(e) = std::fs::write(path, &report) {
            eprintln!("thaw-benches: write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        progress(&format!("report written to {}", path.display()));
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        progress(&format!("{} failure(s); exit status 1", failures.len()));
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn parses_connections() {
        assert_eq!(parse_connections("32,256").unwrap().0, vec![32, 256]);
        assert!(parse_connections("0").is_err());
        assert!(parse_connections("a").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
