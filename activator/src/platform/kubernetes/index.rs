//! What the cluster says, folded into what the activator needs: the functions (Deployments
//! with `thaw.dev/*` annotations), their ready pods (from their Service's EndpointSlices),
//! and the activators themselves (from the activators' own Service).
//!
//! The index is plain data: watchers call [`Index::apply_deployment`],
//! [`Index::delete_deployment`], [`Index::reset_deployments`] and the slice twins, and
//! each call returns what changed as [`Change`]s, which the platform publishes. No
//! Kubernetes client is involved, so every rule here is unit-tested without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use thaw_shared::annotations::{self, AnnotationError, FunctionSettings};
use thaw_shared::autoscale::ScalingSettings;

use crate::platform::PlatformUpdate;
use crate::revision::{RevisionId, RevisionSpec};

/// The queue-proxy's serving port: Knative fixes it, so the activator always dials it,
/// whichever port the Service names.
pub const QUEUE_PROXY_PORT: u16 = 8012;
/// The queue-proxy's metrics port, scraped for the autoscaler.
pub const QUEUE_PROXY_METRICS_PORT: u16 = 9090;
/// The label EndpointSlices carry naming their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What one call changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Goes to the registry as is.
    Update(PlatformUpdate),
    /// A Deployment's annotations could not be used: recorded as an Event on it. `kept`
    /// says whether earlier good settings stay in force.
    BadAnnotation {
        deployment: DeploymentRef,
        error: AnnotationError,
        kept: bool,
    },
}

/// A Deployment, by namespace and name (and uid, for Events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// One function, as the scaler needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub id: RevisionId,
    pub settings: FunctionSettings,
    /// The Deployment's `spec.replicas` (a missing field means 1, as the API defaults it).
    pub replicas: u32,
    /// Ready pod IPs, sorted.
    pub ready: Vec<IpAddr>,
}

impl Function {
    /// Knative's KPA settings for this function.
    pub fn scaling(&self) -> ScalingSettings {
        let s = &self.settings;
        ScalingSettings {
            target: s.target,
            min_scale: s.min_scale,
            max_scale: s.max_scale,
            scale_to_zero_grace_period: s.scale_to_zero_grace_period,
            ..ScalingSettings::default().with_stable_window(s.stable_window)
        }
    }

    fn service(&self) -> &str {
        self.settings.service.as_deref().unwrap_or(&self.id.name)
    }

    fn spec(&self) -> RevisionSpec {
        RevisionSpec {
            id: self.id.clone(),
            container_concurrency: self.settings.container_concurrency,
            timeouts: self.settings.timeouts,
            hosts: self.settings.hosts.clone(),
            // An injected sidecar's names come from the pod and its owners, which need
            // not be the Deployment's: not checked.
            verify_pod_identity: false,
        }
    }

    fn pods(&self) -> PlatformUpdate {
        PlatformUpdate::Pods {
            revision: self.id.clone(),
            pods: self
                .ready
                .iter()
                .map(|ip| SocketAddr::new(*ip, QUEUE_PROXY_PORT))
                .collect(),
        }
    }
}

/// A Service, by namespace and name.
type ServiceKey = (String, String);

/// The index. `activators` names the activators' own Service.
#[derive(Debug)]
pub struct Index {
    activators: ServiceKey,
    functions: BTreeMap<RevisionId, Function>,
    /// Service → slice name → ready addresses in that slice.
    slices: BTreeMap<ServiceKey, BTreeMap<String, Vec<IpAddr>>>,
}

impl Index {
    pub fn new(activator_namespace: &str, activator_service: &str) -> Self {
        Self {
            activators: (activator_namespace.to_owned(), activator_service.to_owned()),
            functions: BTreeMap::new(),
            slices: BTreeMap::new(),
        }
    }

    /// Every function, for the scaler.
    pub fn functions(&self) -> impl Iterator<Item = &Function> {
        self.functions.values()
    }

    pub fn function(&self, id: &RevisionId) -> Option<&Function> {
        self.functions.get(id)
    }

    /// The whole state as updates, for a new subscriber.
    pub fn snapshot(&self) -> Vec<PlatformUpdate> {
        let mut out: Vec<_> = self
            .functions
            .values()
            .flat_map(|f| [PlatformUpdate::Revision(f.spec()), f.pods()])
            .collect();
        out.push(PlatformUpdate::Activators(self.ready(&self.activators)));
        out
    }

    /// A Deployment was added or changed.
    pub fn apply_deployment(&mut self, d: &Deployment) -> Vec<Change> {
        let (Some(namespace), Some(name)) = (&d.metadata.namespace, &d.metadata.name) else {
            return Vec::new();
        };
        let id = RevisionId::new(namespace, name);
        let empty = BTreeMap::new();
        let annotations = d.metadata.annotations.as_ref().unwrap_or(&empty);
        if !annotations::opted_in(annotations) {
            // Opting out (removing the annotations) is a removal.
            return self.delete(&id);
        }
        let replicas = d.spec.replicas.map_or(1, |r| u32::try_from(r).unwrap_or(0));
        let settings = match FunctionSettings::from_annotations(annotations) {
            Ok(s) => s,
            Err(error) => {
                let kept = match self.functions.get_mut(&id) {
                    Some(f) => {
                        f.replicas = replicas;
                        true
                    }
                    None => false,
                };
                return vec![Change::BadAnnotation {
                    deployment: DeploymentRef {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        uid: d.metadata.uid.clone(),
                    },
                    error,
                    kept,
                }];
            }
        };
        let mut function = Function {
            id: id.clone(),
            settings,
            replicas,
            ready: Vec::new(),
        };
        function.ready = self.ready(&(namespace.clone(), function.service().to_owned()));
        let old = self.functions.insert(id, function.clone());
        let mut out = Vec::new();
        if old.as_ref().map(Function::spec) != Some(function.spec()) {
            out.push(Change::Update(PlatformUpdate::Revision(function.spec())));
        }
        if old.as_ref().map(|o| &o.ready) != Some(&function.ready) {
            out.push(Change::Update(function.pods()));
        }
        out
    }

    /// A Deployment was deleted.
    pub fn delete_deployment(&mut self, d: &Deployment) -> Vec<Change> {
        match (&d.metadata.namespace, &d.metadata.name) {
            (Some(ns), Some(name)) => self.delete(&RevisionId::new(ns, name)),
            _ => Vec::new(),
        }
    }

    fn delete(&mut self, id: &RevisionId) -> Vec<Change> {
        match self.functions.remove(id) {
            Some(_) => vec![Change::Update(PlatformUpdate::RevisionRemoved(id.clone()))],
            None => Vec::new(),
        }
    }

    /// A fresh list of every Deployment (after a start or a relist, e.g. on 410 Gone):
    /// functions not in it are removed.
    pub fn reset_deployments(&mut self, all: &[Deployment]) -> Vec<Change> {
        let listed: BTreeSet<RevisionId> = all
            .iter()
            .filter_map(|d| {
                Some(RevisionId::new(
                    d.metadata.namespace.as_deref()?,
                    d.metadata.name.as_deref()?,
                ))
            })
            .collect();
        let gone: Vec<RevisionId> = self
            .functions
            .keys()
            .filter(|id| !listed.contains(*id))
            .cloned()
            .collect();
        let mut out: Vec<Change> = gone.iter().flat_map(|id| self.delete(id)).collect();
        for d in all {
            out.extend(self.apply_deployment(d));
        }
        out
    }

    /// An EndpointSlice was added or changed.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Vec<Change> {
        let Some((service, name)) = slice_key(slice) else {
            return Vec::new();
        };
        let ready = ready_addresses(slice);
        let slices = self.slices.entry(service.clone()).or_default();
        if slices.get(&name) == Some(&ready) {
            return Vec::new();
        }
        slices.insert(name, ready);
        self.service_changed(&service)
    }

    /// An EndpointSlice was deleted.
    pub fn delete_slice(&mut self, slice: &EndpointSlice) -> Vec<Change> {
        let Some((service, name)) = slice_key(slice) else {
            return Vec::new();
        };
        let Some(slices) = self.slices.get_mut(&service) else {
            return Vec::new();
        };
        if slices.remove(&name).is_none() {
            return Vec::new();
        }
        if slices.is_empty() {
            self.slices.remove(&service);
        }
        self.service_changed(&service)
    }

    /// A fresh list of the functions' EndpointSlices (the activators' own Service is
    /// watched on its own and left alone here).
    pub fn reset_slices(&mut self, all: &[EndpointSlice]) -> Vec<Change> {
        let activators = self.activators.clone();
        self.reset_where(all, |service| *service != activators)
    }

    /// A fresh list of the activators' own Service's EndpointSlices.
    pub fn reset_activator_slices(&mut self, all: &[EndpointSlice]) -> Vec<Change> {
        let activators = self.activators.clone();
        self.reset_where(all, |service| *service == activators)
    }

    fn reset_where(
        &mut self,
        all: &[EndpointSlice],
        mine: impl Fn(&ServiceKey) -> bool,
    ) -> Vec<Change> {
        let before: BTreeSet<ServiceKey> =
            self.slices.keys().filter(|s| mine(s)).cloned().collect();
        self.slices.retain(|s, _| !mine(s));
        for slice in all {
            if let Some((service, name)) = slice_key(slice).filter(|(s, _)| mine(s)) {
                self.slices
                    .entry(service)
                    .or_default()
                    .insert(name, ready_addresses(slice));
            }
        }
        let touched: BTreeSet<ServiceKey> = before
            .into_iter()
            .chain(self.slices.keys().filter(|s| mine(s)).cloned())
            .collect();
        touched
            .iter()
            .flat_map(|s| self.service_changed(s))
            .collect()
    }

    /// The ready addresses of a Service, over all its slices, sorted and without repeats
    /// (an address may sit in two slices while the controller moves it).
    fn ready(&self, service: &ServiceKey) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self
            .slices
            .get(service)
            .into_iter()
            .flat_map(|s| s.values().flatten().copied())
            .collect();
        set.into_iter().collect()
    }

    fn service_changed(&mut self, service: &ServiceKey) -> Vec<Change> {
        let ready = self.ready(service);
        let mut out = Vec::new();
        if *service == self.activators {
            out.push(Change::Update(PlatformUpdate::Activators(ready.clone())));
        }
        for f in self.functions.values_mut() {
            if *f.id.namespace == *service.0 && f.service() == service.1 && f.ready != ready {
                f.ready = ready.clone();
                out.push(Change::Update(f.pods()));
            }
        }
        out
    }
}

fn slice_key(slice: &EndpointSlice) -> Option<(ServiceKey, String)> {
    let namespace = slice.metadata.namespace.clone()?;
    let service = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?
        .clone();
    Some(((namespace, service), slice.metadata.name.clone()?))
}

/// The slice's ready endpoints' addresses. Kubernetes says an absent `ready` means ready;
/// a terminating endpoint is never ready.
fn ready_addresses(slice: &EndpointSlice) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| {
            let c = e.conditions.as_ref();
            c.and_then(|c| c.ready).unwrap_or(true)
                && !c.and_then(|c| c.terminating).unwrap_or(false)
        })
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(
        ns: &str,
        name: &str,
        annotations: serde_json::Value,
        replicas: i32,
    ) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": "u1", "annotations": annotations},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
        }))
        .unwrap()
    }

    fn slice(ns: &str, service: &str, name: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn ep(ip: &str, ready: Option<bool>) -> serde_json::Value {
        match ready {
            Some(r) => json!({"addresses": [ip], "conditions": {"ready": r}}),
            None => json!({"addresses": [ip]}),
        }
    }

    fn pods(changes: &[Change]) -> Vec<Vec<SocketAddr>> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Update(PlatformUpdate::Pods { pods, .. }) => Some(pods.clone()),
                _ => None,
            })
            .collect()
    }

    fn addr(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), QUEUE_PROXY_PORT)
    }

    #[test]
    fn annotated_deployments_become_revisions_with_their_services_ready_pods() {
        let mut index = Index::new("thaw-system", "thaw-activator");
        // The slice may arrive before the Deployment.
        index.apply_slice(&slice(
            "fn",
            "hello",
            "hello-abc",
            json!([
                ep("10.0.0.2", Some(true)),
                ep("10.0.0.1", None),
                ep("10.0.0.3", Some(false))
            ]),
        ));
        let changes = index.apply_deployment(&deployment(
            "fn",
            "hello",
            json!({"thaw.dev/hosts": "hello.example.com", "thaw.dev/container-concurrency": "2"}),
            0,
        ));
        let Change::Update(PlatformUpdate::Revision(spec)) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!(spec.id, RevisionId::new("fn", "hello"));
        assert_eq!(spec.container_concurrency, 2);
        assert_eq!(spec.hosts, ["hello.example.com"]);
        assert_eq!(pods(&changes), [vec![addr("10.0.0.1"), addr("10.0.0.2")]]);
        let f = index.function(&RevisionId::new("fn", "hello")).unwrap();
        assert_eq!(f.replicas, 0);
        assert!((f.scaling().target - 1.4).abs() < 1e-9);

        // A second slice of the same Service adds to the set; another Service does not.
        let c = index.apply_slice(&slice(
            "fn",
            "hello",
            "hello-def",
            json!([ep("10.0.0.9", None)]),
        ));
        assert_eq!(
            pods(&c),
            [vec![addr("10.0.0.1"), addr("10.0.0.2"), addr("10.0.0.9")]]
        );
        assert!(index
            .apply_slice(&slice("fn", "other", "o", json!([ep("10.0.0.7", None)])))
            .is_empty());
        assert!(index
            .apply_slice(&slice(
                "other-ns",
                "hello",
                "h",
                json!([ep("10.0.0.8", None)])
            ))
            .is_empty());
        // The same slice again changes nothing.
        assert!(index
            .apply_slice(&slice(
                "fn",
                "hello",
                "hello-def",
                json!([ep("10.0.0.9", None)])
            ))
            .is_empty());
        let c = index.delete_slice(&slice("fn", "hello", "hello-abc", json!([])));
        assert_eq!(pods(&c), [vec![addr("10.0.0.9")]]);
    }

    #[test]
    fn the_service_annotation_picks_the_slices() {
        let mut index = Index::new("thaw-system", "thaw-activator");
        index.apply_slice(&slice("fn", "front", "f1", json!([ep("10.0.1.1", None)])));
        let c = index.apply_deployment(&deployment(
            "fn",
            "hello",
            json!({"thaw.dev/service": "front"}),
            1,
        ));
        assert_eq!(pods(&c), [vec![addr("10.0.1.1")]]);
    }

    #[test]
    fn unannotated_deployments_are_ignored_and_opting_out_removes() {
        let mut index = Index::new("thaw-system", "thaw-activator");
        assert!(index
            .apply_deployment(&deployment("fn", "plain", json!({"x": "y"}), 1))
            .is_empty());
        index.apply_deployment(&deployment(
            "fn",
            "hello",
            json!({"thaw.dev/min-scale": "1"}),
            1,
        ));
        let c = index.apply_deployment(&deployment("fn", "hello", json!({}), 1));
        assert_eq!(
            c,
            [Change::Update(PlatformUpdate::RevisionRemoved(
                RevisionId::new("fn", "hello")
            ))]
        );
        assert!(index.functions().next().is_none());
    }

    #[test]
    fn a_bad_annotation_keeps_the_last_good_settings() {
        let mut index = Index::new("thaw-system", "thaw-activator");
        let c = index.apply_deployment(&deployment(
            "fn",
            "new",
            json!({"thaw.dev/max-scale": "lots"}),
            1,
        ));
        let [Change::BadAnnotation {
            error,
            kept: false,
            deployment: bad,
        }] = &c[..]
        else {
            panic!("{c:?}")
        };
        assert_eq!(error.name, "thaw.dev/max-scale");
        assert_eq!(bad.uid.as_deref(), Some("u1"));
        assert!(index.functions().next().is_none());

        index.apply_deployment(&deployment(
            "fn",
            "hello",
            json!({"thaw.dev/container-concurrency": "3"}),
            1,
        ));
        let c = index.apply_deployment(&deployment(
            "fn",
            "hello",
            json!({"thaw.dev/container-concurrency": "-3"}),
            2,
        ));
        assert!(
            matches!(&c[..], [Change::BadAnnotation { kept: true, .. }]),
            "{c:?}"
        );
        let f = index.function(&RevisionId::new("fn", "hello")).unwrap();
        assert_eq!(f.settings.container_concurrency, 3);
        // The scale still follows the cluster.
        assert_eq!(f.replicas, 2);
    }

    #[test]
    fn settings_changes_are_published_once() {
        let mut index = Index::new("thaw-system", "thaw-activator");
        let d = deployment("fn", "hello", json!({"thaw.dev/timeout-seconds": "10"}), 0);
        assert_eq!(index.apply_deployment(&d).len(), 2);
        // A scale change alone (the scaler's own write coming back) publishes nothing.
        let scaled = deployment("fn", "hello", json!({"thaw.dev/timeout-seconds": "10"}), 3);
        assert!(index.apply_deployment(&scaled).is_empty());
        assert_eq!(
            index
                .function(&RevisionId::new("fn", "hello"))
                .unwrap()
                .replicas,
            3
        );
        let c = index.apply_deployment(&deployment(
            "fn",
            "hello",
            json!({"thaw.dev/timeout-seconds": "20"}),
            3,
        ));
        assert!(
            matches!(&c[..], [Change::Update(PlatformUpdate::Revision(_))]),
            "{c:?}"
        );
    }

    #[test]
    fn the_activators_come_from_their_own_service() {
        let mut index = Index::new("thaw-system", "thaw-activator");
        let c = index.apply_slice(&slice(
            "thaw-system",
            "thaw-activator",
            "a1",
            json!([ep("10.0.2.2", None), ep("10.0.2.1", None), json!({"addresses": ["10.0.2.3"], "conditions": {"ready": true, "terminating": true}})]),
        ));
        let ips: Vec<IpAddr> = vec!["10.0.2.1".parse().unwrap(), "10.0.2.2".parse().unwrap()];
        assert_eq!(c, [Change::Update(PlatformUpdate::Activators(ips.clone()))]);
        assert_eq!(
            index.snapshot().last(),
            Some(&PlatformUpdate::Activators(ips.clone()))
        );
        // The functions' relist leaves the activators alone, and the other way round.
        assert!(index.reset_slices(&[]).is_empty());
        let c = index.reset_activator_slices(&[]);
        assert_eq!(c, [Change::Update(PlatformUpdate::Activators(Vec::new()))]);
    }

    #[test]
    fn a_relist_removes_what_went_away_while_disconnected() {
        let mut index = Index::new("thaw-system", "thaw-activator");
        index.apply_deployment(&deployment(
            "fn",
            "a",
            json!({"thaw.dev/hosts": "a.example"}),
            1,
        ));
        index.apply_deployment(&deployment(
            "fn",
            "b",
            json!({"thaw.dev/hosts": "b.example"}),
            1,
        ));
        index.apply_slice(&slice("fn", "a", "a1", json!([ep("10.0.0.1", None)])));
        let c = index.reset_deployments(&[deployment(
            "fn",
            "b",
            json!({"thaw.dev/hosts": "b.example"}),
            1,
        )]);
        assert_eq!(
            c,
            [Change::Update(PlatformUpdate::RevisionRemoved(
                RevisionId::new("fn", "a")
            ))]
        );
        index.apply_deployment(&deployment(
            "fn",
            "a",
            json!({"thaw.dev/hosts": "a.example"}),
            1,
        ));
        let c = index.reset_slices(&[]);
        assert_eq!(pods(&c), [Vec::<SocketAddr>::new()]);
        assert!(index
            .function(&RevisionId::new("fn", "a"))
            .unwrap()
            .ready
            .is_empty());
    }

    #[test]
    fn objects_without_names_or_labels_are_skipped() {
        let mut index = Index::new("thaw-system", "thaw-activator");
        let nameless: Deployment = serde_json::from_value(json!({"metadata": {}})).unwrap();
        assert!(index.apply_deployment(&nameless).is_empty());
        let unlabelled: EndpointSlice = serde_json::from_value(json!({"metadata": {"namespace": "a", "name": "b"}, "addressType": "IPv4", "endpoints": []})).unwrap();
        assert!(index.apply_slice(&unlabelled).is_empty());
        let garbage = slice("fn", "s", "x", json!([{"addresses": ["not-an-ip"]}]));
        assert!(index.apply_slice(&garbage).is_empty());
    }
}
