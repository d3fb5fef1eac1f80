//! The Knative platform: the activator as Knative Serving runs it. Knative's controller
//! and autoscaler decide everything; this platform only reads what they publish
//! (CONTRACT §2.7), with no more RBAC than Knative's own activator ClusterRole:
//! - Revisions, and the revisions' private and public core/v1 Endpoints ([`index`]);
//! - `config-logging` and `config-observability` in `SYSTEM_NAMESPACE` ([`settings`]):
//!   the log level and the request log follow them as they change.
//!
//! Scale-up is asked of Knative's autoscaler over its stat websocket: the reporter that
//! `build_state` starts (its address is derived from `SYSTEM_NAMESPACE` and the cluster
//! domain, as Knative's activator derives it) pokes it on a revision's first request.
//! Watching and relisting work as on the standalone platform ([`super::kubernetes::sync`]).

pub mod index;
pub mod settings;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ConfigMap, Endpoints};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::index::{Change, Index, REVISION_UID_LABEL};
use self::settings::{ConfigChange, Observed};
use super::kubernetes::sync::{self, Health, Source};
use super::{BoxFuture, Platform, PlatformUpdate};
use crate::config::Config;
use crate::revision::RevisionId;
use thaw_shared::trace::TracingConfig;

/// Where the platform looks.
#[derive(Debug, Clone)]
pub struct KnativeSettings {
    /// This activator's pod IP, found in revisions' public Endpoints for subsetting.
    pub own_ip: Option<IpAddr>,
    /// `SYSTEM_NAMESPACE`: where Knative's config maps live.
    pub system_namespace: String,
    pub config_logging_name: String,
    pub config_observability_name: String,
    /// The tracing settings read from config-observability at start, whose later changes
    /// are reported; `None` when the flags set them.
    pub tracing_at_start: Option<TracingConfig>,
}

struct Inner {
    index: Mutex<Index>,
    observed: Mutex<Observed>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<PlatformUpdate>>>,
    health: Health,
    request_log: AtomicBool,
    /// The last bad spec reported per revision, so a revision whose status keeps
    /// changing is reported once.
    reported: Mutex<std::collections::HashMap<RevisionId, String>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn apply(&self, f: &dyn Fn(&mut Index) -> Vec<Change>) {
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
                Change::Invalid { revision, error } => {
                    let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
                    if reported.get(&revision) != Some(&error) {
                        tracing::warn!(revision = %revision, %error, "cannot use the Revision's spec; keeping its last good settings");
                        reported.insert(revision, error);
                    }
                }
            }
        }
    }

    fn apply_config(&self, f: &dyn Fn(&mut Observed) -> Vec<ConfigChange>) {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        for change in f(&mut observed) {
            match change {
                ConfigChange::LogLevel(level) => {
                    // Said before the change and at error, so that a level hiding info
                    // lines still shows when it took effect. (`log_level`: `level` is
                    // the line's own.)
                    tracing::error!(log_level = level, "log level set from the config map");
                    if let Err(e) = thaw_shared::logging::set_level(level) {
                        tracing::warn!(log_level = level, reason = %e, "log level from the config map not applied");
                    }
                }
                ConfigChange::RequestLog(on) => {
                    self.request_log.store(on, Ordering::Relaxed);
                    tracing::info!(enabled = on, "request log set from the config map");
                }
                ConfigChange::TracingNeedsRestart => {
                    tracing::warn!(
                        "config-observability's tracing settings changed; like Knative's activator, this one reads them at start: restart it to apply them"
                    );
                }
                ConfigChange::Invalid { config_map, error } => {
                    // At error, as Knative logs it, so that no level hides it.
                    tracing::error!(config_map, %error, "cannot use the config map; keeping the previous settings");
                }
            }
        }
    }
}

/// The platform. Cloning shares it.
#[derive(Clone)]
pub struct KnativePlatform {
    inner: Arc<Inner>,
}

/// `serving.knative.dev/v1` Revisions, read as dynamic objects: the few spec fields the
/// activator needs are picked out by [`index::revision_spec`].
fn revisions_api(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("serving.knative.dev", "v1", "Revision"),
        "revisions",
    );
    Api::all_with(client.clone(), &resource)
}

impl KnativePlatform {
    /// Starts the watchers. Returns at once; readiness says when the first lists are in.
    pub fn start(client: Client, settings: KnativeSettings) -> Self {
        let inner = Arc::new(Inner {
            index: Mutex::new(Index::new(settings.own_ip)),
            observed: Mutex::new(
                Observed::new(
                    &settings.config_logging_name,
                    &settings.config_observability_name,
                )
                .with_tracing_at_start(settings.tracing_at_start.clone()),
            ),
            subscribers: Mutex::new(Vec::new()),
            health: Health::default(),
            request_log: AtomicBool::new(false),
            reported: Mutex::new(Default::default()),
            tasks: Mutex::new(Vec::new()),
        });
        let all = "all namespaces".to_owned();
        let mut tasks = Vec::new();
        tasks.push(spawn_watch(
            &inner,
            revisions_api(&client),
            watcher::Config::default(),
            Source {
                resource: "revisions.serving.knative.dev",
                scope: all.clone(),
                apply: Index::apply_revision,
                delete: Index::delete_revision,
                reset: Index::reset_revisions,
                trim: trim_revision,
            },
        ));
        tasks.push(spawn_watch(
            &inner,
            Api::<Endpoints>::all(client.clone()),
            // Only revisions' Endpoints (private and public both carry the uid label).
            watcher::Config::default().labels(REVISION_UID_LABEL),
            Source {
                resource: "endpoints",
                scope: all,
                apply: Index::apply_endpoints,
                delete: Index::delete_endpoints,
                reset: Index::reset_endpoints,
                trim: |e: &mut Endpoints| e.metadata.managed_fields = None,
            },
        ));
        for name in [
            &settings.config_logging_name,
            &settings.config_observability_name,
        ] {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &settings.system_namespace);
            let inner2 = Arc::clone(&inner);
            let source = Source {
                resource: "configmaps",
                scope: format!("namespace {} (name {name})", settings.system_namespace),
                apply: Observed::apply,
                delete: Observed::delete,
                reset: Observed::reset,
                trim: |c: &mut ConfigMap| c.metadata.managed_fields = None,
            };
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            tasks.push(tokio::spawn(async move {
                let health = &inner2.health;
                sync::run(api, config, source, health, |f| inner2.apply_config(f)).await;
            }));
        }
        *inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Self { inner }
    }
}

fn spawn_watch<K>(
    inner: &Arc<Inner>,
    api: Api<K>,
    config: watcher::Config,
    source: Source<K, Index, Change>,
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

/// Keeps the Revision's metadata and spec; its status (which changes as it scales) and
/// managed fields are dropped.
fn trim_revision(r: &mut DynamicObject) {
    r.metadata.managed_fields = None;
    if let Some(map) = r.data.as_object_mut() {
        map.retain(|k, _| k == "spec");
    }
}

impl Platform for KnativePlatform {
    fn subscribe(&self) -> mpsc::UnboundedReceiver<PlatformUpdate> {
        let (tx, rx) = mpsc::unbounded_channel();
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
        // Knative's autoscaler decides; the reporter has already poked it.
    }

    fn name(&self) -> &'static str {
        "knative"
    }

    fn readiness(&self) -> Result<Option<String>, String> {
        self.inner.health.readiness()
    }

    fn request_log(&self) -> bool {
        self.inner.request_log.load(Ordering::Relaxed)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
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

/// The Knative platform could not start.
#[derive(Debug, thiserror::Error)]
pub enum KnativeError {
    #[error("no Kubernetes API to talk to (in-cluster service account or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
}

/// Connects to the API server and starts the watchers.
pub async fn connect(config: &Config) -> Result<KnativePlatform, KnativeError> {
    let client = Client::try_default().await.map_err(KnativeError::Client)?;
    if config.pod_ip.is_none() {
        tracing::warn!("POD_IP is not set: this activator cannot find itself in revisions' public Endpoints, so it uses every pod of a revision (no subsetting)");
    }
    Ok(KnativePlatform::start(
        client,
        KnativeSettings {
            own_ip: config.pod_ip,
            system_namespace: config.knative_namespace.clone(),
            config_logging_name: config.config_logging_name.clone(),
            config_observability_name: config.config_observability_name.clone(),
            tracing_at_start: config.tracing_from_platform.clone(),
        },
    ))
}

/// Why the tracing settings could not be read at start.
#[derive(Debug, thiserror::Error)]
pub enum TracingAtStartError {
    #[error("no Kubernetes API to read {0} from: {1}")]
    Client(String, #[source] kube::Error),
    #[error("cannot read config map {0}: {1}")]
    Read(String, #[source] kube::Error),
    #[error("config map {0}: {1}")]
    Invalid(String, thaw_shared::trace::ConfigError),
    #[error("the API server did not answer for config map {0} within {1:?}")]
    Timeout(String, std::time::Duration),
}

impl TracingAtStartError {
    /// A bad value, as opposed to an API that could not be asked.
    pub fn is_config(&self) -> bool {
        matches!(self, TracingAtStartError::Invalid(..))
    }
}

/// The tracing settings in `config-observability` (`tracing-protocol`,
/// `tracing-endpoint`, `tracing-sampling-rate`), read once at start as Knative's
/// activator reads them (serving's `otel.GetObservabilityConfig`); a missing config map
/// means Knative's defaults (off).
pub async fn tracing_at_start(config: &Config) -> Result<TracingConfig, TracingAtStartError> {
    let name = &config.config_observability_name;
    // Serving does not wait on tracing for long: an API server that does not answer is
    // the platform's to report, with its own retries.
    let limit = std::time::Duration::from_secs(5);
    tokio::time::timeout(limit, read_tracing(config))
        .await
        .unwrap_or_else(|_| Err(TracingAtStartError::Timeout(name.clone(), limit)))
}

async fn read_tracing(config: &Config) -> Result<TracingConfig, TracingAtStartError> {
    let name = &config.config_observability_name;
    let client = Client::try_default()
        .await
        .map_err(|e| TracingAtStartError::Client(name.clone(), e))?;
    let api: Api<ConfigMap> = Api::namespaced(client, &config.knative_namespace);
    let data = match api.get_opt(name).await {
        Ok(found) => found.and_then(|c| c.data).unwrap_or_default(),
        Err(e) => return Err(TracingAtStartError::Read(name.clone(), e)),
    };
    TracingConfig::from_keys(|k| data.get(k).cloned())
        .map_err(|e| TracingAtStartError::Invalid(name.clone(), e))
}
