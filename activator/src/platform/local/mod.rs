//! The local platform: the whole system on one machine, no cluster.
//!
//! Revisions come from a YAML file ([`config`]). A revision with a `command` gets pods
//! that are processes: the app plus a real queue-proxy in front of it
//! ([`super::process`]), started on the first request, scaled with Knative's KPA rule
//! (`thaw_shared::autoscale`) from the activator's own concurrency plus the queue-proxies'
//! `:9090` stats, and stopped (drained) when idle. A revision with `endpoints` uses
//! queue-proxies someone else runs.
//!
//! Kubernetes mapping: a pod is a process pair; a Deployment's scale is the number of
//! pairs; the EndpointSlice is the list of queue-proxy addresses sent to the activator.

pub mod config;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thaw_shared::autoscale::{Autoscaler, ScalingSettings};
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};

use self::config::{LocalConfig, LocalRevision, PodSource};
use super::process::{Pod, PodEvent, PodTemplate, QueueProxyCommand};
use super::scrape::Scraper;
use super::{BoxFuture, Platform, PlatformUpdate};
use crate::backends::probe_pod;
use crate::reporter::RevisionStats;
use crate::revision::{RevisionId, RevisionSpec};

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// How the local platform runs pods.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub queue_proxy: QueueProxyCommand,
    /// The pods' queue-proxies drain for this long after their last request.
    pub drain_quiet_period: Duration,
    /// How often each revision's scale is decided.
    pub tick: Duration,
}

impl LocalSettings {
    /// The queue-proxy to run: `explicit`, else a `queue-proxy` binary beside this
    /// executable, else this executable itself as `activator queue-proxy`.
    pub fn find_queue_proxy(explicit: Option<&Path>) -> QueueProxyCommand {
        if let Some(p) = explicit {
            return QueueProxyCommand {
                program: p.to_owned(),
                args: Vec::new(),
            };
        }
        let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("activator"));
        let sibling = me.with_file_name(format!("queue-proxy{}", std::env::consts::EXE_SUFFIX));
        if sibling.is_file() {
            return QueueProxyCommand {
                program: sibling,
                args: Vec::new(),
            };
        }
        QueueProxyCommand {
            program: me,
            args: vec!["queue-proxy".into()],
        }
    }
}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<LocalConfig, LocalConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let base = config_dir(path);
    LocalConfig::parse(&text, &base).map_err(|message| LocalConfigError::Invalid {
        path: path.to_owned(),
        message,
    })
}

/// The directory relative commands resolve from: the file's own. A bare file name has
/// an empty parent, which as a working directory makes every spawn fail with ENOENT
/// (misreported as the program missing), so it becomes `.`.
fn config_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// One revision's pods, shared between its scaling task and `kill_now`.
struct Pods {
    running: BTreeMap<u64, RunningPod>,
}

struct RunningPod {
    pod: Pod,
    /// The app or queue-proxy exited and has not come back yet.
    down: bool,
}

struct RevisionRuntime {
    spec: RevisionSpec,
    config: LocalRevision,
    pods: Mutex<Pods>,
    wake: Notify,
}

impl RevisionRuntime {
    fn pods(&self) -> MutexGuard<'_, Pods> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serving addresses of pods that are up, for the activator.
    fn addresses(&self) -> Vec<SocketAddr> {
        self.pods()
            .running
            .values()
            .filter(|p| !p.down)
            .map(|p| p.pod.ports.serving)
            .collect()
    }
}

struct Inner {
    revisions: Vec<Arc<RevisionRuntime>>,
    /// Set once the activator stops: scaling loops end instead of replacing pods.
    stopping: tokio::sync::watch::Sender<bool>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<PlatformUpdate>>>,
    load: Arc<RevisionStats>,
    settings: LocalSettings,
    base_dir: PathBuf,
}

impl Inner {
    fn publish(&self, update: PlatformUpdate) {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s.send(update.clone()).is_ok());
    }

    fn publish_pods(&self, rt: &RevisionRuntime) {
        self.publish(PlatformUpdate::Pods {
            revision: rt.spec.id.clone(),
            pods: rt.addresses(),
        });
    }
}

/// The local platform. Cloning shares it.
#[derive(Clone)]
pub struct LocalPlatform {
    inner: Arc<Inner>,
}

impl LocalPlatform {
    /// Starts the platform: a scaling task per revision that runs processes. `load` is the
    /// activator's own per-revision concurrency.
    pub fn start(config: LocalConfig, load: Arc<RevisionStats>, settings: LocalSettings) -> Self {
        let revisions = config
            .revisions
            .into_iter()
            .map(|r| {
                Arc::new(RevisionRuntime {
                    spec: r.spec.clone(),
                    config: r,
                    pods: Mutex::new(Pods {
                        running: BTreeMap::new(),
                    }),
                    wake: Notify::new(),
                })
            })
            .collect();
        let platform = Self {
            inner: Arc::new(Inner {
                revisions,
                stopping: tokio::sync::watch::Sender::new(false),
                subscribers: Mutex::new(Vec::new()),
                load,
                settings,
                base_dir: config.base_dir,
            }),
        };
        for rt in &platform.inner.revisions {
            if matches!(rt.config.source, PodSource::Command { .. }) {
                tokio::spawn(scale_revision(
                    Arc::downgrade(&platform.inner),
                    Arc::clone(rt),
                ));
            }
        }
        platform
    }

    /// Process ids of every running pod, app and queue-proxy (for tests and logs).
    pub fn pids(&self) -> Vec<u32> {
        self.inner
            .revisions
            .iter()
            .flat_map(|rt| {
                rt.pods()
                    .running
                    .values()
                    .flat_map(|p| {
                        let (a, q) = p.pod.pids();
                        [a, q]
                    })
                    .flatten()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Platform for LocalPlatform {
    fn subscribe(&self) -> mpsc::UnboundedReceiver<PlatformUpdate> {
        let (tx, rx) = mpsc::unbounded_channel();
        for rt in &self.inner.revisions {
            let _ = tx.send(PlatformUpdate::Revision(rt.spec.clone()));
            let pods = match &rt.config.source {
                PodSource::Endpoints(addrs) => addrs.clone(),
                PodSource::Command { .. } => rt.addresses(),
            };
            let _ = tx.send(PlatformUpdate::Pods {
                revision: rt.spec.id.clone(),
                pods,
            });
        }
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    fn need_capacity(&self, revision: &RevisionId) {
        if let Some(rt) = self.inner.revisions.iter().find(|r| &r.spec.id == revision) {
            // Decide now rather than at the next tick: this is the cold start.
            rt.wake.notify_one();
        }
    }

    fn name(&self) -> &'static str {
        "local"
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // First stop deciding, so no loop starts a pod to replace the ones leaving.
            self.inner.stopping.send_replace(true);
            let mut stopping = Vec::new();
            for rt in &self.inner.revisions {
                let pods: Vec<_> = std::mem::take(&mut rt.pods().running)
                    .into_values()
                    .collect();
                stopping.extend(pods.into_iter().map(|p| p.pod.stop()));
            }
            if !stopping.is_empty() {
                tracing::info!(pods = stopping.len(), "stopping pods");
            }
            futures_util::future::join_all(stopping).await;
        })
    }

    fn kill_now(&self) {
        for rt in &self.inner.revisions {
            // Dropping a pod kills its processes at once.
            drop(std::mem::take(&mut rt.pods().running));
        }
    }
}

fn scaling_settings(r: &LocalRevision) -> ScalingSettings {
    let mut s = ScalingSettings::default().with_stable_window(r.stable_window);
    s.target = r.target;
    s.min_scale = r.min_scale;
    s.max_scale = r.max_scale;
    s.scale_to_zero_grace_period = r.scale_to_zero_grace_period;
    s
}

/// One revision's control loop: observe, decide, start or stop pods.
async fn scale_revision(platform: std::sync::Weak<Inner>, rt: Arc<RevisionRuntime>) {
    let Some(inner) = platform.upgrade() else {
        return;
    };
    let PodSource::Command { command, env } = &rt.config.source else {
        return;
    };
    let template = PodTemplate {
        namespace: rt.spec.id.namespace.to_string(),
        revision: rt.spec.id.name.to_string(),
        configuration: rt.spec.id.name.to_string(),
        command: command.clone(),
        env: env.clone(),
        working_dir: Some(inner.base_dir.clone()),
        container_concurrency: rt.spec.container_concurrency,
        timeout_seconds: rt.spec.timeouts.total.map_or(0, |d| d.as_secs()),
        response_start_timeout_seconds: rt.spec.timeouts.response_start.map_or(0, |d| d.as_secs()),
        idle_timeout_seconds: rt.spec.timeouts.idle.map_or(0, |d| d.as_secs()),
        readiness_probe: rt.config.readiness_probe.clone(),
        queue_proxy: inner.settings.queue_proxy.clone(),
        drain_quiet_period: inner.settings.drain_quiet_period,
    };
    let tick_every = inner.settings.tick;
    let mut stopping = inner.stopping.subscribe();
    drop(inner);

    let name = rt.spec.id.name.clone();
    let scraper = Scraper::new();
    let mut autoscaler = Autoscaler::new(scaling_settings(&rt.config));
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut next_id = 1u64;
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // After a start failure, wait before trying again (waiting requests got a 502).
    let mut retry_after: Option<Instant> = None;
    let mut failures = 0u32;

    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
            _ = rt.wake.notified() => {}
            Some(event) = events.recv() => {
                let Some(inner) = platform.upgrade() else { return };
                on_pod_event(&inner, &rt, event);
                continue;
            }
        }
        let Some(inner) = platform.upgrade() else {
            return;
        };
        let now = Instant::now();

        // Observed demand: requests in the activator (waiting or proxied) plus what the
        // pods see directly, without counting activator traffic twice.
        let metrics_addrs: Vec<SocketAddr> = rt
            .pods()
            .running
            .values()
            .filter(|p| !p.down)
            .map(|p| p.pod.ports.metrics)
            .collect();
        let direct = scraper.direct_concurrency(metrics_addrs).await;
        let observed = inner.load.in_flight(&rt.spec.id) as f64 + direct;
        autoscaler.record(now, observed);
        let current = rt.pods().running.len() as u32;
        let desired = autoscaler.decide(now, current).desired;
        if desired == current || retry_after.is_some_and(|t| now < t) && desired > current {
            continue;
        }
        tracing::info!(revision = %name, from = current, to = desired, "scaling {name} from {current} to {desired}");
        if desired > current {
            for _ in current..desired {
                if *stopping.borrow() {
                    return;
                }
                let id = next_id;
                next_id += 1;
                match Pod::start(id, &template, events_tx.clone()).await {
                    Ok(pod) => {
                        failures = 0;
                        retry_after = None;
                        if *stopping.borrow() {
                            // The activator began stopping while this pod started.
                            pod.stop().await;
                            return;
                        }
                        tokio::spawn(log_ready(name.clone(), id, pod.ports.serving, now));
                        rt.pods()
                            .running
                            .insert(id, RunningPod { pod, down: false });
                    }
                    Err(e) => {
                        failures += 1;
                        let backoff =
                            Duration::from_millis(500u64.saturating_mul(1 << failures.min(6)));
                        retry_after = Some(Instant::now() + backoff);
                        let reason = format!("cannot start a pod for revision {}: {e}", rt.spec.id);
                        tracing::error!(revision = %name, error = %e, retry_in = ?backoff, "pod did not start");
                        inner.publish(PlatformUpdate::Unavailable {
                            revision: rt.spec.id.clone(),
                            reason,
                        });
                        break;
                    }
                }
            }
        } else {
            let leaving: Vec<Pod> = {
                let mut pods = rt.pods();
                let ids: Vec<u64> = pods
                    .running
                    .keys()
                    .rev()
                    .take((current - desired) as usize)
                    .copied()
                    .collect();
                ids.into_iter()
                    .filter_map(|id| pods.running.remove(&id))
                    .map(|p| p.pod)
                    .collect()
            };
            // Out of rotation first, so no new request is sent to a draining pod.
            inner.publish_pods(&rt);
            for pod in leaving {
                tokio::spawn(pod.stop());
            }
            if desired == 0 {
                tracing::info!(revision = %name, "scaled {name} to zero");
            }
            continue;
        }
        inner.publish_pods(&rt);
    }
}

fn on_pod_event(inner: &Inner, rt: &RevisionRuntime, event: PodEvent) {
    let changed = {
        let mut pods = rt.pods();
        match &event {
            PodEvent::Exited { pod, .. } => {
                pods.running.get_mut(pod).map(|p| p.down = true).is_some()
            }
            PodEvent::Restarted { pod } => {
                pods.running.get_mut(pod).map(|p| p.down = false).is_some()
            }
        }
    };
    if changed {
        // The activator drops a pod that exited at once, and probes it again once back.
        inner.publish_pods(rt);
    }
}

/// Logs when a new pod first answers the activator's probe.
async fn log_ready(revision: Arc<str>, pod: u64, serving: SocketAddr, started: Instant) {
    let deadline = started + Duration::from_secs(600);
    while Instant::now() < deadline {
        if let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_millis(300), probe_pod(serving)).await
        {
            let ms = started.elapsed().as_millis();
            tracing::info!(%revision, pod, ready_ms = ms as u64, "pod ready after {ms} ms");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_config_file_name_resolves_from_the_current_directory() {
        assert_eq!(config_dir(Path::new("hello.yaml")), Path::new("."));
        assert_eq!(
            config_dir(Path::new("deploy/local/hello.yaml")),
            Path::new("deploy/local")
        );
        assert_eq!(config_dir(Path::new("/etc/thaw.yaml")), Path::new("/etc"));
    }

    #[test]
    fn queue_proxy_falls_back_to_this_executable() {
        let explicit = LocalSettings::find_queue_proxy(Some(Path::new("/opt/qp")));
        assert_eq!(explicit.program, PathBuf::from("/opt/qp"));
        assert!(explicit.args.is_empty());
        let found = LocalSettings::find_queue_proxy(None);
        // In a test build, target/debug/deps holds the test binary and no queue-proxy.
        assert!(found.args == ["queue-proxy"] || found.program.ends_with("queue-proxy"));
    }
}
