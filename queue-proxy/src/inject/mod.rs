//! Sidecar injection, like `linkerd inject`: a pure transform over Kubernetes objects held
//! as `serde_json::Value` (no client, no I/O), used by `queue-proxy inject` on YAML
//! streams and by the admission webhook on single Pods.
//!
//! # Entry points
//! - [`inject_pod`] / [`injected_pod`]: one Pod or pod template (`metadata` + `spec`);
//!   [`inject_requested`] decides opt-in from its labels (`thaw.dev/inject: enabled`),
//!   [`has_sidecar`] tells whether it has the sidecar already, and
//!   [`SidecarConfig::for_pod`] reads what a Pod on its own says about its function.
//! - [`inject_stream`] / [`inject_stream_with_report`]: a multi-document YAML stream.
//!
//! # The reference
//! The sidecar and the pod are what Knative Serving's controller builds for a Revision,
//! read from Knative Serving **v1.23** (`knative-v1.23.0-5-g98e5ef90aa`):
//! `pkg/reconciler/revision/resources/queue.go` (`makeQueueContainer`,
//! `applyReadinessProbeDefaults`), `deploy.go` (`makePodSpec`, `makeServingContainer`,
//! `makeContainer`, `BuildPodSpec`), `meta.go` (`podAnnotations`), and the webhook's
//! `pkg/apis/serving/v1/revision_defaults.go` and `k8s_validation.go`, which run before the
//! controller ever sees a Revision; `knative.dev/pkg` for the observability defaults.
//! Unit tests compare each piece with what those files (and their tests) build.
//!
//! Knative's Revision maps onto the workload: the namespace is the Deployment's, the
//! Deployment's name is both revision and configuration (`SERVING_REVISION`,
//! `SERVING_CONFIGURATION`, `K_REVISION`, `K_CONFIGURATION`), and the Service
//! (`thaw.dev/service`, default the Deployment's name) is the service (`SERVING_SERVICE`,
//! `K_SERVICE`). `CONTAINER_CONCURRENCY` and the three timeouts come from the
//! `thaw.dev/*` annotations ([`SidecarConfig`]).
//!
//! What injection does:
//! - **the sidecar** `queue-proxy` is appended (or, present already, updated in place):
//!   Knative's 27 env variables in Knative's order (`SERVING_POD`, `SERVING_POD_IP` and
//!   `HOST_IP` from the downward API); ports `http-autometric` 9090, `http-usermetric`
//!   9091, `queue-port` 8012 (8013 when the user port is named `h2c`) and `https-port`
//!   8112 (like Knative, the admin port 8022 is not listed; the preStop hook names it by
//!   number); a readiness probe with the user probe's timing asking `:8012` with
//!   `K-Network-Probe: queue`; Knative's security context (no privilege escalation, all
//!   capabilities dropped, read-only root, non-root, `RuntimeDefault` seccomp);
//!   [`InjectSettings::resources`] (Knative's default: 25m CPU requested);
//! - **the serving container** gets Knative's single port `user-port`, `PORT`, `K_REVISION`,
//!   `K_CONFIGURATION`, `K_SERVICE`, a `preStop` `httpGet :8022/wait-for-drain` (on the
//!   user container, as Knative: the kubelet holds its SIGTERM until the sidecar has
//!   drained), `terminationMessagePolicy: FallbackToLogsOnError`, no `stdin`/`tty`, its
//!   liveness probe pointed at the user port, and loses its HTTP/TCP/gRPC readiness probe,
//!   which moves into `SERVING_READINESS_PROBE` after Knative's webhook defaults
//!   (`successThreshold: 1`, a TCP probe when there is none), aimed at `127.0.0.1` and
//!   encoded byte for byte as Go's `encoding/json` does; an exec probe stays on the
//!   container and the sidecar checks the port instead;
//! - **the pod** gets `terminationGracePeriodSeconds` covering the drain, and the
//!   annotation `kubectl.kubernetes.io/default-container` naming the serving container.
//!
//! Injecting twice changes nothing. What the first injection moved away (the readiness
//! probe, the `h2c` protocol) is read back from the existing sidecar's
//! `SERVING_READINESS_PROBE` and `QUEUE_SERVING_PORT`; the sidecar's fields Knative sets
//! are replaced, the rest of it (an operator's volume mounts, env variables Thaw does not
//! own, the API server's defaults) is kept.
//!
//! Which container serves: the only one besides the sidecar; else the one named by
//! `kubectl.kubernetes.io/default-container`; else, as Knative, the only one declaring
//! ports. Anything else (two containers with ports, or none) is an error saying so.
//!
//! # Deliberate differences from Knative's controller
//! On input Knative accepts, the pod is Knative's except for the points marked
//! **[beyond]**, where plain Deployments need more than a Revision allows, and the
//! points marked *not done*.
//! - `SERVING_NAMESPACE` comes from the downward API (`metadata.namespace`) when the
//!   manifest names no namespace (it is applied with `kubectl -n`); same value at run time.
//! - `SYSTEM_NAMESPACE` is Thaw's namespace (`thaw-system`), not `knative-serving`.
//! - `OBSERVABILITY_CONFIG` is Knative's default without `requestLogTemplate`: Knative logs
//!   requests only with `enableRequestLog`, Thaw's queue-proxy takes a template alone as
//!   "log requests" ([`DEFAULT_OBSERVABILITY_CONFIG`]).
//! - **[beyond]** `terminationGracePeriodSeconds` is the larger of the revision timeout
//!   (Knative's value), the sidecar's drain quiet period, and what the pod already asks
//!   for; Knative overwrites it with the timeout, which with a short timeout cuts the
//!   30 s drain short.
//! - **[beyond]** `PORT`, which Knative reserves, is kept when set; a literal `PORT` is the
//!   user port when no port is declared; a `PORT` that disagrees with the declared port is
//!   an error (the app would listen where the sidecar does not forward).
//! - **[beyond]** a `postStart` hook is kept (Knative replaces the whole `lifecycle`, which
//!   it forbids); a user `preStop` hook is replaced by the drain hook.
//! - **[beyond]** a container with several ports (Knative refuses them) keeps them all,
//!   the first being the user port; its liveness probe's port is only filled in when
//!   unset. With one port, a startup probe naming it by name is renumbered (the name
//!   disappears with Knative's rename to `user-port`).
//! - **[beyond]** a probe port given by name is looked up in the container's ports
//!   (Knative reads a name as "the user port", the same for the one port it allows).
//! - **[beyond]** other containers (a mesh's sidecar, a log shipper) are left alone;
//!   Knative gives every user container the drain hook and the `K_*` variables, and takes
//!   their readiness probes away (they only come back with its multi-container probing).
//! - `THAW_DRAIN_QUIET_PERIOD` is added only when [`InjectSettings::drain_quiet_period`] is
//!   not Knative's 30 s.
//! - *Not done*, being cluster policy or Deployment fields rather than the sidecar:
//!   `enableServiceLinks: false`, the spread-over-nodes anti-affinity, the feature-gated
//!   volumes (pod-info, service account tokens, system-internal TLS certificates), `/var/log`
//!   collection, `queue.sidecar.serving.knative.dev/*` resource annotations, multi-container
//!   probing, and `MakeDeployment`'s replicas, strategy, labels and owner references.
//!
//! # Streams
//! Every non-empty document is read (Go's YAML 1.1 rules, as Kubernetes reads it:
//! `0644` is octal, `yes` a boolean). `List` and `*List` items are visited one by one.
//! `Deployment`, `ReplicaSet`, `StatefulSet` and `DaemonSet` ([`WORKLOAD_KINDS`]) whose pod
//! template has the label are injected, and so is a labelled `Pod`; a labelled `Job` or
//! `CronJob` is an error (its pods would never complete). The annotations are the
//! workload's, where the Kubernetes platform reads them, with the pod template's filling
//! in names the workload lacks. Then each injected workload's Service, if it is in the
//! stream, gets every port that reached the user container (`targetPort` a number, the
//! port's name, or `port` without `targetPort`) pointed at the sidecar's serving port; a
//! Service none of whose ports reaches it is an error.
//!
//! Every other document passes through with the same content, but not the same text:
//! keys come out sorted, comments and empty documents are dropped, anchors are expanded,
//! numbers are written plainly (`0644` as `420`), and strings are quoted where Go's YAML
//! would read them as something else. Errors name the document (1 = the first non-empty
//! one), the object and the field.

mod config;
mod error;
mod field;
mod pod;
mod probe;
mod serving;
mod settings;
mod sidecar;
mod stream;

pub use config::{workload_of_pod, SidecarConfig, FULL_DUPLEX_ANNOTATION};
pub use error::{InjectError, Location};
pub use pod::{has_sidecar, inject_pod, inject_requested, injected_pod};
pub use serving::{DEFAULT_CONTAINER_ANNOTATION, DEFAULT_USER_PORT, USER_PORT_NAME};
pub use settings::{
    InjectSettings, DEFAULT_DRAIN_QUIET_PERIOD, DEFAULT_IMAGE, DEFAULT_OBSERVABILITY_CONFIG,
    IMAGE_ENV,
};
pub use sidecar::{
    ADMIN_PORT, CONTAINER_NAME, DRAIN_PATH, H2C_SERVING_PORT, METRICS_PORT, RESERVED_PORTS,
    SERVING_PORT, TLS_PORT, USER_METRICS_PORT,
};
pub use stream::{inject_stream, inject_stream_with_report, Report, WORKLOAD_KINDS};

#[cfg(test)]
mod tests;
