//! `activator webhook`: the mutating admission webhook that injects the queue-proxy
//! sidecar into pods as they are created, the way `queue-proxy inject` does to
//! manifests.
//!
//! The server stack, assembled here in one place: TLS (rustls, the certificate from
//! [`source`], swapped live by [`certs::Served`]) under hyper's HTTP/1.1 + HTTP/2, then
//! `tower-http` layers: a trace span per request, a timeout (408), and a request-body
//! limit (413), around the [`routes`]. Beside it run the tasks that keep the
//! certificate current ([`source::Certs::maintain`]) and its CA published in the
//! MutatingWebhookConfiguration ([`ca_bundle`]).
//!
//! Not the hot path: one call per pod created. Clarity over speed.

pub mod admission;
pub mod ca_bundle;
pub mod certs;
pub mod config;
pub mod owner;
pub mod retry;
pub mod routes;
pub mod source;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use thaw_queue_proxy::inject::InjectSettings;
use thaw_shared::conn::ConnIo;
use thaw_shared::drain::{Signal, Signals};
use thaw_shared::serve::{self, AcceptBackoff};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use self::admission::Policy;
use self::certs::{dns_names, Served};
use self::config::WebhookConfig;
use self::owner::Owners;
use self::routes::State;
use self::source::{CertSource, Certs, SourceError};

/// Exit status for a usage or configuration error (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// A client must finish its TLS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send its request head within this.
const READ_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After the drain period, open connections get this long to finish their requests.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Why the webhook could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Config(String),
    #[error("no Kubernetes client ({0}); the webhook needs one to {1}")]
    Client(kube::Error, &'static str),
    #[error("{0}")]
    Certificate(SourceError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write the CA to {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

impl WebhookError {
    /// Errors in what the user gave, as opposed to the environment failing.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            WebhookError::Config(_)
                | WebhookError::Certificate(SourceError::Secret { .. } | SourceError::Cert(_))
        )
    }
}

/// `activator webhook ARGS…`: parses, sets up logging and a runtime, runs.
pub fn main(args: &[String]) -> ExitCode {
    let argv = std::iter::once("activator webhook".to_owned()).chain(args.iter().cloned());
    let config = match WebhookConfig::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "activator webhook: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("activator webhook: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    thaw_shared::logging::init_with(&config.log_level, config.log_format.into());
    // One thread: a call per pod created, and TLS handshakes now and then.
    let runtime = match thaw_shared::runtime::build(Some(1)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("activator webhook: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_config() => {
            eprintln!("activator webhook: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = %e, "webhook failed");
            eprintln!("activator webhook: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What needs the API server, for the message when there is no client.
fn kube_needed_for(config: &WebhookConfig) -> Option<&'static str> {
    if config.cert_secret().is_some() {
        Some("read THAW_WEBHOOK_CERT_SECRET")
    } else if !config.cert_store.trim().is_empty() {
        Some("share its certificate through THAW_WEBHOOK_CERT_STORE (set it empty for one replica without a cluster)")
    } else if !config.webhook_config.trim().is_empty() {
        Some("write THAW_WEBHOOK_CONFIG's caBundle (set it empty to write none)")
    } else {
        None
    }
}

/// Runs the webhook until SIGTERM/SIGINT and its drain.
pub async fn run(config: WebhookConfig) -> Result<(), WebhookError> {
    config.validate().map_err(WebhookError::Config)?;
    let mut signals = Signals::install().map_err(WebhookError::Signals)?;
    let client = match (kube::Client::try_default().await, kube_needed_for(&config)) {
        (Ok(c), _) => Some(c),
        (Err(e), Some(why)) => return Err(WebhookError::Client(e, why)),
        (Err(e), None) => {
            tracing::warn!(error = %e, "no Kubernetes client: pods whose settings are on their Deployment are injected with the defaults");
            None
        }
    };
    let names = dns_names(&config.service, &config.namespace);
    let source = match config.cert_secret() {
        Some(secret) => CertSource::Secret(secret.to_owned()),
        None if !config.cert_store.trim().is_empty() => {
            CertSource::Shared(config.cert_store.trim().to_owned())
        }
        None => CertSource::Own,
    };
    let certs = Certs {
        source,
        client: client.clone(),
        namespace: config.namespace.clone(),
        dialled: format!("{}.{}.svc", config.service, config.namespace),
        names,
    };
    let bundle = certs.load().await.map_err(WebhookError::Certificate)?;
    if bundle.ca_pem.is_none() {
        tracing::info!("the certificate came without ca.crt: caBundle is left to whoever made it");
    }
    let served =
        Served::new(bundle).map_err(|e| WebhookError::Certificate(SourceError::Cert(e)))?;
    tracing::info!(source = ?certs.source, "serving certificate ready");

    if let Some(path) = &config.ca_file_out {
        let mut ca = served.subscribe();
        write_ca(path, ca.ca().as_deref())?;
        let path = path.clone();
        tokio::spawn(async move {
            while ca.changed().await {
                if let Err(e) = write_ca(&path, ca.ca().as_deref()) {
                    tracing::warn!(error = %e, "cannot write the CA file");
                }
            }
        });
    }
    let mut tasks = vec![tokio::spawn(
        certs.maintain(served.clone(), source::CHECK_INTERVAL),
    )];
    if let (Some(client), name) = (client.clone(), config.webhook_config.trim()) {
        if !name.is_empty() {
            tasks.push(tokio::spawn(ca_bundle::run(
                client,
                name.to_owned(),
                served.subscribe(),
            )));
        }
    }

    let state = Arc::new(State {
        policy: Policy {
            own_namespace: config.namespace.clone(),
            settings: InjectSettings {
                image: config.queue_proxy_image.trim().to_owned(),
                system_namespace: config.namespace.clone(),
                ..InjectSettings::default()
            },
        },
        owners: Owners::new(client),
        draining: AtomicBool::new(false),
    });

    let addr = SocketAddr::new(config.listen_address, config.port);
    let listener = serve::bind("https", addr)
        .await
        .map_err(|source| WebhookError::Bind { addr, source })?;
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(serve_https(
        listener,
        served,
        Arc::clone(&state),
        config.clone(),
        stopped,
    ));
    tracing::info!(queue_proxy_image = %state.policy.settings.image, "webhook started");

    let drain = match signals.next().await {
        Signal::Terminate => config.drain_period,
        Signal::Interrupt => config.drain_period.min(Duration::from_secs(1)),
    };
    tracing::info!(drain_period = ?drain, "signal received; draining");
    state.draining.store(true, Ordering::Relaxed);
    signals.exit_on_next(|| {});
    tokio::time::sleep(drain).await;
    let _ = stop.send(true);
    let _ = server.await;
    for t in tasks {
        t.abort();
    }
    tracing::info!("drained");
    Ok(())
}

/// Writes the CA where `--ca-file-out` says, replacing the file whole (written beside
/// it, then renamed) so that a reader never sees half of it.
fn write_ca(path: &Path, pem: Option<&str>) -> Result<(), WebhookError> {
    let err = |source| WebhookError::CaFile {
        path: path.to_owned(),
        source,
    };
    let Some(pem) = pem else {
        return Ok(());
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Accepts TLS connections until `stop`, then lets open connections finish (for at
/// most [`CLOSE_GRACE`]).
async fn serve_https(
    listener: TcpListener,
    served: Served,
    state: Arc<State>,
    config: WebhookConfig,
    mut stop: watch::Receiver<bool>,
) {
    // The stack: a trace span per request, then the timeout (408), then the body limit
    // (413), around the routes.
    let svc = ServiceBuilder::new()
        // Spans and responses at debug; the only 5xx is /healthz while draining, which
        // the kubelet asks every second and is no error.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(RequestBodyLimitLayer::new(config.max_body))
        .service_fn(move |req| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(routes::handle(&state, req).await) }
        });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_HEADER_TIMEOUT);
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    let builder = Arc::new(builder);
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
        // A connection that completes the TLS handshake and then sends nothing is closed
        // after the header timeout, as on the traffic ports.
        let (stream, conn_info) = ConnIo::new(
            stream,
            serve::client_ip_header(peer),
            READ_HEADER_TIMEOUT,
            false,
        );
        let acceptor = served.acceptor();
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let svc = svc.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, %peer, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let hyper_svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                conn_info.request_started();
                svc.clone().oneshot(req)
            });
            let conn = builder
                .serve_connection(TokioIo::new(tls), hyper_svc)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(CLOSE_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
    }
}
