//! The standalone Kubernetes platform (no Knative): functions are Deployments that opt
//! in with `thaw.dev/*` annotations ([`thaw_shared::annotations`]); their pods are the
//! ready endpoints of their Service's EndpointSlices; the built-in KPA
//! ([`scaler`]) writes their `scale` subresource, on one activator at a time, elected
//! through a Lease ([`lease`]).
//!
//! Layout:
//! - [`index`]: what the watchers saw, folded into registry updates (plain data);
//! - [`sync`]: the watchers feeding it, and readiness;
//! - [`scaler`]: the KPA per function; this file runs it when this activator leads;
//! - [`lease`]: leader election; the leader's stat websocket is `crate::stat_server`.

pub mod index;
pub mod lease;
pub mod scaler;
pub mod sync;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{self, Event, EventType, Recorder};
use kube::runtime::watcher;
use kube::{Api, Client};
use thaw_shared::annotations::AnnotationError;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use self::index::{Change, DeploymentRef, Function, Index};
use self::lease::{ElectionError, Elector, LeaseElector, LeaseSettings};
use self::scaler::{Scaler, Write};
use self::sync::{Health, Source};
use super::scrape::Scraper;
use super::{BoxFuture, Platform, PlatformUpdate};
use crate::config::Config;
use crate::reporter::{Reporter, ReporterSettings, RevisionStats};
use crate::revision::RevisionId;
use crate::stat_server::{StatServer, StatServerSettings};

/// Where the platform looks, and how often the leader decides.
#[derive(Debug, Clone)]
pub struct KubernetesSettings {
    /// The activators' namespace (their own Service and the Lease live here).
    pub system_namespace: String,
    /// The activators' own Service, whose EndpointSlices list every activator.
    pub activator_service: String,
    /// Watch functions in this namespace only; `None`: every namespace.
    pub watch_namespace: Option<String>,
    /// This activator's pod name, for Events.
    pub pod_name: String,
    /// How often the leader decides every function's scale (Knative: 2 s; 1 s here,
    /// as on the local platform).
    pub tick: Duration,
    /// Knative's `max-scale-up-rate` for every function.
    pub max_scale_up_rate: f64,
}

/// Other activators' load per function, as the leader's stat server has it.
pub type ReportedLoad = Arc<dyn Fn(&RevisionId) -> f64 + Send + Sync>;

/// What the leader's scaler reads besides the index.
pub struct ScalerInputs {
    /// `true` while this activator holds the Lease.
    pub leading: watch::Receiver<bool>,
    /// This activator's own load, in process.
    pub own: Arc<RevisionStats>,
    /// The other activators' load.
    pub others: ReportedLoad,
    /// Notified when another activator reports a revision waking from zero.
    pub pokes: Arc<Notify>,
}

struct Inner {
    /// What only the Kubernetes wiring owns (election, stat server, reporter), released
    /// on shutdown; `None` when started bare (tests).
    wiring: Mutex<Option<Wiring>>,
    index: Mutex<Index>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<PlatformUpdate>>>,
    health: Health,
    /// Wakes the scaler for a cold start instead of waiting for its tick.
    wake: Notify,
    recorder: Recorder,
    /// The last bad annotation reported per Deployment, so a Deployment that keeps
    /// changing (its status does, while it scales) is reported once, not per update.
    reported: Mutex<HashMap<RevisionId, AnnotationError>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    /// Runs one index call under its lock and publishes what changed, in order.
    fn apply(self: &Arc<Self>, f: &dyn Fn(&mut Index) -> Vec<Change>) {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        for change in f(&mut index) {
            match change {
                Change::Update(update) => {
                    if let PlatformUpdate::Revision(spec) = &update {
                        self.reported
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&spec.id);
                    }
                    self.subscribers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|s| s.send(update.clone()).is_ok());
                }
                Change::BadAnnotation {
                    deployment,
                    error,
                    kept,
                } => self.bad_annotation(deployment, error, kept),
            }
        }
    }

    fn bad_annotation(self: &Arc<Self>, d: DeploymentRef, error: AnnotationError, kept: bool) {
        let id = RevisionId::new(&d.namespace, &d.name);
        {
            let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            if reported.get(&id) == Some(&error) {
                return;
            }
            reported.insert(id, error.clone());
        }
        let consequence = if kept {
            "keeping its last good settings"
        } else {
            "not serving it until it is fixed"
        };
        tracing::warn!(deployment = %format!("{}/{}", d.namespace, d.name), field = error.name, error = %error, "bad annotation; {consequence}");
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidAnnotation".into(),
            note: Some(format!("{error}; Thaw is {consequence}")),
            action: "Configure".into(),
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("Deployment".into()),
            name: Some(d.name.clone()),
            namespace: Some(d.namespace.clone()),
            uid: d.uid.clone(),
            ..ObjectReference::default()
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                let scope = format!("namespace {}", d.namespace);
                tracing::warn!(error = %sync::describe(&e, "create", "events.events.k8s.io", &scope), "cannot record the bad annotation as an Event");
            }
        });
    }

    fn functions(&self) -> Vec<Function> {
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        index.functions().cloned().collect()
    }
}

/// The platform. Cloning shares it.
#[derive(Clone)]
pub struct KubernetesPlatform {
    inner: Arc<Inner>,
}

impl KubernetesPlatform {
    /// Starts the watchers and the scaler. Returns at once; readiness says when the first
    /// lists are in.
    pub fn start(client: Client, settings: KubernetesSettings, inputs: ScalerInputs) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            events::Reporter {
                controller: "thaw-activator".into(),
                instance: Some(settings.pod_name.clone()),
            },
        );
        let inner = Arc::new(Inner {
            wiring: Mutex::new(None),
            index: Mutex::new(Index::new(
                &settings.system_namespace,
                &settings.activator_service,
            )),
            subscribers: Mutex::new(Vec::new()),
            health: Health::default(),
            wake: Notify::new(),
            recorder,
            reported: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let scope = settings
            .watch_namespace
            .as_ref()
            .map_or_else(|| "all namespaces".to_owned(), |n| format!("namespace {n}"));
        let namespaced = |ns: Option<&str>| -> (Api<Deployment>, Api<EndpointSlice>) {
            match ns {
                Some(ns) => (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                ),
                None => (Api::all(client.clone()), Api::all(client.clone())),
            }
        };
        let (deployments, slices) = namespaced(settings.watch_namespace.as_deref());
        let activator_slices: Api<EndpointSlice> =
            Api::namespaced(client.clone(), &settings.system_namespace);
        let service_label = "kubernetes.io/service-name";

        let mut tasks = Vec::new();
        tasks.push(spawn_watch(
            &inner,
            deployments,
            watcher::Config::default(),
            Source {
                resource: "deployments.apps",
                scope: scope.clone(),
                apply: Index::apply_deployment,
                delete: Index::delete_deployment,
                reset: Index::reset_deployments,
                trim: trim_deployment,
            },
        ));
        tasks.push(spawn_watch(
            &inner,
            slices,
            // Only slices that belong to a Service.
            watcher::Config::default().labels(service_label),
            Source {
                resource: "endpointslices.discovery.k8s.io",
                scope,
                apply: Index::apply_slice,
                delete: Index::delete_slice,
                reset: Index::reset_slices,
                trim: trim_slice,
            },
        ));
        tasks.push(spawn_watch(
            &inner,
            activator_slices,
            watcher::Config::default()
                .labels(&format!("{service_label}={}", settings.activator_service)),
            Source {
                resource: "endpointslices.discovery.k8s.io",
                scope: format!(
                    "namespace {} (the activators' Service {})",
                    settings.system_namespace, settings.activator_service
                ),
                apply: Index::apply_slice,
                delete: Index::delete_slice,
                reset: Index::reset_activator_slices,
                trim: trim_slice,
            },
        ));
        tasks.push(tokio::spawn(run_scaler(
            Arc::clone(&inner),
            client,
            inputs,
            settings.tick,
            Scaler::new(settings.max_scale_up_rate),
        )));
        *inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Self { inner }
    }
}

fn spawn_watch<K>(
    inner: &Arc<Inner>,
    api: Api<K>,
    config: watcher::Config,
    source: Source<K>,
) -> JoinHandle<()>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let health = &inner.health;
        sync::run(api, config, source, health, |f| inner.apply(f)).await;
    })
}

/// Keeps what the index reads of a Deployment: its metadata (without managed fields) and
/// its replicas.
fn trim_deployment(d: &mut Deployment) {
    d.metadata.managed_fields = None;
    d.spec.template = Default::default();
    d.status = None;
}

fn trim_slice(s: &mut EndpointSlice) {
    s.metadata.managed_fields = None;
}

impl Platform for KubernetesPlatform {
    fn subscribe(&self) -> mpsc::UnboundedReceiver<PlatformUpdate> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Under the index lock, so no change slips between the snapshot and the
        // subscription.
        let index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
        for update in index.snapshot() {
            let _ = tx.send(update);
        }
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    fn need_capacity(&self, _revision: &RevisionId) {
        // Only the leader acts on it; a follower's reporter has already poked the
        // leader over the stat websocket.
        self.inner.wake.notify_one();
    }

    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn readiness(&self) -> Result<Option<String>, String> {
        let watchers = self.inner.health.readiness()?;
        let election = self
            .inner
            .wiring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|w| w.elector.problem())
            .map(|p| format!("leader election: {p}"));
        Ok(match (watchers, election) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let wiring = self
                .inner
                .wiring
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(w) = wiring {
                // Hand the Lease over at once rather than after it expires, and tell
                // the other activators' reporters to move.
                w.elector.release().await;
                w.stat_server.shutdown().await;
                drop(w.reporter);
            }
            for task in self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                task.abort();
            }
        })
    }
}

/// The Kubernetes platform could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("POD_IP (--pod-ip) is required with --platform kubernetes: it places this activator among the others for subsetting and is where the others report their load (set it from the downward API, status.podIP)")]
    NoPodIp,
    #[error("POD_NAME (--pod-name) must name this pod with --platform kubernetes: it is the identity in the leader election")]
    NoPodName,
    #[error("no Kubernetes API to talk to (in-cluster service account or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error("cannot listen on the stat port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("leader election: {0}")]
    Election(#[from] ElectionError),
}

impl KubernetesError {
    /// Errors in what the user gave, as opposed to the environment failing.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::NoPodIp | Self::NoPodName | Self::Election(_))
    }
}

/// What the platform owns besides its watchers.
struct Wiring {
    elector: Elector,
    stat_server: StatServer,
    reporter: Reporter,
}

/// Everything the activator needs on Kubernetes: an API client, the stat server every
/// activator runs (only the leader's gets traffic), the leader election, a reporter
/// that follows the leader, and the platform fed by the watchers.
pub async fn connect(
    config: &Config,
    own: Arc<RevisionStats>,
) -> Result<KubernetesPlatform, KubernetesError> {
    let pod_ip = config.pod_ip.ok_or(KubernetesError::NoPodIp)?;
    if config.pod_name.is_empty() || config.pod_name == "activator" {
        return Err(KubernetesError::NoPodName);
    }
    let client = Client::try_default()
        .await
        .map_err(KubernetesError::Client)?;
    let addr = SocketAddr::new(config.listen_address, config.stat_port);
    let listener = thaw_shared::serve::bind("stat", addr)
        .await
        .map_err(|source| KubernetesError::Bind { addr, source })?;
    let stat_server = StatServer::spawn(listener, StatServerSettings::default());
    let reported = stat_server.stats();
    let elector = LeaseElector::spawn(
        client.clone(),
        &config.system_namespace,
        &config.lease_name,
        &config.pod_name,
        &SocketAddr::new(pod_ip, config.stat_port).to_string(),
        LeaseSettings::default(),
    )?;
    let reporter = Reporter::spawn_following(
        ReporterSettings::new(String::new(), config.pod_name.clone()),
        elector.stat_target(),
        Arc::clone(&own),
    );
    let inputs = ScalerInputs {
        leading: elector.leading(),
        own,
        pokes: reported.pokes(),
        others: Arc::new(move |id| reported.load(id, Instant::now())),
    };
    let platform = KubernetesPlatform::start(
        client,
        KubernetesSettings {
            system_namespace: config.system_namespace.clone(),
            activator_service: config.activator_service.clone(),
            watch_namespace: config.watch_namespace.clone(),
            pod_name: config.pod_name.clone(),
            tick: Duration::from_secs(1),
            max_scale_up_rate: config.max_scale_up_rate,
        },
        inputs,
    );
    *platform
        .inner
        .wiring
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(Wiring {
        elector,
        stat_server,
        reporter,
    });
    Ok(platform)
}

/// While this activator leads: every tick (or at once on a cold start), observe every
/// function, decide, and write the scales that changed.
/// Holds the platform alive: shutdown aborts it.
async fn run_scaler(
    inner: Arc<Inner>,
    client: Client,
    mut inputs: ScalerInputs,
    tick: Duration,
    mut scaler: Scaler,
) {
    let scraper = Scraper::new();
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The last failure per function, so an API server outage logs once per function.
    let mut failing: HashMap<RevisionId, String> = HashMap::new();
    let mut led = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = inner.wake.notified() => {}
            _ = inputs.pokes.notified() => {}
            changed = inputs.leading.changed() => if changed.is_err() { return },
        }
        let leading = *inputs.leading.borrow_and_update();
        if leading != led {
            tracing::info!(
                leading,
                "autoscaler {}",
                if leading {
                    "leading: this activator decides every function's scale"
                } else {
                    "following: another activator decides"
                }
            );
            led = leading;
            scaler.forget_all();
        }
        if !leading {
            continue;
        }
        let functions = inner.functions();

        let direct: Vec<f64> = futures_util::future::join_all(functions.iter().map(|f| {
            let (targets, factor) = scaler::scrape_targets(f);
            let scraper = &scraper;
            async move { scraper.direct_concurrency(targets).await * factor }
        }))
        .await;
        let direct: HashMap<&RevisionId, f64> =
            functions.iter().map(|f| &f.id).zip(direct).collect();
        let observed = |id: &RevisionId| {
            inputs.own.in_flight(id) as f64
                + (inputs.others)(id)
                + direct.get(id).copied().unwrap_or(0.0)
        };
        let writes = scaler.decide(Instant::now(), &functions, observed);
        for w in writes {
            match write_scale(&client, &w).await {
                Ok(()) => {
                    failing.remove(&w.id);
                    tracing::info!(function = %w.id, from = w.from, to = w.to, "scaling {} from {} to {}", w.id, w.from, w.to);
                }
                Err(e) => {
                    scaler.write_failed(&w.id);
                    let scope = format!("namespace {}", w.id.namespace);
                    let message = sync::describe(&e, "patch", "deployments.apps/scale", &scope);
                    if failing.get(&w.id) != Some(&message) {
                        tracing::warn!(function = %w.id, to = w.to, error = %message, "cannot scale; retrying every tick");
                        failing.insert(w.id.clone(), message);
                    }
                }
            }
        }
    }
}

async fn write_scale(client: &Client, w: &Write) -> Result<(), kube::Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), &w.id.namespace);
    let patch = serde_json::json!({ "spec": { "replicas": w.to } });
    api.patch_scale(&w.id.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}
