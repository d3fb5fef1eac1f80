//! Knative Serving's real control plane on the testbed, for the drop-in tests: installed
//! by `benches/testbed/knative.sh` (built from the `knative.dev/serving` Go module), with
//! Thaw's data plane or Knative's own Go one as the control group.

use std::fmt;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Api, Client};

use super::{repo_root, Testbed};

/// Knative's system namespace.
pub const SYSTEM_NAMESPACE: &str = "knative-serving";

/// Which data plane the installed Knative runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Images {
    /// `thaw.local/activator` and `thaw.local/queue-proxy`.
    Thaw,
    /// Knative's own Go `activator` and `queue`.
    Knative,
}

impl Images {
    /// The `--images` value of knative.sh.
    pub fn as_arg(self) -> &'static str {
        match self {
            Images::Thaw => "thaw",
            Images::Knative => "knative",
        }
    }

    /// The image Knative's controller puts in every Revision's `queue-proxy` container.
    pub fn queue_image(self) -> &'static str {
        match self {
            Images::Thaw => "thaw.local/queue-proxy",
            Images::Knative => "knative.testbed/queue",
        }
    }

    /// The `activator` Deployment's image.
    pub fn activator_image(self) -> &'static str {
        match self {
            Images::Thaw => "thaw.local/activator",
            Images::Knative => "knative.testbed/activator",
        }
    }
}

impl fmt::Display for Images {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_arg())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KnativeError {
    #[error("cannot run {script}: {source}")]
    Spawn {
        script: String,
        source: std::io::Error,
    },
    #[error("knative.sh {args} failed ({status}); its output:\n{output}")]
    Failed {
        args: String,
        status: String,
        output: String,
    },
}

/// Runs `benches/testbed/knative.sh` against the testbed; returns how long it took and
/// what it printed.
fn run_script(testbed: &Testbed, args: &[String]) -> Result<(Duration, String), KnativeError> {
    let script = repo_root().join("benches/testbed/knative.sh");
    let bin_dir = crate::harness::bin_dir();
    let target = bin_dir
        .parent()
        .map_or_else(|| bin_dir.clone(), |p| p.to_owned());
    let start = Instant::now();
    let output = Command::new(&script)
        .args(args)
        .env("KUBECONFIG", &testbed.kubeconfig)
        .env("THAW_TESTBED_DIR", &testbed.state_dir)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .map_err(|source| KnativeError::Spawn {
            script: script.display().to_string(),
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok((start.elapsed(), text))
    } else {
        Err(KnativeError::Failed {
            args: args.join(" "),
            status: output.status.to_string(),
            output: text,
        })
    }
}

/// Installs (or re-installs with other images or settings) Knative Serving on the
/// testbed and waits until its Deployments are Available. `autoscaler` entries are
/// `config-autoscaler` settings, such as `("stable-window", "6s")`.
pub fn install(
    testbed: &Testbed,
    images: Images,
    autoscaler: &[(&str, &str)],
) -> Result<Duration, KnativeError> {
    let mut args = vec!["--images".to_owned(), images.as_arg().to_owned()];
    for (k, v) in autoscaler {
        args.push("--autoscaler".to_owned());
        args.push(format!("{k}={v}"));
    }
    run_script(testbed, &args).map(|(took, _)| took)
}

/// Removes Knative Serving (its Knative Services first).
pub fn uninstall(testbed: &Testbed) -> Result<Duration, KnativeError> {
    run_script(testbed, &["--delete".to_owned()]).map(|(took, _)| took)
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("serving.knative.dev", "v1", kind),
        plural,
    )
}

/// `serving.knative.dev/v1` Services (ksvc) in a namespace.
pub fn services(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &resource("Service", "services"))
}

/// `serving.knative.dev/v1` Revisions in a namespace.
pub fn revisions(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &resource("Revision", "revisions"),
    )
}

/// The status of condition `type_` on a Knative object: `Some("True")` etc.
pub fn condition(object: &DynamicObject, type_: &str) -> Option<String> {
    object
        .data
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(|t| t.as_str()) == Some(type_))?
        .get("status")?
        .as_str()
        .map(str::to_owned)
}

/// The message of condition `type_`, for failure reports.
pub fn condition_message(object: &DynamicObject, type_: &str) -> String {
    object
        .data
        .pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .and_then(|c| {
            c.iter()
                .find(|c| c.get("type").and_then(|t| t.as_str()) == Some(type_))
        })
        .map(|c| {
            format!(
                "{}: {} {}",
                c.get("status").and_then(|s| s.as_str()).unwrap_or("?"),
                c.get("reason").and_then(|s| s.as_str()).unwrap_or(""),
                c.get("message").and_then(|s| s.as_str()).unwrap_or("")
            )
        })
        .unwrap_or_else(|| "no such condition".to_owned())
}

/// The name of the ksvc's latest created Revision, once Knative has made one.
pub async fn latest_revision(client: &Client, namespace: &str, service: &str) -> Option<String> {
    let ksvc = services(client, namespace).get_opt(service).await.ok()??;
    ksvc.data
        .pointer("/status/latestCreatedRevisionName")?
        .as_str()
        .map(str::to_owned)
}

/// Whether the Revision's `Ready` condition is `True`.
pub async fn revision_ready(client: &Client, namespace: &str, revision: &str) -> bool {
    match revisions(client, namespace).get_opt(revision).await {
        Ok(Some(rev)) => condition(&rev, "Ready").as_deref() == Some("True"),
        _ => false,
    }
}

/// Whether a pod is Ready and not being deleted.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod's IP, once it has one.
pub fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

/// Pods matching a label selector.
pub async fn pods(client: &Client, namespace: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// A Revision's pods (Knative labels them `serving.knative.dev/revision`).
pub async fn revision_pods(client: &Client, namespace: &str, revision: &str) -> Vec<Pod> {
    pods(
        client,
        namespace,
        &format!("serving.knative.dev/revision={revision}"),
    )
    .await
}

/// The IPs of the Ready `activator` pods (Knative's `app=activator` label).
pub async fn activator_ips(client: &Client) -> Vec<IpAddr> {
    pods(client, SYSTEM_NAMESPACE, "app=activator")
        .await
        .iter()
        .filter(|p| pod_ready(p))
        .filter_map(pod_ip)
        .collect()
}
