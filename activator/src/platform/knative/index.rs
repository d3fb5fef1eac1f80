//! What Knative's objects say, folded into registry updates (CONTRACT §2.7):
//! - **Revisions**: container concurrency, the three timeouts, and the protocol of the
//!   user port (`h2c` when the first port is named so);
//! - the revision's **private Endpoints** (`networking.internal.knative.dev/serviceType:
//!   Private`): its pods, ready or not (each is probed before use, as Knative's
//!   activator does), on the port named after the protocol (`http` or `http2`);
//! - its **public Endpoints** (`serviceType: Public`): while the revision is behind the
//!   activators, the activators in its path. This activator's own IP among them gives
//!   the subset of pods it uses; absent, it leaves subsetting as it was, as Knative does.
//!
//! Plain data, like the standalone platform's index: watchers call `apply_*`,
//! `delete_*` and `reset_*`, and each call returns what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Endpoints;
use kube::api::DynamicObject;
use serde_json::Value;
use thaw_shared::limits::{MAX_CONTAINER_CONCURRENCY, MAX_SECONDS};
use thaw_shared::timeout::Timeouts;

use crate::platform::PlatformUpdate;
use crate::revision::{RevisionId, RevisionSpec};

/// The label naming an Endpoints' revision.
pub const REVISION_LABEL: &str = "serving.knative.dev/revision";
/// The label every revision's Endpoints carry (the watch selects on it).
pub const REVISION_UID_LABEL: &str = "serving.knative.dev/revisionUID";
/// Private (the pods) or Public (what the ingress sends to).
pub const SERVICE_TYPE_LABEL: &str = "networking.internal.knative.dev/serviceType";
/// Knative's default `revision-timeout-seconds`, for a Revision that lacks one (its
/// webhook always sets it).
const DEFAULT_TIMEOUT_SECONDS: u64 = 300;

/// What one call changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Update(PlatformUpdate),
    /// A Revision's spec cannot be used; its last good settings stay.
    Invalid {
        revision: RevisionId,
        error: String,
    },
}

/// One revision: its settings and the port name its pods serve on.
#[derive(Debug, Clone, PartialEq)]
struct Known {
    spec: RevisionSpec,
    port_name: &'static str,
}

/// One Endpoints object of a revision, by port name.
#[derive(Debug, Clone, PartialEq, Default)]
struct Addresses {
    revision: Option<RevisionId>,
    /// Port name → ready addresses, and ready-or-not addresses.
    ports: BTreeMap<String, (BTreeSet<SocketAddr>, BTreeSet<SocketAddr>)>,
}

type Key = (String, String);

/// The index; `own_ip` places this activator in revisions' public Endpoints.
#[derive(Debug, Default)]
pub struct Index {
    own_ip: Option<IpAddr>,
    revisions: BTreeMap<RevisionId, Known>,
    private: BTreeMap<Key, Addresses>,
    public: BTreeMap<Key, Addresses>,
}

/// Whether an Endpoints object lists a revision's pods or its public addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Private,
    Public,
}

fn kind(e: &Endpoints) -> Option<Kind> {
    let labels = e.metadata.labels.as_ref()?;
    labels.get(REVISION_LABEL)?;
    match labels.get(SERVICE_TYPE_LABEL).map(String::as_str) {
        Some("Private") => Some(Kind::Private),
        Some("Public") => Some(Kind::Public),
        _ => None,
    }
}

fn key_of(meta: &kube::api::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn addresses(e: &Endpoints) -> Addresses {
    let revision = e
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REVISION_LABEL))
        .map(|name| RevisionId::new(e.metadata.namespace.as_deref().unwrap_or_default(), name));
    let mut ports: BTreeMap<String, (BTreeSet<SocketAddr>, BTreeSet<SocketAddr>)> = BTreeMap::new();
    for subset in e.subsets.iter().flatten() {
        let ip = |a: &k8s_openapi::api::core::v1::EndpointAddress| a.ip.parse::<IpAddr>().ok();
        let ready: Vec<IpAddr> = subset.addresses.iter().flatten().filter_map(ip).collect();
        let not_ready: Vec<IpAddr> = subset
            .not_ready_addresses
            .iter()
            .flatten()
            .filter_map(ip)
            .collect();
        for port in subset.ports.iter().flatten() {
            let (Some(name), Ok(number)) = (port.name.clone(), u16::try_from(port.port)) else {
                continue;
            };
            let entry = ports.entry(name).or_default();
            for ip in &ready {
                entry.0.insert(SocketAddr::new(*ip, number));
                entry.1.insert(SocketAddr::new(*ip, number));
            }
            for ip in &not_ready {
                entry.1.insert(SocketAddr::new(*ip, number));
            }
        }
    }
    Addresses { revision, ports }
}

/// A Revision's settings from its spec, range-checked.
pub fn revision_spec(object: &DynamicObject) -> Result<(RevisionSpec, &'static str), String> {
    let namespace = object.metadata.namespace.as_deref().unwrap_or_default();
    let name = object.metadata.name.as_deref().unwrap_or_default();
    let spec = object.data.get("spec").unwrap_or(&Value::Null);
    let seconds = |field: &str| -> Result<Option<u64>, String> {
        match spec.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= MAX_SECONDS => Ok(Some(n)),
                _ => Err(format!(
                    "spec.{field} must be a whole number of seconds from 0 to {MAX_SECONDS}, got {v}"
                )),
            },
        }
    };
    let cc = match spec.get("containerConcurrency") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= MAX_CONTAINER_CONCURRENCY)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                format!("spec.containerConcurrency must be from 0 to {MAX_CONTAINER_CONCURRENCY}, got {v}")
            })?,
    };
    let total = seconds("timeoutSeconds")?.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    let response_start = seconds("responseStartTimeoutSeconds")?.unwrap_or(0);
    let idle = seconds("idleTimeoutSeconds")?.unwrap_or(0);
    Ok((
        RevisionSpec {
            id: RevisionId::new(namespace, name),
            container_concurrency: cc,
            timeouts: Timeouts::from_secs(total, response_start, idle),
            hosts: Vec::new(),
            // Knative's controller gives the sidecar the Revision's own name and namespace.
            verify_pod_identity: true,
        },
        port_name(spec),
    ))
}

/// `http2` when the serving container's first port is named `h2c`, else `http` (the
/// serving container is the one with ports, else the first).
fn port_name(spec: &Value) -> &'static str {
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let serving = containers
        .iter()
        .find(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty())
        })
        .or_else(|| containers.first());
    let first_port = serving
        .and_then(|c| c.get("ports"))
        .and_then(Value::as_array)
        .and_then(|p| p.first())
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str);
    if first_port == Some("h2c") {
        "http2"
    } else {
        "http"
    }
}

impl Index {
    pub fn new(own_ip: Option<IpAddr>) -> Self {
        Self {
            own_ip,
            ..Self::default()
        }
    }

    /// What a new subscriber needs: every revision, its pods and its activators.
    pub fn snapshot(&self) -> Vec<PlatformUpdate> {
        let mut out = Vec::new();
        for (id, known) in &self.revisions {
            out.push(PlatformUpdate::Revision(known.spec.clone()));
            out.push(self.pods(id, known.port_name));
            if let Some(update) = self.activators(id, known.port_name) {
                out.push(update);
            }
        }
        out
    }

    fn pods(&self, id: &RevisionId, port_name: &str) -> PlatformUpdate {
        let pods: BTreeSet<SocketAddr> = self
            .private
            .values()
            .filter(|a| a.revision.as_ref() == Some(id))
            .filter_map(|a| a.ports.get(port_name))
            .flat_map(|(_, any)| any.iter().copied())
            .collect();
        PlatformUpdate::Pods {
            revision: id.clone(),
            pods: pods.into_iter().collect(),
        }
    }

    /// The activators in the revision's path, when this activator is one of them.
    fn activators(&self, id: &RevisionId, port_name: &str) -> Option<PlatformUpdate> {
        let own = self.own_ip?;
        let ips: BTreeSet<IpAddr> = self
            .public
            .values()
            .filter(|a| a.revision.as_ref() == Some(id))
            .filter_map(|a| a.ports.get(port_name))
            .flat_map(|(ready, _)| ready.iter().map(SocketAddr::ip))
            .collect();
        ips.contains(&own)
            .then(|| PlatformUpdate::RevisionActivators {
                revision: id.clone(),
                activators: ips.into_iter().collect(),
            })
    }

    pub fn apply_revision(&mut self, object: &DynamicObject) -> Vec<Change> {
        match revision_spec(object) {
            Err(error) => vec![Change::Invalid {
                revision: RevisionId::new(
                    object.metadata.namespace.as_deref().unwrap_or_default(),
                    object.metadata.name.as_deref().unwrap_or_default(),
                ),
                error,
            }],
            Ok((spec, port_name)) => {
                let id = spec.id.clone();
                let known = Known { spec, port_name };
                let old = self.revisions.insert(id.clone(), known.clone());
                let mut out = Vec::new();
                if old.as_ref().map(|o| &o.spec) != Some(&known.spec) {
                    out.push(Change::Update(PlatformUpdate::Revision(known.spec.clone())));
                }
                if old.as_ref().map(|o| o.port_name) != Some(port_name) {
                    out.push(Change::Update(self.pods(&id, port_name)));
                    if let Some(a) = self.activators(&id, port_name) {
                        out.push(Change::Update(a));
                    }
                }
                out
            }
        }
    }

    pub fn delete_revision(&mut self, object: &DynamicObject) -> Vec<Change> {
        let id = RevisionId::new(
            object.metadata.namespace.as_deref().unwrap_or_default(),
            object.metadata.name.as_deref().unwrap_or_default(),
        );
        match self.revisions.remove(&id) {
            Some(_) => vec![Change::Update(PlatformUpdate::RevisionRemoved(id))],
            None => Vec::new(),
        }
    }

    pub fn reset_revisions(&mut self, all: &[DynamicObject]) -> Vec<Change> {
        let listed: BTreeSet<RevisionId> = all
            .iter()
            .map(|o| {
                RevisionId::new(
                    o.metadata.namespace.as_deref().unwrap_or_default(),
                    o.metadata.name.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        let gone: Vec<RevisionId> = self
            .revisions
            .keys()
            .filter(|id| !listed.contains(*id))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for id in gone {
            self.revisions.remove(&id);
            out.push(Change::Update(PlatformUpdate::RevisionRemoved(id)));
        }
        for o in all {
            out.extend(self.apply_revision(o));
        }
        out
    }

    /// What the revision of `before`/`after` now has, for the kind that changed.
    fn republish(&self, kind: Kind, revisions: BTreeSet<RevisionId>) -> Vec<Change> {
        let mut out = Vec::new();
        for id in revisions {
            let Some(known) = self.revisions.get(&id) else {
                // Its Revision is not known yet: published when it is.
                continue;
            };
            match kind {
                Kind::Private => out.push(Change::Update(self.pods(&id, known.port_name))),
                Kind::Public => {
                    out.extend(self.activators(&id, known.port_name).map(Change::Update))
                }
            }
        }
        out
    }

    fn table(&mut self, kind: Kind) -> &mut BTreeMap<Key, Addresses> {
        match kind {
            Kind::Private => &mut self.private,
            Kind::Public => &mut self.public,
        }
    }

    pub fn apply_endpoints(&mut self, e: &Endpoints) -> Vec<Change> {
        let key = key_of(&e.metadata);
        let Some(kind) = kind(e) else {
            // Labels changed away from a revision: as if deleted.
            return self.delete_endpoints(e);
        };
        let new = addresses(e);
        let mut touched = BTreeSet::new();
        touched.extend(new.revision.clone());
        let old = self.table(kind).insert(key, new.clone());
        if old.as_ref() == Some(&new) {
            return Vec::new();
        }
        touched.extend(old.and_then(|o| o.revision));
        self.republish(kind, touched)
    }

    pub fn delete_endpoints(&mut self, e: &Endpoints) -> Vec<Change> {
        let key = key_of(&e.metadata);
        let mut out = Vec::new();
        for kind in [Kind::Private, Kind::Public] {
            if let Some(old) = self.table(kind).remove(&key) {
                out.extend(self.republish(kind, old.revision.into_iter().collect()));
            }
        }
        out
    }

    pub fn reset_endpoints(&mut self, all: &[Endpoints]) -> Vec<Change> {
        let mut touched: BTreeMap<Kind, BTreeSet<RevisionId>> = BTreeMap::new();
        for kind in [Kind::Private, Kind::Public] {
            let old = std::mem::take(self.table(kind));
            touched
                .entry(kind)
                .or_default()
                .extend(old.into_values().filter_map(|a| a.revision));
        }
        for e in all {
            if let Some(kind) = kind(e) {
                let a = addresses(e);
                touched.entry(kind).or_default().extend(a.revision.clone());
                self.table(kind).insert(key_of(&e.metadata), a);
            }
        }
        touched
            .into_iter()
            .flat_map(|(kind, ids)| self.republish(kind, ids))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn revision(name: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Revision",
            "metadata": {"namespace": "default", "name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    fn endpoints(
        name: &str,
        rev: &str,
        kind: &str,
        ready: &[&str],
        not_ready: &[&str],
        port: (&str, u16),
    ) -> Endpoints {
        let addrs = |ips: &[&str]| ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>();
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name, "labels": {
                REVISION_LABEL: rev, REVISION_UID_LABEL: "u", SERVICE_TYPE_LABEL: kind}},
            "subsets": [{"addresses": addrs(ready), "notReadyAddresses": addrs(not_ready),
                         "ports": [{"name": port.0, "port": port.1}, {"name": "http-autometric", "port": 9090}]}],
        }))
        .unwrap()
    }

    fn id() -> RevisionId {
        RevisionId::new("default", "hello-00001")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn revision_settings_come_from_the_spec() {
        let (spec, port) = revision_spec(&revision(
            "hello-00001",
            json!({"containerConcurrency": 2, "timeoutSeconds": 30, "responseStartTimeoutSeconds": 5,
                   "containers": [{"image": "x", "ports": [{"name": "h2c", "containerPort": 8080}]}]}),
        ))
        .unwrap();
        assert_eq!(spec.id, id());
        assert_eq!(spec.container_concurrency, 2);
        assert_eq!(spec.timeouts, Timeouts::from_secs(30, 5, 0));
        assert_eq!(port, "http2");
        let (spec, port) = revision_spec(&revision(
            "hello-00001",
            json!({"containers": [{"image": "x"}]}),
        ))
        .unwrap();
        assert_eq!(spec.container_concurrency, 0);
        assert_eq!(spec.timeouts, Timeouts::from_secs(300, 0, 0));
        assert_eq!(port, "http");
    }

    #[test]
    fn out_of_range_settings_are_refused_and_the_last_good_ones_stay() {
        let mut index = Index::new(None);
        let good = revision("hello-00001", json!({"containerConcurrency": 2}));
        assert_eq!(index.apply_revision(&good).len(), 2);
        for spec in [
            json!({"containerConcurrency": 18446744073709551615u64}),
            json!({"containerConcurrency": -1}),
            json!({"timeoutSeconds": 18446744073709551615u64}),
            json!({"idleTimeoutSeconds": "10"}),
        ] {
            let c = index.apply_revision(&revision("hello-00001", spec.clone()));
            match c.as_slice() {
                [Change::Invalid { revision, error }] => {
                    assert_eq!(revision, &id());
                    assert!(error.starts_with("spec."), "{error}");
                }
                other => panic!("{spec}: {other:?}"),
            }
        }
        let snapshot = index.snapshot();
        assert!(
            matches!(&snapshot[0], PlatformUpdate::Revision(s) if s.container_concurrency == 2)
        );
    }

    #[test]
    fn pods_are_every_private_address_on_the_protocol_port() {
        let mut index = Index::new(None);
        // Endpoints before their Revision: held until it comes.
        let e = endpoints(
            "hello-00001-private",
            "hello-00001",
            "Private",
            &["10.0.0.2"],
            &["10.0.0.3"],
            ("http", 8012),
        );
        assert!(index.apply_endpoints(&e).is_empty());
        let c = index.apply_revision(&revision("hello-00001", json!({})));
        assert_eq!(
            c[1],
            Change::Update(PlatformUpdate::Pods {
                revision: id(),
                pods: vec![sa("10.0.0.2:8012"), sa("10.0.0.3:8012")]
            })
        );
        // An h2c revision's pods serve on the port named http2.
        let h2 = endpoints(
            "h2-00001-private",
            "h2-00001",
            "Private",
            &["10.0.0.4"],
            &[],
            ("http2", 8013),
        );
        index.apply_endpoints(&h2);
        let c = index.apply_revision(&revision(
            "h2-00001",
            json!({"containers": [{"ports": [{"name": "h2c"}]}]}),
        ));
        assert_eq!(
            c[1],
            Change::Update(PlatformUpdate::Pods {
                revision: RevisionId::new("default", "h2-00001"),
                pods: vec![sa("10.0.0.4:8013")]
            })
        );
        // Deleting the Endpoints empties the revision; deleting the Revision removes it.
        let c = index.delete_endpoints(&e);
        assert_eq!(
            c,
            [Change::Update(PlatformUpdate::Pods {
                revision: id(),
                pods: vec![]
            })]
        );
        let c = index.delete_revision(&revision("hello-00001", json!({})));
        assert_eq!(c, [Change::Update(PlatformUpdate::RevisionRemoved(id()))]);
    }

    #[test]
    fn public_endpoints_give_the_activators_in_path_only_when_this_one_is() {
        let own: IpAddr = "10.0.1.2".parse().unwrap();
        let mut index = Index::new(Some(own));
        index.apply_revision(&revision("hello-00001", json!({})));
        let public = endpoints(
            "hello-00001",
            "hello-00001",
            "Public",
            &["10.0.1.3", "10.0.1.2"],
            &["10.0.1.9"],
            ("http", 8012),
        );
        let c = index.apply_endpoints(&public);
        assert_eq!(
            c,
            [Change::Update(PlatformUpdate::RevisionActivators {
                revision: id(),
                activators: vec!["10.0.1.2".parse().unwrap(), "10.0.1.3".parse().unwrap()],
            })]
        );
        // Serving directly from pods: this activator is not in the path; nothing changes.
        let serve = endpoints(
            "hello-00001",
            "hello-00001",
            "Public",
            &["10.0.0.2"],
            &[],
            ("http", 8012),
        );
        assert!(index.apply_endpoints(&serve).is_empty());
        // Endpoints of something else, or without the labels, are not ours.
        let mut other = serve.clone();
        other.metadata.labels = None;
        assert!(index.apply_endpoints(&other).is_empty());
    }

    #[test]
    fn a_relist_drops_what_is_gone() {
        let mut index = Index::new(None);
        let a = revision("hello-00001", json!({}));
        let b = revision("hello-00002", json!({}));
        index.reset_revisions(&[a.clone(), b]);
        let e = endpoints(
            "hello-00001-private",
            "hello-00001",
            "Private",
            &["10.0.0.2"],
            &[],
            ("http", 8012),
        );
        index.reset_endpoints(&[e]);
        let c = index.reset_revisions(&[a]);
        assert!(c.contains(&Change::Update(PlatformUpdate::RevisionRemoved(
            RevisionId::new("default", "hello-00002")
        ))));
        let c = index.reset_endpoints(&[]);
        assert_eq!(
            c,
            [Change::Update(PlatformUpdate::Pods {
                revision: id(),
                pods: vec![]
            })]
        );
    }
}
