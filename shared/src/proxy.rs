//! Streaming reverse proxy onto one upstream address: HTTP/1.1 on the connections of
//! [`crate::pool`], h2c on hyper-util's client.
//!
//! Bodies stream both ways frame by frame (no buffering, so server-sent events and chunked
//! streams arrive piece by piece). HTTP/2 requests go out as h2c, HTTP/1 ones as HTTP/1.1.
//! `Upgrade` requests (websockets) are spliced into a byte pipe after the `101`.
//! The connector always dials the configured address, whatever the request's authority,
//! so the app sees the client's original `Host` / `:authority`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{Entry, HeaderMap, HeaderValue, CONNECTION, HOST, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::conn::Connection;
use crate::drain::UpgradeTracker;
use crate::headers;
pub use crate::pool::{AddedLines, OutboundBody, UpstreamBody, NO_ADDED_LINES};
use crate::pool::{Pool, PoolSettings, SendError};
use crate::quickack::UpstreamStream;
use crate::serve::MAX_HEADER_BYTES;

/// Which address a connection goes to.
#[derive(Debug, Clone, Copy)]
pub enum Dial {
    /// Always this address, whatever the request's authority (the queue-proxy's app).
    Fixed(SocketAddr),
    /// The request URI's authority, which must be an `ip:port` (the activator's pods).
    Authority,
}

/// Dials per [`Dial`]; never resolves names, since every upstream here is an IP.
#[derive(Debug, Clone, Copy)]
pub struct Connector {
    dial: Dial,
    quick_ack: bool,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let addr = match self.dial {
            Dial::Fixed(addr) => Ok(addr),
            Dial::Authority => uri
                .authority()
                .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("not an ip:port upstream: {uri}"),
                    )
                }),
        };
        let quick_ack = self.quick_ack;
        // One allocation per new connection, not per request: the pool reuses them.
        Box::pin(async move {
            let stream = TcpStream::connect(addr?).await?;
            // Small responses must leave at once, not wait for Nagle.
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(UpstreamStream::new(stream, quick_ack)))
        })
    }
}

/// Why a request could not be proxied. Always answered with `502` and this text.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No connection could be made: nothing was sent, so another upstream may be tried.
    #[error("error connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The upstream broke the exchange after the request was (or may have been) sent.
    #[error("error proxying to {addr}: {reason}")]
    Upstream { addr: SocketAddr, reason: String },
    /// The connection was reset or closed before any response head: the upstream process
    /// is likely gone. The request may have reached it, so it is not sent again, but the
    /// upstream is worth probing before it is used again.
    #[error("error proxying to {addr}: {reason}")]
    Lost { addr: SocketAddr, reason: String },
    /// The client's own request body broke (a malformed chunk, or the client went away
    /// mid-body): the client's fault, not the upstream's.
    #[error("malformed request body: {reason}")]
    ClientBody { reason: String },
}

impl ProxyError {
    /// True when the request never reached the upstream.
    pub fn is_connect(&self) -> bool {
        matches!(self, ProxyError::Connect { .. })
    }

    /// True when the connection died before a response head (see [`ProxyError::Lost`]).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, ProxyError::Lost { .. })
    }

    /// True when the client, not the upstream, broke the exchange: answered `400`, and
    /// never counted against the upstream.
    pub fn is_client_fault(&self) -> bool {
        matches!(self, ProxyError::ClientBody { .. })
    }

    /// The status a client is answered with.
    pub fn status(&self) -> StatusCode {
        if self.is_client_fault() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::BAD_GATEWAY
        }
    }
}

/// True when `err` is the client's request body failing while it was sent: hyper's
/// client reports a failing outgoing body as a "user body" error, and that body is the
/// server's incoming one, whose own hyper error sits beneath.
fn is_request_body_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(hyper_err) = e.downcast_ref::<hyper::Error>() {
            if hyper_err.is_user() {
                let mut below = e.source();
                while let Some(b) = below {
                    if b.downcast_ref::<hyper::Error>().is_some() {
                        return true;
                    }
                    below = b.source();
                }
            }
        }
        current = e.source();
    }
    false
}

/// True when `err` says the connection itself went away before a response head: reset,
/// aborted, a broken pipe, or closed mid-exchange. A pooled connection to a process that
/// was just killed fails like this rather than as a refused connect.
fn is_connection_lost(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut current = Some(err);
    while let Some(e) = current {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            );
        }
        current = e.source();
    }
    false
}

/// Renders an error and its sources, since hyper's top-level messages ("client error
/// (Connect)") say little on their own.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Settings of the pooled client.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSettings {
    pub dial: Dial,
    /// Acknowledge every read from the upstream at once (`crate::quickack`), so an app
    /// that writes its head and body apart with Nagle on is not held by a delayed ACK.
    pub quick_ack: bool,
    /// Idle keep-alive connections kept: Knative sizes this to the concurrency (1000 when
    /// unlimited).
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

/// HTTP/2 connections kept to each upstream. One connection runs every stream through a
/// single connection task at each end, so an app with two cores serves them on one;
/// with two, it serves them in parallel. On 2 cores, h2load at 1 connection × 100 streams
/// through the queue-proxy went from 75–77 k to 89–91 k rps with two, and 86–88 k with
/// four; at 8 × 100 it stayed within the noise (2026-12-07).
const H2_CONNECTIONS: usize = 2;

/// h2c clients, each keeping its own connection per upstream; streams take them in turn.
#[derive(Debug)]
struct H2Clients {
    clients: [Client<Connector, OutboundBody>; H2_CONNECTIONS],
    next: AtomicUsize,
}

impl H2Clients {
    fn next(&self) -> &Client<Connector, OutboundBody> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % H2_CONNECTIONS;
        &self.clients[i]
    }
}

/// A pooled HTTP/1.1 + h2c client, bound to one upstream or dialing per request.
#[derive(Debug, Clone)]
pub struct Upstream {
    http1: Pool,
    http2: Arc<H2Clients>,
    fixed: Option<(SocketAddr, Authority)>,
}

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> Self {
        let connector = Connector {
            dial: settings.dial,
            quick_ack: settings.quick_ack,
        };
        let http1 = Pool::new(PoolSettings {
            quick_ack: settings.quick_ack,
            max_idle: settings.max_idle,
            idle_timeout: settings.idle_timeout,
        });
        let http2 = Arc::new(H2Clients {
            clients: std::array::from_fn(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(settings.idle_timeout)
                    .pool_max_idle_per_host(settings.max_idle)
                    .http2_max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
                    .http2_only(true)
                    .http2_adaptive_window(true)
                    .build(connector)
            }),
            next: AtomicUsize::new(0),
        });
        let fixed = match settings.dial {
            Dial::Fixed(addr) => Some((addr, authority_of(addr))),
            Dial::Authority => None,
        };
        Self {
            http1,
            http2,
            fixed,
        }
    }

    /// Sends a request that [`prepare_request`] already cleaned to the fixed upstream. The
    /// app sees the client's own `Host` / `:authority`. `client` is the connection the
    /// request came on, if the upstream's `1xx` heads should reach it.
    pub fn forward<'a>(
        &'a self,
        req: Request<OutboundBody>,
        upgrades: &'a UpgradeTracker,
        client: Option<&'a Arc<Connection>>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'a {
        self.send(Target::Fixed, req, &NO_ADDED_LINES, upgrades, client)
    }

    /// Sends a request, with `added`'s lines, to `addr`, which also becomes the request's
    /// authority (the activator moved the client's `Host` to `K-Original-Host` already).
    pub fn forward_to<'a>(
        &'a self,
        addr: SocketAddr,
        req: Request<OutboundBody>,
        added: &'a AddedLines,
        upgrades: &'a UpgradeTracker,
        client: Option<&'a Arc<Connection>>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'a {
        self.send(Target::Pod(addr), req, added, upgrades, client)
    }

    /// Returns the response with its hop-by-hop headers removed. Upgrades are spliced in
    /// the background and tracked by `upgrades`.
    ///
    /// A function returning an `async move` block, not an `async fn`: an `async fn` keeps
    /// its arguments twice in its future (the request alone is 264 bytes), and the
    /// stack's future is copied whole into its box.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn send<'a>(
        &'a self,
        target: Target,
        mut req: Request<OutboundBody>,
        added: &'a AddedLines,
        upgrades: &'a UpgradeTracker,
        client: Option<&'a Arc<Connection>>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'a {
        async move {
            // The upstream's `1xx` heads (103 Early Hints) go on to the client before the
            // final response, as Go's ReverseProxy sends them; hyper reports them for
            // HTTP/1 only, and only a plain TCP client can take them.
            let relay =
                client.filter(|c| req.version() == Version::HTTP_11 && c.relays_informational());
            // `fixed` is the fixed upstream's authority, which the client's own `Host` wins
            // over; without it, `addr` is the request's host.
            let (addr, fixed) = match target {
                Target::Fixed => match &self.fixed {
                    Some((addr, authority)) => (*addr, Some(authority)),
                    None => {
                        return Err(ProxyError::Connect {
                            addr: unspecified(),
                            reason: "no fixed upstream".into(),
                        })
                    }
                },
                Target::Pod(addr) => (addr, None),
            };
            let client_upgrade = is_upgrade_request(&req).then(|| hyper::upgrade::on(&mut req));
            let mut resp = if req.version() == Version::HTTP_2 {
                added.insert_into(req.headers_mut());
                let authority = fixed.cloned().unwrap_or_else(|| authority_of(addr));
                set_h2_target(&mut req, authority, fixed.is_none());
                // Boxed: hyper-util's client future would make every request's future 1.8 KiB
                // larger, HTTP/1 ones too.
                Box::pin(self.send_h2(addr, req)).await?
            } else {
                set_h1_target(&mut req, fixed.is_none());
                self.http1
                    .send(addr, req, added, relay)
                    .await
                    .map_err(|e| match e {
                        SendError::Connect(e) => ProxyError::Connect {
                            addr,
                            reason: error_chain(&e),
                        },
                        SendError::Http(e) => classify(addr, &e, error_chain(&e)),
                        SendError::Exchange(e) if e.is_lost() => ProxyError::Lost {
                            addr,
                            reason: error_chain(&e),
                        },
                        SendError::Exchange(e) => ProxyError::Upstream {
                            addr,
                            reason: error_chain(&e),
                        },
                    })?
            };
            // hyper bounds the head only by its read buffer, which can grow past the limit
            // within one read: hold the app to the size a request head may have.
            if head_size(resp.headers()) > MAX_HEADER_BYTES {
                return Err(ProxyError::Upstream {
                    addr,
                    reason: format!("response headers exceed {MAX_HEADER_BYTES} bytes"),
                });
            }
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The connection now belongs to the upgrade, never to the pool.
                resp.body_mut().forget_connection();
                if let Some(client_upgrade) = client_upgrade {
                    let upstream_upgrade = hyper::upgrade::on(&mut resp);
                    let tracked = upgrades.track();
                    let (hold, held) = tokio::sync::oneshot::channel();
                    resp.extensions_mut()
                        .insert(TunnelHold(Arc::new(Mutex::new(Some(hold)))));
                    tokio::spawn(async move {
                        let _tracked = tracked;
                        // Whatever the caller holds for the request (its breaker slot, its
                        // pod permit) lives as long as the tunnel, as in Knative.
                        let _held = held;
                        let (Ok(client), Ok(upstream)) =
                            futures_util::future::join(client_upgrade, upstream_upgrade).await
                        else {
                            return;
                        };
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        // Either side closing or failing ends the tunnel; nothing to report.
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    });
                }
                return Ok(resp);
            }
            strip_hop_by_hop(resp.headers_mut(), false);
            Ok(resp)
        }
    }

    /// Sends an h2 request on one of the h2c connections.
    async fn send_h2(
        &self,
        addr: SocketAddr,
        req: Request<OutboundBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let resp = self.http2.next().request(req).await.map_err(|e| {
            let reason = error_chain(&e);
            if e.is_connect() {
                ProxyError::Connect { addr, reason }
            } else {
                classify(addr, &e, reason)
            }
        })?;
        Ok(resp.map(UpstreamBody::unpooled))
    }
}

/// Where [`Upstream::send`] sends a request.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The fixed upstream, under the client's own authority.
    Fixed,
    /// A pod, which becomes the request's authority.
    Pod(SocketAddr),
}

/// Which [`ProxyError`] a failed exchange is, once a connection was made.
fn classify(
    addr: SocketAddr,
    err: &(dyn std::error::Error + 'static),
    reason: String,
) -> ProxyError {
    if is_request_body_error(err) {
        ProxyError::ClientBody { reason }
    } else if is_connection_lost(err) {
        ProxyError::Lost { addr, reason }
    } else {
        ProxyError::Upstream { addr, reason }
    }
}

/// The size of a head's header lines as they were sent: `name: value\r\n`.
fn head_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// On a `101` response: a place for what the request holds, kept until the spliced
/// connection closes. An upgraded connection is one request for the whole of its life, so
/// it keeps its breaker slot, its pod permit and its place in the concurrency count.
#[derive(Clone)]
pub struct TunnelHold(Arc<Mutex<Option<HoldSender>>>);

/// Where the held value goes: the tunnel task keeps the receiving end until it ends.
type HoldSender = tokio::sync::oneshot::Sender<Box<dyn Send>>;

impl TunnelHold {
    /// Takes the hold out of an upgraded response, if it is one.
    pub fn take(parts: &mut http::response::Parts) -> Option<TunnelHold> {
        parts.extensions.remove::<TunnelHold>()
    }

    /// Keeps `value` until the tunnel ends (at once, if it already has).
    pub fn keep(self, value: impl Send + 'static) {
        let sender = self.0.lock().ok().and_then(|mut s| s.take());
        if let Some(sender) = sender {
            let _ = sender.send(Box::new(value));
        }
    }
}

fn authority_of(addr: SocketAddr) -> Authority {
    // A SocketAddr always renders as a valid authority.
    Authority::try_from(addr.to_string().as_str())
        .unwrap_or_else(|_| Authority::from_static("0.0.0.0"))
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Points an HTTP/1.1 request at its upstream: origin form, with the client's `Host`
/// unless `force_host`. A request left with no `Host` gets the upstream's address as its
/// host from the pool, which knows it per connection rather than formatting it per request.
fn set_h1_target<B>(req: &mut Request<B>, force_host: bool) {
    *req.version_mut() = Version::HTTP_11;
    if force_host {
        req.headers_mut().remove(HOST);
    }
    let uri = req.uri();
    if uri.scheme().is_some() || uri.authority().is_some() || uri.path_and_query().is_none() {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
}

/// Points an h2 request at the upstream: an absolute URI for hyper-util's pool, the host
/// in `:authority` (the client's, unless `force_authority`).
fn set_h2_target<B>(req: &mut Request<B>, authority: Authority, force_authority: bool) {
    let uri = std::mem::take(req.uri_mut());
    let mut parts = uri.into_parts();
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    parts.scheme = Some(Scheme::HTTP);
    if force_authority {
        parts.authority = Some(authority);
    } else {
        // HTTP/2 carries the host as `:authority`; a `Host` header set upstream of
        // here (K-Original-Host) wins, as Go's proxy sends `req.Host`.
        if let Some(host) = req.headers_mut().remove(HOST) {
            if let Ok(a) = Authority::try_from(host.as_bytes()) {
                parts.authority = Some(a);
            }
        }
        if parts.authority.is_none() {
            parts.authority = Some(authority);
        }
    }
    // Every part is set and individually valid, so this cannot fail; keep the default
    // URI rather than panic if it ever does.
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
}

/// True for an HTTP/1.1 `Connection: upgrade` + `Upgrade: …` request.
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    is_upgrade(req.version(), req.headers())
}

/// As [`is_upgrade_request`], from a request's version and headers.
pub fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && has_upgrade_header(headers)
        && connection_has_token(headers, b"upgrade")
}

/// Whether `headers` has an `Upgrade`. Asked three times of each request on its way
/// through; for the few names most requests carry, comparing each (a tag check) costs a
/// quarter of hashing the name (callgrind: 84 instructions a look-up).
fn has_upgrade_header(headers: &HeaderMap) -> bool {
    const SCANNED: usize = 8;
    if headers.keys_len() <= SCANNED {
        headers.keys().any(|k| *k == UPGRADE)
    } else {
        headers.contains_key(UPGRADE)
    }
}

fn connection_has_token(headers: &HeaderMap, token: &[u8]) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// Removes hop-by-hop headers, including any named by `Connection`. With `keep_upgrade`,
/// `Connection: upgrade` and `Upgrade` survive so a websocket handshake can pass through.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names they have is cheaper than a
    // hashed removal for each hop-by-hop name they might have.
    if !keep_upgrade
        && !headers
            .keys()
            .any(|k| *k == UPGRADE || headers::is_hop_by_hop(k))
    {
        return;
    }
    strip_framing(headers);
    if headers.contains_key(CONNECTION) {
        // Names listed in Connection are hop-by-hop too (RFC 9110 §7.6.1).
        let listed: Vec<http::HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| http::HeaderName::from_bytes(t.trim_ascii()).ok())
            .filter(|n| !(keep_upgrade && *n == UPGRADE))
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &headers::HOP_BY_HOP {
        if name == CONNECTION && keep_upgrade {
            continue;
        }
        if name == http::header::TE {
            // `TE: trailers` is how gRPC clients ask for trailers; it must reach the app.
            if headers
                .get(name)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
            {
                continue;
            }
        }
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// Removes the framing headers of a message whose body is re-framed on the next hop.
/// `Transfer-Encoding` goes with the hop-by-hop headers; a `Content-Length` sent beside
/// it is stale (RFC 9112 §6.3: Transfer-Encoding overrides it, and the body arrives
/// decoded), so it goes too, or the next hop would cut the body at the wrong length.
fn strip_framing(headers: &mut HeaderMap) {
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        headers.remove(http::header::CONTENT_LENGTH);
    }
}

/// Header rules for a request going to the app (CONTRACT §1.3.9 and §2.2): hop-by-hop
/// headers out (upgrades kept), the client's address appended to `X-Forwarded-For`.
pub fn prepare_request<B>(req: &mut Request<B>, client_ip: Option<&HeaderValue>) {
    let upgrade = is_upgrade_request(req);
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    if let Some(ip) = client_ip {
        append_forwarded_for(headers, ip);
    }
}

/// Appends the peer to `X-Forwarded-For` as Go's reverse proxy does: `prior, ip`.
///
/// The joined value is written once into a buffer of its exact size and handed to the
/// header without a copy: collecting, joining and copying it cost the queue-proxy behind
/// an activator, which always sends one, four allocations per request.
pub fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    // One hash of the name for the look-up and the replacement both.
    let mut prior = match headers.entry(headers::X_FORWARDED_FOR) {
        Entry::Vacant(vacant) => {
            vacant.insert(ip.clone());
            return;
        }
        Entry::Occupied(occupied) => occupied,
    };
    let len = prior.iter().map(|v| v.len() + 2).sum::<usize>() + ip.len();
    let mut joined = Vec::with_capacity(len);
    for v in prior.iter() {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(ip.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        prior.insert(v);
    }
}

/// Builds `Forwarded` from the `X-Forwarded-*` headers when it is absent, as Knative's
/// forwarded shim does: one `for=` element per `X-Forwarded-For` hop, the first also
/// carrying `host=` and `proto=`.
///
/// The value is built before `Forwarded` is looked for, so that one hash of that name
/// both finds it absent and inserts: a client's own `Forwarded`, the rare case, costs the
/// building.
pub fn forwarded_shim(headers: &mut HeaderMap) {
    let Some(xff) = headers
        .get(headers::X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let host = headers
        .get(headers::X_FORWARDED_HOST)
        .and_then(|v| v.to_str().ok());
    let proto = headers
        .get(headers::X_FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok());
    // Room for every hop's `for=` and IPv6 quoting, and the first's `host=` and `proto=`,
    // so the value is written without growing.
    let hops = xff.bytes().filter(|&b| b == b',').count() + 1;
    let room =
        xff.len() + hops * 8 + host.map_or(0, |h| h.len() + 6) + proto.map_or(0, |p| p.len() + 7);
    let mut out = String::with_capacity(room);
    for (i, hop) in xff
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .enumerate()
    {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str("for=");
        if hop.contains(':') {
            // IPv6 nodes are quoted and bracketed (RFC 7239 §6).
            out.push_str("\"[");
            out.push_str(hop.trim_start_matches('[').trim_end_matches(']'));
            out.push_str("]\"");
        } else {
            out.push_str(hop);
        }
        if i == 0 {
            if let Some(h) = host {
                out.push_str(";host=");
                out.push_str(h);
            }
            if let Some(p) = proto {
                out.push_str(";proto=");
                out.push_str(p);
            }
        }
    }
    // Handed over without a copy (`from_str` would copy it into a new buffer).
    let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(out)) else {
        return;
    };
    if let Entry::Vacant(absent) = headers.entry(headers::FORWARDED) {
        absent.insert(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An h2c upstream answering `200` to every stream, counting the connections it took.
    async fn h2c_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                        bytes::Bytes,
                    >::new()))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(conn), svc),
                );
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn h2_streams_take_the_upstream_connections_in_turn() {
        let (addr, accepted) = h2c_upstream().await;
        let upstream = Upstream::new(UpstreamSettings {
            dial: Dial::Fixed(addr),
            quick_ack: false,
            max_idle: 16,
            idle_timeout: Duration::from_secs(30),
        });
        let tracker = UpgradeTracker::default();
        for _ in 0..3 * H2_CONNECTIONS {
            let req = Request::get("/")
                .version(Version::HTTP_2)
                .body(OutboundBody::Right(http_body_util::Empty::new()))
                .unwrap();
            let resp = upstream.forward(req, &tracker, None).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        // One connection per client, each kept and reused: never one, never one per stream.
        assert_eq!(accepted.load(Ordering::SeqCst), H2_CONNECTIONS);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn a_stale_content_length_goes_with_transfer_encoding() {
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("5"));
        h.insert("trailer", HeaderValue::from_static("x-checksum"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("content-length"), "{h:?}");
        assert!(!h.contains_key("transfer-encoding"), "{h:?}");
        // `Trailer` is end to end: without it hyper drops every trailer it is sent.
        assert_eq!(h.get("trailer").unwrap(), "x-checksum");
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("content-length").unwrap(), "5");
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("te").unwrap(), "trailers");
    }

    #[test]
    fn upgrade_headers_survive_for_websockets() {
        let mut req = Request::builder()
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, "websocket")
            .header("keep-alive", "1")
            .body(())
            .unwrap();
        assert!(is_upgrade_request(&req));
        prepare_request(&mut req, None);
        assert_eq!(req.headers().get(UPGRADE).unwrap(), "websocket");
        assert_eq!(req.headers().get(CONNECTION).unwrap(), "upgrade");
        assert!(!req.headers().contains_key("keep-alive"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h.get(headers::X_FORWARDED_FOR).unwrap(), "10.0.0.9");
        let mut h = HeaderMap::new();
        h.append(
            headers::X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1"),
        );
        h.append(
            headers::X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2"),
        );
        append_forwarded_for(&mut h, &ip);
        assert_eq!(
            h.get(headers::X_FORWARDED_FOR).unwrap(),
            "1.1.1.1, 2.2.2.2, 10.0.0.9"
        );
        assert_eq!(h.get_all(headers::X_FORWARDED_FOR).iter().count(), 1);
        // What the queue-proxy gets behind an activator: one prior hop.
        let mut h = HeaderMap::new();
        h.insert(
            headers::X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.7"),
        );
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h[headers::X_FORWARDED_FOR], "10.0.0.7, 10.0.0.9");
    }

    #[test]
    fn forwarded_shim_builds_from_x_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            headers::X_FORWARDED_FOR,
            HeaderValue::from_static("1.2.3.4, 2001:db8::1"),
        );
        h.insert(
            headers::X_FORWARDED_HOST,
            HeaderValue::from_static("example.com"),
        );
        h.insert(
            headers::X_FORWARDED_PROTO,
            HeaderValue::from_static("https"),
        );
        forwarded_shim(&mut h);
        assert_eq!(
            h.get(headers::FORWARDED).unwrap(),
            "for=1.2.3.4;host=example.com;proto=https, for=\"[2001:db8::1]\""
        );
        // An existing Forwarded is left alone, and nothing is made up without XFF.
        let mut h = HeaderMap::new();
        h.insert(headers::FORWARDED, HeaderValue::from_static("for=9.9.9.9"));
        h.insert(
            headers::X_FORWARDED_FOR,
            HeaderValue::from_static("1.2.3.4"),
        );
        forwarded_shim(&mut h);
        assert_eq!(h.get(headers::FORWARDED).unwrap(), "for=9.9.9.9");
        let mut h = HeaderMap::new();
        h.insert(
            headers::X_FORWARDED_HOST,
            HeaderValue::from_static("example.com"),
        );
        forwarded_shim(&mut h);
        assert!(!h.contains_key(headers::FORWARDED));
    }

    /// Serves one connection on a real socket with `answer`, after reading the request.
    async fn one_shot_upstream(answer: Option<&'static [u8]>) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            match answer {
                Some(bytes) => {
                    let _ = conn.write_all(bytes).await;
                }
                // Reset, as the kernel does for the sockets of a process that was killed.
                None => conn.set_zero_linger().unwrap(),
            }
        });
        addr
    }

    async fn send_to(addr: SocketAddr) -> ProxyError {
        let upstream = Upstream::new(UpstreamSettings {
            dial: Dial::Authority,
            quick_ack: false,
            max_idle: 1,
            idle_timeout: Duration::from_secs(1),
        });
        let req = Request::get("/")
            .body(http_body_util::Either::Right(http_body_util::Empty::new()))
            .unwrap();
        upstream
            .forward_to(addr, req, &NO_ADDED_LINES, &UpgradeTracker::default(), None)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_connection_reset_before_the_head_is_a_lost_upstream() {
        let err = send_to(one_shot_upstream(None).await).await;
        assert!(err.is_connection_lost(), "{err:?}");
        assert!(!err.is_connect());
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn a_malformed_answer_is_an_upstream_error_not_a_lost_one() {
        let err = send_to(one_shot_upstream(Some(b"NOT HTTP AT ALL\r\n\r\n")).await).await;
        assert!(matches!(err, ProxyError::Upstream { .. }), "{err:?}");
    }

    #[test]
    fn an_h1_target_is_origin_form_with_the_clients_host_unless_forced() {
        let mut req = Request::get("http://example.com/a?b=1")
            .header(HOST, "example.com")
            .body(())
            .unwrap();
        set_h1_target(&mut req, true);
        assert_eq!(req.uri(), "/a?b=1");
        // The pool sends the upstream's address as the host of a request with none.
        assert!(req.headers().get(HOST).is_none());
        let mut req = Request::get("/x")
            .header(HOST, "app.example")
            .body(())
            .unwrap();
        set_h1_target(&mut req, false);
        assert_eq!(
            (req.uri().path(), &req.headers()[HOST]),
            ("/x", &HeaderValue::from_static("app.example"))
        );
    }

    #[test]
    fn error_chain_includes_sources() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(
            error_chain(&Outer(io)),
            "tcp connect error: connection refused"
        );
    }
}
