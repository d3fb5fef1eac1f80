//! Soak: the local platform for a long run (10 minutes by default) at mixed load, while
//! apps and queue-proxies are killed and revisions scale up, down and to zero.
//!
//! One activator runs three revisions of the test app. Workers send, all at once: short
//! requests, streamed responses, websocket echo sessions, slow clients (bodies sent or
//! read a little at a time) and clients that hang up on purpose. A seeded chaos loop
//! SIGKILLs app processes and queue-proxies, sends bursts that scale a revision out, and
//! stops a revision's traffic so it scales down (to zero where its minScale allows).
//! The local platform has no config reload, so scale changes come from load, as they do
//! in a cluster.
//!
//! Every request's fate is counted, from the client's side of the wire:
//! - answered: a response head with a status below 500, its body complete or cut;
//! - refused: a 5xx (which one is kept);
//! - lost: no response head at all (reset, EOF, or nothing within the head timeout),
//!   other than on connections the client itself hung up. The target is none.
//!
//! The client is a raw HTTP/1.1 one, so that nothing (a pool, a retry) hides a reset.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use thaw_benches::harness::{self, Activator};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout_at, Instant};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{group, mib, process_tree, progress, Ctx, Section, Table};

/// The revisions' `timeoutSeconds`: a request still waiting for a pod after this gets the
/// activator's 504, so the client's own limit below is only reached by a hang.
const REVISION_TIMEOUT_S: u64 = 30;
/// How long a client waits for a response head before it counts the request as lost.
const HEAD_TIMEOUT: Duration = Duration::from_secs(REVISION_TIMEOUT_S + 15);
/// How long a whole exchange, body included, may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a websocket client waits for each echo.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection is replaced after this many requests, so that the load mixes
/// fresh connections and reused ones.
const REUSE_LIMIT: u32 = 50;
/// Kills up to this long before a failure are shown next to it.
const KILL_WINDOW: Duration = Duration::from_secs(2);
/// Lost requests listed one by one, at most.
const LOST_SHOWN: usize = 25;

/// One revision of the soak's config.
struct Rev {
    name: &'static str,
    /// Its scaling fields, as YAML lines.
    scaling: &'static [(&'static str, &'static str)],
    about: &'static str,
}

const REVS: [Rev; 3] = [
    Rev {
        name: "alpha",
        scaling: &[
            ("containerConcurrency", "4"),
            ("minScale", "0"),
            ("maxScale", "4"),
        ],
        about: "CC=4, 0–4 pods",
    },
    Rev {
        name: "beta",
        scaling: &[
            ("containerConcurrency", "10"),
            ("minScale", "1"),
            ("maxScale", "3"),
        ],
        about: "CC=10, 1–3 pods",
    },
    Rev {
        name: "gamma",
        scaling: &[
            ("containerConcurrency", "0"),
            ("target", "10"),
            ("minScale", "0"),
            ("maxScale", "3"),
        ],
        about: "CC=0 (unbounded), target 10, 0–3 pods",
    },
];

/// Scaling fields every revision shares: short windows, so that a 10-minute run sees many
/// scale changes.
const COMMON: &[(&str, &str)] = &[("stableWindow", "10s"), ("scaleToZeroGracePeriod", "5s")];

fn host(rev: usize) -> String {
    format!("{}.soak", REVS[rev].name)
}

fn config_yaml(app: &str, app_args: &[String]) -> String {
    let mut argv = vec![json_string(app)];
    argv.extend(app_args.iter().map(|a| json_string(a)));
    let mut out = String::from("revisions:\n");
    for r in &REVS {
        let _ = writeln!(out, "  - name: {}", r.name);
        let _ = writeln!(out, "    namespace: default");
        let _ = writeln!(out, "    hosts: [{}.soak]", r.name);
        let _ = writeln!(out, "    command: [{}]", argv.join(", "));
        let _ = writeln!(out, "    timeoutSeconds: {REVISION_TIMEOUT_S}");
        for (k, v) in r.scaling.iter().chain(COMMON) {
            let _ = writeln!(out, "    {k}: {v}");
        }
    }
    out
}

/// A YAML flow scalar: JSON's string syntax is valid YAML.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

// ---------------------------------------------------------------------------------------
// What happened
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Short,
    Stream,
    SlowSend,
    SlowRead,
    Burst,
    HangUp,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Short => "short (`/`, `/delay` ≤ 200 ms)",
            Kind::Stream => "streamed (`/stream`, `/sse`, `/bytes` ≤ 2 MiB)",
            Kind::SlowSend => "slow sender (`POST /echo`, body in pieces)",
            Kind::SlowRead => "slow reader (`/bytes`, read in pieces)",
            Kind::Burst => "burst (`/delay` 100–600 ms)",
            Kind::HangUp => "client hangs up mid-request",
        }
    }
}

/// How a request without a response head ended.
#[derive(Debug, Clone)]
enum NoHead {
    Connect(String),
    Eof,
    Reset(String),
    Timeout,
    Malformed,
}

impl NoHead {
    fn short(&self) -> &'static str {
        match self {
            NoHead::Connect(_) => "connect failed",
            NoHead::Eof => "EOF",
            NoHead::Reset(_) => "reset/error",
            NoHead::Timeout => "no head in time",
            NoHead::Malformed => "malformed head",
        }
    }

    fn detail(&self) -> String {
        match self {
            NoHead::Connect(e) => format!("connect: {e}"),
            NoHead::Eof => "EOF before a response head".to_owned(),
            NoHead::Reset(e) => format!("read: {e}"),
            NoHead::Timeout => format!("no response head within {}s", HEAD_TIMEOUT.as_secs()),
            NoHead::Malformed => "malformed response head".to_owned(),
        }
    }
}

/// How a response body ended.
enum BodyEnd {
    Complete(u64),
    Cut {
        bytes: u64,
        why: String,
    },
    /// The client hung up on purpose after reading part of it.
    HungUp,
}

/// One request's fate.
enum Fate {
    Response {
        status: u16,
        body: BodyEnd,
        /// The body's size was wrong (an echo or `/bytes` of the wrong length).
        wrong_size: bool,
    },
    HungUp,
    Lost(NoHead),
}

/// Counts for one kind of request.
struct Tally {
    requests: u64,
    ok: u64,
    ok_cut: u64,
    ok_cut_in_kill: u64,
    wrong_size: u64,
    /// Answered with a status 300–499 (none expected).
    other: BTreeMap<u16, u64>,
    refused: BTreeMap<u16, u64>,
    hung_up: u64,
    lost: BTreeMap<&'static str, u64>,
    /// Time to a complete 2xx, µs.
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            requests: 0,
            ok: 0,
            ok_cut: 0,
            ok_cut_in_kill: 0,
            wrong_size: 0,
            other: BTreeMap::new(),
            refused: BTreeMap::new(),
            hung_up: 0,
            lost: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
        }
    }

    fn lost(&self) -> u64 {
        self.lost.values().sum()
    }
}

/// Websocket sessions' fates.
#[derive(Default)]
struct WsTally {
    sessions: u64,
    completed: u64,
    /// The upgrade was answered with another status.
    refused: BTreeMap<u16, u64>,
    /// The server sent a close frame before the session was over: a clean refusal.
    closed_by_server: u64,
    /// The connection failed mid-session without a close frame.
    broken: u64,
    broken_in_kill: u64,
    hung_up: u64,
    lost: BTreeMap<&'static str, u64>,
    messages: u64,
}

struct LostRecord {
    at: Duration,
    what: String,
    rev: usize,
    reused: bool,
    why: String,
    kills: String,
}

/// A chaos kill, for relating failures to it.
struct Kill {
    at: Instant,
    rev: usize,
    process: &'static str,
}

#[derive(Default)]
struct Ledger {
    kinds: BTreeMap<Kind, Tally>,
    ws: WsTally,
    lost: Vec<LostRecord>,
    /// Cut bodies and broken sessions, with what explains them.
    cuts: Vec<String>,
}

/// What every task shares.
struct Shared {
    addr: SocketAddr,
    started: Instant,
    /// No new request starts after this.
    end: Instant,
    /// A revision in a quiet spell gets no traffic until then.
    quiet_until: Mutex<[Option<Instant>; 3]>,
    ledger: Mutex<Ledger>,
    kills: Mutex<Vec<Kill>>,
    smoke: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn running(&self) -> bool {
        Instant::now() < self.end
    }

    /// A revision not in a quiet spell.
    fn pick_rev(&self, rng: &mut fastrand::Rng) -> usize {
        let now = Instant::now();
        let quiet = *lock(&self.quiet_until);
        let open: Vec<usize> = (0..REVS.len())
            .filter(|&r| quiet[r].is_none_or(|t| t <= now))
            .collect();
        if open.is_empty() {
            rng.usize(0..REVS.len())
        } else {
            open[rng.usize(0..open.len())]
        }
    }

    /// Kills of `rev`'s processes from `KILL_WINDOW` before `from` to now.
    fn kills_since(&self, rev: usize, from: Instant) -> Vec<String> {
        let since = from.checked_sub(KILL_WINDOW).unwrap_or(from);
        lock(&self.kills)
            .iter()
            .filter(|k| k.rev == rev && k.at >= since)
            .map(|k| {
                format!(
                    "{} killed at {:.1}s",
                    k.process,
                    k.at.duration_since(self.started).as_secs_f64()
                )
            })
            .collect()
    }

    fn record(&self, kind: Kind, rev: usize, what: &str, start: Instant, reused: bool, fate: Fate) {
        let kills = self.kills_since(rev, start);
        let mut ledger = lock(&self.ledger);
        let ledger = &mut *ledger;
        let t = ledger.kinds.entry(kind).or_insert_with(Tally::new);
        t.requests += 1;
        match fate {
            Fate::Response {
                status,
                body,
                wrong_size,
            } => match (status, body) {
                (500.., _) => *t.refused.entry(status).or_default() += 1,
                (300.., _) => *t.other.entry(status).or_default() += 1,
                (_, BodyEnd::HungUp) => t.hung_up += 1,
                (_, BodyEnd::Complete(_)) => {
                    t.ok += 1;
                    t.wrong_size += u64::from(wrong_size);
                    let us = start.elapsed().as_micros() as u64;
                    let _ = t.latency.record(us.clamp(1, 600_000_000));
                }
                (_, BodyEnd::Cut { bytes, why }) => {
                    t.ok_cut += 1;
                    if !kills.is_empty() {
                        t.ok_cut_in_kill += 1;
                    }
                    ledger.cuts.push(format!(
                        "{:.1}s {what} on {}: {status}, body cut after {bytes} bytes ({why}); {}",
                        start.duration_since(self.started).as_secs_f64(),
                        REVS[rev].name,
                        if kills.is_empty() {
                            "no kill of this revision nearby".to_owned()
                        } else {
                            kills.join(", ")
                        }
                    ));
                }
            },
            Fate::HungUp => t.hung_up += 1,
            Fate::Lost(why) => {
                *t.lost.entry(why.short()).or_default() += 1;
                ledger.lost.push(LostRecord {
                    at: start.duration_since(self.started),
                    what: what.to_owned(),
                    rev,
                    reused,
                    why: why.detail(),
                    kills: kills.join(", "),
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client
// ---------------------------------------------------------------------------------------

/// A connection to the activator and what has been read from it but not used yet.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Requests already answered on it.
    served: u32,
}

async fn connect(addr: SocketAddr) -> Result<Conn, NoHead> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| NoHead::Connect(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        buf: BytesMut::with_capacity(16 * 1024),
        served: 0,
    })
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    Close,
}

struct Head {
    status: u16,
    framing: Framing,
    close: bool,
}

/// Reads at most `max` more bytes into `buf`. `Ok(0)` is EOF.
async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> io::Result<usize> {
    buf.reserve(max.min(64 * 1024));
    let mut limited = (&mut *buf).limit(max);
    rd.read_buf(&mut limited).await
}

async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<Head, NoHead> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.ok_or(NoHead::Malformed)?;
                let mut framing = Framing::Close;
                let mut close = false;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let n = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or(NoHead::Malformed)?;
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
                if status == 101 || status == 204 || status == 304 {
                    framing = Framing::Length(0);
                }
                buf.advance(len);
                if (100..200).contains(&status) && status != 101 {
                    // An interim response: the final one follows.
                    continue;
                }
                return Ok(Head {
                    status,
                    framing,
                    close,
                });
            }
            Ok(httparse::Status::Partial) => {
                match timeout_at(deadline, fill(rd, buf, 16 * 1024)).await {
                    Err(_) => return Err(NoHead::Timeout),
                    Ok(Ok(0)) => return Err(NoHead::Eof),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(NoHead::Reset(e.to_string())),
                }
            }
            Err(_) => return Err(NoHead::Malformed),
        }
    }
}

/// How the client reads a body.
#[derive(Debug, Clone, Copy)]
struct ReadPace {
    /// Bytes per read.
    step: usize,
    /// Pause after each read.
    every: Duration,
    /// Hang up once this many body bytes have been read.
    hang_up_after: Option<u64>,
}

const FULL_SPEED: ReadPace = ReadPace {
    step: 64 * 1024,
    every: Duration::ZERO,
    hang_up_after: None,
};

/// Reads a body to its end, as paced.
async fn read_body<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    framing: Framing,
    pace: ReadPace,
    deadline: Instant,
) -> BodyEnd {
    let mut got = 0u64;
    // Chunked: bytes of the current chunk still to come (data + CRLF), or None between
    // chunks.
    let mut in_chunk: Option<u64> = None;
    loop {
        // Consume what the buffer holds.
        match framing {
            Framing::Length(n) => {
                let take = (n - got).min(buf.len() as u64);
                buf.advance(take as usize);
                got += take;
                if got == n {
                    return BodyEnd::Complete(got);
                }
            }
            Framing::Close => {
                got += buf.len() as u64;
                buf.clear();
            }
            Framing::Chunked => loop {
                match in_chunk {
                    Some(left) => {
                        let take = left.min(buf.len() as u64);
                        buf.advance(take as usize);
                        // The CRLF after the data is not body.
                        got += take.min(left.saturating_sub(2));
                        let left = left - take;
                        in_chunk = (left > 0).then_some(left);
                        if left > 0 {
                            break;
                        }
                    }
                    None => {
                        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                            break;
                        };
                        let size = std::str::from_utf8(&buf[..end])
                            .ok()
                            .and_then(|l| l.split(';').next())
                            .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
                        let Some(size) = size else {
                            return BodyEnd::Cut {
                                bytes: got,
                                why: "bad chunk size".to_owned(),
                            };
                        };
                        if size == 0 {
                            // The last chunk; trailers and the final CRLF end the body.
                            if let Some(t) = buf[end..].windows(4).position(|w| w == b"\r\n\r\n") {
                                buf.advance(end + t + 4);
                                return BodyEnd::Complete(got);
                            }
                            break;
                        }
                        buf.advance(end + 2);
                        in_chunk = Some(size + 2);
                    }
                }
            },
        }
        if pace.hang_up_after.is_some_and(|n| got >= n) {
            return BodyEnd::HungUp;
        }
        if !pace.every.is_zero() {
            sleep(pace.every).await;
        }
        match timeout_at(deadline, fill(rd, buf, pace.step)).await {
            Err(_) => {
                return BodyEnd::Cut {
                    bytes: got,
                    why: "timed out".to_owned(),
                }
            }
            Ok(Ok(0)) => {
                return match framing {
                    Framing::Close => BodyEnd::Complete(got),
                    _ => BodyEnd::Cut {
                        bytes: got,
                        why: "EOF".to_owned(),
                    },
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return BodyEnd::Cut {
                    bytes: got,
                    why: e.to_string(),
                }
            }
        }
    }
}

/// How the client sends a request.
#[derive(Debug, Clone)]
struct Plan {
    kind: Kind,
    rev: usize,
    method: &'static str,
    path: String,
    /// Body bytes, with `Content-Length`.
    body: u64,
    /// Bytes per write of the body, and the pause after each.
    send_step: usize,
    send_every: Duration,
    /// Hang up after sending this many bytes of the head…
    hang_up_in_head: bool,
    /// …or of the body, then waiting this long (a response that comes first still counts).
    hang_up_in_body: Option<(u64, Duration)>,
    /// …or this long after sending the whole request, if no head came.
    hang_up_waiting: Option<Duration>,
    read: ReadPace,
    /// The body size a complete 2xx must have.
    expect: Option<u64>,
    reuse: bool,
}

impl Plan {
    fn get(kind: Kind, rev: usize, path: String) -> Plan {
        Plan {
            kind,
            rev,
            method: "GET",
            path,
            body: 0,
            send_step: 64 * 1024,
            send_every: Duration::ZERO,
            hang_up_in_head: false,
            hang_up_in_body: None,
            hang_up_waiting: None,
            read: FULL_SPEED,
            expect: None,
            reuse: true,
        }
    }

    fn head_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nhost: {}\r\nuser-agent: thaw-soak\r\n",
            self.method,
            self.path,
            host(self.rev)
        );
        if self.body > 0 || self.method == "POST" {
            let _ = write!(
                out,
                "content-length: {}\r\ncontent-type: application/octet-stream\r\n",
                self.body
            );
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    fn what(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Why sending stopped early.
enum SendEnd {
    HungUp,
    Failed(String),
}

async fn send<W: AsyncWrite + Unpin>(
    wr: &mut W,
    plan: &Plan,
    head_seen: &AtomicBool,
) -> Result<(), SendEnd> {
    let head = plan.head_bytes();
    let fail = |e: io::Error| SendEnd::Failed(e.to_string());
    if plan.hang_up_in_head {
        wr.write_all(&head[..head.len() / 2]).await.map_err(fail)?;
        sleep(Duration::from_millis(50)).await;
        return Err(SendEnd::HungUp);
    }
    wr.write_all(&head).await.map_err(fail)?;
    let body_limit = plan.hang_up_in_body.map_or(plan.body, |(n, _)| n);
    let chunk = vec![b'b'; plan.send_step.max(1)];
    let mut sent = 0u64;
    while sent < body_limit {
        let n = (body_limit - sent).min(chunk.len() as u64) as usize;
        wr.write_all(&chunk[..n]).await.map_err(fail)?;
        sent += n as u64;
        if !plan.send_every.is_zero() && sent < body_limit {
            sleep(plan.send_every).await;
        }
    }
    if let Some((_, wait)) = plan.hang_up_in_body {
        sleep(wait).await;
        return Err(SendEnd::HungUp);
    }
    if let Some(wait) = plan.hang_up_waiting {
        sleep(wait).await;
        if !head_seen.load(Ordering::Relaxed) {
            return Err(SendEnd::HungUp);
        }
    }
    Ok(())
}

/// What the receiving side saw.
enum Recv {
    NoHead(NoHead),
    Response {
        status: u16,
        body: BodyEnd,
        close: bool,
    },
}

async fn receive<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    plan: &Plan,
    start: Instant,
    head_seen: &AtomicBool,
) -> Recv {
    let head = match read_head(rd, buf, start + HEAD_TIMEOUT).await {
        Ok(h) => h,
        Err(e) => return Recv::NoHead(e),
    };
    head_seen.store(true, Ordering::Relaxed);
    let pace = if head.status < 300 {
        plan.read
    } else {
        FULL_SPEED
    };
    let body = read_body(rd, buf, head.framing, pace, start + EXCHANGE_TIMEOUT).await;
    Recv::Response {
        status: head.status,
        body,
        close: head.close || matches!(head.framing, Framing::Close),
    }
}

/// Runs one request on `conn` (or a new connection) and returns its fate, with the
/// connection if it can carry another request.
async fn exchange(shared: &Shared, conn: Option<Conn>, plan: &Plan) -> (Fate, Option<Conn>, bool) {
    let mut conn = match conn {
        Some(c) => c,
        None => match connect(shared.addr).await {
            Ok(c) => c,
            Err(e) => return (Fate::Lost(e), None, false),
        },
    };
    let reused = conn.served > 0;
    let start = Instant::now();
    // Shared by the two halves of one task: an atomic only because tasks must be Send.
    let head_seen = AtomicBool::new(false);
    let mut send_result: Option<Result<(), SendEnd>> = None;
    let recv = {
        let (mut rd, mut wr) = conn.stream.split();
        let sending = send(&mut wr, plan, &head_seen);
        let receiving = receive(&mut rd, &mut conn.buf, plan, start, &head_seen);
        tokio::pin!(sending, receiving);
        loop {
            tokio::select! {
                r = &mut sending, if send_result.is_none() => {
                    match r {
                        Err(SendEnd::HungUp) => {
                            return (Fate::HungUp, None, reused);
                        }
                        Err(SendEnd::Failed(e)) if !head_seen.load(Ordering::Relaxed) => {
                            // A server that answers early and closes can make a write fail
                            // while its response waits in our buffer: read it before judging.
                            let deadline = Instant::now() + Duration::from_secs(2);
                            let recv = tokio::select! {
                                r = &mut receiving => r,
                                () = sleep_until(deadline) => Recv::NoHead(NoHead::Timeout),
                            };
                            if let Recv::NoHead(why) = recv {
                                let why = NoHead::Reset(format!("write: {e}; then {}", why.detail()));
                                return (Fate::Lost(why), None, reused);
                            }
                            break recv;
                        }
                        r => send_result = Some(r),
                    }
                }
                r = &mut receiving => break r,
            }
        }
    };
    let sent_all = matches!(send_result, Some(Ok(())));
    let (fate, keep) = match recv {
        Recv::NoHead(why) => (Fate::Lost(why), false),
        Recv::Response {
            status,
            body,
            close,
        } => {
            let complete = matches!(body, BodyEnd::Complete(_));
            let wrong_size = match (&body, plan.expect) {
                (BodyEnd::Complete(n), Some(want)) if status < 300 => *n != want,
                _ => false,
            };
            (
                Fate::Response {
                    status,
                    body,
                    wrong_size,
                },
                complete && sent_all && !close,
            )
        }
    };
    conn.served += 1;
    let keep = keep && plan.reuse && conn.served < REUSE_LIMIT;
    (fate, keep.then_some(conn), reused)
}

// ---------------------------------------------------------------------------------------
// Websockets
// ---------------------------------------------------------------------------------------

enum WsFate {
    Completed(u64),
    Refused(u16),
    ClosedByServer(u64),
    Broken(u64, String),
    HungUp,
    Lost(NoHead),
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

async fn ws_session(shared: &Shared, rev: usize, rng: &mut fastrand::Rng, hang_up: bool) -> WsFate {
    let mut conn = match connect(shared.addr).await {
        Ok(c) => c,
        Err(e) => return WsFate::Lost(e),
    };
    let request = format!(
        "GET /ws HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: {WS_KEY}\r\nsec-websocket-version: 13\r\n\r\n",
        host(rev)
    );
    if let Err(e) = conn.stream.write_all(request.as_bytes()).await {
        return WsFate::Lost(NoHead::Reset(format!("write: {e}")));
    }
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let head = match read_head(&mut conn.stream, &mut conn.buf, deadline).await {
        Ok(h) => h,
        Err(e) => return WsFate::Lost(e),
    };
    if head.status != 101 {
        return WsFate::Refused(head.status);
    }
    let leftover = conn.buf.to_vec();
    let mut ws =
        WebSocketStream::from_partially_read(conn.stream, leftover, Role::Client, None).await;
    let messages = if hang_up { 1 } else { rng.u64(3..=8) };
    let mut echoed = 0;
    for i in 0..messages {
        let text = format!("{}-{i}-{}", REVS[rev].name, rng.u32(..));
        if let Err(e) = ws.send(Message::text(text.clone())).await {
            return WsFate::Broken(echoed, format!("send: {e}"));
        }
        let reply = loop {
            match tokio::time::timeout(ECHO_TIMEOUT, ws.next()).await {
                Err(_) => break Err(format!("no echo within {}s", ECHO_TIMEOUT.as_secs())),
                Ok(None) => break Err("EOF without a close frame".to_owned()),
                Ok(Some(Err(e))) => break Err(e.to_string()),
                Ok(Some(Ok(Message::Close(_)))) => return WsFate::ClosedByServer(echoed),
                Ok(Some(Ok(Message::Text(t)))) => break Ok(t.to_string()),
                Ok(Some(Ok(Message::Binary(_)))) => break Err("binary reply".to_owned()),
                Ok(Some(Ok(_))) => {}
            }
        };
        match reply {
            Ok(t) if t == text => echoed += 1,
            Ok(t) => return WsFate::Broken(echoed, format!("wrong echo {t:?}")),
            Err(e) => return WsFate::Broken(echoed, e),
        }
        sleep(Duration::from_millis(rng.u64(20..200))).await;
    }
    if hang_up {
        // Dropped without a close frame: the client vanishing.
        drop(ws);
        return WsFate::HungUp;
    }
    if let Err(e) = ws.close(None).await {
        return WsFate::Broken(echoed, format!("close: {e}"));
    }
    loop {
        match tokio::time::timeout(ECHO_TIMEOUT, ws.next()).await {
            Err(_) => return WsFate::Broken(echoed, "no close reply".to_owned()),
            // tungstenite ends the stream once the close handshake is over.
            Ok(None) => return WsFate::Completed(echoed),
            Ok(Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed))) => {
                return WsFate::Completed(echoed)
            }
            Ok(Some(Err(e))) => return WsFate::Broken(echoed, format!("at close: {e}")),
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn record_ws(shared: &Shared, rev: usize, start: Instant, fate: WsFate) {
    let kills = shared.kills_since(rev, start);
    let mut ledger = lock(&shared.ledger);
    let ledger = &mut *ledger;
    let w = &mut ledger.ws;
    w.sessions += 1;
    match fate {
        WsFate::Completed(n) => {
            w.completed += 1;
            w.messages += n;
        }
        WsFate::Refused(status) => *w.refused.entry(status).or_default() += 1,
        WsFate::ClosedByServer(n) => {
            w.closed_by_server += 1;
            w.messages += n;
        }
        WsFate::Broken(n, why) => {
            w.broken += 1;
            w.messages += n;
            if !kills.is_empty() {
                w.broken_in_kill += 1;
            }
            ledger.cuts.push(format!(
                "{:.1}s websocket on {} broken after {n} echoes ({why}); {}",
                start.duration_since(shared.started).as_secs_f64(),
                REVS[rev].name,
                if kills.is_empty() {
                    "no kill of this revision nearby".to_owned()
                } else {
                    kills.join(", ")
                }
            ));
        }
        WsFate::HungUp => w.hung_up += 1,
        WsFate::Lost(why) => {
            *w.lost.entry(why.short()).or_default() += 1;
            ledger.lost.push(LostRecord {
                at: start.duration_since(shared.started),
                what: "websocket GET /ws".to_owned(),
                rev,
                reused: false,
                why: why.detail(),
                kills: kills.join(", "),
            });
        }
    }
}

// ---------------------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Load {
    Short,
    Stream,
    Websocket,
    Slow,
    HangUp,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Short => "short-request clients",
            Load::Stream => "streaming clients",
            Load::Websocket => "websocket clients",
            Load::Slow => "slow clients (half slow senders, half slow readers)",
            Load::HangUp => "clients that hang up (one in five on a websocket)",
        }
    }
}

/// Workers per role: a load two shared cores can carry alongside the processes under test.
const WORKERS: &[(Load, usize)] = &[
    (Load::Short, 6),
    (Load::Stream, 2),
    (Load::Websocket, 2),
    (Load::Slow, 2),
    (Load::HangUp, 2),
];

fn plan_for(role: Load, rev: usize, rng: &mut fastrand::Rng) -> Plan {
    match role {
        Load::Short => {
            let path = if rng.u8(0..5) == 0 {
                format!("/delay?ms={}", rng.u32(1..=200))
            } else {
                "/".to_owned()
            };
            Plan::get(Kind::Short, rev, path)
        }
        Load::Stream => match rng.u8(0..10) {
            0..=4 => Plan::get(
                Kind::Stream,
                rev,
                format!(
                    "/stream?chunks={}&interval_ms={}&size={}",
                    rng.u32(10..=60),
                    rng.u32(5..=40),
                    rng.u32(64..=8192)
                ),
            ),
            5..=6 => Plan::get(
                Kind::Stream,
                rev,
                format!(
                    "/sse?events={}&interval_ms={}",
                    rng.u32(5..=30),
                    rng.u32(10..=50)
                ),
            ),
            _ => {
                let n = rng.u64(16 * 1024..=2 * 1024 * 1024);
                let mut plan = Plan::get(Kind::Stream, rev, format!("/bytes?n={n}"));
                plan.expect = Some(n);
                plan
            }
        },
        Load::Slow => {
            if rng.bool() {
                let n = rng.u64(2 * 1024..=16 * 1024);
                let mut plan = Plan::get(Kind::SlowSend, rev, "/echo".to_owned());
                plan.method = "POST";
                plan.body = n;
                plan.send_step = rng.usize(256..=1024);
                plan.send_every = Duration::from_millis(rng.u64(20..=100));
                plan.expect = Some(n);
                plan
            } else {
                let n = rng.u64(128 * 1024..=1024 * 1024);
                let mut plan = Plan::get(Kind::SlowRead, rev, format!("/bytes?n={n}"));
                plan.read = ReadPace {
                    step: 4096,
                    every: Duration::from_millis(rng.u64(5..=30)),
                    hang_up_after: None,
                };
                plan.expect = Some(n);
                plan
            }
        }
        Load::HangUp => {
            let mut plan = Plan::get(Kind::HangUp, rev, "/".to_owned());
            plan.reuse = false;
            match rng.u8(0..4) {
                0 => plan.hang_up_in_head = true,
                1 => {
                    plan.method = "POST";
                    plan.path = "/echo".to_owned();
                    plan.body = 4096;
                    plan.send_step = 512;
                    plan.send_every = Duration::from_millis(10);
                    plan.hang_up_in_body =
                        Some((rng.u64(1..4096), Duration::from_millis(rng.u64(0..=300))));
                }
                2 => {
                    plan.path = "/delay?ms=2000".to_owned();
                    plan.hang_up_waiting = Some(Duration::from_millis(rng.u64(10..=500)));
                }
                _ => {
                    plan.path = "/stream?chunks=50&interval_ms=20&size=512".to_owned();
                    plan.read.hang_up_after = Some(rng.u64(1..=10 * 512));
                }
            }
            plan
        }
        Load::Websocket => unreachable!("websocket sessions have no plan"),
    }
}

async fn worker(shared: Arc<Shared>, role: Load, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut conn: Option<Conn> = None;
    while shared.running() {
        let rev = shared.pick_rev(&mut rng);
        let start = Instant::now();
        match role {
            Load::Websocket => {
                let fate = ws_session(&shared, rev, &mut rng, false).await;
                record_ws(&shared, rev, start, fate);
            }
            // One in five of the hang-ups is a websocket client that vanishes.
            Load::HangUp if rng.u8(0..5) == 0 => {
                let fate = ws_session(&shared, rev, &mut rng, true).await;
                record_ws(&shared, rev, start, fate);
            }
            _ => {
                let plan = plan_for(role, rev, &mut rng);
                let (fate, back, reused) = exchange(&shared, conn.take(), &plan).await;
                shared.record(plan.kind, rev, &plan.what(), start, reused, fate);
                conn = back;
            }
        }
        let think = match role {
            Load::Short => rng.u64(0..=20),
            _ => rng.u64(0..=100),
        };
        sleep(Duration::from_millis(think)).await;
    }
}

/// A burst's connection: back-to-back `/delay` requests to one revision until `until`.
async fn burster(shared: Arc<Shared>, rev: usize, until: Instant, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut conn = None;
    while Instant::now() < until && shared.running() {
        let plan = Plan::get(
            Kind::Burst,
            rev,
            format!("/delay?ms={}", rng.u32(100..=600)),
        );
        let start = Instant::now();
        let (fate, back, reused) = exchange(&shared, conn.take(), &plan).await;
        shared.record(Kind::Burst, rev, &plan.what(), start, reused, fate);
        conn = back;
    }
}

// ---------------------------------------------------------------------------------------
// The pods, seen from /proc
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcKind {
    App,
    QueueProxy,
}

struct PodProc {
    pid: u32,
    kind: ProcKind,
    rev: Option<usize>,
}

/// The activator's live pod processes: its children named like the test app or the
/// queue-proxy, with the revision from their environment.
fn pod_processes(activator: u32) -> Vec<PodProc> {
    process_tree(activator)
        .into_iter()
        .filter(|&pid| pid != activator)
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // A zombie has no memory and is already dead.
            let state = stat.rsplit_once(") ")?.1.split(' ').next()?;
            if state == "Z" || state == "X" {
                return None;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let (kind, var) = match comm.trim() {
                "thaw-testapp" => (ProcKind::App, "K_REVISION="),
                "queue-proxy" => (ProcKind::QueueProxy, "SERVING_REVISION="),
                _ => return None,
            };
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let rev = environ
                .split(|&b| b == 0)
                .filter_map(|kv| std::str::from_utf8(kv).ok())
                .find_map(|kv| kv.strip_prefix(var))
                .and_then(|name| REVS.iter().position(|r| r.name == name));
            Some(PodProc { pid, kind, rev })
        })
        .collect()
}

struct RssRow {
    at: Duration,
    activator_kib: u64,
    qp_max_kib: u64,
    qp_sum_kib: u64,
    qps: usize,
    apps: usize,
    per_rev: [usize; 3],
}

fn rss_row(started: Instant, activator: u32) -> RssRow {
    let procs = pod_processes(activator);
    let qp: Vec<u64> = procs
        .iter()
        .filter(|p| p.kind == ProcKind::QueueProxy)
        .map(|p| harness::rss_kib(p.pid))
        .collect();
    let mut per_rev = [0; 3];
    for p in procs.iter().filter(|p| p.kind == ProcKind::QueueProxy) {
        if let Some(r) = p.rev {
            per_rev[r] += 1;
        }
    }
    RssRow {
        at: started.elapsed(),
        activator_kib: harness::rss_kib(activator),
        qp_max_kib: qp.iter().copied().max().unwrap_or(0),
        qp_sum_kib: qp.iter().sum(),
        qps: qp.len(),
        apps: procs.iter().filter(|p| p.kind == ProcKind::App).count(),
        per_rev,
    }
}

/// Pod processes the activator logged starting that still run, as `pid (name)`.
fn survivors(log: &[String]) -> Vec<String> {
    let mut pids = Vec::new();
    for line in log {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let message = v["message"].as_str().unwrap_or_default();
        if message == "pod started" || message.ends_with(" restarted") {
            for key in ["app_pid", "queue_proxy_pid", "pid"] {
                // `pid` is logged as `Some(123)`.
                let pid = v[key].as_u64().or_else(|| {
                    v[key].as_str().and_then(|s| {
                        s.trim_start_matches("Some(")
                            .trim_end_matches(')')
                            .parse()
                            .ok()
                    })
                });
                pids.extend(pid);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = stat
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'));
            (!zombie && (comm == "thaw-testapp" || comm == "queue-proxy"))
                .then(|| format!("{pid} ({comm})"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Chaos
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct ChaosCounts {
    app_kills: [u64; 3],
    qp_kills: [u64; 3],
    /// Picked a kill, but the revision had no such process running.
    kills_without_target: u64,
    bursts: [u64; 3],
    burst_connections: u64,
    quiet_spells: [u64; 3],
}

async fn chaos(
    shared: Arc<Shared>,
    activator: u32,
    seed: u64,
    tasks: Arc<Mutex<JoinSet<()>>>,
) -> ChaosCounts {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut counts = ChaosCounts::default();
    // Let the first pods come up before anything is killed.
    let (first, gap) = if shared.smoke {
        (Duration::from_secs(2), 1000..=3000)
    } else {
        (Duration::from_secs(10), 2000..=10_000)
    };
    sleep(first).await;
    let mut n = 0u64;
    while shared.running() {
        n += 1;
        match rng.u8(0..20) {
            // Kill an app or a queue-proxy: 12 in 20.
            k @ 0..=11 => {
                let kind = if k < 6 {
                    ProcKind::App
                } else {
                    ProcKind::QueueProxy
                };
                let procs: Vec<PodProc> = pod_processes(activator)
                    .into_iter()
                    .filter(|p| p.kind == kind && p.rev.is_some())
                    .collect();
                if procs.is_empty() {
                    counts.kills_without_target += 1;
                } else {
                    let victim = &procs[rng.usize(0..procs.len())];
                    let rev = victim.rev.unwrap_or(0);
                    let pid = nix::unistd::Pid::from_raw(victim.pid as i32);
                    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                        let process = match kind {
                            ProcKind::App => {
                                counts.app_kills[rev] += 1;
                                "app"
                            }
                            ProcKind::QueueProxy => {
                                counts.qp_kills[rev] += 1;
                                "queue-proxy"
                            }
                        };
                        lock(&shared.kills).push(Kill {
                            at: Instant::now(),
                            rev,
                            process,
                        });
                    } else {
                        counts.kills_without_target += 1;
                    }
                }
            }
            // A burst: 5 in 20.
            12..=16 => {
                let rev = shared.pick_rev(&mut rng);
                let conns = rng.u64(10..=30);
                let until = Instant::now() + Duration::from_millis(rng.u64(5000..=15_000));
                counts.bursts[rev] += 1;
                counts.burst_connections += conns;
                let mut set = lock(&tasks);
                for i in 0..conns {
                    set.spawn(burster(
                        Arc::clone(&shared),
                        rev,
                        until,
                        seed ^ (n << 16) ^ i,
                    ));
                }
            }
            // A quiet spell, one revision at a time: 3 in 20.
            _ => {
                let rev = rng.usize(0..REVS.len());
                let mut quiet = lock(&shared.quiet_until);
                let now = Instant::now();
                if quiet.iter().all(|q| q.is_none_or(|t| t <= now)) {
                    quiet[rev] = Some(now + Duration::from_millis(rng.u64(20_000..=40_000)));
                    counts.quiet_spells[rev] += 1;
                }
            }
        }
        sleep(Duration::from_millis(rng.u64(gap.clone()))).await;
    }
    counts
}

// ---------------------------------------------------------------------------------------
// The activator's own account, from its log
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct LogCounts {
    scale_ups: [u64; 3],
    scale_downs: [u64; 3],
    to_zero: [u64; 3],
    max_pods: [u64; 3],
    exits: BTreeMap<String, u64>,
    restarts: u64,
    warnings: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

fn read_log(lines: &[String]) -> LogCounts {
    let mut c = LogCounts::default();
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let message = v["message"].as_str().unwrap_or_default();
        let rev = v["revision"]
            .as_str()
            .and_then(|r| REVS.iter().position(|x| r.ends_with(x.name)));
        let level = v["level"].as_str().unwrap_or_default().to_ascii_lowercase();
        if message.starts_with("scaling ") {
            if let (Some(r), Some(from), Some(to)) = (rev, v["from"].as_u64(), v["to"].as_u64()) {
                if to > from {
                    c.scale_ups[r] += 1;
                } else {
                    c.scale_downs[r] += 1;
                }
                c.max_pods[r] = c.max_pods[r].max(to);
            }
        } else if message.starts_with("scaled ") && message.ends_with(" to zero") {
            if let Some(r) = rev {
                c.to_zero[r] += 1;
            }
        } else if message.ends_with(" restarted") {
            c.restarts += 1;
        } else if message.contains(" exited; restarting") {
            let process = v["process"].as_str().unwrap_or("?");
            let status = v["status"].as_str().unwrap_or("?");
            *c.exits.entry(format!("{process}: {status}")).or_default() += 1;
        } else if level == "warn" {
            *c.warnings.entry(message.to_owned()).or_default() += 1;
        } else if level == "error" {
            *c.errors.entry(message.to_owned()).or_default() += 1;
        }
    }
    c
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

pub async fn run(ctx: Arc<Ctx>) -> Section {
    let mut section = Section::new(&format!(
        "Soak: the local platform for {} at mixed load, with kills and scaling (seed {})",
        humanize(ctx.duration),
        ctx.seed
    ));
    match soak(&ctx, &mut section).await {
        Ok(()) => {}
        Err(e) => section.fail(format!("soak: {e}")),
    }
    section
}

/// The time of day, UTC, to the millisecond.
fn utc_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let day_ms = now.as_millis() % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{:.0} s", d.as_secs_f64())
    }
}

async fn soak(ctx: &Ctx, section: &mut Section) -> Result<(), String> {
    let app = harness::bin("thaw-testapp");
    let yaml = config_yaml(&app.to_string_lossy(), &ctx.app_args());
    progress("soak: starting the activator with three revisions");
    let mut act = Activator::start(&yaml, &[]).await;
    let act_pid = act.pid();
    let started = Instant::now();
    progress(&format!(
        "soak: t=0 is {} UTC (the activator log's clock)",
        utc_now()
    ));
    let shared = Arc::new(Shared {
        addr: act.http,
        started,
        end: started + ctx.duration,
        quiet_until: Mutex::new([None; 3]),
        ledger: Mutex::new(Ledger::default()),
        kills: Mutex::new(Vec::new()),
        smoke: ctx.smoke,
    });

    let tasks = Arc::new(Mutex::new(JoinSet::new()));
    {
        let mut set = lock(&tasks);
        let mut i = 0u64;
        for &(role, n) in WORKERS {
            for _ in 0..n {
                i += 1;
                let seed = ctx.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i);
                set.spawn(worker(Arc::clone(&shared), role, seed));
            }
        }
    }
    let chaos_task = tokio::spawn(chaos(
        Arc::clone(&shared),
        act_pid,
        ctx.seed ^ 0xC4A0_5C4A_05C4_A05C,
        Arc::clone(&tasks),
    ));

    // RSS every 10 s (more often in a short run), and a progress line each minute.
    let every = (ctx.duration / 30).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut rows = vec![rss_row(started, act_pid)];
    let mut next = started + every;
    let mut said = started;
    while Instant::now() < shared.end {
        sleep_until(next.min(shared.end)).await;
        if Instant::now() >= next {
            rows.push(rss_row(started, act_pid));
            next += every;
        }
        if said.elapsed() >= Duration::from_secs(60) || (ctx.smoke && said.elapsed() >= every) {
            said = Instant::now();
            let l = lock(&shared.ledger);
            let answered: u64 = l.kinds.values().map(|t| t.ok).sum();
            let lost = l.lost.len();
            drop(l);
            progress(&format!(
                "soak: {:.0}s of {:.0}s, {} answered, {lost} lost",
                started.elapsed().as_secs_f64(),
                ctx.duration.as_secs_f64(),
                group(answered)
            ));
        }
        if let Some(status) = act.try_exit() {
            return Err(format!("the activator exited during the soak: {status}"));
        }
    }
    let chaos_counts = chaos_task.await.map_err(|e| format!("chaos task: {e}"))?;
    progress("soak: load stopped; waiting for the requests in flight");
    let drained = {
        let mut set = std::mem::take(&mut *lock(&tasks));
        let deadline = Instant::now() + EXCHANGE_TIMEOUT + Duration::from_secs(10);
        let mut ok = true;
        while !set.is_empty() {
            match timeout_at(deadline, set.join_next()).await {
                Ok(Some(Ok(()))) | Ok(None) => {}
                Ok(Some(Err(e))) => {
                    section.fail(format!("soak: a client task failed: {e}"));
                }
                Err(_) => {
                    ok = false;
                    set.abort_all();
                    break;
                }
            }
        }
        ok
    };
    if !drained {
        section.fail("soak: client tasks still running after the exchange timeout".to_owned());
    }
    rows.push(rss_row(started, act_pid));
    let lines = act.logs();
    let log = read_log(&lines);
    // The whole log, for finding out what happened around a failure the tables show.
    let log_path =
        std::env::temp_dir().join(format!("thaw-soak-{}-activator.log", std::process::id()));
    match std::fs::write(&log_path, lines.join("\n")) {
        Ok(()) => progress(&format!(
            "soak: the activator's log is in {}",
            log_path.display()
        )),
        Err(e) => progress(&format!("soak: cannot write {}: {e}", log_path.display())),
    }
    let ledger = std::mem::take(&mut *lock(&shared.ledger));
    render(ctx, section, &ledger, &chaos_counts, &log, &rows);

    progress("soak: stopping the activator (SIGINT: it drains and stops its pods)");
    act.signal("INT");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = act.try_exit() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        sleep(Duration::from_millis(100)).await;
    };
    let leftover = survivors(&act.logs());
    match status {
        Some(status) => section.line(&format!(
            "After the run the activator was stopped with SIGINT: it exited ({status}) and left {} pod process(es) running.\n",
            leftover.len()
        )),
        None => section.fail("soak: the activator did not exit within 60 s of SIGINT".to_owned()),
    }
    if !leftover.is_empty() {
        section.fail(format!(
            "soak: pod processes outlived the activator: {leftover:?}"
        ));
    }
    let lost: u64 =
        ledger.kinds.values().map(Tally::lost).sum::<u64>() + ledger.ws.lost.values().sum::<u64>();
    if lost > 0 {
        section.fail(format!(
            "soak: {lost} request(s) lost (no response, no status)"
        ));
    }
    if ledger.kinds.values().all(|t| t.ok == 0) {
        section.fail("soak: not one request was answered".to_owned());
    }
    Ok(())
}

fn statuses(m: &BTreeMap<u16, u64>) -> String {
    if m.is_empty() {
        return "0".to_owned();
    }
    let total: u64 = m.values().sum();
    let parts: Vec<String> = m
        .iter()
        .map(|(s, n)| format!("{s}: {}", group(*n)))
        .collect();
    format!("{} ({})", group(total), parts.join(", "))
}

fn lost_text(m: &BTreeMap<&'static str, u64>) -> String {
    let total: u64 = m.values().sum();
    if total == 0 {
        return "**0**".to_owned();
    }
    let parts: Vec<String> = m.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    format!("**{}** ({})", group(total), parts.join(", "))
}

fn per_rev(v: &[u64; 3]) -> String {
    format!("{} / {} / {}", v[0], v[1], v[2])
}

fn render(
    ctx: &Ctx,
    section: &mut Section,
    ledger: &Ledger,
    chaos: &ChaosCounts,
    log: &LogCounts,
    rows: &[RssRow],
) {
    let secs = ctx.duration.as_secs_f64();
    let mut fates = Table::new(&[
        "requests",
        "sent",
        "answered 2xx",
        "2xx, body cut (during a kill)",
        "answered 3xx/4xx",
        "refused 5xx",
        "client hung up",
        "lost",
        "2xx p50 / p99 ms",
    ]);
    let mut total = Tally::new();
    for (kind, t) in &ledger.kinds {
        fates.row(vec![
            kind.label().to_owned(),
            group(t.requests),
            format!(
                "{}{}",
                group(t.ok),
                if t.wrong_size > 0 {
                    format!(" ({} of the wrong size)", t.wrong_size)
                } else {
                    String::new()
                }
            ),
            format!("{} ({})", t.ok_cut, t.ok_cut_in_kill),
            statuses(&t.other),
            statuses(&t.refused),
            group(t.hung_up),
            lost_text(&t.lost),
            if t.ok > 0 {
                format!(
                    "{:.1} / {:.0}",
                    t.latency.value_at_quantile(0.5) as f64 / 1000.0,
                    t.latency.value_at_quantile(0.99) as f64 / 1000.0
                )
            } else {
                "—".to_owned()
            },
        ]);
        total.requests += t.requests;
        total.ok += t.ok;
        total.ok_cut += t.ok_cut;
        total.ok_cut_in_kill += t.ok_cut_in_kill;
        total.wrong_size += t.wrong_size;
        total.hung_up += t.hung_up;
        for (s, n) in &t.other {
            *total.other.entry(*s).or_default() += n;
        }
        for (s, n) in &t.refused {
            *total.refused.entry(*s).or_default() += n;
        }
        for (s, n) in &t.lost {
            *total.lost.entry(s).or_default() += n;
        }
    }
    fates.row(vec![
        "**all HTTP requests**".to_owned(),
        format!("**{}**", group(total.requests)),
        format!("**{}**", group(total.ok)),
        format!("{} ({})", total.ok_cut, total.ok_cut_in_kill),
        statuses(&total.other),
        statuses(&total.refused),
        group(total.hung_up),
        lost_text(&total.lost),
        format!("{:.0} rps", total.requests as f64 / secs),
    ]);
    section.line("### Every request's fate\n");
    section.line(&fates.render());
    section.line(
        "Counted at the client, a raw HTTP/1.1 one with no retries. *answered*: a response head with a status below 500; *body cut*: a 2xx whose body ended early (the connection failed mid-body), with in brackets those that began at most 2 s before a kill of a process of the same revision or later; *refused*: a 5xx; *client hung up*: the client closed on purpose (mid-head, mid-body, while waiting, or mid-response), whatever the server had sent by then; *lost*: no response head and no status at all (reset, EOF, or nothing within 45 s), on a connection the client did not hang up. The target for lost is 0.\n",
    );

    let w = &ledger.ws;
    let mut ws = Table::new(&[
        "websocket sessions",
        "completed",
        "refused (status)",
        "closed cleanly by the server",
        "broken mid-session (during a kill)",
        "client vanished",
        "lost",
        "messages echoed",
    ]);
    ws.row(vec![
        group(w.sessions),
        group(w.completed),
        statuses(&w.refused),
        group(w.closed_by_server),
        format!("{} ({})", w.broken, w.broken_in_kill),
        group(w.hung_up),
        lost_text(&w.lost),
        group(w.messages),
    ]);
    section.line(&ws.render());
    section.line(
        "A session upgrades `GET /ws`, sends 3–8 text messages 20–200 ms apart, checks each echo (10 s limit), and closes with a close handshake. *broken*: the connection failed mid-session without a close frame (a kill of the pod's app or queue-proxy ends its tunnels this way; in brackets those near a kill of that revision); *closed cleanly*: the server sent a close frame first; *client vanished*: one echo, then the client drops the TCP connection.\n",
    );

    if !ledger.lost.is_empty() {
        let mut t = Table::new(&[
            "at",
            "request",
            "revision",
            "connection",
            "what the client saw",
            "kills nearby",
        ]);
        for l in ledger.lost.iter().take(LOST_SHOWN) {
            t.row(vec![
                format!("{:.1} s", l.at.as_secs_f64()),
                format!("`{}`", l.what),
                REVS[l.rev].name.to_owned(),
                if l.reused { "reused" } else { "new" }.to_owned(),
                l.why.clone(),
                if l.kills.is_empty() {
                    "none".to_owned()
                } else {
                    l.kills.clone()
                },
            ]);
        }
        section.line(&format!(
            "### Lost requests ({} in all; the first {} shown)\n",
            ledger.lost.len(),
            ledger.lost.len().min(LOST_SHOWN)
        ));
        section.line(&t.render());
    }
    if !ledger.cuts.is_empty() {
        section.line(&format!(
            "<details><summary>Cut bodies and broken sessions ({})</summary>\n",
            ledger.cuts.len()
        ));
        for c in ledger.cuts.iter().take(200) {
            section.line(&format!("- {c}"));
        }
        section.line("\n</details>\n");
    }

    section.line("### Chaos\n");
    let mut t = Table::new(&["event (alpha / beta / gamma)", "count"]);
    t.row(vec!["app SIGKILLed".into(), per_rev(&chaos.app_kills)]);
    t.row(vec![
        "queue-proxy SIGKILLed".into(),
        per_rev(&chaos.qp_kills),
    ]);
    t.row(vec![
        "kill picked, no process to kill".into(),
        chaos.kills_without_target.to_string(),
    ]);
    t.row(vec![
        "bursts of 10–30 connections for 5–15 s".into(),
        format!(
            "{} ({} connections)",
            per_rev(&chaos.bursts),
            chaos.burst_connections
        ),
    ]);
    t.row(vec![
        "quiet spells of 20–40 s (no traffic)".into(),
        per_rev(&chaos.quiet_spells),
    ]);
    t.row(vec![
        "scale-ups (activator log)".into(),
        per_rev(&log.scale_ups),
    ]);
    t.row(vec![
        "scale-downs (activator log)".into(),
        per_rev(&log.scale_downs),
    ]);
    t.row(vec![
        "scaled to zero (activator log)".into(),
        per_rev(&log.to_zero),
    ]);
    t.row(vec!["most pods asked for".into(), per_rev(&log.max_pods)]);
    t.row(vec![
        "process restarts (activator log)".into(),
        log.restarts.to_string(),
    ]);
    section.line(&t.render());
    let revs: Vec<String> = REVS
        .iter()
        .map(|r| format!("{} ({})", r.name, r.about))
        .collect();
    section.line(&format!(
        "Revisions: {}; all with `stableWindow: 10s`, `scaleToZeroGracePeriod: 5s`, `timeoutSeconds: {REVISION_TIMEOUT_S}`, the app `thaw-testapp {}`. Chaos acts every {} s (after the first {} s): a kill of a random app or queue-proxy process (6 in 20 each; SIGKILL, so the platform restarts it with backoff), a burst (5 in 20), or a quiet spell for one revision (3 in 20). Load: {}.\n",
        revs.join(", "),
        ctx.app_args().join(" "),
        if ctx.smoke { "1–3" } else { "2–10" },
        if ctx.smoke { 2 } else { 10 },
        WORKERS
            .iter()
            .map(|(r, n)| format!("{n} {}", r.label()))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    let exits: Vec<String> = log.exits.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
    let warns: Vec<String> = log
        .warnings
        .iter()
        .map(|(k, n)| format!("`{k}` ×{n}"))
        .collect();
    let errors: Vec<String> = log
        .errors
        .iter()
        .map(|(k, n)| format!("`{k}` ×{n}"))
        .collect();
    section.line(&format!(
        "Activator log: exits seen: {}; other warnings: {}; errors: {}.\n",
        if exits.is_empty() {
            "none".to_owned()
        } else {
            exits.join(", ")
        },
        if warns.is_empty() {
            "none".to_owned()
        } else {
            warns.join(", ")
        },
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        },
    ));

    section.line("### Memory over time\n");
    let mut t = Table::new(&[
        "t (s)",
        "activator RSS MiB",
        "queue-proxy RSS MiB: max",
        "sum",
        "pods (alpha / beta / gamma)",
        "apps",
    ]);
    for r in rows {
        t.row(vec![
            format!("{:.0}", r.at.as_secs_f64()),
            mib(r.activator_kib),
            if r.qps > 0 {
                mib(r.qp_max_kib)
            } else {
                "—".into()
            },
            mib(r.qp_sum_kib),
            format!(
                "{} ({} / {} / {})",
                r.qps, r.per_rev[0], r.per_rev[1], r.per_rev[2]
            ),
            r.apps.to_string(),
        ]);
    }
    section.line(&t.render());
    section.line("VmRSS from `/proc/PID/status`. Pods are counted as running queue-proxy processes (a pod being drained still counts), apps as running test-app processes; a killed process is absent until restarted.\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `wire` as a body, `step` bytes at a time.
    async fn body_of(wire: &[u8], framing: Framing, step: usize) -> BodyEnd {
        let mut rd = wire;
        let mut buf = BytesMut::new();
        let pace = ReadPace {
            step,
            every: Duration::ZERO,
            hang_up_after: None,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        read_body(&mut rd, &mut buf, framing, pace, deadline).await
    }

    #[tokio::test]
    async fn chunked_bodies_end_at_the_last_chunk_whatever_the_reads() {
        let wire = b"5\r\nhello\r\n3;ext=1\r\n abc\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, 64] {
            match body_of(wire, Framing::Chunked, step).await {
                BodyEnd::Complete(n) => assert_eq!(n, 8, "step {step}"),
                _ => panic!("step {step}: not complete"),
            }
        }
        match body_of(b"5\r\nhello\r\n0\r\n\r\n", Framing::Chunked, 4).await {
            BodyEnd::Complete(5) => {}
            _ => panic!("no trailers: not complete"),
        }
    }

    #[tokio::test]
    async fn a_body_that_stops_early_is_cut() {
        match body_of(b"5\r\nhello\r\n3\r\nab", Framing::Chunked, 4).await {
            BodyEnd::Cut { bytes, .. } => assert_eq!(bytes, 7),
            _ => panic!("chunked: not cut"),
        }
        match body_of(b"abc", Framing::Length(10), 2).await {
            BodyEnd::Cut { bytes, .. } => assert_eq!(bytes, 3),
            _ => panic!("length: not cut"),
        }
        match body_of(b"abcdefghij", Framing::Length(10), 3).await {
            BodyEnd::Complete(10) => {}
            _ => panic!("length: not complete"),
        }
        match body_of(b"abc", Framing::Close, 2).await {
            BodyEnd::Complete(3) => {}
            _ => panic!("close-delimited: not complete"),
        }
    }

    #[tokio::test]
    async fn heads_give_status_and_framing_and_skip_interim_responses() {
        let wire: &[u8] = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 502 Bad Gateway\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbad";
        let mut rd = wire;
        let mut buf = BytesMut::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let head = read_head(&mut rd, &mut buf, deadline)
            .await
            .unwrap_or_else(|e| panic!("no head: {}", e.detail()));
        assert_eq!(head.status, 502);
        assert!(matches!(head.framing, Framing::Length(3)));
        assert!(head.close);
        assert_eq!(&buf[..], b"bad");

        let mut rd: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-le";
        let mut buf = BytesMut::new();
        assert!(matches!(
            read_head(&mut rd, &mut buf, deadline).await,
            Err(NoHead::Eof)
        ));
    }

    #[test]
    fn the_config_is_one_the_local_platform_accepts() {
        use thaw_activator::platform::local::config::LocalConfig;
        let yaml = config_yaml(
            "/opt/thaw testapp",
            &["--threads".to_owned(), "1".to_owned()],
        );
        let config = LocalConfig::parse(&yaml, std::path::Path::new("/tmp"))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let names: Vec<String> = config
            .revisions
            .iter()
            .map(|r| r.spec.id.name.to_string())
            .collect();
        assert_eq!(names, ["alpha", "beta", "gamma"]);
        assert_eq!(config.revisions[1].min_scale, 1);
    }
}
