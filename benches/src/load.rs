//! An in-tree, closed-loop HTTP/1.1 load generator.
//!
//! A fixed number of keep-alive connections, each driven by its own task that sends
//! requests back to back on its own connection, as wrk does: the request's bytes are
//! built once, and responses are parsed just enough to find their end (`httparse` for the
//! head; `Content-Length`, chunked, or close-delimited bodies). A hyper client costs
//! enough per request to become the bottleneck against a fast app.
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

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    /// When not empty, each request names the next of these as its `Host`, each
    /// connection starting at its own place: load spread over many revisions.
    pub hosts: Vec<String>,
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
            hosts: Vec::new(),
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
        .map(|i| tokio::spawn(worker(Arc::clone(&spec), i, measure_from, end)))
        .collect();
    let mut total = LoadResult::empty(spec.connections, spec.duration);
    for task in tasks {
        let part = task.await.expect("load task panicked");
        total.merge(&part);
    }
    total
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The requests' bytes, built once per task: one, or one per host of `spec.hosts`.
fn build_requests(spec: &LoadSpec) -> Vec<Vec<u8>> {
    if spec.hosts.is_empty() {
        return vec![build_request(spec, None)];
    }
    spec.hosts
        .iter()
        .map(|h| build_request(spec, Some(h)))
        .collect()
}

fn build_request(spec: &LoadSpec, host: Option<&str>) -> Vec<u8> {
    let mut out = format!("{} {} HTTP/1.1\r\n", spec.method, spec.path).into_bytes();
    if let Some(host) = host {
        out.extend_from_slice(format!("host: {host}\r\n").as_bytes());
    } else if !spec
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("host"))
    {
        out.extend_from_slice(format!("host: {}\r\n", spec.addr).as_bytes());
    }
    for (name, value) in &spec.headers {
        if host.is_some() && name.eq_ignore_ascii_case("host") {
            continue;
        }
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
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

/// How a response body ends.
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

/// Reads more bytes into `buf`; `false` when the peer closed or failed.
async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    matches!(stream.read_buf(buf).await, Ok(n) if n > 0)
}

/// Parses a response head at the start of `buf`, reading more as needed.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Option<(u16, Framing, bool, usize)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code?;
                let mut framing = Framing::Close;
                let mut close = false;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let n = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
                        framing = Framing::Length(n);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                        && h.value.eq_ignore_ascii_case(b"chunked")
                    {
                        framing = Framing::Chunked;
                    } else if h.name.eq_ignore_ascii_case("connection")
                        && h.value.eq_ignore_ascii_case(b"close")
                    {
                        close = true;
                    }
                }
                // 1xx, 204 and 304 have no body whatever the headers say.
                if status < 200 || status == 204 || status == 304 {
                    framing = Framing::Length(0);
                }
                return Some((status, framing, close, len));
            }
            Ok(httparse::Status::Partial) => {
                if !fill(stream, buf).await {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

/// Consumes a chunked body from `buf`; returns its size.
async fn read_chunked(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<u64> {
    let mut total = 0u64;
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if !fill(stream, buf).await {
                return None;
            }
        };
        let size_text = std::str::from_utf8(&buf[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        buf.advance(line_end + 2);
        // The chunk and its CRLF; the last chunk is followed by an empty trailer line.
        while buf.len() < size + 2 {
            if !fill(stream, buf).await {
                return None;
            }
        }
        buf.advance(size + 2);
        total += size as u64;
        if size == 0 {
            return Some(total);
        }
    }
}

async fn one_request(stream: &mut TcpStream, request: &[u8], buf: &mut BytesMut) -> Outcome {
    if stream.write_all(request).await.is_err() {
        return Outcome::TransportError;
    }
    let Some((status, framing, close, head_len)) = read_head(stream, buf).await else {
        return Outcome::TransportError;
    };
    buf.advance(head_len);
    let bytes = match framing {
        Framing::Length(n) => {
            while buf.len() < n {
                if !fill(stream, buf).await {
                    return Outcome::TransportError;
                }
            }
            buf.advance(n);
            n as u64
        }
        Framing::Chunked => match read_chunked(stream, buf).await {
            Some(n) => n,
            None => return Outcome::TransportError,
        },
        Framing::Close => {
            let mut n = buf.len() as u64;
            buf.clear();
            while fill(stream, buf).await {
                n += buf.len() as u64;
                buf.clear();
            }
            return Outcome::Response {
                status,
                bytes: n,
                reusable: false,
            };
        }
    };
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
    stream: &mut TcpStream,
    requests: &[Vec<u8>],
    next: &mut usize,
    part: &mut LoadResult,
    measure_from: Instant,
    end: Instant,
) -> LoopEnd {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        if Instant::now() >= end {
            return LoopEnd::Deadline;
        }
        let request = &requests[*next % requests.len()];
        *next = next.wrapping_add(1);
        let t0 = Instant::now();
        let outcome = one_request(stream, request, &mut buf).await;
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

async fn worker(
    spec: Arc<LoadSpec>,
    index: usize,
    measure_from: Instant,
    end: Instant,
) -> LoadResult {
    let mut part = LoadResult::empty(spec.connections, spec.duration);
    let requests = build_requests(&spec);
    // Connections start spread over the hosts, so every host is busy from the start.
    let mut next = index.wrapping_mul(requests.len() / spec.connections.max(1) + 1);
    while Instant::now() < end {
        let mut stream = match timeout_at(end, connect(spec.addr)).await {
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
        // One timer for the whole connection, none per request: a request still in
        // flight when the window closes is dropped, not counted.
        let driven = timeout_at(
            end,
            request_loop(
                &mut stream,
                &requests,
                &mut next,
                &mut part,
                measure_from,
                end,
            ),
        );
        if let LoopEnd::Deadline = driven.await.unwrap_or(LoopEnd::Deadline) {
            break;
        }
    }
    part
}
