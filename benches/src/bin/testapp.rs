//! `thaw-testapp`: the HTTP app every Thaw test and benchmark puts behind the
//! proxies, and the "direct" baseline the benchmarks compare them against.
//!
//! It serves HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on one port,
//! with routes that exercise what a proxy must get right: streaming in both
//! directions, upgrades, gRPC trailers, slow and broken responses, and a
//! concurrency guard that records every time more requests were in flight
//! than allowed. Run it with `--help` for the routes and flags.
//!
//! Being a baseline, the request path does no logging and avoids allocation
//! where it can.

#![forbid(unsafe_code)]

// A binary's root resolves modules next to itself, so point at the
// directory that keeps this binary's modules apart from other binaries.
#[path = "testapp/body.rs"]
mod body;
#[path = "testapp/config.rs"]
mod config;
#[path = "testapp/counters.rs"]
mod counters;
#[path = "testapp/grpc.rs"]
mod grpc;
#[path = "testapp/routes.rs"]
mod routes;
#[path = "testapp/websocket.rs"]
mod websocket;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Command, Config};
use crate::counters::App;

/// BSD `EX_USAGE`: the conventional exit code for bad invocations.
const EXIT_USAGE: u8 = 64;

/// Enough that HTTP/2 benchmarks are limited by the proxies, not by the
/// app's stream limit (hyper's default is 200).
const MAX_H2_STREAMS: u32 = 4096;

/// How long to back off after an accept error such as running out of file
/// descriptors, instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

fn main() -> ExitCode {
    let config = match config::from_process() {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            print!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("thaw-testapp: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match config.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(threads) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("thaw-testapp: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("thaw-testapp: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> io::Result<()> {
    if !config.slow_start.is_zero() {
        tokio::time::sleep(config.slow_start).await;
    }
    let listener = TcpListener::bind((config.host, config.port))
        .await
        .map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("cannot listen on {}:{}: {err}", config.host, config.port),
            )
        })?;
    announce(listener.local_addr()?)?;

    // Both live as long as the process; leaking them once lets every
    // connection borrow them without reference counting.
    let app: &'static App = Box::leak(Box::new(App::new(config.max_concurrency)));
    let server: &'static auto::Builder<TokioExecutor> = Box::leak(Box::new(server_builder()));

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => serve_connection(server, app, stream),
                Err(err) if is_per_connection(&err) => {}
                Err(err) => {
                    eprintln!("thaw-testapp: accept failed: {err}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            () = &mut shutdown => {
                // Tests of preStop hooks read this: a hook that ran first (GET
                // /ready?state=off) shows here as `ready: false`.
                let mut stdout = io::stdout().lock();
                writeln!(stdout, "stopping on signal (ready: {})", app.is_ready())?;
                stdout.flush()?;
                return Ok(());
            }
        }
    }
}

/// Prints the line tests wait for, flushed so a pipe reader sees it now.
fn announce(addr: SocketAddr) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()
}

fn server_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's HTTP/1 header-read timeout and HTTP/2 keep-alive need a timer.
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS);
    builder
}

fn serve_connection(
    server: &'static auto::Builder<TokioExecutor>,
    app: &'static App,
    stream: TcpStream,
) {
    // Small responses must not sit behind Nagle's algorithm.
    if stream.set_nodelay(true).is_err() {
        return;
    }
    tokio::spawn(async move {
        let service = service_fn(move |req| routes::handle(app, req));
        // Connection errors are expected here (clients hanging up, /reset,
        // /close) and are nobody's business in a baseline app.
        let _ = server
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .await;
    });
}

/// Errors that concern one connection that died before being accepted, not
/// the listener.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Resolves on SIGTERM (how Kubernetes stops a container) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    // Without a handler, exit on Ctrl-C only; if even that cannot be set
    // up, run until killed.
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
