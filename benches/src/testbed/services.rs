//! Services inside the testbed, with no kube-proxy and no iptables:
//! - the cluster DNS answers `<service>.<namespace>.svc.<domain>` with the Service's
//!   ClusterIP (a headless Service's ready endpoint IPs), and `a-b-c-d.<ns>.pod.<domain>`;
//! - the Service proxy listens on every ClusterIP:port (the whole ClusterIP range is a
//!   local route, see `up.sh`) and splices each TCP connection to a ready endpoint, as
//!   kube-proxy's original userspace mode did. So `targetPort` mapping works, and the
//!   `kubernetes` Service reaches the API server.
//!
//! Both read one cache of Services and EndpointSlices, kept by kube-rs reflectors.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::dns::{Answer, Resolver};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The cache of Services and EndpointSlices.
#[derive(Clone)]
pub struct ServiceCache {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    changed: Arc<Notify>,
}

impl ServiceCache {
    /// Starts the reflectors; they run until the returned tasks are dropped/aborted.
    pub fn start(client: &Client) -> (Self, Vec<JoinHandle<()>>) {
        let changed = Arc::new(Notify::new());
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let mut tasks = Vec::new();
        let notify = Arc::clone(&changed);
        let api: Api<Service> = Api::all(client.clone());
        tasks.push(tokio::spawn(async move {
            let stream = reflector::reflector(
                services_writer,
                watcher(api, watcher::Config::default()).default_backoff(),
            )
            .touched_objects();
            futures_util::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "service watch failed; retrying");
                }
                notify.notify_waiters();
            }
        }));
        let notify = Arc::clone(&changed);
        let api: Api<EndpointSlice> = Api::all(client.clone());
        tasks.push(tokio::spawn(async move {
            let stream = reflector::reflector(
                slices_writer,
                watcher(api, watcher::Config::default()).default_backoff(),
            )
            .touched_objects();
            futures_util::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "endpointslice watch failed; retrying");
                }
                notify.notify_waiters();
            }
        }));
        (
            Self {
                services,
                slices,
                changed,
            },
            tasks,
        )
    }

    /// Waits until both lists have been read once.
    pub async fn ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
    }

    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services.get(&ObjectRef::new(name).within(namespace))
    }

    /// Ready endpoint addresses of a Service, each with the port named `port_name`
    /// (Services' unnamed single port is named "").
    pub fn endpoints(&self, namespace: &str, service: &str, port_name: &str) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for slice in self.slices.state() {
            if slice.metadata.namespace.as_deref() != Some(namespace)
                || slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    != Some(service)
                || slice.address_type != "IPv4"
            {
                continue;
            }
            let port = slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
            });
            let Some(port) = port
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for endpoint in slice.endpoints.iter().flatten() {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if !ready {
                    continue;
                }
                for address in &endpoint.addresses {
                    if let Ok(ip) = address.parse::<Ipv4Addr>() {
                        out.push(SocketAddr::from((ip, port)));
                    }
                }
            }
        }
        out
    }

    fn endpoint_ips(&self, namespace: &str, service: &str) -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = self
            .slices
            .state()
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .map(String::as_str)
                        == Some(service)
            })
            .flat_map(|s| s.endpoints.clone().unwrap_or_default())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses)
            .filter_map(|a| a.parse().ok())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

/// DNS names of the cluster.
pub struct ClusterDns {
    pub cache: ServiceCache,
    /// `cluster.local`.
    pub domain: String,
}

impl Resolver for ClusterDns {
    fn lookup(&self, name: &str) -> Answer {
        let Some(local) = name
            .strip_suffix(self.domain.as_str())
            .and_then(|n| n.strip_suffix('.'))
        else {
            return Answer::NxDomain;
        };
        let labels: Vec<&str> = local.split('.').collect();
        match labels.as_slice() {
            [service, namespace, "svc"] => match self.cache.service(namespace, service) {
                None => Answer::NxDomain,
                Some(svc) => {
                    let spec = svc.spec.clone().unwrap_or_default();
                    match spec.cluster_ip.as_deref() {
                        Some("None") | None => {
                            Answer::Addresses(self.cache.endpoint_ips(namespace, service))
                        }
                        Some(ip) => match ip.parse() {
                            Ok(ip) => Answer::Addresses(vec![ip]),
                            Err(_) => Answer::NoData,
                        },
                    }
                }
            },
            [pod_ip, _namespace, "pod"] => match pod_ip.replace('-', ".").parse() {
                Ok(ip) => Answer::Addresses(vec![ip]),
                Err(_) => Answer::NxDomain,
            },
            // Only the names above, and the zones that hold them, exist.
            [_, "svc"] | ["svc"] | [_, "pod"] | ["pod"] => Answer::NoData,
            _ => Answer::NxDomain,
        }
    }
}

/// One ClusterIP:port and the Service port behind it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Frontend {
    address: SocketAddr,
    namespace: String,
    service: String,
    port_name: String,
}

/// The frontends the Services ask for now.
fn frontends(services: &[Arc<Service>]) -> Vec<Frontend> {
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            out.push(Frontend {
                address: SocketAddr::from((ip, number)),
                namespace: svc.metadata.namespace.clone().unwrap_or_default(),
                service: svc.metadata.name.clone().unwrap_or_default(),
                port_name: port.name.clone().unwrap_or_default(),
            });
        }
    }
    out
}

/// Keeps one listener per frontend, following Service changes, until dropped.
pub async fn proxy(cache: ServiceCache) {
    let mut running: BTreeMap<Frontend, JoinHandle<()>> = BTreeMap::new();
    cache.ready().await;
    loop {
        let changed = cache.changed.notified();
        let wanted: Vec<Frontend> = frontends(&cache.services.state());
        running.retain(|f, task| {
            let keep = wanted.contains(f) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for frontend in wanted {
            if running.contains_key(&frontend) {
                continue;
            }
            match TcpListener::bind(frontend.address).await {
                Ok(listener) => {
                    let task = tokio::spawn(serve(listener, frontend.clone(), cache.clone()));
                    running.insert(frontend, task);
                }
                Err(e) => {
                    tracing::warn!(address = %frontend.address, error = %e,
                        "cannot listen on a ClusterIP (is the ClusterIP range a local route?)");
                }
            }
        }
        changed.await;
    }
}

async fn serve(listener: TcpListener, frontend: Frontend, cache: ServiceCache) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let endpoints =
            cache.endpoints(&frontend.namespace, &frontend.service, &frontend.port_name);
        tokio::spawn(splice(client, endpoints));
    }
}

/// Connects to a ready endpoint (a random one first, then the others) and copies both
/// ways. With none reachable the client's connection is closed: what a Service with no
/// ready endpoints does to a connection.
async fn splice(mut client: TcpStream, mut endpoints: Vec<SocketAddr>) {
    if !endpoints.is_empty() {
        let first = fastrand::usize(..endpoints.len());
        endpoints.rotate_left(first);
    }
    for endpoint in endpoints {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                let _ = client.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                return;
            }
            _ => continue,
        }
    }
}

/// The `kubernetes` Service's ClusterIP and port, for pods' `KUBERNETES_SERVICE_*`.
pub fn kubernetes_service(services: &[Arc<Service>]) -> Option<(Ipv4Addr, u16)> {
    let svc = services.iter().find(|s| {
        s.metadata.namespace.as_deref() == Some("default")
            && s.metadata.name.as_deref() == Some("kubernetes")
    })?;
    let spec = svc.spec.as_ref()?;
    let ip = spec.cluster_ip.as_deref()?.parse().ok()?;
    let port = spec.ports.as_ref()?.first()?.port;
    Some((ip, u16::try_from(port).ok()?))
}

impl ServiceCache {
    pub fn kubernetes(&self) -> Option<(Ipv4Addr, u16)> {
        kubernetes_service(&self.services.state())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    fn cache(services: Vec<serde_json::Value>, slices: Vec<serde_json::Value>) -> ServiceCache {
        let (svc_store, mut svc_writer) = reflector::store::<Service>();
        let (slice_store, mut slice_writer) = reflector::store::<EndpointSlice>();
        for s in services {
            svc_writer.apply_watcher_event(&Event::Apply(serde_json::from_value(s).unwrap()));
        }
        for s in slices {
            slice_writer.apply_watcher_event(&Event::Apply(serde_json::from_value(s).unwrap()));
        }
        ServiceCache {
            services: svc_store,
            slices: slice_store,
            changed: Arc::new(Notify::new()),
        }
    }

    fn slice(ns: &str, svc: &str, port: (&str, i32), eps: &[(&str, bool)]) -> serde_json::Value {
        json!({
            "metadata": {"name": format!("{svc}-abc"), "namespace": ns,
                         "labels": {SERVICE_NAME_LABEL: svc}},
            "addressType": "IPv4",
            "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
            "endpoints": eps.iter().map(|(ip, ready)| json!({
                "addresses": [ip], "conditions": {"ready": ready}})).collect::<Vec<_>>()
        })
    }

    fn fixture() -> ServiceCache {
        cache(
            vec![
                json!({"metadata": {"name": "autoscaler", "namespace": "knative-serving"},
                       "spec": {"clusterIP": "10.96.3.20", "ports": [{"name": "http", "port": 8080}]}}),
                json!({"metadata": {"name": "web", "namespace": "apps"},
                       "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
                json!({"metadata": {"name": "kubernetes", "namespace": "default"},
                       "spec": {"clusterIP": "10.96.3.1", "ports": [{"name": "https", "port": 443}]}}),
            ],
            vec![
                slice(
                    "knative-serving",
                    "autoscaler",
                    ("http", 8080),
                    &[("10.244.3.7", true), ("10.244.3.8", false)],
                ),
                slice(
                    "apps",
                    "web",
                    ("", 8080),
                    &[("10.244.3.9", true), ("10.244.3.2", true)],
                ),
            ],
        )
    }

    #[test]
    fn dns_names_resolve_like_cluster_dns() {
        let dns = ClusterDns {
            cache: fixture(),
            domain: "cluster.local".to_owned(),
        };
        assert_eq!(
            dns.lookup("autoscaler.knative-serving.svc.cluster.local"),
            Answer::Addresses(vec![Ipv4Addr::new(10, 96, 3, 20)])
        );
        assert_eq!(
            dns.lookup("web.apps.svc.cluster.local"),
            Answer::Addresses(vec![
                Ipv4Addr::new(10, 244, 3, 2),
                Ipv4Addr::new(10, 244, 3, 9)
            ])
        );
        assert_eq!(
            dns.lookup("10-244-3-9.apps.pod.cluster.local"),
            Answer::Addresses(vec![Ipv4Addr::new(10, 244, 3, 9)])
        );
        assert_eq!(dns.lookup("nope.apps.svc.cluster.local"), Answer::NxDomain);
        // The search list tries these first; they must not exist.
        assert_eq!(
            dns.lookup("autoscaler.knative-serving.svc.cluster.local.apps.svc.cluster.local"),
            Answer::NxDomain
        );
        assert_eq!(dns.lookup("example.com"), Answer::NxDomain);
        assert_eq!(dns.lookup("apps.svc.cluster.local"), Answer::NoData);
    }

    #[test]
    fn the_proxy_targets_ready_endpoints_by_port_name() {
        let cache = fixture();
        assert_eq!(
            cache.endpoints("knative-serving", "autoscaler", "http"),
            vec!["10.244.3.7:8080".parse::<SocketAddr>().unwrap()]
        );
        assert!(cache
            .endpoints("knative-serving", "autoscaler", "other")
            .is_empty());
        let fronts = frontends(&cache.services.state());
        // Headless Services get no frontend.
        assert_eq!(fronts.len(), 2);
        assert_eq!(cache.kubernetes(), Some((Ipv4Addr::new(10, 96, 3, 1), 443)));
    }
}
