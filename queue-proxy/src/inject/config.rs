//! What one function's sidecar is told. Knative's controller takes it from the Revision;
//! on plain Kubernetes it comes from the workload (a Deployment): its namespace, its name
//! as both revision and configuration, and its `thaw.dev/*` annotations, the same ones
//! the activator's Kubernetes platform reads.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use thaw_shared::annotations::{AnnotationError, FunctionSettings};

use super::error::{InjectError, Location};
use super::field::{self, Path};

/// Knative's per-revision switch for full-duplex HTTP/1 (`ENABLE_HTTP_FULL_DUPLEX`).
pub const FULL_DUPLEX_ANNOTATION: &str = "features.knative.dev/http-full-duplex";

/// One function's sidecar settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarConfig {
    /// `SERVING_NAMESPACE`. `None` (a manifest without a namespace, applied with
    /// `kubectl -n`) takes the pod's namespace from the downward API instead.
    pub namespace: Option<String>,
    /// `SERVING_REVISION` and `SERVING_CONFIGURATION` (and the user container's
    /// `K_REVISION`, `K_CONFIGURATION`): the Deployment's name.
    pub revision: String,
    /// `SERVING_SERVICE` (and `K_SERVICE`): `thaw.dev/service`, else the Deployment's name.
    pub service: String,
    /// `CONTAINER_CONCURRENCY` (`thaw.dev/container-concurrency`; 0 = unlimited).
    pub container_concurrency: usize,
    /// `REVISION_TIMEOUT_SECONDS` (`thaw.dev/timeout-seconds`, default 300).
    pub timeout_seconds: u64,
    /// `REVISION_RESPONSE_START_TIMEOUT_SECONDS` (`thaw.dev/response-start-timeout-seconds`).
    pub response_start_timeout_seconds: u64,
    /// `REVISION_IDLE_TIMEOUT_SECONDS` (`thaw.dev/idle-timeout-seconds`).
    pub idle_timeout_seconds: u64,
    /// `ENABLE_HTTP_FULL_DUPLEX`: annotation `features.knative.dev/http-full-duplex: Enabled`.
    pub http_full_duplex: bool,
}

impl SidecarConfig {
    /// From a workload's namespace, name and annotations. Every `thaw.dev/*` annotation
    /// is checked, not only those the sidecar uses, so that a typo fails at injection
    /// rather than later in the activator.
    pub fn from_annotations(
        namespace: Option<&str>,
        workload: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Self, AnnotationError> {
        let s = FunctionSettings::from_annotations(annotations)?;
        Ok(Self {
            namespace: namespace.filter(|n| !n.is_empty()).map(str::to_owned),
            revision: workload.to_owned(),
            service: s.service.unwrap_or_else(|| workload.to_owned()),
            container_concurrency: s.container_concurrency,
            timeout_seconds: s.timeout_seconds,
            response_start_timeout_seconds: s.response_start_timeout_seconds,
            idle_timeout_seconds: s.idle_timeout_seconds,
            http_full_duplex: annotations
                .get(FULL_DUPLEX_ANNOTATION)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("enabled")),
        })
    }

    /// For a Pod seen on its own, as the admission webhook sees it: the annotations are
    /// the pod's (its template's), the workload is found from its owner
    /// ([`workload_of_pod`]), and `namespace` (the admission request's) wins over the
    /// pod's own field, which a pod being created may lack.
    pub fn for_pod(pod: &Value, namespace: Option<&str>) -> Result<Self, InjectError> {
        let root = Path::root();
        let pod_map = field::object(pod, &root)?;
        let meta_path = root.key("metadata");
        let empty = Map::new();
        let meta = match field::present(pod_map, "metadata") {
            Some(m) => field::object(m, &meta_path)?,
            None => &empty,
        };
        let own_namespace = field::string(meta, "namespace", &meta_path)?;
        let namespace = namespace.filter(|n| !n.is_empty()).or(own_namespace);
        let workload = workload_of_pod(pod).ok_or_else(|| {
            meta_path.key("name").error(
                "missing: a pod needs a name, a generateName or an owner to name its revision",
            )
        })?;
        let annotations = annotations(meta, &meta_path)?;
        Self::from_annotations(namespace, &workload, &annotations).map_err(|source| {
            InjectError::Annotation {
                at: Location::default(),
                field: meta_path.key("annotations").as_str().to_owned(),
                source: Box::new(source),
            }
        })
    }
}

/// The workload a pod belongs to. A Deployment's pod is owned by a ReplicaSet named
/// `<deployment>-<pod-template-hash>`; any other controller owner (StatefulSet,
/// DaemonSet, a bare ReplicaSet) names it directly; a pod of its own is its own
/// workload (`metadata.name`, or `generateName` without its trailing `-`).
pub fn workload_of_pod(pod: &Value) -> Option<String> {
    let meta = pod.get("metadata")?;
    let owners = meta.get("ownerReferences").and_then(Value::as_array);
    let controller = owners.and_then(|owners| {
        owners
            .iter()
            .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
            .or_else(|| owners.first())
    });
    if let Some(owner) = controller {
        let name = owner.get("name").and_then(Value::as_str).unwrap_or("");
        let kind = owner.get("kind").and_then(Value::as_str).unwrap_or("");
        let hash = meta
            .get("labels")
            .and_then(|l| l.get("pod-template-hash"))
            .and_then(Value::as_str);
        let deployment = match (kind, hash) {
            ("ReplicaSet", Some(hash)) => name
                .strip_suffix(hash)
                .and_then(|n| n.strip_suffix('-'))
                .filter(|n| !n.is_empty()),
            _ => None,
        };
        if let Some(d) = deployment {
            return Some(d.to_owned());
        }
        if !name.is_empty() {
            return Some(name.to_owned());
        }
    }
    let name = meta.get("name").and_then(Value::as_str).unwrap_or("");
    if !name.is_empty() {
        return Some(name.to_owned());
    }
    meta.get("generateName")
        .and_then(Value::as_str)
        .map(|g| g.trim_end_matches('-'))
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
}

/// An object's annotations. Kubernetes requires string values; a number here is a
/// forgotten pair of quotes (`thaw.dev/container-concurrency: "10"`), and says so.
pub(crate) fn annotations(
    meta: &Map<String, Value>,
    at: &Path,
) -> Result<BTreeMap<String, String>, InjectError> {
    let at = at.key("annotations");
    let Some(v) = field::present(meta, "annotations") else {
        return Ok(BTreeMap::new());
    };
    field::object(v, &at)?
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(at.key(k).error(format!(
                "expected a string, got {} (annotation values must be quoted: \"{}\")",
                field::kind_of(other),
                field::shown(other)
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use thaw_shared::annotations as ann;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_knatives_and_every_annotation_is_read() {
        let c = SidecarConfig::from_annotations(Some("ns"), "web", &BTreeMap::new()).unwrap();
        assert_eq!(
            c,
            SidecarConfig {
                namespace: Some("ns".into()),
                revision: "web".into(),
                service: "web".into(),
                container_concurrency: 0,
                timeout_seconds: 300,
                response_start_timeout_seconds: 0,
                idle_timeout_seconds: 0,
                http_full_duplex: false,
            }
        );
        let c = SidecarConfig::from_annotations(
            Some(""),
            "web",
            &map(&[
                (ann::SERVICE, "web-svc"),
                (ann::CONTAINER_CONCURRENCY, "10"),
                (ann::TIMEOUT_SECONDS, "60"),
                (ann::RESPONSE_START_TIMEOUT_SECONDS, "5"),
                (ann::IDLE_TIMEOUT_SECONDS, "7"),
                (FULL_DUPLEX_ANNOTATION, "Enabled"),
            ]),
        )
        .unwrap();
        assert_eq!(c.namespace, None);
        assert_eq!(c.service, "web-svc");
        assert_eq!(
            (
                c.container_concurrency,
                c.timeout_seconds,
                c.response_start_timeout_seconds,
                c.idle_timeout_seconds
            ),
            (10, 60, 5, 7)
        );
        assert!(c.http_full_duplex);
    }

    #[test]
    fn a_huge_number_is_an_error_naming_the_annotation() {
        for (name, value) in [
            (ann::CONTAINER_CONCURRENCY, "99999999999999999999999999"),
            (ann::TIMEOUT_SECONDS, "18446744073709551615"),
            (ann::CONTAINER_CONCURRENCY, "-1"),
            (ann::IDLE_TIMEOUT_SECONDS, "soon"),
        ] {
            let e =
                SidecarConfig::from_annotations(None, "web", &map(&[(name, value)])).unwrap_err();
            assert_eq!(e.name, name);
            assert_eq!(e.value, value);
        }
    }

    #[test]
    fn a_pods_workload_comes_from_its_owner() {
        let pod = json!({"metadata": {
            "generateName": "web-5d4f8b7c9-",
            "labels": {"pod-template-hash": "5d4f8b7c9"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d4f8b7c9", "controller": true}],
            "annotations": {"thaw.dev/container-concurrency": "3"}
        }});
        assert_eq!(workload_of_pod(&pod).as_deref(), Some("web"));
        let c = SidecarConfig::for_pod(&pod, Some("prod")).unwrap();
        assert_eq!(
            (c.namespace.as_deref(), c.revision.as_str()),
            (Some("prod"), "web")
        );
        assert_eq!(c.container_concurrency, 3);

        let sts = json!({"metadata": {"name": "db-0", "namespace": "data",
            "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": true}]}});
        assert_eq!(workload_of_pod(&sts).as_deref(), Some("db"));
        assert_eq!(
            SidecarConfig::for_pod(&sts, None)
                .unwrap()
                .namespace
                .as_deref(),
            Some("data")
        );
        assert_eq!(
            workload_of_pod(&json!({"metadata": {"name": "solo"}})).as_deref(),
            Some("solo")
        );
        assert_eq!(
            workload_of_pod(&json!({"metadata": {"generateName": "job-"}})).as_deref(),
            Some("job")
        );
        assert_eq!(workload_of_pod(&json!({"metadata": {}})), None);
        let e = SidecarConfig::for_pod(&json!({"spec": {}}), None).unwrap_err();
        assert_eq!(e.field(), Some("metadata.name"));
    }

    #[test]
    fn annotations_must_be_strings() {
        let pod = json!({"metadata": {"name": "p", "annotations": {"thaw.dev/container-concurrency": 10}}});
        let e = SidecarConfig::for_pod(&pod, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata.annotations[\"thaw.dev/container-concurrency\"]: expected a string, got a number (annotation values must be quoted: \"10\")"
        );
        let pod = json!({"metadata": {"name": "p", "annotations": {"thaw.dev/container-concurrency": "x"}}});
        let e = SidecarConfig::for_pod(&pod, None).unwrap_err();
        assert!(
            matches!(&e, InjectError::Annotation { source, .. } if source.name == ann::CONTAINER_CONCURRENCY),
            "{e}"
        );
        assert!(
            e.to_string().contains("thaw.dev/container-concurrency"),
            "{e}"
        );
    }
}
