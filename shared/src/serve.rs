//! Accepting connections: the HTTP/1.1 + h2c server settings both binaries use, and an
//! accept loop that stops on a signal and then lets open connections finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::conn::{ConnIo, Connection};
use crate::tls::CertReloader;

/// Largest request head accepted; beyond it the client gets `431`. Responses from the
/// app are held to the same size.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Header lines allowed in one head, so that [`MAX_HEADER_BYTES`] is the limit anyone
/// meets: 2048 lines averaging 32 bytes fill it. hyper's default of 100 lines refuses
/// ordinary requests of 2 KiB. The count cannot simply be `MAX_HEADER_BYTES / 4`: hyper
/// allocates 64 bytes per allowed line for every head it parses, which costs ~40 ns up to
/// this value and ~10 µs past it, once the allocation leaves the allocator's fast path.
pub const MAX_HEADERS: usize = 2048;

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

/// Accepts connections until `stop` turns true, then lets open connections finish
/// their in-flight requests before returning. `handler` gets the request's
/// [`Connection`]: the client's address, and the limits on how it is written.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    transport: Transport,
    builder: Arc<auto::Builder<TokioExecutor>>,
    read_header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(&Arc<Connection>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
        let plain = matches!(transport, Transport::Plain);
        let (io, conn) = ConnIo::new(stream, client_ip_header(peer), read_header_timeout, plain);
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            conn.request_started();
            let fut = handler(&conn, req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        match &transport {
            Transport::Plain => {
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .into_owned();
                tokio::spawn(graceful.watch(conn));
            }
            Transport::Tls(certs) => {
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
