//! Which revision a request is for (CONTRACT §2.1), and what the activator knows about
//! each revision.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use http::{HeaderMap, HeaderValue, Uri};
use thaw_shared::headers::{Carried, KNATIVE_SERVING_NAMESPACE, KNATIVE_SERVING_REVISION};
use thaw_shared::stats::ConcurrencyRecorder;
use thaw_shared::timeout::Timeouts;

use crate::backends::{Backends, ProbeSchedule};
use crate::metrics::RevisionMetrics;
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
    pub throttler: Throttler,
    pub backends: Backends,
    pub metrics: RevisionMetrics,
    /// Its load through this activator, for the autoscaler
    /// ([`RevisionStats`](crate::reporter::RevisionStats)).
    pub load: Arc<ConcurrencyRecorder>,
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
/// waiting on writers. Each batch of platform updates that adds, changes or removes
/// revisions builds one new snapshot (O(revisions)); pod and activator changes touch
/// only their revision. Batching matters at start: a platform lists 10 000 revisions at
/// once, and one snapshot per revision made that quadratic (10 s before serving).
pub struct Registry {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Held while a batch is applied: one writer at a time, so no batch is lost.
    writer: Mutex<()>,
    settings: RegistrySettings,
    activators: Mutex<Vec<IpAddr>>,
}

impl Snapshot {
    fn get(&self, id: &RevisionId) -> Option<&Arc<Revision>> {
        self.by_name.get(&id.namespace)?.get(&id.name)
    }

    fn revisions(&self) -> impl Iterator<Item = &Arc<Revision>> {
        self.by_name.values().flat_map(|m| m.values())
    }

    /// `by_host`, rebuilt from `by_name`.
    fn index_hosts(&mut self) {
        self.by_host = self
            .revisions()
            .flat_map(|r| {
                r.spec
                    .hosts
                    .iter()
                    .map(move |h| (h.to_ascii_lowercase(), Arc::clone(r)))
            })
            .collect();
    }
}

/// The batch's next snapshot, cloned from `current` the first time it is needed.
fn draft_of<'a>(draft: &'a mut Option<Snapshot>, current: &Snapshot) -> &'a mut Snapshot {
    draft.get_or_insert_with(|| Snapshot {
        by_name: current.by_name.clone(),
        by_host: HashMap::new(),
    })
}

impl Registry {
    pub fn new(settings: RegistrySettings) -> Self {
        Self {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            writer: Mutex::new(()),
            settings,
            activators: Mutex::new(Vec::new()),
        }
    }

    fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Revision>> {
        self.current().by_name.get(namespace)?.get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Revision>> {
        self.current().revisions().cloned().collect()
    }

    /// CONTRACT §2.1: the `Knative-Serving-Revision` and `-Namespace` headers; if either
    /// is empty, a `Host` of the form `<revision>.<namespace>.svc.<cluster-domain>`; then
    /// the hosts platforms declare.
    /// `carried` says whether the request has any routing header to look up.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        carried: Carried,
        uri: &Uri,
        cluster_domain: &str,
    ) -> Option<Arc<Revision>> {
        let routed = carried.has(Carried::ROUTING);
        let header = |name| {
            routed
                .then(|| headers.get(name))
                .flatten()
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .filter(|v| !v.is_empty())
        };
        let host = headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()));
        self.identify_by(
            header(KNATIVE_SERVING_REVISION),
            header(KNATIVE_SERVING_NAMESPACE),
            host,
            cluster_domain,
        )
    }

    /// As [`Self::identify`], from the header values already read: the revision and
    /// namespace headers (when both are there, they decide), else the host.
    pub fn identify_by(
        &self,
        revision: Option<&str>,
        namespace: Option<&str>,
        host: Option<&str>,
        cluster_domain: &str,
    ) -> Option<Arc<Revision>> {
        let snapshot = self.current();
        if let (Some(name), Some(namespace)) = (revision, namespace) {
            return snapshot.by_name.get(namespace)?.get(name).cloned();
        }
        let host = strip_port(host?);
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
        self.apply_all(std::iter::once(update));
    }

    /// Applies updates in order, publishing at most one new snapshot for all of them.
    pub fn apply_all(&self, updates: impl IntoIterator<Item = PlatformUpdate>) {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        // The next snapshot, cloned from the current one at the first revision change.
        let mut draft: Option<Snapshot> = None;
        let mut removed = Vec::new();
        for update in updates {
            match update {
                PlatformUpdate::Revision(spec) => {
                    let next = draft_of(&mut draft, &current);
                    let existing = next.get(&spec.id).cloned();
                    let revision = Arc::new(self.build(spec, existing.as_ref()));
                    next.by_name
                        .entry(Arc::clone(&revision.spec.id.namespace))
                        .or_default()
                        .insert(Arc::clone(&revision.spec.id.name), revision);
                }
                PlatformUpdate::RevisionRemoved(id) => {
                    let next = draft_of(&mut draft, &current);
                    if let Some(m) = next.by_name.get_mut(&id.namespace) {
                        removed.extend(m.remove(&id.name));
                        if m.is_empty() {
                            next.by_name.remove(&id.namespace);
                        }
                    }
                }
                other => self.apply_to_revisions(draft.as_ref().unwrap_or(&current), other),
            }
        }
        if let Some(mut next) = draft {
            next.index_hosts();
            *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        }
        // Only once no new request can find them.
        for r in removed {
            r.backends.shutdown();
            r.throttler.close();
            tracing::info!(revision = %r.spec.id, "revision removed");
        }
    }

    /// The updates that change one revision's pods or activators, or every revision's.
    fn apply_to_revisions(&self, snapshot: &Snapshot, update: PlatformUpdate) {
        match update {
            PlatformUpdate::Revision(_) | PlatformUpdate::RevisionRemoved(_) => {}
            PlatformUpdate::Pods { revision, pods } => {
                if let Some(r) = snapshot.get(&revision) {
                    r.backends.set_pods(&pods);
                }
            }
            PlatformUpdate::Unavailable { revision, reason } => {
                if let Some(r) = snapshot.get(&revision) {
                    r.throttler.fail_waiting(&reason);
                }
            }
            PlatformUpdate::RevisionActivators {
                revision,
                activators,
            } => {
                if let Some(r) = snapshot.get(&revision) {
                    r.throttler
                        .update_activators(activators, self.settings.own_ip);
                }
            }
            PlatformUpdate::Activators(mut ips) => {
                ips.sort_unstable();
                for r in snapshot.revisions() {
                    r.throttler
                        .update_activators(ips.clone(), self.settings.own_ip);
                }
                *self.activators.lock().unwrap_or_else(|p| p.into_inner()) = ips;
            }
        }
    }

    /// The revision `spec` describes: a new one, or `existing` with new settings (its
    /// throttler, backends and metrics carry over).
    fn build(&self, spec: RevisionSpec, existing: Option<&Arc<Revision>>) -> Revision {
        if let Some(old) = existing {
            old.throttler
                .set_container_concurrency(spec.container_concurrency);
            old.backends.verify_identity(spec.verify_pod_identity);
            return Revision {
                spec,
                throttler: old.throttler.clone(),
                backends: old.backends.clone(),
                metrics: old.metrics.clone(),
                load: Arc::clone(&old.load),
            };
        }
        let throttler = Throttler::new(
            spec.id.clone(),
            spec.container_concurrency,
            self.settings.throttler,
        );
        let activators = self
            .activators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !activators.is_empty() {
            throttler.update_activators(activators, self.settings.own_ip);
        }
        tracing::info!(revision = %spec.id, cc = spec.container_concurrency, "revision added");
        let backends = Backends::new(throttler.clone(), self.settings.probes);
        backends.verify_identity(spec.verify_pod_identity);
        Revision {
            backends,
            metrics: RevisionMetrics::new(&spec.id),
            load: Arc::new(ConcurrencyRecorder::untracked()),
            throttler,
            spec,
        }
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

    fn registry() -> Registry {
        Registry::new(RegistrySettings {
            throttler: ThrottlerSettings::default(),
            probes: ProbeSchedule::default(),
            own_ip: None,
        })
    }

    fn spec(name: &str, cc: usize) -> RevisionSpec {
        RevisionSpec {
            id: RevisionId::new("ns", name),
            container_concurrency: cc,
            timeouts: Timeouts::from_secs(60, 0, 0),
            hosts: vec![format!("{name}.local")],
            verify_pod_identity: false,
        }
    }

    fn by_host(r: &Registry, host: &str) -> Option<Arc<Revision>> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_str(host).unwrap());
        let carried = Carried::scan(&headers);
        r.identify(&headers, carried, &Uri::from_static("/"), "cluster.local")
    }

    #[tokio::test]
    async fn a_batch_is_applied_in_order_and_published_once() {
        let r = registry();
        r.apply(PlatformUpdate::Revision(spec("kept", 1)));
        let kept = r.get("ns", "kept").unwrap();
        let before = r.current();
        r.apply_all([
            PlatformUpdate::Revision(spec("a", 1)),
            PlatformUpdate::Revision(spec("b", 1)),
            PlatformUpdate::RevisionRemoved(RevisionId::new("ns", "a")),
            // A change of settings keeps the revision's throttler.
            PlatformUpdate::Revision(spec("kept", 7)),
            // Seen by a revision added earlier in the same batch.
            PlatformUpdate::Activators(vec!["10.0.0.1".parse().unwrap()]),
        ]);
        assert!(r.get("ns", "a").is_none());
        assert!(by_host(&r, "a.local").is_none());
        assert_eq!(
            by_host(&r, "B.local:80").unwrap().spec.id.name.as_ref(),
            "b"
        );
        let kept_now = r.get("ns", "kept").unwrap();
        assert!(kept.throttler.same_as(&kept_now.throttler));
        assert_eq!(kept_now.spec.container_concurrency, 7);
        // The snapshot requests held before the batch is untouched.
        assert!(before.get(&RevisionId::new("ns", "b")).is_none());
        assert_eq!(r.all().len(), 2);
    }

    #[tokio::test]
    async fn updates_without_revision_changes_publish_no_snapshot() {
        let r = registry();
        r.apply(PlatformUpdate::Revision(spec("a", 1)));
        let before = r.current();
        r.apply_all([
            PlatformUpdate::Pods {
                revision: RevisionId::new("ns", "a"),
                pods: vec!["127.0.0.1:9".parse().unwrap()],
            },
            PlatformUpdate::Pods {
                revision: RevisionId::new("ns", "unknown"),
                pods: Vec::new(),
            },
        ]);
        assert!(Arc::ptr_eq(&before, &r.current()));
    }

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
