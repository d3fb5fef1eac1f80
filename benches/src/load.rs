//! An in-tree, closed-loop HTTP/1.1 load generator.
//!
//! A fixed number of keep-alive connections, each driven by its own task that sends
//! requests back to back on its own `hyper::client::conn::http1` connection (no pool).
//! A warm-up period runs first and is not recorded; then every response that completes
//! inside the measured window is recorded, its latency in microseconds in an
//! [`hdrhistogram::Histogram`] (one per task, merged at the end).
//!
//! Errors are non-2xx responses and transport errors (a failed connect, a request or
//! body that fails); a transport error closes the connection and the task reconnects.
//! Non-2xx statuses are also counted by status code.
//!
//! The generator runs on its own multi-threaded tokio runtime (one worker per CPU by
//! default) so that it does not share threads with whatever else the caller runs.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

/// What to send, where, and for how long.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    /// Path and query, e.g. `/` or `/delay?ms=20`.
    pub path: String,
    pub method: Method,
    /// Extra request headers, e.g. `("host", "hello.local")`. Without a `host` header,
    /// `Host: <addr>` is sent.
    pub headers: Vec<(String, String)>,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Worker threads of the generator; 0 = one per CPU.
    pub threads: usize,
    pub scheduler: Scheduler,
}

/// How the generator's threads run its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduler {
    /// One multi-threaded (work-stealing) tokio runtime with `threads` workers.
    #[default]
    MultiThread,
    /// `threads` OS threads, each with its own current-thread runtime and an even share
    /// of the connections (wrk's model: no work stealing, no cross-thread wake-ups).
    PerThread,
}

impl LoadSpec {
    /// `GET /` on `addr` with `connections` connections, 1 s warm-up, 5 s measured.
    pub fn get(addr: SocketAddr, path: &str, connections: usize) -> LoadSpec {
        LoadSpec {
            addr,
            path: path.to_owned(),
            method: Method::GET,
            headers: Vec::new(),
            connections,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(5),
            threads: 0,
            scheduler: Scheduler::default(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> LoadSpec {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn timing(mut self, warmup: Duration, duration: Duration) -> LoadSpec {
        self.warmup = warmup;
        self.duration = duration;
        self
    }
}

/// What one run measured (the measured window only).
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub connections: usize,
    /// The measured window.
    pub duration: Duration,
    /// Responses completed in the window, any status.
    pub requests: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Latency of every completed response, µs.
    pub latency: Histogram<u64>,
    /// Latency of the 2xx responses only, µs.
    pub ok_latency: Histogram<u64>,
    /// Non-2xx responses plus transport errors.
    pub errors: u64,
    /// Failed connects, requests and bodies.
    pub transport_errors: u64,
    /// Every status seen, with its count.
    pub statuses: BTreeMap<u16, u64>,
    /// Response body bytes read in the window.
    pub bytes: u64,
}

impl LoadResult {
    fn empty(connections: usize, duration: Duration) -> LoadResult {
        LoadResult {
            connections,
            duration,
            requests: 0,
            ok: 0,
            latency: new_histogram(),
            ok_latency: new_histogram(),
            errors: 0,
            transport_errors: 0,
            statuses: BTreeMap::new(),
            bytes: 0,
        }
    }

    fn merge(&mut self, other: &LoadResult) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.errors += other.errors;
        self.transport_errors += other.transport_errors;
        self.bytes += other.bytes;
        self.latency.add(&other.latency).expect("same bounds");
        self.ok_latency.add(&other.ok_latency).expect("same bounds");
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
    }

    /// Completed responses per second, any status.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64()
    }

    /// 2xx responses per second.
    pub fn ok_rps(&self) -> f64 {
        self.ok as f64 / self.duration.as_secs_f64()
    }

    /// Response body MiB per second.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.duration.as_secs_f64()
    }

    /// A latency quantile (0..=1) of every response, µs.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q)
    }

    pub fn p50_us(&self) -> u64 {
        self.quantile_us(0.50)
    }
    pub fn p90_us(&self) -> u64 {
        self.quantile_us(0.90)
    }
    pub fn p99_us(&self) -> u64 {
        self.quantile_us(0.99)
    }
    pub fn max_us(&self) -> u64 {
        self.latency.max()
    }

    /// Count of responses with `status`.
    pub fn status_count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// `200: 1234, 503: 5` (every status seen).
    pub fn statuses_text(&self) -> String {
        let parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Runs the load on a dedicated runtime and returns what the measured window saw.
/// Blocks the calling thread; from async code use [`run_async`].
pub fn run(spec: &LoadSpec) -> LoadResult {
    let threads = if spec.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        spec.threads
    };
    let spec = Arc::new(spec.clone());
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    match spec.scheduler {
        Scheduler::MultiThread => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("thaw-load")
                .enable_all()
                .build()
                .expect("load generator runtime");
            let result = rt.block_on(drive(
                Arc::clone(&spec),
                spec.connections.max(1),
                measure_from,
                end,
            ));
            rt.shutdown_timeout(Duration::from_millis(100));
            result
        }
        Scheduler::PerThread => {
            let conns = spec.connections.max(1);
            let handles: Vec<_> = (0..threads.min(conns))
                .map(|t| {
                    // Spread the connections evenly over the threads.
                    let mine =
                        conns / threads.min(conns) + usize::from(t < conns % threads.min(conns));
                    let spec = Arc::clone(&spec);
                    std::thread::Builder::new()
                        .name("thaw-load".to_owned())
                        .spawn(move || {
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .expect("load generator runtime");
                            rt.block_on(drive(spec, mine, measure_from, end))
                        })
                        .expect("load generator thread")
                })
                .collect();
            let mut total = LoadResult::empty(spec.connections, spec.duration);
            for h in handles {
                total.merge(&h.join().expect("load generator thread panicked"));
            }
            total
        }
    }
}

/// [`run`] from async code: the load runs on its own runtime in its own thread.
pub async fn run_async(spec: &LoadSpec) -> LoadResult {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || run(&spec))
        .await
        .expect("load generator thread panicked")
}

async fn drive(
    spec: Arc<LoadSpec>,
    connections: usize,
    measure_from: Instant,
    end: Instant,
) -> LoadResult {
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(worker(Arc::clone(&spec), measure_from, end)))
        .collect();
    let mut total = LoadResult::empty(spec.connections, spec.duration);
    for task in tasks {
        let part = task.await.expect("load task panicked");
        total.merge(&part);
    }
    total
}

type Sender = SendRequest<Empty<Bytes>>;
type Connection = hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>;

async fn connect(
    addr: SocketAddr,
) -> Result<(Sender, Connection), Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?)
}

/// The request with its headers, built once per task and cloned per request.
fn build_request(spec: &LoadSpec) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.method_mut() = spec.method.clone();
    *req.uri_mut() = spec.path.parse().expect("valid request path");
    let headers = req.headers_mut();
    headers.insert(
        header::HOST,
        HeaderValue::try_from(spec.addr.to_string()).expect("an address is a valid header"),
    );
    for (name, value) in &spec.headers {
        let name = HeaderName::try_from(name.as_str()).expect("valid header name");
        let value = HeaderValue::try_from(value.as_str()).expect("valid header value");
        headers.insert(name, value);
    }
    req
}

fn clone_request(template: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.method_mut() = template.method().clone();
    *req.uri_mut() = template.uri().clone();
    *req.headers_mut() = template.headers().clone();
    req
}

/// Outcome of one request.
enum Outcome {
    Response {
        status: u16,
        bytes: u64,
        reusable: bool,
    },
    TransportError,
}

async fn one_request(sender: &mut Sender, req: Request<Empty<Bytes>>) -> Outcome {
    let resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        Err(_) => return Outcome::TransportError,
    };
    let status = resp.status().as_u16();
    let close = resp
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut body = resp.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    bytes += data.len() as u64;
                }
            }
            Err(_) => return Outcome::TransportError,
        }
    }
    Outcome::Response {
        status,
        bytes,
        reusable: !close,
    }
}

/// Why a connection's request loop ended.
enum LoopEnd {
    /// The window closed: the task is done.
    Deadline,
    /// Open a new connection.
    Reconnect,
}

/// Requests back to back on one connection until the window closes or the connection
/// cannot be used any more.
async fn request_loop(
    sender: &mut Sender,
    template: &Request<Empty<Bytes>>,
    part: &mut LoadResult,
    measure_from: Instant,
    end: Instant,
) -> LoopEnd {
    loop {
        if Instant::now() >= end {
            return LoopEnd::Deadline;
        }
        if sender.ready().await.is_err() {
            // The server closed the idle connection: reconnect, not an error.
            return LoopEnd::Reconnect;
        }
        let req = clone_request(template);
        let t0 = Instant::now();
        let outcome = one_request(sender, req).await;
        let t1 = Instant::now();
        let recorded = t1 >= measure_from;
        match outcome {
            Outcome::TransportError => {
                if recorded {
                    part.transport_errors += 1;
                    part.errors += 1;
                }
                return LoopEnd::Reconnect;
            }
            Outcome::Response {
                status,
                bytes,
                reusable,
            } => {
                if recorded {
                    let us = (t1 - t0).as_micros().max(1) as u64;
                    part.requests += 1;
                    part.bytes += bytes;
                    part.latency.saturating_record(us);
                    *part.statuses.entry(status).or_default() += 1;
                    if (200..300).contains(&status) {
                        part.ok += 1;
                        part.ok_latency.saturating_record(us);
                    } else {
                        part.errors += 1;
                    }
                }
                if !reusable {
                    return LoopEnd::Reconnect;
                }
            }
        }
    }
}

async fn worker(spec: Arc<LoadSpec>, measure_from: Instant, end: Instant) -> LoadResult {
    let mut part = LoadResult::empty(spec.connections, spec.duration);
    let template = build_request(&spec);
    while Instant::now() < end {
        let (mut sender, mut conn) = match timeout_at(end, connect(spec.addr)).await {
            Ok(Ok(c)) => c,
            Ok(Err(_)) => {
                if Instant::now() >= measure_from {
                    part.transport_errors += 1;
                    part.errors += 1;
                }
                // Do not spin on a refusing server.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Err(_) => break,
        };
        // The connection is driven by this same task, next to the request loop: no
        // cross-task wake-up per request.
        // One timer for the whole connection, none per request: a request still in
        // flight when the window closes is dropped, not counted.
        let requests = request_loop(&mut sender, &template, &mut part, measure_from, end);
        tokio::pin!(requests);
        let driven = timeout_at(end, async {
            tokio::select! {
                biased;
                e = &mut requests => e,
                // The connection ended: let the loop see it (and count an in-flight
                // request's error) before reconnecting.
                _ = &mut conn => (&mut requests).await,
            }
        });
        let end_of_loop = driven.await.unwrap_or(LoopEnd::Deadline);
        if let LoopEnd::Deadline = end_of_loop {
            break;
        }
    }
    part
}
