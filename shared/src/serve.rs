//! Accepting connections: the HTTP/1.1 + h2c server settings both binaries use, and an
//! accept loop that stops on a signal and then lets open connections finish.

use std::any::Any;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::conn::{ConnIo, Connection, Protocol};
use crate::downstream_h1::{self, Served};
use crate::tls::CertReloader;
use crate::upstream_h1::VerbatimSource;

/// Largest request head accepted; beyond it the client gets `431`. Responses from the
/// app are held to the same size.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Header lines allowed in one head. hyper's default of 100 refuses ordinary requests
/// (a 1.2 KiB request with 101 short headers; Go has no line limit), but the line limit
/// is not free: on every head it parses, hyper prepares 64 bytes of parser state per
/// allowed line, on the heap past 100. Counted with callgrind through the queue-proxy
/// (two heads per request): 99 598 instructions per request at 2048, which this was
/// before; now 38 567 at 256 against 37 590 at hyper's 100 (2.5 %). 256 lines is 2.5
/// times what Envoy (the ingress in front of most Knative installs) lets through by
/// default.
pub const MAX_HEADERS: usize = 256;

/// A request's body as handlers get it: hyper's, or none for a request read by this
/// crate's own HTTP/1.1 path (`downstream_h1`), which takes only requests with no body.
pub type RequestBody = http_body_util::Either<Incoming, http_body_util::Empty<Bytes>>;

/// The HTTP/1.1 and HTTP/2 server settings shared by every listener. Which of the two
/// serves a connection is decided before either sees it: by ALPN under TLS, as Go's
/// server decides, and on a plain connection by its first bytes ([`ConnIo::protocol`]).
pub struct Http {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// The server settings of every listener: see [`Http`].
pub fn http_builder(read_header_timeout: Duration) -> Http {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(read_header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    Http { h1, h2 }
}

/// Where a listener's connections come from.
pub enum Transport {
    Plain,
    Tls(CertReloader),
}

/// Work on a plain connection before hyper sees it. The activator parks a request for a
/// revision with no pod here, holding its head in a few hundred bytes rather than in a
/// hyper connection's buffers and tasks (about 26 KiB each).
pub trait BeforeHyper: Send + Sync + 'static {
    /// Reads from `stream` as much as it needs. `None` when the connection is done with
    /// (the client left, or sent nothing in time); else what hyper goes on with.
    fn run(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<Handoff>> + Send;
}

/// A connection handed on to hyper by [`BeforeHyper::run`].
pub struct Handoff {
    pub stream: TcpStream,
    /// What was read from the stream; hyper reads it first.
    pub read: Bytes,
    /// For the handler of the connection's first request, which is the one in `read`
    /// ([`Connection::take_admission`]).
    pub admission: Option<Box<dyn Any + Send>>,
}

/// No work before hyper: each connection is handed on as it is.
pub struct Direct;

impl BeforeHyper for Direct {
    async fn run(&self, stream: TcpStream, _: SocketAddr) -> Option<Handoff> {
        Some(Handoff {
            stream,
            read: Bytes::new(),
            admission: None,
        })
    }
}

/// Accepts connections until `stop` turns true, then lets open connections finish
/// their in-flight requests before returning. `handler` gets the request's
/// [`Connection`]: the client's address, and the limits on how it is written.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    transport: Transport,
    http: Arc<Http>,
    read_header_timeout: Duration,
    stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(&Arc<Connection>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + VerbatimSource + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with::<F, Fut, B, Direct>(
        listener,
        transport,
        http,
        read_header_timeout,
        stop,
        handler,
        None,
    )
    .await;
}

/// As [`serve`], with `before` run on every plain connection before hyper gets it.
pub async fn serve_with<F, Fut, B, P>(
    listener: TcpListener,
    transport: Transport,
    http: Arc<Http>,
    read_header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    handler: F,
    before: Option<Arc<P>>,
) where
    F: Fn(&Arc<Connection>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + VerbatimSource + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    P: BeforeHyper,
{
    // Counts the open connections: each task holds a watcher until its connection ends,
    // and the drain waits for the last one.
    let graceful = GracefulShutdown::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                backoff.reset();
                conn
            }
            Err(e) => {
                backoff.wait(&e).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (http, handler, stop) = (Arc::clone(&http), handler.clone(), stop.clone());
        let watcher = graceful.watcher();
        match (&transport, &before) {
            (Transport::Plain, Some(before)) => {
                let before = Arc::clone(before);
                tokio::spawn(async move {
                    let Some(handoff) = before.run(stream, peer).await else {
                        return;
                    };
                    // Boxed: a connection still waiting above holds only its own state.
                    Box::pin(serve_plain(
                        handoff,
                        peer,
                        &http,
                        read_header_timeout,
                        stop,
                        handler,
                    ))
                    .await;
                    drop(watcher);
                });
            }
            (Transport::Plain, None) => {
                let handoff = Handoff {
                    stream,
                    read: Bytes::new(),
                    admission: None,
                };
                tokio::spawn(async move {
                    serve_plain(handoff, peer, &http, read_header_timeout, stop, handler).await;
                    drop(watcher);
                });
            }
            (Transport::Tls(certs), _) => {
                let (io, conn) =
                    ConnIo::new(stream, client_ip_header(peer), read_header_timeout, false);
                let acceptor = certs.acceptor();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(io).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                    };
                    let protocol = match tls.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    let service = service(conn, &handler);
                    serve_protocol(&http, protocol, TokioIo::new(tls), service, stop, || true)
                        .await;
                    drop(watcher);
                });
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// hyper's service for one connection: marks the connection's requests and calls
/// `handler`.
fn service<F, Fut, B>(
    conn: Arc<Connection>,
    handler: &F,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<B>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<B>, Infallible>> + Send,
> + Clone
       + Send
where
    F: Fn(&Arc<Connection>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let handler = handler.clone();
    hyper::service::service_fn(move |req| {
        conn.request_started();
        // The request stack's future is several kilobytes. Boxed once here, it is never
        // copied again: hyper's h2 server moves each stream's future into a spawned
        // task and tokio rewrites the task's whole stage when it ends, and an
        // `async move { Ok(fut.await) }` wrapper would move it into its await slot at
        // the first poll. Those copies were a quarter of the queue-proxy's CPU under
        // h2load (1 connection x 100 streams: 49k -> 62k rps); HTTP/1 is unchanged.
        Box::pin(handler(&conn, req.map(RequestBody::Left))).map(Ok::<_, Infallible>)
    })
}

/// Serves a plain connection, with what was read from it before (see [`BeforeHyper`]).
///
/// At the drain, hyper's graceful shutdown closes a connection that has not parsed a
/// request yet. A connection handed on with bytes already read may hold its first
/// request unparsed in them, so for such a one the shutdown is asked for only once that
/// request has arrived.
async fn serve_plain<F, Fut, B>(
    handoff: Handoff,
    peer: SocketAddr,
    http: &Http,
    read_header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(&Arc<Connection>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + VerbatimSource + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let holds_request = !handoff.read.is_empty();
    let (mut io, conn) = ConnIo::with_prefix(
        handoff.stream,
        handoff.read,
        client_ip_header(peer),
        read_header_timeout,
        true,
    );
    if let Some(admission) = handoff.admission {
        conn.set_admission(admission);
    }
    // A connection that has sent nothing when the drain starts is closed then, as
    // hyper closes an idle one, rather than holding the drain for the read-header
    // timeout.
    let protocol = tokio::select! {
        biased;
        sniffed = io.protocol() => match sniffed {
            Ok(protocol) => protocol,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "connection closed before its first request");
                return;
            }
        },
        _ = stop.wait_for(|s| *s), if !holds_request => return,
    };
    // Plain HTTP/1.1 requests are served here; the first other one hands the
    // connection to hyper, with what was read of it.
    let holds_request = match protocol {
        Protocol::Http1 => {
            match downstream_h1::serve(&mut io, &conn, &handler, read_header_timeout, &mut stop)
                .await
            {
                Served::Closed => return,
                Served::ToHyper(read) => {
                    let holds = !read.is_empty();
                    io.unread(read);
                    holds
                }
            }
        }
        Protocol::Http2 => holds_request,
    };
    let service = service(Arc::clone(&conn), &handler);
    let seen = conn.requests();
    let may_stop = || !holds_request || conn.requests() > seen;
    serve_protocol(http, protocol, TokioIo::new(io), service, stop, may_stop).await;
}

/// Serves one connection with `protocol` until it ends. Once `stop` turns true and
/// `may_stop` allows it, the connection is asked to finish its in-flight requests and
/// close.
async fn serve_protocol<I, S, B>(
    http: &Http,
    protocol: Protocol,
    io: I,
    service: S,
    stop: watch::Receiver<bool>,
    may_stop: impl Fn() -> bool,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = bytes::Bytes> + VerbatimSource + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match protocol {
        Protocol::Http1 => {
            let conn = http.h1.serve_connection(io, service).with_upgrades();
            until_done(conn, stop, may_stop).await;
        }
        // Boxed: an HTTP/1 connection's task then holds no room for HTTP/2's state.
        Protocol::Http2 => {
            let conn = http.h2.serve_connection(io, service);
            Box::pin(until_done(conn, stop, may_stop)).await;
        }
    }
}

/// A hyper server connection that can be asked to finish its in-flight requests and
/// close. (hyper-util's `GracefulConnection` is sealed, and leaves out HTTP/1 with
/// upgrades.)
trait Graceful: Future {
    fn finish(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Drives `conn` to its end, asking it to finish once `stop` turns true and `may_stop`
/// allows it. A connection's error (a client gone, a malformed request) ends only it;
/// hyper has already answered what could be answered.
async fn until_done<C: Graceful>(
    conn: C,
    mut stop: watch::Receiver<bool>,
    may_stop: impl Fn() -> bool,
) {
    let mut conn = pin!(conn);
    let mut stopping = pin!(stop.wait_for(|s| *s));
    let (mut stop_seen, mut asked) = (false, false);
    poll_fn(|cx| loop {
        if !stop_seen && stopping.as_mut().poll(cx).is_ready() {
            stop_seen = true;
        }
        if stop_seen && !asked && may_stop() {
            conn.as_mut().finish();
            asked = true;
        }
        match conn.as_mut().poll(cx) {
            // The first request arrived during that poll: ask for the shutdown now.
            Poll::Pending if stop_seen && !asked && may_stop() => continue,
            Poll::Pending => return Poll::Pending,
            Poll::Ready(_) => return Poll::Ready(()),
        }
    })
    .await;
}

/// The pause after a failed `accept`, as Go's server makes it: 5 ms, doubling to 1 s
/// while failures go on. Out of file descriptors, accepting again at once would spin;
/// a long pause would lock clients out after the pressure is gone. Logged once per run
/// of failures, not once per failure.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay: Option<Duration>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    /// Sleeps after a failed accept, longer each time while failures go on.
    pub async fn wait(&mut self, err: &std::io::Error) {
        let delay = match self.delay {
            None => {
                tracing::warn!(error = %err, "accept failed; retrying with backoff");
                Self::FIRST
            }
            Some(d) => (d * 2).min(Self::MAX),
        };
        self.delay = Some(delay);
        tokio::time::sleep(delay).await;
    }

    /// An accept succeeded: the next failure starts again at the shortest pause.
    pub fn reset(&mut self) {
        if self.delay.take().is_some() {
            tracing::info!("accepting connections again");
        }
    }
}

/// The client address as `X-Forwarded-For` wants it.
pub fn client_ip_header(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Binds a listener and logs where, so tests and people can find ephemeral ports.
pub async fn bind(what: &'static str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(listener = what, address = %bound, "listening");
    Ok(listener)
}

/// The end of a drain: stop the traffic listeners, let their connections finish, then give
/// upgraded connections (websockets) up to their grace period.
pub async fn finish_traffic(
    stop: &watch::Sender<bool>,
    servers: impl IntoIterator<Item = tokio::task::JoinHandle<()>>,
    upgrades: &crate::drain::UpgradeTracker,
) {
    let _ = stop.send(true);
    for server in servers {
        let _ = server.await;
    }
    if !upgrades
        .wait_closed(crate::drain::UpgradeTracker::GRACE)
        .await
    {
        tracing::warn!(
            open = upgrades.open(),
            "upgraded connections still open after the grace period"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// The test handlers answer with plain bodies, which never bring verbatim lines.
    impl VerbatimSource for Full<Bytes> {}
    impl<S> VerbatimSource for http_body_util::StreamBody<S> {}

    /// `serve` on a loopback port with a 60 s read-header timeout, answering `ok`.
    async fn start() -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        start_with(
            Duration::from_secs(60),
            |_: &Arc<Connection>, _: Request<RequestBody>| async {
                Response::new(Full::new(Bytes::from_static(b"ok")))
            },
        )
        .await
    }

    #[tokio::test]
    async fn a_connection_that_sent_nothing_does_not_hold_the_drain() {
        let (addr, stop, server) = start().await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // The connection is being served (its task is waiting for a first byte).
        let mut served = send(addr, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        let mut buf = [0u8; 256];
        let n = served.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the drain waited for the silent connection")
            .unwrap();
        assert_eq!(silent.read(&mut buf).await.unwrap(), 0, "closed");
    }

    #[tokio::test]
    async fn http1_and_h2c_are_both_served_on_one_port() {
        let (addr, _stop, _server) = start().await;
        let mut h1 = send(
            addr,
            b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await;
        let mut got = Vec::new();
        h1.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"ok"));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://a/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), http::StatusCode::OK);
    }

    /// `serve` on a loopback port with `timeout` as its read-header timeout, answering
    /// with `handler`.
    async fn start_with<F, Fut, B>(
        timeout: Duration,
        handler: F,
    ) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>)
    where
        F: Fn(&Arc<Connection>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = bytes::Bytes> + VerbatimSource + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            Transport::Plain,
            Arc::new(http_builder(timeout)),
            timeout,
            stopped,
            handler,
        ));
        (addr, stop, server)
    }

    /// `serve` answering with [`echo`].
    async fn start_echo(
        timeout: Duration,
    ) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        start_with(timeout, |_: &Arc<Connection>, req| echo(req)).await
    }

    /// Opens a connection to `addr` and sends `bytes` on it.
    async fn send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(bytes).await.unwrap();
        client
    }

    /// Answers `<method> <uri> <body bytes>`, after reading the whole body.
    async fn echo(req: Request<RequestBody>) -> Response<Full<Bytes>> {
        use http_body_util::BodyExt;
        let line = format!("{} {}", req.method(), req.uri());
        let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
        Response::new(Full::new(Bytes::from(format!(
            "{line} {}",
            body.unwrap_or(0)
        ))))
    }

    /// Reads one response whose body is `Content-Length` framed; returns the head and body.
    async fn read_response(client: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(pending[..end + 4].to_vec()).unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if pending.len() >= end + 4 + len {
                    let body = String::from_utf8(pending[end + 4..end + 4 + len].to_vec()).unwrap();
                    pending.drain(..end + 4 + len);
                    return (head, body);
                }
            }
            let mut buf = [0u8; 4096];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a whole response: {pending:?}");
            pending.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn pipelined_plain_requests_are_answered_in_order_then_hyper_takes_a_body() {
        let (addr, _stop, _server) = start_echo(Duration::from_secs(60)).await;
        let mut client = send(
            addr,
            b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nGET /2?x=y HTTP/1.1\r\nhost: a\r\n\r\n",
        )
        .await;
        let mut pending = Vec::new();
        let (head, body) = read_response(&mut client, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("\r\ndate: "),
            "hyper's Date header is kept: {head}"
        );
        assert_eq!(body, "GET /1 0");
        assert_eq!(
            read_response(&mut client, &mut pending).await.1,
            "GET /2?x=y 0"
        );
        // A request with a body is hyper's, on the same connection, and so is the rest.
        client
            .write_all(b"POST /3 HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhelloGET /4 HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut client, &mut pending).await.1,
            "POST /3 5"
        );
        assert_eq!(read_response(&mut client, &mut pending).await.1, "GET /4 0");
        // Malformed: hyper's answer.
        let mut bad = send(addr, b"GET / HTTP/1.1\r\nbad header\r\n\r\n").await;
        let mut got = Vec::new();
        bad.read_to_end(&mut got).await.unwrap();
        assert!(
            got.starts_with(b"HTTP/1.1 400"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }

    #[tokio::test]
    async fn a_client_that_leaves_ends_its_plain_request() {
        let (dropped_tx, mut dropped) = tokio::sync::mpsc::channel::<()>(1);
        let handler = move |_: &Arc<Connection>, _: Request<RequestBody>| {
            let guard = dropped_tx.clone();
            async move {
                // Sends on drop: the handler's future was dropped.
                struct OnDrop(tokio::sync::mpsc::Sender<()>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        let _ = self.0.try_send(());
                    }
                }
                let _guard = OnDrop(guard);
                std::future::pending::<()>().await;
                Response::new(Full::new(Bytes::new()))
            }
        };
        let (addr, _stop, _server) = start_with(Duration::from_secs(60), handler).await;
        let client = send(addr, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), dropped.recv())
            .await
            .expect("the request was not ended when its client left");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_closes_after_the_read_header_timeout() {
        let (addr, _stop, _server) = start_echo(Duration::from_millis(300)).await;
        let mut client = send(addr, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        let mut pending = Vec::new();
        read_response(&mut client, &mut pending).await;
        // Half a head, then nothing: the timer runs from the end of the last response.
        client.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
            .await
            .expect("the idle connection was never closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer, as hyper does");
    }

    #[tokio::test]
    async fn the_drain_closes_idle_plain_connections_and_finishes_one_in_flight() {
        let release = Arc::new(tokio::sync::Notify::new());
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (r, a) = (Arc::clone(&release), Arc::clone(&arrived));
        let handler = move |_: &Arc<Connection>, req: Request<RequestBody>| {
            let (release, arrived) = (Arc::clone(&r), Arc::clone(&a));
            async move {
                if req.uri() == "/slow" {
                    arrived.notify_one();
                    release.notified().await;
                }
                Response::new(Full::new(Bytes::from_static(b"done")))
            }
        };
        let (addr, stop, server) = start_with(Duration::from_secs(60), handler).await;
        let mut idle = send(addr, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        let mut idle_pending = Vec::new();
        read_response(&mut idle, &mut idle_pending).await;
        let mut busy = send(addr, b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n").await;
        arrived.notified().await;
        stop.send(true).unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
            .await
            .expect("the idle connection held the drain")
            .unwrap();
        assert_eq!(n, 0);
        release.notify_one();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), busy.read_to_end(&mut got))
            .await
            .expect("the in-flight connection was not closed after its answer")
            .unwrap();
        assert!(
            got.starts_with(b"HTTP/1.1 200 OK") && got.ends_with(b"done"),
            "{got:?}"
        );
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the drain did not end")
            .unwrap();
    }

    /// Sends `GET /` with `extra` header lines on a new connection and reads until what
    /// came back ends with `tail`.
    async fn get_until(addr: SocketAddr, extra: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut req = b"GET / HTTP/1.1\r\nhost: a\r\n".to_vec();
        req.extend_from_slice(extra);
        req.extend_from_slice(b"\r\n");
        client.write_all(&req).await.unwrap();
        let mut got = Vec::new();
        while !got.ends_with(tail) {
            let mut buf = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "{:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_streamed_plain_response_is_chunked_with_its_named_trailers() {
        let handler = |_: &Arc<Connection>, _: Request<RequestBody>| async {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-t", HeaderValue::from_static("1"));
            trailers.insert("x-unnamed", HeaderValue::from_static("2"));
            let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = vec![
                Ok(http_body::Frame::data(Bytes::from_static(b"ab"))),
                Ok(http_body::Frame::data(Bytes::new())),
                Ok(http_body::Frame::data(Bytes::from(vec![b'c'; 20_000]))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            Response::builder()
                .header("trailer", "x-t")
                .body(body)
                .unwrap()
        };
        let (addr, _stop, _server) = start_with(Duration::from_secs(60), handler).await;
        // Without `TE: trailers` the trailers are dropped, as hyper drops them.
        let got = get_until(addr, b"", b"\r\n0\r\n\r\n").await;
        assert!(!String::from_utf8_lossy(&got).contains("x-t: 1"));
        let got = get_until(addr, b"te: trailers\r\n", b"0\r\nx-t: 1\r\n\r\n").await;
        let text = String::from_utf8(got).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("\r\ntrailer: x-t\r\n"), "{head}");
        assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
        let expected = format!(
            "2\r\nab\r\n4E20\r\n{}\r\n0\r\nx-t: 1\r\n\r\n",
            "c".repeat(20_000)
        );
        assert_eq!(body, expected);
    }
}
