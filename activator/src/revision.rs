//! Which revision a request is for (CONTRACT §2.1), and what the activator knows about
//! each revision.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use http::{HeaderMap, HeaderValue, Uri};
use thaw_shared::headers::{KNATIVE_SERVING_NAMESPACE, KNATIVE_SERVING_REVISION};
use thaw_shared::timeout::Timeouts;

use crate::backends::{Backends, ProbeSchedule};
use crate::metrics::{Metrics, RevisionMetrics};
use crate::platform::PlatformUpdate;
use crate::throttler::{Throttler, ThrottlerSettings};

/// A revision's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevisionId {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl RevisionId {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: Arc::from(namespace),
            name: Arc::from(name),
        }
    }
}

impl fmt::Display for RevisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A revision's settings, as the platform declares them.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionSpec {
    pub id: RevisionId,
    /// Requests one pod may run at once; 0 = unlimited.
    pub container_concurrency: usize,
    /// Revision, response-start and idle timeouts; the wait for a pod counts.
    pub timeouts: Timeouts,
    /// `Host` values routed to this revision, for platforms that declare hosts.
    pub hosts: Vec<String>,
    /// The platform vouches that a pod's queue-proxy is given this revision's exact name
    /// and namespace (Knative's controller does, and so does the local platform for the
    /// pods it runs), so a pod answering for another revision (`Thaw-Revision`) is
    /// refused. Off where the names may differ: queue-proxies someone else runs, and
    /// sidecars injected on plain Kubernetes.
    pub verify_pod_identity: bool,
}

/// A revision the activator serves: its settings and the machinery behind it. Settings
/// changes replace this value; the throttler and backends carry over.
pub struct Revision {
    pub spec: RevisionSpec,
    pub throttler: Arc<Throttler>,
    pub backends: Backends,
    pub metrics: RevisionMetrics,
}

#[derive(Default)]
struct Snapshot {
    /// namespace → name → revision; two levels so a lookup by header values needs no
    /// allocation.
    by_name: HashMap<Arc<str>, HashMap<Arc<str>, Arc<Revision>>>,
    /// Lowercase `Host` (without port) → revision, for platforms that declare hosts.
    by_host: HashMap<String, Arc<Revision>>,
}

/// What every new revision is built with.
#[derive(Clone)]
pub struct RegistrySettings {
    pub throttler: ThrottlerSettings,
    pub probes: ProbeSchedule,
    pub own_ip: Option<IpAddr>,
}

/// The revisions known to this activator, as a snapshot that requests read without
/// waiting on writers. Platform updates are rare; each rebuilds the snapshot.
pub struct Registry {
    snapshot: RwLock<Arc<Snapshot>>,
    settings: RegistrySettings,
    metrics: Metrics,
    activators: Mutex<Vec<IpAddr>>,
}

impl Registry {
    pub fn new(settings: RegistrySettings, metrics: Metrics) -> Self {
        Self {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            settings,
            metrics,
            activators: Mutex::new(Vec::new()),
        }
    }

    fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn replace(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut guard = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        let mut next = Snapshot {
            by_name: guard.by_name.clone(),
            by_host: HashMap::new(),
        };
        f(&mut next);
        next.by_host = next
            .by_name
            .values()
            .flat_map(|m| m.values())
            .flat_map(|r| {
                r.spec
                    .hosts
                    .iter()
                    .map(move |h| (h.to_ascii_lowercase(), Arc::clone(r)))
            })
            .collect();
        *guard = Arc::new(next);
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Revision>> {
        self.current().by_name.get(namespace)?.get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Revision>> {
        self.current()
            .by_name
            .values()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    /// CONTRACT §2.1: the `Knative-Serving-Revision` and `-Namespace` headers; if either
    /// is empty, a `Host` of the form `<revision>.<namespace>.svc.<cluster-domain>`; then
    /// the hosts platforms declare.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        cluster_domain: &str,
    ) -> Option<Arc<Revision>> {
        let snapshot = self.current();
        let header = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .filter(|v| !v.is_empty())
        };
        if let (Some(name), Some(namespace)) = (
            header(KNATIVE_SERVING_REVISION),
            header(KNATIVE_SERVING_NAMESPACE),
        ) {
            return snapshot.by_name.get(namespace)?.get(name).cloned();
        }
        let host = headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()))?;
        let host = strip_port(host);
        if let Some((name, namespace)) = service_host(host, cluster_domain) {
            if let Some(r) = snapshot.by_name.get(namespace).and_then(|m| m.get(name)) {
                return Some(Arc::clone(r));
            }
        }
        match snapshot.by_host.get(host) {
            Some(r) => Some(Arc::clone(r)),
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                snapshot.by_host.get(&host.to_ascii_lowercase()).cloned()
            }
            None => None,
        }
    }

    /// Applies one platform update.
    pub fn apply(&self, update: PlatformUpdate) {
        match update {
            PlatformUpdate::Revision(spec) => self.upsert(spec),
            PlatformUpdate::RevisionRemoved(id) => {
                let mut removed = None;
                self.replace(|s| {
                    if let Some(m) = s.by_name.get_mut(&id.namespace) {
                        removed = m.remove(&id.name);
                        if m.is_empty() {
                            s.by_name.remove(&id.namespace);
                        }
                    }
                });
                if let Some(r) = removed {
                    r.backends.shutdown();
                    r.throttler.close();
                    self.metrics.remove_revision(&id);
                    tracing::info!(revision = %id, "revision removed");
                }
            }
            PlatformUpdate::Pods { revision, pods } => {
                if let Some(r) = self.get(&revision.namespace, &revision.name) {
                    r.backends.set_pods(&pods);
                }
            }
            PlatformUpdate::Unavailable { revision, reason } => {
                if let Some(r) = self.get(&revision.namespace, &revision.name) {
                    r.throttler.fail_waiting(&reason);
                }
            }
            PlatformUpdate::RevisionActivators {
                revision,
                activators,
            } => {
                if let Some(r) = self.get(&revision.namespace, &revision.name) {
                    r.throttler
                        .update_activators(activators, self.settings.own_ip);
                }
            }
            PlatformUpdate::Activators(mut ips) => {
                ips.sort_unstable();
                for r in self.all() {
                    r.throttler
                        .update_activators(ips.clone(), self.settings.own_ip);
                }
                *self.activators.lock().unwrap_or_else(|p| p.into_inner()) = ips;
            }
        }
    }

    fn upsert(&self, spec: RevisionSpec) {
        let existing = self.get(&spec.id.namespace, &spec.id.name);
        let revision = match existing {
            Some(old) => {
                old.throttler
                    .set_container_concurrency(spec.container_concurrency);
                old.backends.verify_identity(spec.verify_pod_identity);
                Revision {
                    spec,
                    throttler: Arc::clone(&old.throttler),
                    backends: old.backends.clone(),
                    metrics: old.metrics.clone(),
                }
            }
            None => {
                let throttler = Arc::new(Throttler::new(
                    spec.id.clone(),
                    spec.container_concurrency,
                    self.settings.throttler,
                ));
                let activators = self
                    .activators
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if !activators.is_empty() {
                    throttler.update_activators(activators, self.settings.own_ip);
                }
                tracing::info!(revision = %spec.id, cc = spec.container_concurrency, "revision added");
                let backends = Backends::new(Arc::clone(&throttler), self.settings.probes);
                backends.verify_identity(spec.verify_pod_identity);
                Revision {
                    backends,
                    metrics: self.metrics.revision(&spec.id),
                    throttler,
                    spec,
                }
            }
        };
        let revision = Arc::new(revision);
        self.replace(|s| {
            s.by_name
                .entry(Arc::clone(&revision.spec.id.namespace))
                .or_default()
                .insert(Arc::clone(&revision.spec.id.name), revision);
        });
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// `<revision>.<namespace>.svc.<cluster-domain>` → (revision, namespace).
fn service_host<'a>(host: &'a str, cluster_domain: &str) -> Option<(&'a str, &'a str)> {
    let rest = host
        .strip_suffix(cluster_domain)?
        .strip_suffix('.')?
        .strip_suffix(".svc")?;
    let (name, namespace) = rest.split_once('.')?;
    (!name.is_empty() && !namespace.is_empty() && !namespace.contains('.'))
        .then_some((name, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_hosts_are_parsed() {
        assert_eq!(
            service_host("hello-00001.default.svc.cluster.local", "cluster.local"),
            Some(("hello-00001", "default"))
        );
        assert_eq!(
            service_host("hello.default.svc.cluster.local", "example.com"),
            None
        );
        assert_eq!(
            service_host("a.b.c.svc.cluster.local", "cluster.local"),
            None
        );
        assert_eq!(service_host("svc.cluster.local", "cluster.local"), None);
        assert_eq!(strip_port("hello.local:8080"), "hello.local");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("hello.local"), "hello.local");
    }
}
