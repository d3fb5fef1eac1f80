//! The testbed's node: what a kubelet does for the control plane, over the real API.
//! It registers a `Node` and keeps its Lease fresh, binds pending pods to itself (there
//! is no scheduler), runs the pods bound to it ([`super::pods`]), and serves the cluster
//! DNS and the Service proxy ([`super::services`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::dns;
use super::images::ImageMap;
use super::network::Network;
use super::pods::{NodeContext, PodHandle, PodUpdate};
use super::services::{self, ClusterDns, ServiceCache};

/// How often the node renews its Lease (the kubelet's default) and rewrites its status.
const LEASE_RENEW: Duration = Duration::from_secs(10);
const LEASE_SECONDS: i32 = 40;
const STATUS_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot register node {name}: {source}")]
    Register { name: String, source: kube::Error },
    #[error("the `kubernetes` Service did not appear within 60 s")]
    NoKubernetesService,
    #[error("cannot serve cluster DNS on {addr}: {source}")]
    Dns {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The node's settings (the `run` subcommand's flags).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's own identity (`system:node:<name>`).
    pub kubeconfig: PathBuf,
    /// The identity binding pods (`system:kube-scheduler`): the Node authorizer and the
    /// NodeRestriction plugin forbid a node to bind pods.
    pub scheduler_kubeconfig: PathBuf,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub bridge: String,
    pub netns_prefix: String,
    pub pod_cidr: String,
    pub gateway: Ipv4Addr,
    pub cluster_domain: String,
    pub images: PathBuf,
}

async fn client_from(path: &PathBuf) -> Result<Client, NodeError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| NodeError::Kubeconfig {
        path: path.clone(),
        source,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| err(Box::new(e)))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| err(Box::new(e)))?;
    Client::try_from(config).map_err(|e| err(Box::new(e)))
}

/// Runs the node until `shutdown` resolves, then stops every pod's processes.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let client = client_from(&config.kubeconfig).await?;
    let scheduler = client_from(&config.scheduler_kubeconfig).await?;
    let (cpu, memory) = machine_size();
    register(&client, &config, cpu, memory).await?;
    tracing::info!(node = %config.node_name, "node registered");

    let (cache, _reflectors) = ServiceCache::start(&client);
    let _reflectors = AbortOnDrop(_reflectors);
    cache.ready().await;
    let kubernetes = wait_for_kubernetes_service(&cache).await?;

    let dns_addr = SocketAddr::from((config.gateway, 53));
    let resolver = Arc::new(ClusterDns {
        cache: cache.clone(),
        domain: config.cluster_domain.clone(),
    });
    // Bind before anything runs, so that a port conflict is a start-up error.
    let mut dns = Box::pin(dns::serve(dns_addr, resolver));
    let dns_started = tokio::time::timeout(Duration::from_millis(200), &mut dns).await;
    if let Ok(Err(source)) = dns_started {
        return Err(NodeError::Dns {
            addr: dns_addr,
            source,
        });
    }
    let dns_task = AbortOnDrop(vec![tokio::spawn(async move {
        if let Err(e) = dns.await {
            tracing::error!(error = %e, "cluster DNS stopped");
        }
    })]);
    let proxy_task = AbortOnDrop(vec![tokio::spawn(services::proxy(cache.clone()))]);

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kubelet".to_owned(),
            instance: Some(config.node_name.clone()),
        },
    );
    let ctx = Arc::new(NodeContext {
        client: client.clone(),
        node_name: config.node_name.clone(),
        network: Network::new(&config.bridge, &config.netns_prefix, config.gateway),
        images: ImageMap::new(&config.images),
        pods_dir: config.state_dir.join("pods"),
        self_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("thaw-testbed-node")),
        kubernetes,
        cluster_domain: config.cluster_domain.clone(),
        node_cpu: cpu,
        node_memory: memory,
        recorder,
    });

    let heartbeat = AbortOnDrop(vec![tokio::spawn(heartbeat(
        client.clone(),
        config.clone(),
        cpu,
        memory,
    ))]);
    let binder = AbortOnDrop(vec![tokio::spawn(bind_pending(
        scheduler,
        client.clone(),
        config.node_name.clone(),
    ))]);

    let mut pods: HashMap<String, PodHandle> = HashMap::new();
    let api: Api<Pod> = Api::all(client.clone());
    let selector = format!("spec.nodeName={}", config.node_name);
    let stream = watcher(api, watcher::Config::default().fields(&selector)).default_backoff();
    futures_util::pin_mut!(stream);
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            event = stream.next() => event,
        };
        let Some(event) = event else { break };
        match event {
            Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => {
                apply(&ctx, &mut pods, pod)
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(handle) = pods.get(&pod.uid().unwrap_or_default()) {
                    handle.update(PodUpdate::Gone);
                }
            }
            Ok(watcher::Event::Init) | Ok(watcher::Event::InitDone) => {}
            Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
        }
        pods.retain(|_, h| !h.is_finished());
    }

    tracing::info!(pods = pods.len(), "node stopping; stopping its pods");
    let stops = pods.into_values().map(PodHandle::stop);
    futures_util::future::join_all(stops).await;
    drop((heartbeat, binder, dns_task, proxy_task));
    Ok(())
}

/// A watch event for a pod bound here: start it, or hand its task the new version.
fn apply(ctx: &Arc<NodeContext>, pods: &mut HashMap<String, PodHandle>, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    if let Some(handle) = pods.get(&uid) {
        handle.update(PodUpdate::Current(Arc::new(pod)));
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        // Finished before (or by a previous node): nothing to run.
        return;
    }
    pods.insert(uid, PodHandle::spawn(Arc::clone(ctx), pod));
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

async fn wait_for_kubernetes_service(cache: &ServiceCache) -> Result<(Ipv4Addr, u16), NodeError> {
    for _ in 0..600 {
        if let Some(found) = cache.kubernetes() {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(NodeError::NoKubernetesService)
}

/// CPUs and memory of this machine, reported as the node's capacity.
fn machine_size() -> (f64, f64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024.0)
        })
        .unwrap_or(1024.0 * 1024.0 * 1024.0);
    (cpus, memory)
}

fn node_status(config: &NodeConfig, cpu: f64, memory: f64) -> serde_json::Value {
    let now = Timestamp::now().to_string();
    let resources = json!({
        "cpu": format!("{cpu}"),
        "memory": format!("{}Ki", (memory / 1024.0) as u64),
        "pods": "110",
        "ephemeral-storage": "100Gi",
    });
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("Ready", "True", "KubeletReady", "the testbed's node is posting ready status"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": config.gateway.to_string()},
            {"type": "Hostname", "address": config.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": "thaw-testbed", "systemUUID": "thaw-testbed", "bootID": "thaw-testbed",
            "kernelVersion": kernel_version(), "osImage": "thaw testbed (processes in network namespaces)",
            "containerRuntimeVersion": "thaw-testbed://1", "kubeletVersion": "v1.37.2",
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
        },
    })
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

async fn register(
    client: &Client,
    config: &NodeConfig,
    cpu: f64,
    memory: f64,
) -> Result<(), NodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": config.node_name,
            "labels": {
                "kubernetes.io/hostname": config.node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
                "node.kubernetes.io/instance-type": "thaw-testbed",
            },
        },
        "spec": {"podCIDR": config.pod_cidr, "podCIDRs": [config.pod_cidr]},
        "status": node_status(config, cpu, memory),
    }))
    .unwrap_or_default();
    let err = |source| NodeError::Register {
        name: config.node_name.clone(),
        source,
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(err(e)),
    }
    // Creation may drop status; write it through the status subresource as well.
    write_status(&nodes, config, cpu, memory).await.map_err(err)
}

async fn write_status(
    nodes: &Api<Node>,
    config: &NodeConfig,
    cpu: f64,
    memory: f64,
) -> Result<(), kube::Error> {
    let patch = json!({"status": node_status(config, cpu, memory)});
    nodes
        .patch_status(
            &config.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
}

/// The node's Lease in `kube-node-lease` (what the node lifecycle controller watches)
/// every 10 s, and its status every minute.
async fn heartbeat(client: Client, config: NodeConfig, cpu: f64, memory: f64) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client.clone());
    let mut last_status = tokio::time::Instant::now();
    loop {
        if let Err(e) = renew_lease(&leases, &nodes, &config.node_name).await {
            tracing::warn!(error = %e, "cannot renew the node's lease");
        }
        if last_status.elapsed() >= STATUS_EVERY {
            if let Err(e) = write_status(&nodes, &config, cpu, memory).await {
                tracing::warn!(error = %e, "cannot update node status");
            }
            last_status = tokio::time::Instant::now();
        }
        tokio::time::sleep(LEASE_RENEW).await;
    }
}

async fn renew_lease(
    leases: &Api<Lease>,
    nodes: &Api<Node>,
    name: &str,
) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    match leases.get_opt(name).await? {
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.renew_time = Some(now);
            spec.holder_identity = Some(name.to_owned());
            spec.lease_duration_seconds = Some(LEASE_SECONDS);
            leases.replace(name, &PostParams::default(), &lease).await?;
        }
        None => {
            let node = nodes.get(name).await?;
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some("kube-node-lease".to_owned()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".to_owned(),
                        kind: "Node".to_owned(),
                        name: name.to_owned(),
                        uid: node.uid().unwrap_or_default(),
                        ..OwnerReference::default()
                    }]),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.to_owned()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    renew_time: Some(now),
                    ..LeaseSpec::default()
                }),
            };
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// The scheduler's one job here: every pod without a node is bound to this one.
async fn bind_pending(scheduler: Client, events_client: Client, node_name: String) {
    let api: Api<Pod> = Api::all(scheduler.clone());
    let recorder = Recorder::new(
        events_client,
        Reporter {
            controller: "default-scheduler".to_owned(),
            instance: None,
        },
    );
    let stream =
        watcher(api, watcher::Config::default().fields("spec.nodeName=")).default_backoff();
    futures_util::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let pod = match event {
            Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => pod,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "pending-pod watch failed; retrying");
                continue;
            }
        };
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Node".to_owned()),
                name: Some(node_name.clone()),
                ..ObjectReference::default()
            },
        };
        let pods: Api<Pod> = Api::namespaced(scheduler.clone(), &namespace);
        match pods
            .create_subresource::<Binding, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                let event = Event {
                    type_: EventType::Normal,
                    reason: "Scheduled".to_owned(),
                    note: Some(format!(
                        "Successfully assigned {namespace}/{name} to {node_name}"
                    )),
                    action: "Binding".to_owned(),
                    secondary: None,
                };
                let _ = recorder.publish(&event, &pod.object_ref(&())).await;
            }
            // Already bound, or gone: the next watch event says which.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => {
                tracing::warn!(error = %e, pod = %format!("{namespace}/{name}"), "cannot bind pod")
            }
        }
    }
}
