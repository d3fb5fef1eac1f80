//! Thaw's queue-proxy: a drop-in replacement for Knative Serving's sidecar. It enforces
//! the pod's concurrency, probes the app, drains without dropping requests and reports
//! load to the autoscaler, speaking Knative's exact wire contract.
#![forbid(unsafe_code)]

pub mod body;
pub mod cli;
pub mod config;
pub mod inject;
pub mod listen_fds;
pub mod logging;
pub mod metrics;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thaw_shared::breaker::Breaker;
use thaw_shared::drain::{Drainer, Signals, UpgradeTracker};
use thaw_shared::probe::{ProbeTiming, Prober, ProberOptions};
use thaw_shared::proxy::{Dial, Upstream, UpstreamSettings};
use thaw_shared::stats::ConcurrencyRecorder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::Config;
use crate::listen_fds::Listener;
use crate::metrics::{AutoscalerStats, UserMetrics};
use crate::server::State;
use thaw_shared::conn::Connection;
use thaw_shared::serve::{self, Transport};
use thaw_shared::tls::{self, certs_present, CertReloader, TlsSettings};

/// How often a `Stat` is cut for the autoscaler.
pub const REPORTING_PERIOD: Duration = Duration::from_secs(1);
/// How often the TLS files are checked for rotation.
const CERT_POLL: Duration = Duration::from_secs(10);

/// Why the queue-proxy could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {what} port {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("signals: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Adopt(#[from] listen_fds::AdoptError),
    #[error("the inherited {what} listener is on {bound}, not on the configured port {port}")]
    InheritedPort {
        what: &'static str,
        bound: SocketAddr,
        port: u16,
    },
}

/// Listening sockets the parent bound for this queue-proxy (`THAW_LISTEN_FDS`).
#[derive(Debug, Default)]
pub struct Inherited {
    listeners: Vec<(Listener, std::net::TcpListener)>,
}

impl Inherited {
    /// Takes over the descriptors `config` names. Call it before starting the runtime:
    /// it briefly borrows standard input (see [`listen_fds`]).
    pub fn adopt(config: &Config) -> Result<Self, RunError> {
        Ok(Self {
            listeners: listen_fds::adopt(&config.listen_fds)?,
        })
    }

    fn take(&mut self, which: Listener) -> Option<std::net::TcpListener> {
        let i = self.listeners.iter().position(|(l, _)| *l == which)?;
        Some(self.listeners.swap_remove(i).1)
    }
}

/// The listener for `which`: the inherited one if the parent passed it (it must be on the
/// configured port, unless that is 0), else a fresh bind of the port.
async fn bind(
    config: &Config,
    inherited: &mut Inherited,
    which: Listener,
    port: u16,
) -> Result<TcpListener, RunError> {
    let what = which.name();
    let addr = SocketAddr::new(config.listen_address, port);
    let listener = match inherited.take(which) {
        Some(std) => {
            let listener = TcpListener::from_std(std).map_err(|source| RunError::Bind {
                what,
                addr,
                source,
            })?;
            let bound =
                listener
                    .local_addr()
                    .map_err(|source| RunError::Bind { what, addr, source })?;
            if port != 0 && bound.port() != port {
                return Err(RunError::InheritedPort { what, bound, port });
            }
            listener
        }
        None => TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { what, addr, source })?,
    };
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(listener = what, address = %bound, "listening");
    Ok(listener)
}

/// Builds the shared request-path state from the configuration.
pub fn build_state(config: &Config) -> Result<Arc<State>, RunError> {
    let cc = config.container_concurrency;
    Ok(Arc::new(State {
        timeouts: config.timeouts,
        drainer: Arc::new(Drainer::new(config.drain_quiet_period)),
        stats: Arc::new(ConcurrencyRecorder::new()),
        breaker: (cc > 0).then(|| Arc::new(Breaker::new(cc))),
        upstream: Upstream::new(UpstreamSettings {
            dial: Dial::Fixed(SocketAddr::from(([127, 0, 0, 1], config.user_port))),
            quick_ack: config.upstream_quick_ack,
            max_idle: if cc > 0 { cc } else { 1000 },
            idle_timeout: Duration::from_secs(90),
        }),
        upgrades: UpgradeTracker::default(),
        prober: Prober::new(
            config.readiness_probes.clone(),
            ProberOptions {
                http2_auto_detect: config.http2_auto_detect,
                timing: ProbeTiming {
                    aggressive_interval: config.aggressive_probe_interval,
                    ..ProbeTiming::default()
                },
            },
        ),
        metrics: Arc::new(UserMetrics::new(config)?),
        autoscaler: AutoscalerStats::new(config),
        request_log: config.observability.request_log,
        tracing: config
            .observability
            .tracing
            .is_on()
            .then(|| crate::server::TraceNames {
                namespace: config.namespace.clone(),
                revision: config.revision.clone(),
            }),
        identity: http::HeaderValue::from_str(&thaw_shared::headers::revision_identity(
            &config.namespace,
            &config.revision,
        ))
        .ok(),
    }))
}

/// Runs the queue-proxy until it has drained after SIGTERM (or SIGINT).
pub async fn run(config: Config) -> Result<(), RunError> {
    run_with(config, Inherited::default()).await
}

/// [`run`], serving on the listeners the parent passed where it passed them.
pub async fn run_with(config: Config, mut inherited: Inherited) -> Result<(), RunError> {
    let state = build_state(&config)?;
    let mut signals = Signals::install().map_err(RunError::Signals)?;

    // Every port is bound before anything serves, so a clash fails the start cleanly.
    let serving = bind(
        &config,
        &mut inherited,
        Listener::Serving,
        config.serving_port,
    )
    .await?;
    let tls = if certs_present(&config.tls_cert_file, &config.tls_key_file) {
        let certs = CertReloader::load(TlsSettings {
            cert_path: config.tls_cert_file.clone(),
            key_path: config.tls_key_file.clone(),
            min_version: config.tls_min_version,
            max_version: config.tls_max_version,
        })?;
        Some((
            bind(&config, &mut inherited, Listener::Tls, config.tls_port).await?,
            certs,
        ))
    } else {
        None
    };
    let admin = bind(&config, &mut inherited, Listener::Admin, config.admin_port).await?;
    let metrics = bind(
        &config,
        &mut inherited,
        Listener::Metrics,
        config.metrics_port,
    )
    .await?;
    let user_metrics = bind(
        &config,
        &mut inherited,
        Listener::UserMetrics,
        config.user_metrics_port,
    )
    .await?;
    // An inherited TLS listener without certificates is not served; closing our copy
    // leaves the port to the parent, which holds it for the pod.
    drop(inherited);

    let builder = Arc::new(serve::http_builder(config.read_header_timeout));
    let (stop_traffic, traffic_stopped) = watch::channel(false);
    let (stop_aux, aux_stopped) = watch::channel(false);

    let mut traffic = Vec::new();
    let s = Arc::clone(&state);
    let user_handler =
        move |conn: &Arc<Connection>, req| server::handle(Arc::clone(&s), Arc::clone(conn), req);
    traffic.push(tokio::spawn(serve::serve(
        serving,
        Transport::Plain,
        Arc::clone(&builder),
        config.read_header_timeout,
        traffic_stopped.clone(),
        user_handler.clone(),
    )));
    if let Some((listener, certs)) = tls {
        certs.spawn_watcher(CERT_POLL);
        traffic.push(tokio::spawn(serve::serve(
            listener,
            Transport::Tls(certs),
            Arc::clone(&builder),
            config.read_header_timeout,
            traffic_stopped,
            user_handler,
        )));
    }

    let mut aux = Vec::new();
    let s = Arc::clone(&state);
    aux.push(tokio::spawn(serve::serve(
        admin,
        Transport::Plain,
        Arc::clone(&builder),
        config.read_header_timeout,
        aux_stopped.clone(),
        move |_: &Arc<Connection>, req| {
            let s = Arc::clone(&s);
            async move { server::admin(&s, &req).await }
        },
    )));
    let s = Arc::clone(&state);
    aux.push(tokio::spawn(serve::serve(
        metrics,
        Transport::Plain,
        Arc::clone(&builder),
        config.read_header_timeout,
        aux_stopped.clone(),
        move |_: &Arc<Connection>, req| {
            let resp = server::autoscaler_metrics(&s, &req);
            async move { resp }
        },
    )));
    let s = Arc::clone(&state);
    aux.push(tokio::spawn(serve::serve(
        user_metrics,
        Transport::Plain,
        Arc::clone(&builder),
        config.read_header_timeout,
        aux_stopped,
        move |_: &Arc<Connection>, req| {
            let resp = server::user_metrics(&s, &req);
            async move { resp }
        },
    )));

    let reporter = tokio::spawn(report_stats(Arc::clone(&state), config.pod.clone()));

    signals.next().await;
    tracing::info!(quiet_period = ?config.drain_quiet_period, "signal received; draining");
    state.drainer.start();
    signals.exit_on_next(|| {});

    state.drainer.quiet().await;
    tracing::info!("quiet period over; finishing in-flight requests");
    serve::finish_traffic(&stop_traffic, traffic, &state.upgrades).await;
    state.drainer.finish();
    reporter.abort();
    let _ = stop_aux.send(true);
    for t in aux {
        let _ = t.await;
    }
    tracing::info!("drained");
    Ok(())
}

/// Cuts a `Stat` every reporting period and publishes it for the autoscaler's scrape.
async fn report_stats(state: Arc<State>, pod: String) {
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(started + REPORTING_PERIOD, REPORTING_PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let now = tick.tick().await;
        let report = state.stats.report_at(now);
        state
            .autoscaler
            .set(report.to_stat(&pod, REPORTING_PERIOD, now.duration_since(started)));
    }
}
