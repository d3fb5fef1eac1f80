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
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use thaw_shared::autoscale::{Autoscaler, ScalingSettings};
use thaw_shared::trace::TracingConfig;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
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
    /// Knative's `max-scale-up-rate`: one decision asks for at most this many times the
    /// ready pods (at least one), so a revision whose pods never become ready cannot
    /// ask for more and more of them.
    pub max_scale_up_rate: f64,
    /// Pods the platform runs at once, over all revisions: what this machine can hold.
    /// Knative's rate alone allows 1000 pods from zero; a laptop cannot run that.
    pub max_pods: usize,
    /// The activator's tracing settings, handed to every queue-proxy in
    /// `OBSERVABILITY_CONFIG` as Knative's controller does, so one flag traces the path.
    pub tracing: TracingConfig,
}

impl LocalSettings {
    /// The default [`LocalSettings::max_pods`]: eight pods per CPU this process may use
    /// (the standard library reads the cgroup quota), and never fewer than eight. A pod is
    /// two processes that mostly wait; eight per core leaves room for bursts while a
    /// runaway scale-out still cannot exhaust the machine's processes, ports or memory.
    pub fn default_max_pods() -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        cpus.saturating_mul(8).max(8)
    }

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
    /// The pod answered the activator's probe since it last (re)started. Only ready pods
    /// count for the scale-up rate; pods still starting count as asked for already, so
    /// they are not asked for again.
    ready: bool,
    /// The task that probes the pod until it is ready; it stops when the pod leaves.
    readiness: AbortOnDrop,
    /// The pod's place under the machine's pod limit, held until its processes are gone.
    slot: OwnedSemaphorePermit,
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    /// One permit per pod the machine may run, shared by every revision.
    pod_slots: Arc<Semaphore>,
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
                pod_slots: Arc::new(Semaphore::new(settings.max_pods.max(1))),
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

fn scaling_settings(r: &LocalRevision, max_scale_up_rate: f64) -> ScalingSettings {
    let mut s = ScalingSettings::default().with_stable_window(r.stable_window);
    s.target = r.target;
    s.min_scale = r.min_scale;
    s.max_scale = r.max_scale;
    s.scale_to_zero_grace_period = r.scale_to_zero_grace_period;
    s.max_scale_up_rate = max_scale_up_rate;
    s
}

/// What one decision does to a revision's pods.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Keep,
    Start(u32),
    /// These pods, by id.
    Stop(Vec<u64>),
}

/// Turns a desired pod count into starts or stops, given each running pod's id and
/// readiness. Pods still starting are counted, so that they are not asked for twice.
/// Scale-down takes pods that are not ready first (they serve nobody), then the newest,
/// as Kubernetes' ReplicaSet controller picks which pods to delete.
fn plan(desired: u32, pods: &[(u64, bool)]) -> Plan {
    let running = u32::try_from(pods.len()).unwrap_or(u32::MAX);
    if desired > running {
        return Plan::Start(desired - running);
    }
    if desired == running {
        return Plan::Keep;
    }
    let mut order: Vec<(u64, bool)> = pods.to_vec();
    // Not ready before ready; newest (highest id) first within each.
    order.sort_by_key(|&(id, ready)| (ready, std::cmp::Reverse(id)));
    Plan::Stop(
        order
            .into_iter()
            .take((running - desired) as usize)
            .map(|(id, _)| id)
            .collect(),
    )
}

/// One revision's control loop: observe, decide, start or stop pods.
async fn scale_revision(platform: Weak<Inner>, rt: Arc<RevisionRuntime>) {
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
        observability_config: observability_config(&inner.settings.tracing),
    };
    let tick_every = inner.settings.tick;
    let max_pods = inner.settings.max_pods;
    let pod_slots = Arc::clone(&inner.pod_slots);
    let mut stopping = inner.stopping.subscribe();
    let mut autoscaler = Autoscaler::new(scaling_settings(
        &rt.config,
        inner.settings.max_scale_up_rate,
    ));
    drop(inner);

    let name = rt.spec.id.name.clone();
    let scraper = Scraper::new();
    // Whether the last decision was held back by the machine's pod limit, so that the
    // warning is logged once per episode rather than every tick.
    let mut capped = false;
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
                if on_pod_event(&rt, event) {
                    // The activator drops a pod that exited at once, and probes it again
                    // once it is back.
                    inner.publish_pods(&rt);
                }
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
        let pods: Vec<(u64, bool)> = rt
            .pods()
            .running
            .iter()
            .map(|(id, p)| (*id, p.ready && !p.down))
            .collect();
        let current = u32::try_from(pods.len()).unwrap_or(u32::MAX);
        // Knative's KPA counts ready pods only: the scale-up rate is a multiple of what
        // already serves, so pods that never become ready cannot snowball.
        let ready = u32::try_from(pods.iter().filter(|(_, r)| *r).count()).unwrap_or(u32::MAX);
        let desired = autoscaler.decide(now, ready).desired;
        match plan(desired, &pods) {
            Plan::Keep => {
                capped = false;
            }
            Plan::Start(_) if retry_after.is_some_and(|t| now < t) => {}
            Plan::Start(wanted) => {
                let free = u32::try_from(pod_slots.available_permits()).unwrap_or(u32::MAX);
                let starting = wanted.min(free);
                if starting < wanted && !capped {
                    tracing::warn!(
                        revision = %name,
                        desired,
                        max_pods,
                        "{name} wants {desired} pods; the machine's limit of {max_pods} pods (--max-local-pods) holds it at {}",
                        current + starting
                    );
                }
                capped = starting < wanted;
                if starting == 0 {
                    continue;
                }
                let to = current + starting;
                tracing::info!(revision = %name, from = current, to, ready, "scaling {name} from {current} to {to}");
                for _ in 0..starting {
                    if *stopping.borrow() {
                        return;
                    }
                    // There was room a moment ago, but another revision may have taken it.
                    let Ok(slot) = Arc::clone(&pod_slots).try_acquire_owned() else {
                        break;
                    };
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
                            let readiness = tokio::spawn(watch_ready(
                                Arc::downgrade(&rt),
                                id,
                                pod.ports.serving,
                                true,
                            ));
                            rt.pods().running.insert(
                                id,
                                RunningPod {
                                    pod,
                                    down: false,
                                    ready: false,
                                    readiness: AbortOnDrop(readiness),
                                    slot,
                                },
                            );
                        }
                        Err(e) => {
                            failures += 1;
                            let backoff =
                                Duration::from_millis(500u64.saturating_mul(1 << failures.min(6)));
                            retry_after = Some(Instant::now() + backoff);
                            let reason =
                                format!("cannot start a pod for revision {}: {e}", rt.spec.id);
                            tracing::error!(revision = %name, error = %e, retry_in = ?backoff, "pod did not start");
                            inner.publish(PlatformUpdate::Unavailable {
                                revision: rt.spec.id.clone(),
                                reason,
                            });
                            break;
                        }
                    }
                }
                inner.publish_pods(&rt);
            }
            Plan::Stop(ids) => {
                capped = false;
                tracing::info!(revision = %name, from = current, to = desired, ready, "scaling {name} from {current} to {desired}");
                let leaving: Vec<RunningPod> = {
                    let mut pods = rt.pods();
                    ids.into_iter()
                        .filter_map(|id| pods.running.remove(&id))
                        .collect()
                };
                // Out of rotation first, so no new request is sent to a draining pod.
                inner.publish_pods(&rt);
                for RunningPod { pod, slot, .. } in leaving {
                    tokio::spawn(async move {
                        pod.stop().await;
                        // The machine has room again only once the processes are gone.
                        drop(slot);
                    });
                }
                if desired == 0 {
                    tracing::info!(revision = %name, "scaled {name} to zero");
                }
            }
        }
    }
}

fn on_pod_event(rt: &Arc<RevisionRuntime>, event: PodEvent) -> bool {
    let mut pods = rt.pods();
    match &event {
        PodEvent::Exited { pod, .. } => pods.running.get_mut(pod).is_some_and(|p| {
            p.down = true;
            p.ready = false;
            true
        }),
        PodEvent::Restarted { pod } => pods.running.get_mut(pod).is_some_and(|p| {
            p.down = false;
            // Probed again from scratch: the new process is not ready yet.
            p.readiness = AbortOnDrop(tokio::spawn(watch_ready(
                Arc::downgrade(rt),
                *pod,
                p.pod.ports.serving,
                false,
            )));
            true
        }),
    }
}

/// How often a starting pod is probed: often at first, since the cold start is the local
/// platform's most visible latency, then at Knative's pace for a pod that takes long.
const READY_PROBE_FAST: Duration = Duration::from_millis(5);
const READY_PROBE_SLOW: Duration = Duration::from_millis(200);
const READY_PROBE_FAST_FOR: Duration = Duration::from_secs(5);

/// Probes a pod as the activator does until it answers, then marks it ready (which lets
/// the scale-up rate count it) and wakes the revision's loop. `first` logs the cold start.
async fn watch_ready(rt: Weak<RevisionRuntime>, pod: u64, serving: SocketAddr, first: bool) {
    let started = Instant::now();
    let Some(revision) = rt.upgrade().map(|rt| rt.spec.id.clone()) else {
        return;
    };
    loop {
        if let Ok(Ok(())) = tokio::time::timeout(
            Duration::from_millis(300),
            probe_pod(serving, Some(&revision)),
        )
        .await
        {
            break;
        }
        let pace = if started.elapsed() < READY_PROBE_FAST_FOR {
            READY_PROBE_FAST
        } else {
            READY_PROBE_SLOW
        };
        tokio::time::sleep(pace).await;
    }
    let Some(rt) = rt.upgrade() else {
        return;
    };
    let marked = rt
        .pods()
        .running
        .get_mut(&pod)
        .is_some_and(|p| !p.down && !std::mem::replace(&mut p.ready, true));
    if marked {
        let revision = &rt.spec.id.name;
        let ms = started.elapsed().as_millis();
        if first {
            tracing::info!(%revision, pod, ready_ms = ms as u64, "pod ready after {ms} ms");
        } else {
            tracing::debug!(%revision, pod, ready_ms = ms as u64, "restarted pod ready after {ms} ms");
        }
        rt.wake.notify_one();
    }
}

/// A queue-proxy's `OBSERVABILITY_CONFIG`: Knative's JSON with the tracing settings, or
/// empty (Knative's defaults) when tracing is off.
fn observability_config(tracing: &TracingConfig) -> String {
    if tracing.is_on() {
        serde_json::json!({ "tracing": tracing.to_observability_json() }).to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_count_starting_pods_and_stop_unready_ones_first() {
        assert_eq!(plan(0, &[]), Plan::Keep);
        assert_eq!(plan(3, &[]), Plan::Start(3));
        // Two still starting count as asked for: one more, not three.
        assert_eq!(plan(3, &[(1, false), (2, false)]), Plan::Start(1));
        assert_eq!(plan(2, &[(1, false), (2, true)]), Plan::Keep);
        // Scale-down: pods that serve nobody go first, newest first, then ready ones.
        let pods = [(1, true), (2, false), (3, true), (4, false), (5, true)];
        assert_eq!(plan(3, &pods), Plan::Stop(vec![4, 2]));
        assert_eq!(plan(1, &pods), Plan::Stop(vec![4, 2, 5, 3]));
        assert_eq!(plan(0, &pods), Plan::Stop(vec![4, 2, 5, 3, 1]));
    }

    #[test]
    fn the_default_pod_limit_follows_the_cpus() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(LocalSettings::default_max_pods(), (8 * cpus).max(8));
    }

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
