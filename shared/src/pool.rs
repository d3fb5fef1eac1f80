//! HTTP/1.1 keep-alive connections to upstreams, reused most recently used first.
//!
//! hyper-util's general-purpose pool costs a proxy more than its requests do: per request
//! it hashes a `(scheme, authority)` key with SipHash twice, races a checkout against a
//! connect, and spawns a task to put the connection back once the response ends. Here a
//! connection is checked out of a per-address stack under a short lock, and goes back
//! when the response body it carries ends, from the task reading that body. Counted with
//! callgrind through the queue-proxy, that is about a fifth of the instructions of a
//! request.
//!
//! A request with no body and no upgrade is exchanged on a connection of
//! [`crate::upstream_h1`], by the task serving the client; others go through hyper's
//! client. The two kinds of connection are kept apart, each most recently used first.
//!
//! A connection whose upstream closed it while idle is found closed at checkout and
//! dropped. One that closes between checkout and send gives the request back unsent,
//! which is then sent on a new connection (as hyper-util retries such requests). A
//! reused connection that closes after a bodiless request went out but before any answer
//! has it sent again on a new one when it is safe to repeat, as Go's transport does.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::conn::Connection;
use crate::quickack::UpstreamStream;
use crate::serve::{MAX_HEADERS, MAX_HEADER_BYTES};
use crate::upstream_h1::{
    ExchangeError, H1Body, NotReusable, UpstreamConn, VerbatimLines, VerbatimSource,
};

/// What every request sends upstream: the client's body, or none (a request sent again
/// to another upstream after its first one could not connect).
pub type OutboundBody = http_body_util::Either<Incoming, http_body_util::Empty<Bytes>>;

/// How many lines [`AddedLines`] holds: the activator adds three.
const ADDED_LINES: usize = 3;

/// Header lines a proxy adds to a request on its way out, kept beside the request rather
/// than in its map. The pool's own HTTP/1 exchange writes them after the request's lines;
/// hyper's clients (bodies, upgrades, HTTP/2) get them inserted into the map first. Put
/// in the map, a line is hashed in only to be iterated out again by the encoder, with no
/// layer reading it in between (callgrind: 250 instructions a line in the activator).
///
/// Each name stands for the whole field: the request must carry none of them itself (its
/// maker removes any the client sent), or the exchange would send the field twice.
#[derive(Debug, Default)]
pub struct AddedLines {
    lines: [Option<(HeaderName, HeaderValue)>; ADDED_LINES],
}

/// No lines added (the queue-proxy's requests, and tests).
pub static NO_ADDED_LINES: AddedLines = AddedLines::new();

impl AddedLines {
    pub const fn new() -> Self {
        Self {
            lines: [None, None, None],
        }
    }

    /// Adds `name: value`; a fourth line is a bug in the caller and panics.
    pub fn push(&mut self, name: HeaderName, value: HeaderValue) {
        let Some(free) = self.lines.iter_mut().find(|l| l.is_none()) else {
            panic!("more than {ADDED_LINES} added lines");
        };
        *free = Some((name, value));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.lines.iter().flatten().map(|(n, v)| (n, v))
    }

    /// The value added for `name`, if any.
    pub fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Lines from static names and values, for tests.
    #[cfg(test)]
    pub(crate) fn of(lines: &[(&'static str, &'static str)]) -> Self {
        let mut added = Self::new();
        for (name, value) in lines {
            added.push(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        added
    }

    /// Puts the lines into `headers`, for a client that sends only what the map holds.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        for (name, value) in self.iter() {
            headers.insert(name.clone(), value.clone());
        }
    }
}

type Sender = http1::SendRequest<OutboundBody>;

/// What a body that failed says: hyper's error, or this crate's [`ExchangeError`].
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// How a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Tcp(#[source] std::io::Error),
    #[error("{0}")]
    Handshake(#[source] hyper::Error),
}

/// How a request failed once it had a connection.
#[derive(Debug)]
pub enum SendError {
    Connect(ConnectError),
    /// hyper's error: the connection broke, or the answer was not HTTP.
    Http(hyper::Error),
    /// The same, on a connection of [`crate::upstream_h1`].
    Exchange(ExchangeError),
}

/// The pool's settings, per upstream address.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Acknowledge every read at once (`crate::quickack`).
    pub quick_ack: bool,
    /// Idle connections kept per address.
    pub max_idle: usize,
    /// An idle connection older than this is closed.
    pub idle_timeout: Duration,
}

/// Idle connections per address kept for the whole idle timeout: the most recently used,
/// enough for a steady load's spread. The others are spares, left from a burst.
const WARM: usize = 16;

/// How long a spare idle connection is kept. Each holds its buffers and a task (about
/// 20 KiB); a burst of a thousand would otherwise keep 20 MiB for the idle timeout.
const SPARE_IDLE: Duration = Duration::from_secs(2);

/// The HTTP/1.1 connections to all upstreams of one proxy.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.inner.settings)
            .field("idle", &self.idle())
            .finish()
    }
}

struct Inner {
    settings: PoolSettings,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_addr: HashMap<SocketAddr, Conns, BuildHasherDefault<AddrHasher>>,
    /// Whether the task that closes old idle connections runs.
    reaping: bool,
}

/// One address's idle connections of each kind, oldest first: the last is the warmest.
#[derive(Default)]
struct Conns {
    hyper: Vec<Kept<Sender>>,
    /// Boxed: a connection moves in and out of this list and the response body with
    /// every request, and a pointer moves cheaper than its buffers' handles.
    own: Vec<Kept<Box<UpstreamConn>>>,
}

impl Conns {
    fn len(&self) -> usize {
        self.hyper.len() + self.own.len()
    }
}

struct Kept<C> {
    conn: C,
    since: Instant,
}

/// What an idle connection must answer for the reaper.
trait IdleConn {
    fn is_closed(&self) -> bool;
}

impl IdleConn for Sender {
    fn is_closed(&self) -> bool {
        Sender::is_closed(self)
    }
}

impl IdleConn for Box<UpstreamConn> {
    fn is_closed(&self) -> bool {
        !self.is_open()
    }
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                idle: Mutex::new(Idle::default()),
            }),
        }
    }

    /// Idle connections, all addresses together.
    pub fn idle(&self) -> usize {
        self.inner.lock().by_addr.values().map(Conns::len).sum()
    }

    /// Sends `req`, with `added`'s lines, to `addr` on a pooled connection, or a new one.
    /// The response's body gives the connection back when it ends. The upstream's `1xx`
    /// heads (but `100` and `101`) go on to `relay`'s client, when there is one.
    ///
    /// An `async move` block rather than an `async fn`, which would keep the request
    /// twice in its future.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub fn send<'a>(
        &'a self,
        addr: SocketAddr,
        mut req: Request<OutboundBody>,
        added: &'a AddedLines,
        relay: Option<&'a Arc<Connection>>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        async move {
            if exchanged_here(&req) {
                // By reference: moved in, the request would take room twice in the future.
                return self.exchange(addr, &req, added, relay).await;
            }
            added.insert_into(req.headers_mut());
            // Boxed: hyper's client futures would otherwise make every request's future
            // 1.4 KiB larger, and the stack's future is copied whole into its box.
            Box::pin(self.send_with_hyper(addr, req, relay.cloned())).await
        }
    }

    /// Sends a request with a body, or an upgrade, through hyper's client.
    async fn send_with_hyper(
        &self,
        addr: SocketAddr,
        mut req: Request<OutboundBody>,
        relay: Option<Arc<Connection>>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        // hyper's client sends the headers it is given, and an HTTP/1.1 request needs a
        // `Host` (RFC 9112 §3.2).
        if !req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, host_of(addr));
        }
        if let Some(relay) = relay {
            hyper::ext::on_informational(&mut req, move |res| {
                relay.informational(Version::HTTP_11, res.status(), res.headers());
            });
        }
        let mut sender = match self.checkout(addr).await {
            Some(sender) => sender,
            None => self.connect(addr).await.map_err(SendError::Connect)?,
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut err) => match err.take_message() {
                // The connection closed before the request went out: nothing reached
                // the upstream, so a new connection may carry it.
                Some(req) => {
                    sender = self.connect(addr).await.map_err(SendError::Connect)?;
                    sender.send_request(req).await.map_err(SendError::Http)?
                }
                None => return Err(SendError::Http(err.into_error())),
            },
        };
        let pooled = Pooled {
            sender,
            pool: Arc::downgrade(&self.inner),
            addr,
        };
        Ok(resp.map(|body| UpstreamBody {
            source: Source::Hyper {
                body,
                pooled: Some(pooled),
            },
        }))
    }

    /// Sends a request with no body on a connection of [`crate::upstream_h1`].
    async fn exchange(
        &self,
        addr: SocketAddr,
        req: &Request<OutboundBody>,
        added: &AddedLines,
        relay: Option<&Arc<Connection>>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let informational = |status: StatusCode, headers: &HeaderMap| {
            if let Some(relay) = relay {
                relay.informational(Version::HTTP_11, status, headers);
            }
        };
        // A client whose response head downstream_h1 writes can take the answer's lines
        // as they came.
        let verbatim = relay.is_some_and(|c| c.on_plain_path());
        let (mut conn, reused) = match self.checkout_own(addr) {
            Some(conn) => (conn, true),
            None => (self.connect_own(addr).await?, false),
        };
        let mut head = match conn.exchange(req, added, verbatim, informational).await {
            Ok(head) => head,
            // The upstream closed a kept connection as the request went out (an idle
            // timeout of its own): nothing came back, so a safe request goes again.
            Err(e) if e.is_lost() && reused && is_replayable(req.method(), req.headers()) => {
                conn = self.connect_own(addr).await?;
                conn.exchange(req, added, verbatim, informational)
                    .await
                    .map_err(SendError::Exchange)?
            }
            Err(e) => return Err(SendError::Exchange(e)),
        };
        let reusable = head.parts.extensions.remove::<NotReusable>().is_none();
        Ok(Response::from_parts(
            head.parts,
            UpstreamBody {
                source: Source::Exchanged {
                    body: H1Body::new(conn, head.decode, reusable),
                    pool: Arc::downgrade(&self.inner),
                    addr,
                    verbatim: head.verbatim,
                },
            },
        ))
    }

    /// The warmest idle connection of [`crate::upstream_h1`] to `addr` still open.
    fn checkout_own(&self, addr: SocketAddr) -> Option<Box<UpstreamConn>> {
        loop {
            let conn = self.pop_kept(addr, |conns| &mut conns.own)?;
            if conn.is_open() {
                return Some(conn);
            }
        }
    }

    /// The warmest idle connection of one kind to `addr`, unless it outlived the idle
    /// timeout (then the rest of that kind, older still, go too).
    fn pop_kept<C>(
        &self,
        addr: SocketAddr,
        kind: impl FnOnce(&mut Conns) -> &mut Vec<Kept<C>>,
    ) -> Option<C> {
        let mut idle = self.inner.lock();
        let kept = kind(idle.by_addr.get_mut(&addr)?);
        let last = kept.pop()?;
        if last.since.elapsed() >= self.inner.settings.idle_timeout {
            kept.clear();
            return None;
        }
        Some(last.conn)
    }

    async fn connect_own(&self, addr: SocketAddr) -> Result<Box<UpstreamConn>, SendError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| SendError::Connect(ConnectError::Tcp(e)))?;
        // Small requests must leave at once, not wait for Nagle.
        stream
            .set_nodelay(true)
            .map_err(|e| SendError::Connect(ConnectError::Tcp(e)))?;
        Ok(Box::new(UpstreamConn::new(
            stream,
            self.inner.settings.quick_ack,
            host_of(addr),
        )))
    }

    /// The warmest idle connection to `addr` that is still open and ready.
    async fn checkout(&self, addr: SocketAddr) -> Option<Sender> {
        loop {
            let mut sender = self.pop_kept(addr, |conns| &mut conns.hyper)?;
            // At once for a connection whose last response was read to its end; an
            // upstream that closed it meanwhile makes this fail.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Sender, ConnectError> {
        let stream = TcpStream::connect(addr).await.map_err(ConnectError::Tcp)?;
        // Small responses must leave at once, not wait for Nagle.
        stream.set_nodelay(true).map_err(ConnectError::Tcp)?;
        let io = TokioIo::new(UpstreamStream::new(stream, self.inner.settings.quick_ack));
        // The app's response heads are held to the size and line count a request head
        // may have, not to hyper's 100 lines (Go's proxy passes a response of 151).
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS)
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            // Errors reach the request that was on the connection.
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Idle> {
        // Only plain collections are behind it; a panic elsewhere leaves them usable.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn give_back(self: &Arc<Self>, addr: SocketAddr, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        self.keep(addr, |conns| &mut conns.hyper, sender);
    }

    fn give_back_own(self: &Arc<Self>, addr: SocketAddr, conn: Box<UpstreamConn>) {
        self.keep(addr, |conns| &mut conns.own, conn);
    }

    /// Keeps `conn` idle among `addr`'s connections of its kind, unless the address
    /// holds as many as it may.
    fn keep<C>(
        self: &Arc<Self>,
        addr: SocketAddr,
        kind: impl FnOnce(&mut Conns) -> &mut Vec<Kept<C>>,
        conn: C,
    ) {
        let start_reaper = {
            let mut idle = self.lock();
            let conns = idle.by_addr.entry(addr).or_default();
            if conns.len() >= self.settings.max_idle {
                return;
            }
            kind(conns).push(Kept {
                conn,
                since: Instant::now(),
            });
            !std::mem::replace(&mut idle.reaping, true)
        };
        if start_reaper {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(reap(Arc::downgrade(self), self.settings.idle_timeout));
            }
        }
    }
}

/// Closes idle connections that outlived their keep: the [`WARM`] most recently used per
/// address after `timeout`, the spares after [`SPARE_IDLE`]; and any closed by their
/// upstream. Runs while the pool has idle connections.
async fn reap(pool: Weak<Inner>, timeout: Duration) {
    let spare = SPARE_IDLE.min(timeout);
    // Twice per spare's keep, so a spare goes at most half a keep late.
    let every = (spare / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut idle = pool.lock();
        idle.by_addr.retain(|_, conns| {
            reap_kind(&mut conns.hyper, now, spare, timeout);
            reap_kind(&mut conns.own, now, spare, timeout);
            conns.len() > 0
        });
        if idle.by_addr.is_empty() {
            // Nothing left to watch; the next connection given back starts a new reaper.
            idle.reaping = false;
            return;
        }
    }
}

/// Closes one kind's idle connections past their keep (see [`reap`]).
fn reap_kind<C: IdleConn>(
    conns: &mut Vec<Kept<C>>,
    now: Instant,
    spare: Duration,
    timeout: Duration,
) {
    // Oldest first: the last `WARM` are the warm ones.
    let spares = conns.len().saturating_sub(WARM);
    let mut i = 0;
    conns.retain(|c| {
        let keep = if i < spares { spare } else { timeout };
        i += 1;
        now.duration_since(c.since) < keep && !c.conn.is_closed()
    });
}

/// Whether the pool's own exchange carries `req`: HTTP/1.1 with no body, not an upgrade
/// nor a `CONNECT`.
fn exchanged_here(req: &Request<OutboundBody>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() != Method::CONNECT
        && req.body().is_end_stream()
        && !crate::proxy::is_upgrade_request(req)
}

/// `ip:port` as a `Host` value, for a request that has none: the activator sends every
/// request to a pod's address. Formatted on the stack rather than through `fmt` and a
/// `String`: `SocketAddr`'s `Display` cost 1 400 instructions (callgrind), which the
/// hyper path still pays per request.
fn host_of(addr: SocketAddr) -> HeaderValue {
    use std::io::Write;
    // `[` + 39 + `]:` + 5 for the longest IPv6 address: 47 bytes.
    let mut buf = [0u8; 64];
    let mut rest = &mut buf[..];
    let written = match addr {
        SocketAddr::V4(v4) => {
            let [a, b, c, d] = v4.ip().octets();
            write_decimal(&mut rest, a.into())
                .and_then(|()| rest.write_all(b"."))
                .and_then(|()| write_decimal(&mut rest, b.into()))
                .and_then(|()| rest.write_all(b"."))
                .and_then(|()| write_decimal(&mut rest, c.into()))
                .and_then(|()| rest.write_all(b"."))
                .and_then(|()| write_decimal(&mut rest, d.into()))
                .and_then(|()| rest.write_all(b":"))
                .and_then(|()| write_decimal(&mut rest, v4.port().into()))
        }
        SocketAddr::V6(_) => write!(rest, "{addr}"),
    };
    let len = if written.is_ok() { 64 - rest.len() } else { 0 };
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("0.0.0.0"))
}

/// Writes `n` in decimal.
fn write_decimal(out: &mut impl std::io::Write, mut n: u32) -> std::io::Result<()> {
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.write_all(&digits[start..])
}

/// Whether a request may be sent again after its connection was lost: the safe methods
/// (RFC 9110 §9.2.1), or one its client marked with an idempotency key. The same rule as
/// Go's `http.Transport`, which Knative's activator proxies with.
pub fn is_replayable(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || headers.contains_key("idempotency-key")
        || headers.contains_key("x-idempotency-key")
}

/// A connection lent to one request; it goes back to the pool when its response ends.
struct Pooled {
    sender: Sender,
    pool: Weak<Inner>,
    addr: SocketAddr,
}

impl Pooled {
    fn give_back(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(self.addr, self.sender);
        }
    }
}

/// An upstream's response body. For HTTP/1, it carries the connection, which goes back
/// to the pool the moment the body has ended; a body dropped before its end closes the
/// connection, which cannot carry another request with a response half read.
pub struct UpstreamBody {
    source: Source,
}

enum Source {
    /// From hyper's client: HTTP/2, or an HTTP/1.1 request with a body or an upgrade.
    Hyper {
        body: Incoming,
        pooled: Option<Pooled>,
    },
    /// Read by [`crate::upstream_h1`] from the connection it carries.
    Exchanged {
        body: H1Body,
        pool: Weak<Inner>,
        addr: SocketAddr,
        /// The head's lines, when they came verbatim: the response's map is empty.
        verbatim: Option<VerbatimLines>,
    },
}

impl UpstreamBody {
    /// A body that carries no pooled connection (HTTP/2, or an upgraded connection).
    pub fn unpooled(inner: Incoming) -> Self {
        Self {
            source: Source::Hyper {
                body: inner,
                pooled: None,
            },
        }
    }

    /// Lets go of the connection without returning it (a `101`: the connection now
    /// belongs to the upgrade).
    pub fn forget_connection(&mut self) {
        match &mut self.source {
            Source::Hyper { pooled, .. } => *pooled = None,
            Source::Exchanged { body, .. } => body.forget_connection(),
        }
    }

    /// Gives the connection back once the body has ended on it.
    fn release(&mut self) {
        match &mut self.source {
            Source::Hyper { pooled, .. } => {
                if let Some(pooled) = pooled.take() {
                    pooled.give_back();
                }
            }
            Source::Exchanged {
                body, pool, addr, ..
            } => {
                if let (Some(conn), Some(pool)) = (body.finished(), pool.upgrade()) {
                    pool.give_back_own(*addr, conn);
                }
            }
        }
    }
}

impl VerbatimSource for UpstreamBody {
    fn take_verbatim(&mut self) -> Option<VerbatimLines> {
        match &mut self.source {
            Source::Exchanged { verbatim, .. } => verbatim.take(),
            Source::Hyper { .. } => None,
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Source::Hyper { body, pooled } => f
                .debug_struct("UpstreamBody")
                .field("inner", body)
                .field("pooled", &pooled.is_some())
                .finish(),
            Source::Exchanged { body, addr, .. } => f
                .debug_struct("UpstreamBody")
                .field("inner", body)
                .field("addr", addr)
                .finish(),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.source {
            Source::Hyper { body, pooled } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => self.release(),
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => self.release(),
                    // A broken body leaves a connection that cannot be reused.
                    Poll::Ready(Some(Err(_))) => *pooled = None,
                    _ => {}
                }
                polled.map(|frame| frame.map(|r| r.map_err(BodyError::from)))
            }
            Source::Exchanged { body, .. } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if polled.is_ready() {
                    self.release();
                }
                polled.map(|frame| frame.map(|r| r.map_err(BodyError::from)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Hyper { body, .. } => body.is_end_stream(),
            Source::Exchanged { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Hyper { body, .. } => body.size_hint(),
            Source::Exchanged { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body with nothing to read (`204`, `HEAD`, `Content-Length: 0`) may never be
        // polled; its connection is as good as after any other complete response.
        if self.is_end_stream() {
            self.release();
        }
    }
}

/// Hashes upstream addresses: they come from the platform, not from clients, so a
/// multiply-xor (FNV-1a) is enough and costs a few instructions instead of SipHash's.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Either, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A listener on loopback that counts the connections it accepts and runs `serve`
    /// on each.
    async fn counting_upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(conn));
            }
        });
        (addr, accepted)
    }

    /// An upstream answering every request on a connection with `answer`, counting the
    /// connections it accepted.
    async fn upstream(answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
        let (addr, accepted, _heads) = recording_upstream(answer).await;
        (addr, accepted)
    }

    /// As [`upstream`] (requests without a body), also sending every head it read down
    /// the channel.
    async fn recording_upstream(
        answer: &'static [u8],
    ) -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (addr, accepted) = counting_upstream(move |mut conn| {
            let tx = tx.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n @ 1..) = conn.read(&mut buf).await {
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = seen.drain(..end + 4).collect();
                        // No one listening is fine: most tests only count connections.
                        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .await;
        (addr, accepted, rx)
    }

    fn pool(max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool::new(PoolSettings {
            quick_ack: false,
            max_idle,
            idle_timeout,
        })
    }

    fn get() -> Request<OutboundBody> {
        Request::get("/")
            .header("host", "a")
            .body(Either::Right(Empty::new()))
            .unwrap()
    }

    /// `n` requests sent at once, their responses held (so each kept its connection).
    async fn burst(pool: &Pool, addr: SocketAddr, n: usize) -> Vec<Response<UpstreamBody>> {
        futures_util::future::join_all(
            (0..n).map(|_| pool.send(addr, get(), &NO_ADDED_LINES, None)),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
    }

    async fn read_all(resp: Response<UpstreamBody>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_was_read() {
        let (addr, accepted) = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = pool(4, Duration::from_secs(60));
        for _ in 0..5 {
            let resp = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
            assert_eq!(read_all(resp).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn a_bodiless_response_gives_its_connection_back_unread() {
        let (addr, accepted) = upstream(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let pool = pool(4, Duration::from_secs(60));
        for _ in 0..3 {
            let resp = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
            assert_eq!(resp.status(), 204);
            drop(resp);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_closes_its_connection() {
        let (addr, accepted) = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc").await;
        let pool = pool(4, Duration::from_secs(60));
        let resp = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle(), 0);
        let _ = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_and_keep_at_most_max_idle() {
        let (addr, accepted) = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = pool(2, Duration::from_secs(60));
        let held = burst(&pool, addr, 5).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
        for resp in held {
            assert_eq!(read_all(resp).await, "ok");
        }
        assert_eq!(pool.idle(), 2);
    }

    #[tokio::test]
    async fn idle_connections_older_than_the_timeout_are_closed() {
        let (addr, accepted) = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = pool(4, Duration::from_millis(200));
        read_all(pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap()).await;
        assert_eq!(pool.idle(), 1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(pool.idle(), 0, "the reaper closed it");
        read_all(pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn spares_from_a_burst_are_closed_long_before_the_warm_ones() {
        let (addr, accepted) = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = pool(100, Duration::from_secs(60));
        for resp in burst(&pool, addr, 40).await {
            read_all(resp).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 40);
        assert_eq!(pool.idle(), 40);
        tokio::time::sleep(SPARE_IDLE * 2 + Duration::from_millis(500)).await;
        assert_eq!(pool.idle(), WARM, "the spares went, the warm ones stay");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        // Answers once, then closes, as an app with a short keep-alive timeout does.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                drop(conn);
            }
        });
        let pool = pool(4, Duration::from_secs(60));
        for _ in 0..3 {
            let resp = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
            assert_eq!(read_all(resp).await, "ok");
            // Let the connection task see the close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An upstream answering the first `answered` requests of each connection with
    /// `answer`, then reading one more and closing without a word (an app whose
    /// keep-alive timeout fired as the request arrived).
    async fn closing_upstream(
        answered: usize,
        answer: &'static [u8],
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        counting_upstream(move |mut conn| async move {
            let mut buf = [0u8; 4096];
            for _ in 0..answered {
                if matches!(conn.read(&mut buf).await, Ok(0) | Err(_))
                    || conn.write_all(answer).await.is_err()
                {
                    return;
                }
            }
            let _ = conn.read(&mut buf).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_chunked_answer_streams_with_its_trailers_and_keeps_its_connection() {
        let (addr, accepted) = upstream(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nx-sum: 5\r\n\r\n",
        )
        .await;
        let pool = pool(4, Duration::from_secs(60));
        for _ in 0..3 {
            let resp = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
            let collected = resp.into_body().collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["x-sum"], "5");
            assert_eq!(collected.to_bytes(), "abcde");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_malformed_chunk_is_a_body_error_and_the_connection_goes() {
        let (addr, _) = upstream(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        )
        .await;
        let pool = pool(4, Duration::from_secs(60));
        let resp = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
        let err = resp.into_body().collect().await.unwrap_err();
        assert!(err.to_string().contains("invalid chunk size"), "{err}");
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn an_answer_framed_by_close_is_read_to_the_end_and_not_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil ").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = conn.write_all(b"the end").await;
        });
        let pool = pool(4, Duration::from_secs(60));
        let resp = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
        assert_eq!(read_all(resp).await, "until the end");
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn bytes_past_the_answer_keep_its_connection_from_reuse() {
        let (addr, accepted) =
            upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n").await;
        let pool = pool(4, Duration::from_secs(60));
        for _ in 0..2 {
            let resp = pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap();
            assert_eq!(read_all(resp).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_kept_connection_that_closes_unanswered_is_tried_again_for_a_safe_request() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (addr, accepted) = closing_upstream(1, answer).await;
        let pool = pool(4, Duration::from_secs(60));
        assert_eq!(
            read_all(pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap()).await,
            "ok"
        );
        // The kept connection closes when this GET reaches it: a new one carries it.
        assert_eq!(
            read_all(pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap()).await,
            "ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A POST is not repeated, even without a body: the upstream may have acted on it.
        let mut post = get();
        *post.method_mut() = Method::POST;
        let err = pool
            .send(addr, post, &NO_ADDED_LINES, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SendError::Exchange(e) if e.is_lost()),
            "{err:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = pool(1, Duration::from_secs(1))
            .send(addr, get(), &NO_ADDED_LINES, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, SendError::Connect(ConnectError::Tcp(_))),
            "{err:?}"
        );
    }

    #[test]
    fn a_pod_address_is_its_host() {
        assert_eq!(host_of("10.1.2.3:8012".parse().unwrap()), "10.1.2.3:8012");
        assert_eq!(host_of("0.0.0.0:0".parse().unwrap()), "0.0.0.0:0");
        assert_eq!(
            host_of("255.255.255.255:65535".parse().unwrap()),
            "255.255.255.255:65535"
        );
        assert_eq!(
            host_of("[fd00:1:2:3:4:5:6:7]:65535".parse().unwrap()),
            "[fd00:1:2:3:4:5:6:7]:65535"
        );
    }

    #[tokio::test]
    async fn a_request_with_no_host_is_sent_with_the_upstreams_address_on_both_paths() {
        let (addr, _, mut heads) =
            recording_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = pool(4, Duration::from_secs(60));
        let expected = format!("host: {addr}\r\n");
        // No body: this module's own exchange.
        let bare = Request::get("/").body(Either::Right(Empty::new())).unwrap();
        read_all(pool.send(addr, bare, &NO_ADDED_LINES, None).await.unwrap()).await;
        let head = heads.recv().await.unwrap();
        assert!(head.to_ascii_lowercase().contains(&expected), "{head}");
        // An upgrade: hyper's client.
        let upgrade = Request::get("/")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Either::Right(Empty::new()))
            .unwrap();
        read_all(
            pool.send(addr, upgrade, &NO_ADDED_LINES, None)
                .await
                .unwrap(),
        )
        .await;
        let head = heads.recv().await.unwrap();
        assert!(head.contains("upgrade: websocket"), "{head}");
        assert!(head.to_ascii_lowercase().contains(&expected), "{head}");
        // A request's own Host is kept.
        read_all(pool.send(addr, get(), &NO_ADDED_LINES, None).await.unwrap()).await;
        let head = heads.recv().await.unwrap();
        assert!(head.contains("host: a\r\n"), "{head}");
        assert!(!head.contains(&expected), "{head}");
    }

    #[tokio::test]
    async fn added_lines_are_sent_once_on_both_paths() {
        let (addr, _, mut heads) =
            recording_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = pool(4, Duration::from_secs(60));
        let added = AddedLines::of(&[
            ("k-proxy-request", "activator"),
            ("x-forwarded-for", "10.0.0.9"),
        ]);
        let upgrade = || {
            Request::get("/")
                .header("host", "a")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(Either::Right(Empty::new()))
                .unwrap()
        };
        // This module's own exchange, then hyper's client.
        for req in [get(), upgrade()] {
            read_all(pool.send(addr, req, &added, None).await.unwrap()).await;
            let head = heads.recv().await.unwrap().to_ascii_lowercase();
            for line in [
                "k-proxy-request: activator\r\n",
                "x-forwarded-for: 10.0.0.9\r\n",
            ] {
                assert_eq!(head.matches(line).count(), 1, "{line:?} in {head}");
            }
            assert!(head.contains("host: a\r\n"), "{head}");
        }
    }

    #[test]
    fn more_added_lines_than_room_is_a_bug_that_panics() {
        let mut added = AddedLines::new();
        for _ in 0..ADDED_LINES {
            added.push(HOST, HeaderValue::from_static("a"));
        }
        let fourth = std::panic::catch_unwind(move || {
            added.push(HOST, HeaderValue::from_static("a"));
        });
        assert!(fourth.is_err());
    }

    #[test]
    fn addresses_hash_apart() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<AddrHasher>::default();
        let h = |a: &str| build.hash_one(a.parse::<SocketAddr>().unwrap());
        assert_ne!(h("10.0.0.1:8012"), h("10.0.0.2:8012"));
        assert_ne!(h("10.0.0.1:8012"), h("10.0.0.1:8013"));
    }

    #[test]
    fn only_safe_or_keyed_requests_are_replayed_after_a_lost_connection() {
        let replayable = |method: Method, key: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(key) = key {
                headers.insert(
                    http::HeaderName::from_bytes(key.as_bytes()).unwrap(),
                    "k-1".parse().unwrap(),
                );
            }
            is_replayable(&method, &headers)
        };
        for safe in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(replayable(safe, None));
        }
        for unsafe_ in [Method::POST, Method::PATCH, Method::PUT, Method::DELETE] {
            assert!(!replayable(unsafe_.clone(), None), "{unsafe_}");
        }
        assert!(replayable(Method::POST, Some("Idempotency-Key")));
        assert!(replayable(Method::POST, Some("X-Idempotency-Key")));
    }
}
