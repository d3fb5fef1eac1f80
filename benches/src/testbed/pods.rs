//! One pod's life on the testbed's node, as the kubelet lives it: map its images, give it
//! a network namespace, make its volumes, run its init containers in order and then its
//! containers, probe them, restart them by the restart policy, and report status. On
//! deletion: each container's `preStop` hook, then SIGTERM, then SIGKILL when the grace
//! period is up; then the pod's namespace goes and the Pod object is removed.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};

use super::env::{self, EnvContext};
use super::images::ImageMap;
use super::network::{Network, PodNetwork};
use super::podexec::Bind;
use super::probes::{ContainerProbe, Hook};
use super::status::{self, PodState, State};
use super::volumes::{PodVolumes, VolumeContext};

/// The kubelet waits 10 s to 5 min between restarts; the testbed starts at 1 s so that
/// crash tests do not wait, and caps at 60 s.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A container that ran this long without failing starts its back-off afresh.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// How often a pod waiting on a missing image, volume or config tries again.
const RETRY: Duration = Duration::from_secs(2);
/// When the node itself stops, its containers get this long after SIGTERM.
const NODE_STOP_GRACE: Duration = Duration::from_secs(2);

/// What every pod needs from the node.
pub struct NodeContext {
    pub client: Client,
    pub node_name: String,
    pub network: Network,
    pub images: ImageMap,
    /// `<state>/pods`: one folder per pod with its logs, volumes and `/etc` files.
    pub pods_dir: PathBuf,
    /// This binary, for `pod-exec`.
    pub self_exe: PathBuf,
    /// The `kubernetes` Service's ClusterIP and port.
    pub kubernetes: (Ipv4Addr, u16),
    pub cluster_domain: String,
    pub node_cpu: f64,
    pub node_memory: f64,
    pub recorder: Recorder,
}

impl NodeContext {
    fn host_ip(&self) -> Ipv4Addr {
        self.network.gateway()
    }

    async fn event(&self, pod: &Pod, warning: bool, reason: &str, note: String) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: reason.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &pod.object_ref(&())).await {
            tracing::debug!(error = %e, reason, "cannot record an event");
        }
    }
}

/// What the node's pod watch says of a pod.
#[derive(Debug, Clone)]
pub enum PodUpdate {
    Current(Arc<Pod>),
    /// Removed from the API (force-deleted): stop at once.
    Gone,
    /// The node is stopping: stop quickly, leave the Pod object alone.
    NodeStopping,
}

/// A running pod's task.
pub struct PodHandle {
    updates: watch::Sender<PodUpdate>,
    task: tokio::task::JoinHandle<()>,
}

impl PodHandle {
    pub fn spawn(ctx: Arc<NodeContext>, pod: Pod) -> Self {
        let (updates, rx) = watch::channel(PodUpdate::Current(Arc::new(pod)));
        let task = tokio::spawn(run_pod(ctx, rx));
        Self { updates, task }
    }

    pub fn update(&self, update: PodUpdate) {
        // A finished pod's task has dropped its receiver; nothing is listening then.
        let _ = self.updates.send(update);
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the pod for a node shutdown and waits until its processes are gone.
    pub async fn stop(self) {
        self.update(PodUpdate::NodeStopping);
        let _ = self.task.await;
    }
}

/// When containers must stop, and how.
#[derive(Debug, Clone, Copy)]
struct Stop {
    deadline: Instant,
    run_pre_stop: bool,
    /// Remove the Pod object once everything is stopped (a graceful deletion).
    delete: bool,
    /// Keep reporting status (not after the pod is gone or the node stops).
    report: bool,
}

fn stop_for(update: &PodUpdate, previous: Option<Stop>) -> Option<Stop> {
    let now = Instant::now();
    let stop = match update {
        PodUpdate::Current(pod) => {
            pod.metadata.deletion_timestamp.as_ref()?;
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds)
                .unwrap_or(30);
            Stop {
                deadline: now + Duration::from_secs(u64::try_from(grace).unwrap_or(0)),
                run_pre_stop: true,
                delete: true,
                report: true,
            }
        }
        PodUpdate::Gone => Stop {
            deadline: now,
            run_pre_stop: false,
            delete: false,
            report: false,
        },
        PodUpdate::NodeStopping => Stop {
            deadline: now + NODE_STOP_GRACE,
            run_pre_stop: false,
            delete: false,
            report: false,
        },
    };
    // A later deletion may shorten the grace period, never lengthen it.
    Some(match previous {
        Some(p) => Stop {
            deadline: p.deadline.min(stop.deadline),
            run_pre_stop: p.run_pre_stop && stop.run_pre_stop,
            delete: p.delete || stop.delete,
            report: p.report && stop.report,
        },
        None => stop,
    })
}

/// The state container runners and the status reporter share.
struct Shared {
    state: Mutex<PodState>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PodState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut PodState)) {
        f(&mut self.lock());
        self.changed.notify_one();
    }
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Init(usize),
    Main(usize),
}

impl Shared {
    fn container(&self, slot: Slot, f: impl FnOnce(&mut status::Container)) {
        self.update(|s| {
            let c = match slot {
                Slot::Init(i) => s.init.get_mut(i),
                Slot::Main(i) => s.main.get_mut(i),
            };
            if let Some(c) = c {
                f(c);
            }
        });
    }
}

async fn run_pod(ctx: Arc<NodeContext>, mut updates: watch::Receiver<PodUpdate>) {
    let PodUpdate::Current(pod) = updates.borrow_and_update().clone() else {
        return;
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let dir = ctx.pods_dir.join(format!("{namespace}_{name}_{uid}"));
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| status::Container::new(&c.name, c.image.as_deref().unwrap_or("")))
        .collect();
    let main = spec
        .containers
        .iter()
        .map(|c| status::Container::new(&c.name, c.image.as_deref().unwrap_or("")))
        .collect();
    let shared = Arc::new(Shared {
        state: Mutex::new(PodState::new(ctx.host_ip(), init, main)),
        changed: Notify::new(),
    });
    tracing::info!(pod = %format!("{namespace}/{name}"), "starting pod");

    // Deletion arrives as pod updates; containers watch the resulting stop signal.
    let (stop_tx, stop_rx) = watch::channel::<Option<Stop>>(None);
    let forward = tokio::spawn(async move {
        loop {
            let update = updates.borrow_and_update().clone();
            let next = stop_for(&update, *stop_tx.borrow());
            if next.is_some() {
                stop_tx.send_replace(next);
            }
            if !matches!(update, PodUpdate::Current(_)) || updates.changed().await.is_err() {
                // Keep the sender alive until the pod's task is done with it (it aborts us).
                std::future::pending::<()>().await;
            }
        }
    });
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let reporter = tokio::spawn(report_status(
        api.clone(),
        name.clone(),
        Arc::clone(&shared),
        stop_rx.clone(),
    ));

    let mut run = PodRun {
        ctx: Arc::clone(&ctx),
        pod: Arc::clone(&pod),
        shared: Arc::clone(&shared),
        stop: stop_rx.clone(),
        dir,
        network: None,
        volumes: None,
        refresher: None,
    };
    run.start_and_wait().await;
    run.clean_up().await;

    let stop = *stop_rx.borrow();
    let report = stop.is_none_or(|s| s.report);
    if report {
        // The final statuses (terminated containers, phase) before the object goes.
        flush_status(&api, &name, &shared).await;
    }
    reporter.abort();
    if let Some(Stop { delete: true, .. }) = stop {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(e) = api.delete(&name, &params).await {
            tracing::debug!(error = %e, pod = %name, "pod already removed");
        }
    }
    forward.abort();
    tracing::info!(pod = %format!("{namespace}/{name}"), "pod stopped");
}

struct PodRun {
    ctx: Arc<NodeContext>,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
    stop: watch::Receiver<Option<Stop>>,
    dir: PathBuf,
    network: Option<PodNetwork>,
    volumes: Option<Arc<PodVolumes>>,
    /// Keeps the pod's service-account tokens fresh while it runs.
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl PodRun {
    fn stopping(&self) -> bool {
        self.stop.borrow().is_some()
    }

    /// Waits `d`, or less if the pod is being stopped; true when it is.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = sleep(d) => self.stopping(),
            _ = wait_stop(&mut self.stop) => true,
        }
    }

    async fn start_and_wait(&mut self) {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let Some(executables) = self.resolve_images(&spec).await else {
            return;
        };
        if !self.attach_network().await {
            return;
        }
        if !self.prepare_volumes().await {
            return;
        }
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".to_owned());
        let grace = Duration::from_secs(
            u64::try_from(spec.termination_grace_period_seconds.unwrap_or(30)).unwrap_or(30),
        );
        let (init_exes, main_exes) = executables;
        // Init containers one at a time, each to a successful exit.
        for (i, container) in spec.init_containers.iter().flatten().enumerate() {
            let runner = self.runner(Slot::Init(i), container, &init_exes[i], grace);
            let init_policy = if policy == "Always" {
                "OnFailure"
            } else {
                &policy
            };
            let succeeded = runner.run(init_policy).await;
            if !succeeded || self.stopping() {
                return;
            }
        }
        self.shared.update(|s| s.initialized = true);
        let mut containers = JoinSet::new();
        for (i, container) in spec.containers.iter().enumerate() {
            let runner = self.runner(Slot::Main(i), container, &main_exes[i], grace);
            let policy = policy.clone();
            containers.spawn(async move { runner.run(&policy).await });
        }
        while containers.join_next().await.is_some() {}
    }

    /// Maps every image to its executable; while one is unknown the pod waits with
    /// `ErrImagePull` (the map is read again every few seconds).
    async fn resolve_images(
        &mut self,
        spec: &k8s_openapi::api::core::v1::PodSpec,
    ) -> Option<(Vec<PathBuf>, Vec<PathBuf>)> {
        let mut warned = false;
        loop {
            let mut failed = false;
            let mut resolve = |slot: Slot, c: &Container| {
                let image = c.image.clone().unwrap_or_default();
                match self.ctx.images.resolve(&image) {
                    Ok(exe) => {
                        self.shared.container(slot, |s| {
                            s.image_id = format!("thaw-testbed://{}", exe.display());
                        });
                        Some(exe)
                    }
                    Err(e) => {
                        failed = true;
                        let message = e.to_string();
                        self.shared.container(slot, |s| {
                            s.state = State::Waiting {
                                reason: "ErrImagePull".to_owned(),
                                message: Some(message.clone()),
                            }
                        });
                        Some(PathBuf::from(message))
                    }
                }
            };
            let init: Vec<PathBuf> = spec
                .init_containers
                .iter()
                .flatten()
                .enumerate()
                .filter_map(|(i, c)| resolve(Slot::Init(i), c))
                .collect();
            let main: Vec<PathBuf> = spec
                .containers
                .iter()
                .enumerate()
                .filter_map(|(i, c)| resolve(Slot::Main(i), c))
                .collect();
            if !failed {
                return Some((init, main));
            }
            if !warned {
                warned = true;
                let messages = self.waiting_messages();
                self.ctx
                    .event(
                        &self.pod,
                        true,
                        "Failed",
                        format!("ErrImagePull: {messages}"),
                    )
                    .await;
            }
            if self.pause(RETRY).await {
                return None;
            }
        }
    }

    fn waiting_messages(&self) -> String {
        let state = self.shared.lock();
        state
            .init
            .iter()
            .chain(state.main.iter())
            .filter_map(|c| match &c.state {
                State::Waiting {
                    message: Some(m), ..
                } => Some(m.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn attach_network(&mut self) -> bool {
        if self.pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            // The node's own namespace; the pod's IP is the node's.
            let ip = self.ctx.host_ip();
            self.shared.update(|s| {
                s.pod_ip = Some(ip);
                s.sandbox_ready = true;
            });
            return true;
        }
        loop {
            match self.ctx.network.attach().await {
                Ok(net) => {
                    let ip = net.ip;
                    self.network = Some(net);
                    self.shared.update(|s| {
                        s.pod_ip = Some(ip);
                        s.sandbox_ready = true;
                    });
                    return true;
                }
                Err(e) => {
                    self.ctx
                        .event(&self.pod, true, "FailedCreatePodSandBox", e.to_string())
                        .await;
                    if self.pause(RETRY).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn prepare_volumes(&mut self) -> bool {
        let etc = self.dir.join("etc");
        if let Err(e) = self.write_etc(&etc) {
            self.ctx
                .event(&self.pod, true, "FailedCreatePodSandBox", e.to_string())
                .await;
            return false;
        }
        let mut reported = None;
        loop {
            let empty_maps = HashMap::new();
            let empty_secrets = HashMap::new();
            let env = self.env_context(&empty_maps, &empty_secrets);
            let volume_dir = self.dir.join("volumes");
            let ctx = VolumeContext {
                client: &self.ctx.client,
                pod: &self.pod,
                dir: &volume_dir,
                env: &env,
            };
            match PodVolumes::prepare(&ctx).await {
                Ok(volumes) => {
                    let volumes = Arc::new(volumes);
                    let (tokens, client, pod) = (
                        Arc::clone(&volumes),
                        self.ctx.client.clone(),
                        Arc::clone(&self.pod),
                    );
                    self.refresher = Some(tokio::spawn(async move {
                        tokens.refresh_tokens(&client, &pod).await;
                    }));
                    self.volumes = Some(volumes);
                    return true;
                }
                Err(e) => {
                    let message = e.to_string();
                    // One event per distinct failure, not one every retry.
                    if reported.as_deref() != Some(message.as_str()) {
                        tracing::warn!(pod = ?self.pod.metadata.name, error = %message, "cannot mount a volume");
                        self.ctx
                            .event(&self.pod, true, "FailedMount", message.clone())
                            .await;
                        reported = Some(message);
                    }
                    if self.pause(RETRY).await {
                        return false;
                    }
                }
            }
        }
    }

    /// The pod's own `resolv.conf`, `hosts` and `hostname`, seen at `/etc` by its
    /// containers: cluster DNS on the node, and the pod's name for its own address.
    fn write_etc(&self, etc: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(etc)?;
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let domain = &self.ctx.cluster_domain;
        let ip = self.shared.lock().pod_ip.unwrap_or(Ipv4Addr::LOCALHOST);
        std::fs::write(
            etc.join("resolv.conf"),
            format!(
                "nameserver {}\nsearch {namespace}.svc.{domain} svc.{domain} {domain}\noptions ndots:5\n",
                self.ctx.host_ip()
            ),
        )?;
        let spec = self.pod.spec.as_ref();
        let hostname = spec
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| name.clone());
        let fqdn = spec
            .and_then(|s| s.subdomain.clone())
            .map(|sub| format!(" {hostname}.{sub}.{namespace}.svc.{domain}"))
            .unwrap_or_default();
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{hostname}{fqdn}\n"),
        )?;
        std::fs::write(etc.join("hostname"), format!("{hostname}\n"))
    }

    fn env_context<'a>(
        &'a self,
        config_maps: &'a HashMap<String, BTreeMap<String, String>>,
        secrets: &'a HashMap<String, BTreeMap<String, Vec<u8>>>,
    ) -> EnvContext<'a> {
        EnvContext {
            pod: &self.pod,
            pod_ip: self.shared.lock().pod_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            host_ip: self.ctx.host_ip(),
            node_cpu: self.ctx.node_cpu,
            node_memory: self.ctx.node_memory,
            kubernetes: self.ctx.kubernetes,
            config_maps,
            secrets,
        }
    }

    fn runner(
        &self,
        slot: Slot,
        container: &Container,
        executable: &Path,
        grace: Duration,
    ) -> ContainerRunner {
        let etc = self.dir.join("etc");
        let mut binds = vec![
            Bind {
                source: etc.join("resolv.conf"),
                target: "/etc/resolv.conf".into(),
                read_only: false,
            },
            Bind {
                source: etc.join("hosts"),
                target: "/etc/hosts".into(),
                read_only: false,
            },
            Bind {
                source: etc.join("hostname"),
                target: "/etc/hostname".into(),
                read_only: false,
            },
        ];
        let volume_binds = self
            .volumes
            .as_ref()
            .map(|v| v.binds(container))
            .transpose();
        let config_error = match volume_binds {
            Ok(extra) => {
                binds.extend(extra.into_iter().flatten());
                None
            }
            Err(e) => Some(e.to_string()),
        };
        ContainerRunner {
            ctx: Arc::clone(&self.ctx),
            pod: Arc::clone(&self.pod),
            shared: Arc::clone(&self.shared),
            stop: self.stop.clone(),
            slot,
            container: container.clone(),
            executable: executable.to_owned(),
            netns: self.network.as_ref().map(PodNetwork::netns_path),
            binds,
            config_error,
            log: self.dir.join(format!("{}.log", container.name)),
            grace,
        }
    }

    async fn clean_up(&mut self) {
        if let Some(task) = self.refresher.take() {
            task.abort();
        }
        if let Some(net) = self.network.take() {
            self.ctx.network.detach(&net).await;
        }
        self.volumes = None;
        // Volumes go with the pod; its logs stay for whoever debugs a test.
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
    }
}

/// Runs one container through its restarts.
struct ContainerRunner {
    ctx: Arc<NodeContext>,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
    stop: watch::Receiver<Option<Stop>>,
    slot: Slot,
    container: Container,
    executable: PathBuf,
    netns: Option<PathBuf>,
    binds: Vec<Bind>,
    /// A mount that cannot be made for this container: it waits, as with the kubelet's
    /// `CreateContainerConfigError`.
    config_error: Option<String>,
    log: PathBuf,
    grace: Duration,
}

/// How one run of a container ended.
enum Ended {
    Exited(i32),
    /// The pod is stopping; the container has been stopped.
    Stopped,
}

impl ContainerRunner {
    /// Runs under `policy` until the container is done for good or the pod stops. True
    /// when its last run exited 0.
    async fn run(mut self, policy: &str) -> bool {
        let mut backoff = BACKOFF_START;
        let mut warned_config = None::<String>;
        let outcome = loop {
            if self.stop.borrow().is_some() {
                break false;
            }
            let start = self.prepare().await;
            let (program, args, environment) = match start {
                Ok(s) => s,
                Err(message) => {
                    self.shared.container(self.slot, |c| {
                        c.state = State::Waiting {
                            reason: "CreateContainerConfigError".to_owned(),
                            message: Some(message.clone()),
                        }
                    });
                    if warned_config.as_deref() != Some(message.as_str()) {
                        self.ctx
                            .event(&self.pod, true, "Failed", format!("Error: {message}"))
                            .await;
                        warned_config = Some(message);
                    }
                    tokio::select! {
                        _ = sleep(RETRY) => continue,
                        _ = wait_stop(&mut self.stop) => break false,
                    }
                }
            };
            let started = std::time::Instant::now();
            let ended = self.run_once(&program, &args, environment).await;
            let code = match ended {
                Ended::Stopped => break self.last_exit_ok(),
                Ended::Exited(code) => code,
            };
            let restart = match policy {
                "Always" => true,
                "OnFailure" => code != 0,
                _ => false,
            };
            if !restart {
                break code == 0;
            }
            if started.elapsed() > BACKOFF_RESET {
                backoff = BACKOFF_START;
            }
            let message = format!(
                "back-off {}s restarting failed container={} pod={}",
                backoff.as_secs(),
                self.container.name,
                self.pod.metadata.name.as_deref().unwrap_or("")
            );
            self.shared.container(self.slot, |c| {
                c.last_state = Some(c.state.clone());
                c.state = State::Waiting {
                    reason: "CrashLoopBackOff".to_owned(),
                    message: Some(message.clone()),
                };
            });
            self.ctx.event(&self.pod, true, "BackOff", message).await;
            tokio::select! {
                _ = sleep(backoff) => {}
                _ = wait_stop(&mut self.stop) => break false,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            self.shared.container(self.slot, |c| c.restarts += 1);
        };
        self.shared.container(self.slot, |c| {
            c.finished = true;
            c.ready = false;
        });
        outcome
    }

    fn last_exit_ok(&self) -> bool {
        let state = self.shared.lock();
        let c = match self.slot {
            Slot::Init(i) => state.init.get(i),
            Slot::Main(i) => state.main.get(i),
        };
        c.and_then(status::Container::exit_code) == Some(0)
    }

    /// The program, its arguments and environment for the next run.
    async fn prepare(&self) -> Result<(PathBuf, Vec<String>, Vec<(String, String)>), String> {
        if let Some(e) = &self.config_error {
            return Err(e.clone());
        }
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let (map_names, secret_names) = env::references(&self.container);
        let mut config_maps = HashMap::new();
        let maps: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &namespace);
        for name in map_names {
            match maps.get_opt(&name).await {
                Ok(Some(cm)) => {
                    config_maps.insert(name, cm.data.unwrap_or_default());
                }
                Ok(None) => {}
                Err(e) => return Err(format!("configmap {name:?}: {e}")),
            }
        }
        let mut secrets = HashMap::new();
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &namespace);
        for name in secret_names {
            match api.get_opt(&name).await {
                Ok(Some(s)) => {
                    let data = s
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect();
                    secrets.insert(name, data);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("secret {name:?}: {e}")),
            }
        }
        let ctx = EnvContext {
            pod: &self.pod,
            pod_ip: self.shared.lock().pod_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            host_ip: self.ctx.host_ip(),
            node_cpu: self.ctx.node_cpu,
            node_memory: self.ctx.node_memory,
            kubernetes: self.ctx.kubernetes,
            config_maps: &config_maps,
            secrets: &secrets,
        };
        let mut environment =
            env::container_env(&ctx, &self.container).map_err(|e| e.to_string())?;
        if !environment.iter().any(|(k, _)| k == "PATH") {
            environment.push((
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ));
        }
        let vars: HashMap<&str, &str> = environment
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let command: Vec<String> = self
            .container
            .command
            .iter()
            .flatten()
            .map(|s| env::expand(s, &vars))
            .collect();
        let args: Vec<String> = self
            .container
            .args
            .iter()
            .flatten()
            .map(|s| env::expand(s, &vars))
            .collect();
        let (program, mut argv) = match command.split_first() {
            Some((first, rest)) => (self.program_for(first, &vars), rest.to_vec()),
            None => (self.executable.clone(), Vec::new()),
        };
        argv.extend(args);
        Ok((program, argv, environment))
    }

    /// `command[0]`: a program on this machine when it names one, else the image's
    /// executable (an image's entrypoint path, such as `/ko-app/queue`, means nothing
    /// here).
    fn program_for(&self, first: &str, vars: &HashMap<&str, &str>) -> PathBuf {
        let path = Path::new(first);
        if path.is_absolute() {
            if path.is_file() {
                return path.to_owned();
            }
            return self.executable.clone();
        }
        if !first.contains('/') {
            let search = vars.get("PATH").copied().unwrap_or("/usr/bin:/bin");
            for dir in search.split(':') {
                let candidate = Path::new(dir).join(first);
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
        self.executable.clone()
    }

    async fn run_once(
        &self,
        program: &Path,
        args: &[String],
        environment: Vec<(String, String)>,
    ) -> Ended {
        let mut child = match self.spawn(program, args, environment) {
            Ok(child) => child,
            Err(e) => {
                let message = format!("cannot start {}: {e}", program.display());
                self.terminated(128, None, "StartError", Some(message.clone()), None);
                self.ctx.event(&self.pod, true, "Failed", message).await;
                return Ended::Exited(128);
            }
        };
        let pid = child.id();
        let started_at = Timestamp::now();
        let has_startup = self.container.startup_probe.is_some();
        let has_readiness = self.container.readiness_probe.is_some();
        self.shared.container(self.slot, |c| {
            c.state = State::Running { started_at };
            c.ever_started = true;
            c.started = !has_startup;
            c.ready = !has_startup && !has_readiness;
            c.pid = pid;
        });
        self.ctx
            .event(
                &self.pod,
                false,
                "Started",
                format!("Started container {}", self.container.name),
            )
            .await;

        let mut stop = self.stop.clone();
        let probes = self.probe_loop();
        tokio::pin!(probes);
        let post_start = self.post_start();
        tokio::pin!(post_start);
        let mut post_start_done = false;
        loop {
            tokio::select! {
                status = child.wait() => {
                    kill_group(pid, Signal::SIGKILL);
                    let (code, signal) = exit_code(status.ok());
                    let reason = if code == 0 { "Completed" } else { "Error" };
                    self.terminated(code, signal, reason, None, Some(started_at));
                    return Ended::Exited(code);
                }
                failure = &mut probes => {
                    self.ctx.event(&self.pod, false, "Killing", format!(
                        "Container {} {failure}, will be restarted", self.container.name)).await;
                    let deadline = Instant::now() + self.grace;
                    let status = stop_process(&mut child, pid, deadline, &mut stop).await;
                    let (code, signal) = exit_code(status);
                    self.terminated(code, signal, "Error", Some(failure), Some(started_at));
                    return Ended::Exited(code);
                }
                ok = &mut post_start, if !post_start_done => {
                    post_start_done = true;
                    if let Err(message) = ok {
                        self.ctx.event(&self.pod, true, "FailedPostStartHook", message.clone()).await;
                        let deadline = Instant::now() + self.grace;
                        let status = stop_process(&mut child, pid, deadline, &mut stop).await;
                        let (code, signal) = exit_code(status);
                        self.terminated(code, signal, "Error", Some(message), Some(started_at));
                        return Ended::Exited(code);
                    }
                }
                _ = wait_stop(&mut stop) => {
                    let status = self.stop_for_pod(&mut child, pid, &mut stop).await;
                    let (code, signal) = exit_code(status);
                    let reason = if code == 0 { "Completed" } else { "Error" };
                    self.terminated(code, signal, reason, None, Some(started_at));
                    return Ended::Stopped;
                }
            }
        }
    }

    /// The pod is being deleted: `preStop`, SIGTERM, then SIGKILL at the deadline.
    async fn stop_for_pod(
        &self,
        child: &mut Child,
        pid: Option<u32>,
        stop_rx: &mut watch::Receiver<Option<Stop>>,
    ) -> Option<ExitStatus> {
        let stop = (*stop_rx.borrow())?;
        let mut deadline = stop.deadline;
        if stop.run_pre_stop {
            let hook = self
                .container
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref());
            if let Some(handler) = hook {
                let ip = self.shared.lock().pod_ip.unwrap_or(Ipv4Addr::LOCALHOST);
                match Hook::new(handler, &self.container, ip, "preStop hooks") {
                    Ok(hook) => {
                        let ran = tokio::time::timeout_at(deadline, hook.run()).await;
                        if !matches!(ran, Ok(true)) {
                            let why = if ran.is_err() {
                                "did not finish within the grace period"
                            } else {
                                "failed"
                            };
                            self.ctx
                                .event(
                                    &self.pod,
                                    true,
                                    "FailedPreStopHook",
                                    format!(
                                        "PreStopHook {why} for container {}",
                                        self.container.name
                                    ),
                                )
                                .await;
                        }
                    }
                    Err(e) => {
                        self.ctx
                            .event(&self.pod, true, "FailedPreStopHook", e.to_string())
                            .await;
                    }
                }
                // As the kubelet does: a hook that used the whole grace period still
                // leaves the process 2 s between SIGTERM and SIGKILL.
                deadline = deadline.max(Instant::now() + Duration::from_secs(2));
            }
        }
        self.ctx
            .event(
                &self.pod,
                false,
                "Killing",
                format!("Stopping container {}", self.container.name),
            )
            .await;
        stop_process(child, pid, deadline, stop_rx).await
    }

    fn terminated(
        &self,
        exit_code: i32,
        signal: Option<i32>,
        reason: &str,
        message: Option<String>,
        started_at: Option<Timestamp>,
    ) {
        self.shared.container(self.slot, |c| {
            c.state = State::Terminated {
                exit_code,
                signal,
                reason: reason.to_owned(),
                message,
                started_at,
                finished_at: Timestamp::now(),
            };
            c.ready = false;
            c.started = false;
            c.pid = None;
        });
    }

    fn spawn(
        &self,
        program: &Path,
        args: &[String],
        environment: Vec<(String, String)>,
    ) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.ctx.self_exe);
        cmd.arg("pod-exec")
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .arg("--hostname")
            .arg(
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.hostname.clone())
                    .or_else(|| self.pod.metadata.name.clone())
                    .unwrap_or_default(),
            );
        if let Some(netns) = &self.netns {
            cmd.arg("--netns").arg(netns);
        }
        for bind in &self.binds {
            cmd.arg("--bind").arg(bind.to_arg());
        }
        if let Some(dir) = self
            .container
            .working_dir
            .as_deref()
            .filter(|d| !d.is_empty())
        {
            cmd.arg("--workdir").arg(dir);
        }
        cmd.arg("--").arg(program).args(args);
        cmd.env_clear()
            .envs(environment)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        cmd.spawn()
    }

    /// Startup, then liveness and readiness probes, for one run of the container.
    /// Returns only when the container must be restarted, with the reason.
    async fn probe_loop(&self) -> String {
        let ip = self.shared.lock().pod_ip.unwrap_or(Ipv4Addr::LOCALHOST);
        let make = |probe: Option<&k8s_openapi::api::core::v1::Probe>, what| {
            probe.map(|p| ContainerProbe::new(p, &self.container, ip, what))
        };
        let startup = make(self.container.startup_probe.as_ref(), "startup probes");
        let liveness = make(self.container.liveness_probe.as_ref(), "liveness probes");
        let readiness = make(self.container.readiness_probe.as_ref(), "readiness probes");
        for (what, probe) in [
            ("startup", &startup),
            ("liveness", &liveness),
            ("readiness", &readiness),
        ] {
            if let Some(Err(e)) = probe {
                self.ctx
                    .event(&self.pod, true, "Unhealthy", format!("{what} probe: {e}"))
                    .await;
            }
        }
        if let Some(probe) = &startup {
            let Ok(probe) = probe else {
                return std::future::pending().await;
            };
            if !self.probe_until(probe, true, "Startup").await {
                return "failed startup probe".to_owned();
            }
            self.shared.container(self.slot, |c| {
                c.started = true;
                c.ready = readiness.is_none();
            });
        }
        let live = async {
            match &liveness {
                Some(Ok(probe)) => {
                    if self.probe_until(probe, false, "Liveness").await {
                        return std::future::pending::<String>().await;
                    }
                    "failed liveness probe".to_owned()
                }
                _ => std::future::pending().await,
            }
        };
        let ready = async {
            if let Some(Ok(probe)) = &readiness {
                self.readiness(probe).await;
            }
            std::future::pending::<String>().await
        };
        tokio::select! {
            reason = live => reason,
            never = ready => never,
        }
    }

    /// Probes at the probe's period. With `until_success`, returns true at the first
    /// success run; otherwise returns false once `failureThreshold` attempts in a row
    /// failed.
    async fn probe_until(&self, probe: &ContainerProbe, until_success: bool, what: &str) -> bool {
        sleep(probe.initial_delay).await;
        let mut failures = 0;
        loop {
            if probe.check().await {
                failures = 0;
                if until_success {
                    return true;
                }
            } else {
                failures += 1;
                self.ctx
                    .event(
                        &self.pod,
                        true,
                        "Unhealthy",
                        format!("{what} probe failed for container {}", self.container.name),
                    )
                    .await;
                if failures >= probe.failure_threshold {
                    return false;
                }
            }
            sleep(probe.period).await;
        }
    }

    async fn readiness(&self, probe: &ContainerProbe) {
        sleep(probe.initial_delay).await;
        let (mut successes, mut failures) = (0u32, 0u32);
        let mut ready = false;
        loop {
            if probe.check().await {
                successes += 1;
                failures = 0;
                if !ready && successes >= probe.success_threshold {
                    ready = true;
                    self.shared.container(self.slot, |c| c.ready = true);
                }
            } else {
                failures += 1;
                successes = 0;
                if ready && failures >= probe.failure_threshold {
                    ready = false;
                    self.shared.container(self.slot, |c| c.ready = false);
                    self.ctx
                        .event(
                            &self.pod,
                            true,
                            "Unhealthy",
                            format!(
                                "Readiness probe failed for container {}",
                                self.container.name
                            ),
                        )
                        .await;
                }
            }
            sleep(probe.period).await;
        }
    }

    /// The `postStart` hook; resolves when it is done (or there is none).
    async fn post_start(&self) -> Result<(), String> {
        let Some(handler) = self
            .container
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
        else {
            return Ok(());
        };
        let ip = self.shared.lock().pod_ip.unwrap_or(Ipv4Addr::LOCALHOST);
        let hook = Hook::new(handler, &self.container, ip, "postStart hooks")
            .map_err(|e| e.to_string())?;
        if hook.run().await {
            Ok(())
        } else {
            Err(format!(
                "PostStartHook failed for container {}",
                self.container.name
            ))
        }
    }
}

/// SIGTERM to the container's process, SIGKILL to its whole group at the deadline. A
/// shorter deadline arriving meanwhile (a forced deletion) is honoured.
async fn stop_process(
    child: &mut Child,
    pid: Option<u32>,
    mut deadline: Instant,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Option<ExitStatus> {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    loop {
        tokio::select! {
            status = child.wait() => {
                kill_group(pid, Signal::SIGKILL);
                return status.ok();
            }
            _ = sleep_until(deadline) => {
                kill_group(pid, Signal::SIGKILL);
                return child.wait().await.ok();
            }
            changed = stop.changed() => {
                if changed.is_err() {
                    // The pod's task is gone: nobody will wait longer.
                    deadline = Instant::now();
                } else if let Some(s) = *stop.borrow() {
                    deadline = deadline.min(s.deadline);
                }
            }
        }
    }
}

fn kill_group(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // The container is its own process group (pod-exec calls setsid).
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

fn exit_code(status: Option<ExitStatus>) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => (code, None),
            (None, Some(sig)) => (128 + sig, Some(sig)),
            (None, None) => (255, None),
        },
        None => (137, Some(9)),
    }
}

async fn wait_stop(stop: &mut watch::Receiver<Option<Stop>>) {
    // A closed channel means the pod's task is ending: treat it as a stop.
    let _ = stop.wait_for(Option::is_some).await;
}

/// Patches the pod's status whenever it changes (coalescing bursts), until aborted.
async fn report_status(
    api: Api<Pod>,
    name: String,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Option<Stop>>,
) {
    let mut last = None::<serde_json::Value>;
    loop {
        let reporting = stop.borrow().is_none_or(|s| s.report);
        if reporting {
            let status = shared.lock().status(Timestamp::now());
            let value = serde_json::to_value(&status).unwrap_or_default();
            if last.as_ref() != Some(&value) {
                let patch = serde_json::json!({ "status": value });
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => last = Some(value),
                    Err(e) => {
                        tracing::debug!(error = %e, pod = %name, "cannot update pod status");
                        sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = stop.changed() => {}
            // Conditions carry times; nothing else needs a periodic write.
            _ = sleep(Duration::from_secs(30)) => {}
        }
        // Coalesce a burst of changes (a pod's containers starting together) into one write.
        sleep(Duration::from_millis(20)).await;
    }
}

async fn flush_status(api: &Api<Pod>, name: &str, shared: &Shared) {
    let status = shared.lock().status(Timestamp::now());
    let patch = serde_json::json!({ "status": status });
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(error = %e, pod = %name, "cannot write the final pod status");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> PodUpdate {
        PodUpdate::Current(Arc::new(serde_json::from_value(json).unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn deletion_grace_comes_from_the_pod_and_only_shortens() {
        let alive = pod(serde_json::json!({"metadata": {"name": "p"}}));
        assert!(stop_for(&alive, None).is_none());
        let deleted = pod(serde_json::json!({"metadata": {
            "name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z",
            "deletionGracePeriodSeconds": 20}}));
        let now = Instant::now();
        let first = stop_for(&deleted, None).unwrap();
        assert_eq!(first.deadline - now, Duration::from_secs(20));
        assert!(first.run_pre_stop && first.delete && first.report);
        let forced = stop_for(&PodUpdate::Gone, Some(first)).unwrap();
        assert_eq!(forced.deadline, now);
        assert!(!forced.run_pre_stop && forced.delete && !forced.report);
        let longer = pod(serde_json::json!({"metadata": {
            "name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z",
            "deletionGracePeriodSeconds": 60}}));
        assert_eq!(
            stop_for(&longer, Some(first)).unwrap().deadline,
            first.deadline
        );
        let spec_grace = pod(serde_json::json!({"metadata": {
            "name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": []}}));
        assert_eq!(
            stop_for(&spec_grace, None).unwrap().deadline - now,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn exit_codes_map_signals_as_runtimes_do() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(Some(ExitStatus::from_raw(3 << 8))), (3, None));
        assert_eq!(exit_code(Some(ExitStatus::from_raw(9))), (137, Some(9)));
        assert_eq!(exit_code(Some(ExitStatus::from_raw(15))), (143, Some(15)));
    }
}
