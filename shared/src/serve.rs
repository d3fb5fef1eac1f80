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

use crate::tls::CertReloader;

/// Largest request head accepted; beyond it the client gets `431`.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The HTTP/1.1 + h2c server settings shared by every listener.
pub fn http_builder(read_header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
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
/// their in-flight requests before returning. `handler` gets the client's address as
/// `X-Forwarded-For` wants it, rendered once per connection.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    transport: Transport,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(&HeaderValue, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Running out of file descriptors must not end the server: back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let client_ip = client_ip_header(peer);
        let service = hyper::service::service_fn(move |req| {
            let fut = handler(&client_ip, req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        match &transport {
            Transport::Plain => {
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                tokio::spawn(graceful.watch(conn));
            }
            Transport::Tls(certs) => {
                let acceptor = certs.acceptor();
                let builder = Arc::clone(&builder);
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(stream).await {
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
