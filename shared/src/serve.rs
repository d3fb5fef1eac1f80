//! Accepting connections: the HTTP/1.1 + h2c server settings both binaries use, and an
//! accept loop that stops on a signal and then lets open connections finish.

use std::any::Any;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::conn::{ConnIo, Connection};
use crate::tls::CertReloader;

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

/// The HTTP/1.1 + h2c server settings shared by every listener.
pub fn http_builder(read_header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    builder
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
    builder: Arc<auto::Builder<TokioExecutor>>,
    read_header_timeout: Duration,
    stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(&Arc<Connection>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with::<F, Fut, B, Direct>(
        listener,
        transport,
        builder,
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
    builder: Arc<auto::Builder<TokioExecutor>>,
    read_header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    handler: F,
    before: Option<Arc<P>>,
) where
    F: Fn(&Arc<Connection>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    P: BeforeHyper,
{
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
        match (&transport, &before) {
            (Transport::Plain, Some(before)) => {
                let before = Arc::clone(before);
                let (builder, handler) = (Arc::clone(&builder), handler.clone());
                // Held while the connection waits above hyper, so the drain waits for it.
                let watcher = graceful.watcher();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Some(handoff) = before.run(stream, peer).await else {
                        return;
                    };
                    // Boxed: a connection still waiting above holds only its own state.
                    Box::pin(serve_handed_off(
                        handoff,
                        peer,
                        builder,
                        read_header_timeout,
                        stop,
                        watcher,
                        handler,
                    ))
                    .await;
                });
            }
            (Transport::Plain, None) => {
                let (io, conn) =
                    ConnIo::new(stream, client_ip_header(peer), read_header_timeout, true);
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service(conn, &handler))
                    .into_owned();
                tokio::spawn(graceful.watch(conn));
            }
            (Transport::Tls(certs), _) => {
                let (io, conn) =
                    ConnIo::new(stream, client_ip_header(peer), read_header_timeout, false);
                let service = service(conn, &handler);
                let acceptor = certs.acceptor();
                let builder = Arc::clone(&builder);
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(io).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                    };
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .into_owned();
                    let _ = watcher.watch(conn).await;
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
    F: Fn(&Arc<Connection>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
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
        Box::pin(handler(&conn, req)).map(Ok::<_, Infallible>)
    })
}

/// Serves a connection [`BeforeHyper`] handed on. At the drain, hyper's own graceful
/// shutdown would close a connection that has not parsed a request yet, and this one's
/// first request may still sit unparsed in what was read: so the shutdown is asked for
/// only once that request has arrived.
async fn serve_handed_off<F, Fut, B>(
    handoff: Handoff,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    read_header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    watcher: Watcher,
    handler: F,
) where
    F: Fn(&Arc<Connection>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (io, conn) = ConnIo::with_prefix(
        handoff.stream,
        handoff.read,
        client_ip_header(peer),
        read_header_timeout,
        true,
    );
    if let Some(admission) = handoff.admission {
        conn.set_admission(admission);
    }
    let mut served = pin!(builder
        .serve_connection_with_upgrades(TokioIo::new(io), service(Arc::clone(&conn), &handler)));
    let mut stopping = pin!(stop.wait_for(|s| *s));
    let (mut stop_seen, mut asked) = (false, false);
    poll_fn(|cx| loop {
        if !stop_seen && stopping.as_mut().poll(cx).is_ready() {
            stop_seen = true;
        }
        if stop_seen && !asked && conn.request_seen() {
            served.as_mut().graceful_shutdown();
            asked = true;
        }
        match served.as_mut().poll(cx) {
            // The first request arrived during that poll: ask for the shutdown now.
            Poll::Pending if stop_seen && !asked && conn.request_seen() => continue,
            Poll::Pending => return Poll::Pending,
            Poll::Ready(_) => return Poll::Ready(()),
        }
    })
    .await;
    drop(watcher);
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
