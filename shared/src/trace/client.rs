//! The OTLP exporter's transport. opentelemetry-otlp's HTTP exporter encodes and retries,
//! and hands each request to this client, which sends it as OTLP/HTTP, or for `grpc` as
//! the same export in a gRPC call over HTTP/2 (see [`super::grpc`]); over TLS for
//! `https://` endpoints, trusting the system's roots as Go's exporters do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_http::{HttpClient, HttpError};

use super::{grpc, StartError, EXPORT_TIMEOUT};

/// A collector's answer is a few bytes; anything this big is not one.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How an export travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wire {
    /// OTLP/HTTP: the exporter's request as it is, over HTTP/1.1.
    Http,
    /// OTLP/gRPC: the request framed as a gRPC call, over HTTP/2 (prior knowledge for
    /// `http://`, ALPN `h2` for `https://`).
    Grpc,
}

/// The exporter's client: hyper-util's, on a current-thread runtime of its own, driven by
/// the batch processor's thread (which is not a runtime thread, so blocking on it is
/// allowed). The request path's runtime never runs an export.
pub(super) struct ExportClient {
    runtime: tokio::runtime::Runtime,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    wire: Wire,
    url: String,
    /// Whether the last export failed: a failure is logged when an episode starts, and
    /// the recovery when it ends, never once per batch.
    failing: AtomicBool,
    /// For an `https://` endpoint when no root certificate could be loaded: said with
    /// each failure, since the certificate error that follows would not say why.
    no_roots: Option<String>,
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportClient")
            .field("url", &self.url)
            .field("wire", &self.wire)
            .finish_non_exhaustive()
    }
}

impl ExportClient {
    pub(super) fn new(url: &str, wire: Wire) -> Result<Self, StartError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(StartError::Runtime)?;
        let mut http = HttpConnector::new();
        // The TLS layer around it takes the https:// URLs.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(EXPORT_TIMEOUT));
        // The system's roots are read only for an https:// endpoint: a plaintext one
        // needs none, and reading them costs start-up time and memory.
        let (tls, no_roots) = tls_config(url.starts_with("https://"))?;
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let connector = match wire {
            Wire::Http => builder.enable_http1().wrap_connector(http),
            Wire::Grpc => builder.enable_http2().wrap_connector(http),
        };
        // Connections are only driven while an export runs; one kept idle in between
        // would be found dead later. A batch every few seconds can afford a connect.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http2_only(wire == Wire::Grpc)
            .build(connector);
        Ok(ExportClient {
            runtime,
            client,
            wire,
            url: url.to_owned(),
            failing: AtomicBool::new(false),
            no_roots,
        })
    }

    /// Sends one export: the exporter's answer, and what went wrong if anything did.
    async fn send(
        &self,
        request: Request<Bytes>,
    ) -> Result<(Response<Bytes>, Option<String>), HttpError> {
        match self.wire {
            Wire::Http => {
                let resp = self.client.request(request.map(Full::new)).await?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await?;
                let failure = (!parts.status.is_success())
                    .then(|| format!("collector answered {}", parts.status));
                Ok((Response::from_parts(parts, body.to_bytes()), failure))
            }
            Wire::Grpc => {
                let call = grpc::request(request)?;
                let resp = self.client.request(call.map(Full::new)).await?;
                let (parts, body) = resp.into_parts();
                let collected = Limited::new(body, MAX_RESPONSE_BYTES).collect().await?;
                let trailers = collected.trailers().cloned();
                let body = collected.to_bytes();
                match grpc::outcome(parts.status, &parts.headers, trailers.as_ref(), &body) {
                    Ok(message) => Ok((Response::new(message), None)),
                    Err(failure) => Ok((failure.response(), Some(failure.to_string()))),
                }
            }
        }
    }

    fn outcome(&self, failure: Option<String>) {
        match failure {
            Some(mut error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    if let Some(why) = &self.no_roots {
                        error = format!("{error} ({why})");
                    }
                    tracing::warn!(endpoint = %self.url, %error, "cannot export spans to the tracing collector; spans are dropped until it answers");
                }
            }
            None => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.url, "the tracing collector answers again");
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let result = self
            .runtime
            .block_on(async { tokio::time::timeout(EXPORT_TIMEOUT, self.send(request)).await });
        match result {
            Ok(Ok((response, failure))) => {
                self.outcome(failure);
                Ok(response)
            }
            Ok(Err(e)) => {
                self.outcome(Some(with_sources(&*e)));
                Err(e)
            }
            Err(_) => {
                let e = format!("no answer within {EXPORT_TIMEOUT:?}");
                self.outcome(Some(e.clone()));
                Err(e.into())
            }
        }
    }
}

/// An error with its causes: hyper's own message ("client error (Connect)") says little
/// without the refused connection or the certificate it wraps.
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// The client's TLS settings: ring (the provider the rest of Thaw uses), and when asked
/// the system's root certificates, read by rustls-native-certs as OpenSSL finds them
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` replace the system store, as for Go). With no
/// root at all, also the reason, for the failures to say.
fn tls_config(with_roots: bool) -> Result<(rustls::ClientConfig, Option<String>), StartError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut no_roots = None;
    if with_roots {
        let found = rustls_native_certs::load_native_certs();
        // A store often holds a file rustls cannot use; the others still count.
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
            no_roots = Some(if errors.is_empty() {
                "no trusted root certificate found; set SSL_CERT_FILE or SSL_CERT_DIR".to_owned()
            } else {
                format!("no trusted root certificate loaded: {}", errors.join("; "))
            });
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((config, no_roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_told_with_its_causes_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = std::io::Error::other(inner);
        // io::Error's Display already shows the wrapped error: not twice.
        assert_eq!(with_sources(&outer), "refused");
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "tcp connect error",
        ));
        assert_eq!(
            with_sources(&e),
            "client error (Connect): tcp connect error"
        );
    }
}
