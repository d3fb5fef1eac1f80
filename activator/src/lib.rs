//! Thaw's activator: sits in the ingress path of cold or busy revisions, buffers their
//! requests with bounded memory, asks for capacity, and balances requests onto ready pods
//! without ever sending a pod more than its concurrency.
#![forbid(unsafe_code)]

pub mod backends;
pub mod config;
pub mod metrics;
pub mod parking;
pub mod platform;
pub mod reporter;
pub mod revision;
pub mod server;
pub mod stat_server;
pub mod throttler;
pub mod webhook;

pub use thaw_shared::logging;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thaw_shared::conn::Connection;
use thaw_shared::drain::{Signal, Signals, UpgradeTracker};
use thaw_shared::proxy::{Dial, Upstream, UpstreamSettings};
use thaw_shared::serve::{self, Transport};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backends::ProbeSchedule;
use crate::config::{Config, PlatformKind};
use crate::parking::Parking;
use crate::platform::knative::{self, KnativeError};
use crate::platform::kubernetes::{self, KubernetesError};
use crate::platform::local::{self, LocalConfigError, LocalPlatform, LocalSettings};
use crate::platform::Platform;
use crate::reporter::{Reporter, ReporterSettings, RevisionStats};
use crate::revision::{Registry, RegistrySettings};
use crate::server::State;
use crate::throttler::ThrottlerSettings;

/// Why the activator could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A bad tracing flag, named.
    #[error("{0}")]
    Tracing(String),
    #[error(
        "--config is required with --platform local: a YAML file of revisions (see deploy/local/)"
    )]
    NoConfig,
    #[error("{0}")]
    LocalConfig(#[from] LocalConfigError),
    #[error("{0}")]
    Kubernetes(#[from] KubernetesError),
    #[error("{0}")]
    Knative(#[from] KnativeError),
    #[error("cannot listen on {what} port {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

impl RunError {
    /// Errors in what the user gave, as opposed to the environment failing.
    pub fn is_config(&self) -> bool {
        match self {
            RunError::NoConfig | RunError::LocalConfig(_) | RunError::Tracing(_) => true,
            RunError::Kubernetes(e) => e.is_config(),
            _ => false,
        }
    }
}

/// Builds the platform the flags ask for; `load` is the activator's own per-revision
/// concurrency, which platforms with a built-in autoscaler scale on.
pub async fn platform(
    config: &Config,
    load: Arc<RevisionStats>,
) -> Result<Arc<dyn Platform>, RunError> {
    match config.platform {
        PlatformKind::Local => {
            let path = config.config.as_ref().ok_or(RunError::NoConfig)?;
            let file = local::load(path)?;
            let settings = LocalSettings {
                queue_proxy: LocalSettings::find_queue_proxy(config.queue_proxy_bin.as_deref()),
                drain_quiet_period: config.pod_quiet_period,
                tick: Duration::from_secs(1),
                max_scale_up_rate: config.max_scale_up_rate,
                max_pods: config
                    .max_local_pods
                    .unwrap_or_else(LocalSettings::default_max_pods),
                tracing: config.tracing().map_err(RunError::Tracing)?,
            };
            Ok(Arc::new(LocalPlatform::start(file, load, settings)))
        }
        PlatformKind::Kubernetes => Ok(Arc::new(kubernetes::connect(config, load).await?)),
        PlatformKind::Knative => Ok(Arc::new(knative::connect(config).await?)),
    }
}

/// Builds the request-path state around a platform.
pub fn build_state(
    config: &Config,
    platform: Arc<dyn Platform>,
    stats: Arc<RevisionStats>,
) -> Result<Arc<State>, RunError> {
    let registry = Arc::new(Registry::new(RegistrySettings {
        throttler: ThrottlerSettings {
            max_waiting: config.max_waiting,
            max_waiting_body_bytes: config.buffer_budget,
        },
        probes: ProbeSchedule {
            eager: config.eager_probe_interval,
            ..ProbeSchedule::default()
        },
        own_ip: config.pod_ip,
    }));
    let reporter = config.autoscaler_url.as_ref().map(|url| {
        Reporter::spawn(
            ReporterSettings::new(url.clone(), config.pod_name.clone()),
            Arc::clone(&stats),
        )
    });
    Ok(Arc::new(State {
        registry,
        platform,
        stats,
        reporter,
        upstream: Upstream::new(UpstreamSettings {
            dial: Dial::Authority,
            // Its upstreams are queue-proxies, which write a response head with its body.
            quick_ack: false,
            max_idle: 1000,
            idle_timeout: Duration::from_secs(90),
        }),
        upgrades: UpgradeTracker::default(),
        draining: std::sync::atomic::AtomicBool::new(false),
        cluster_domain: config.cluster_domain.clone(),
        tracing: config.tracing().map_err(RunError::Tracing)?.is_on(),
    }))
}

async fn bind(config: &Config, what: &'static str, port: u16) -> Result<TcpListener, RunError> {
    let addr = SocketAddr::new(config.listen_address, port);
    serve::bind(what, addr)
        .await
        .map_err(|source| RunError::Bind { what, addr, source })
}

/// Platform updates applied together at most: a bound on how long one batch holds the
/// applier (its cost is O(revisions) plus O(batch)).
const UPDATE_BATCH: usize = 4096;

/// Runs the activator on the platform the flags name until SIGTERM/SIGINT and its drain.
pub async fn run(config: Config) -> Result<(), RunError> {
    let stats = Arc::new(RevisionStats::new());
    let platform = platform(&config, Arc::clone(&stats)).await?;
    run_with(config, platform, stats).await
}

/// Runs the activator on a given platform (tests pass an in-memory one).
pub async fn run_with(
    config: Config,
    platform: Arc<dyn Platform>,
    stats: Arc<RevisionStats>,
) -> Result<(), RunError> {
    let state = build_state(&config, Arc::clone(&platform), stats)?;
    let mut signals = Signals::install().map_err(RunError::Signals)?;

    let http = bind(&config, "http", config.http_port).await?;
    let http_addr = http.local_addr().ok().map(|a| {
        // A wildcard bind is reached on loopback from this machine.
        if a.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        } else {
            a
        }
    });
    let h2c = bind(&config, "h2c", config.h2c_port).await?;
    let metrics = bind(&config, "metrics", config.metrics_port).await?;

    // Platform updates are applied in one task, in order; what the platform already knows
    // is applied before serving, so the first requests never see an empty registry.
    // Whatever is queued is applied as one batch: one new registry snapshot for a
    // platform's whole listing, not one per revision.
    let mut updates = platform.subscribe();
    let mut batch = Vec::new();
    while let Ok(update) = updates.try_recv() {
        batch.push(update);
    }
    state.registry.apply_all(batch);
    let registry = Arc::clone(&state.registry);
    let applier = tokio::spawn(async move {
        while let Some(first) = updates.recv().await {
            let mut batch = vec![first];
            while batch.len() < UPDATE_BATCH {
                match updates.try_recv() {
                    Ok(update) => batch.push(update),
                    Err(_) => break,
                }
            }
            registry.apply_all(batch);
        }
    });

    let builder = Arc::new(serve::http_builder(config.read_header_timeout));
    let (stop_traffic, traffic_stopped) = watch::channel(false);
    let (stop_aux, aux_stopped) = watch::channel(false);
    let s = Arc::clone(&state);
    let handler =
        move |conn: &Arc<Connection>, req| server::handle(Arc::clone(&s), Arc::clone(conn), req);
    // Requests for a revision that must wait are parked before hyper, in a fraction of
    // the memory a hyper connection holds.
    let parking = Arc::new(Parking::new(Arc::clone(&state), config.read_header_timeout));
    let traffic = [
        tokio::spawn(serve::serve_with(
            http,
            Transport::Plain,
            Arc::clone(&builder),
            config.read_header_timeout,
            traffic_stopped.clone(),
            handler.clone(),
            Some(Arc::clone(&parking)),
        )),
        tokio::spawn(serve::serve_with(
            h2c,
            Transport::Plain,
            Arc::clone(&builder),
            config.read_header_timeout,
            traffic_stopped,
            handler,
            Some(parking),
        )),
    ];
    let s = Arc::clone(&state);
    let metrics_server = tokio::spawn(serve::serve(
        metrics,
        Transport::Plain,
        Arc::clone(&builder),
        config.read_header_timeout,
        aux_stopped,
        move |_: &Arc<Connection>, req| {
            let resp = server::metrics(&s, &req);
            async move { resp }
        },
    ));
    tracing::info!(platform = platform.name(), "activator started");
    let http_addr = http_addr.map_or_else(
        || format!("127.0.0.1:{}", config.http_port),
        |a| a.to_string(),
    );
    for r in state.registry.all() {
        let host = r.spec.hosts.first().cloned().unwrap_or_else(|| {
            format!(
                "{}.{}.svc.{}",
                r.spec.id.name, r.spec.id.namespace, config.cluster_domain
            )
        });
        tracing::info!(
            revision = %r.spec.id,
            "call {} with: curl -H 'Host: {host}' http://{http_addr}/",
            r.spec.id.name
        );
    }

    // Kubernetes sends SIGTERM and expects the full drain; Ctrl-C at a terminal wants the
    // process gone soon.
    let drain_period = match signals.next().await {
        Signal::Terminate => config.drain_period,
        Signal::Interrupt => config.drain_period.min(Duration::from_secs(1)),
    };
    tracing::info!(drain_period = ?drain_period, "signal received; draining");
    state.draining.store(true, Ordering::Relaxed);
    let doomed = Arc::clone(&platform);
    signals.exit_on_next(move || doomed.kill_now());
    tokio::time::sleep(drain_period).await;
    tracing::info!("drain period over; finishing in-flight and buffered requests");
    serve::finish_traffic(&stop_traffic, traffic, &state.upgrades).await;
    applier.abort();
    platform.shutdown().await;
    let _ = stop_aux.send(true);
    let _ = metrics_server.await;
    tracing::info!("drained");
    Ok(())
}
