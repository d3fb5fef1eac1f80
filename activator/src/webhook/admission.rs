//! AdmissionReview v1 in, AdmissionReview v1 out: which pods get the sidecar, with which
//! settings, and the JSON Patch (RFC 6902) that adds it.
//!
//! The webhook mutates; it never denies. Every answer is `allowed: true`, with a
//! `JSONPatch` only when the pod changes, and `warnings` (which the API server passes
//! on to whoever created the pod) when something was not done as asked.
//!
//! A pod is injected when all of these hold, else passed through untouched:
//! - the request is a CREATE of a core/v1 Pod (anything else is a misconfigured webhook
//!   rule: allowed with a warning saying so);
//! - it is not one of Thaw's own: not in the webhook's namespace, not labelled
//!   `app.kubernetes.io/part-of: thaw`;
//! - it opts in (label `thaw.dev/inject: enabled`; the configuration's `objectSelector`
//!   already filters on it, this is checked again for a hand-written configuration);
//! - it has no `queue-proxy` container yet (a pod injected by `queue-proxy inject`, or
//!   one re-submitted, gets no patch).
//!
//! The sidecar's settings come from the pod's own `thaw.dev/*` annotations when it has
//! any; else from its owner's: a ReplicaSet's pod is looked up to its Deployment
//! ([`super::owner`]), whose annotations are the ones the activator reads. If that
//! lookup fails the pod is still injected, with the defaults, and a warning says so.
//! A bad annotation (the pod's or the workload's) is dropped for this pod, its default
//! applying, and named in a warning: an opted-in pod left without its sidecar could
//! never be reached. (The activators, reading the same annotation, keep their last good
//! settings and record an Event.) A pod the transform cannot inject at all (two
//! containers with ports, say) is passed through with the reason as a warning.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};
use thaw_queue_proxy::inject::{
    has_sidecar, inject_requested, injected_pod, InjectError, InjectSettings, SidecarConfig,
};
use thaw_shared::annotations::opted_in;

use super::owner::{OwnerError, Workload};

/// The only AdmissionReview version this webhook is configured for.
pub const V1: &str = "admission.k8s.io/v1";
/// The label every Thaw component carries; such pods are never injected.
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";
pub const PART_OF_THAW: &str = "thaw";

/// An AdmissionReview as the API server sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    /// The version to answer with: the request's, when it is an admission.k8s.io one.
    pub api_version: String,
    pub request: Request,
    /// Set when the review is not a v1 AdmissionReview: it is answered, never mutated.
    pub unsupported: Option<String>,
}

/// The part of an AdmissionRequest the webhook reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    #[serde(default)]
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub object: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawReview {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    request: Option<Request>,
}

/// Why a body is not an AdmissionReview at all (answered 400).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the body is not an AdmissionReview: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the AdmissionReview's request has no uid")]
    NoUid,
}

/// Reads an AdmissionReview. A well-formed review of another kind or version is not an
/// error: it is answered (allowed, with a warning), since an error would be a failed
/// call, and with `failurePolicy: Fail` that would block pods.
pub fn decode(body: &[u8]) -> Result<Review, DecodeError> {
    let raw: RawReview = serde_json::from_slice(body)?;
    let request = raw.request.ok_or(DecodeError::NoRequest)?;
    if request.uid.is_empty() {
        return Err(DecodeError::NoUid);
    }
    let version = raw.api_version.unwrap_or_default();
    let kind = raw.kind.unwrap_or_default();
    let unsupported = (version != V1 || kind != "AdmissionReview").then(|| {
        format!(
            "expected a {V1} AdmissionReview, got {} {}; set admissionReviewVersions: [v1]",
            if version.is_empty() {
                "(no apiVersion)"
            } else {
                &version
            },
            if kind.is_empty() { "(no kind)" } else { &kind },
        )
    });
    let api_version = if version.starts_with("admission.k8s.io/") {
        version
    } else {
        V1.to_owned()
    };
    Ok(Review {
        api_version,
        request,
        unsupported,
    })
}

/// What happened to one pod, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Passed through on purpose (not opted in, Thaw's own, already injected, …).
    Skipped(&'static str),
    /// Asked for, but not done; the warning says why.
    NotInjected,
}

/// The answer to one review.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub outcome: Outcome,
    /// RFC 6902 operations, `None` when the pod is left as it is.
    pub patch: Option<json_patch::Patch>,
    pub warnings: Vec<String>,
}

impl Answer {
    fn skipped(why: &'static str) -> Self {
        Self {
            outcome: Outcome::Skipped(why),
            patch: None,
            warnings: Vec::new(),
        }
    }

    fn warned(outcome: Outcome, warning: String) -> Self {
        Self {
            outcome,
            patch: None,
            warnings: vec![format!("thaw-webhook: {warning}")],
        }
    }

    /// The AdmissionReview to send back.
    pub fn to_review(&self, review: &Review) -> Value {
        use base64::Engine as _;
        let mut response = json!({"uid": review.request.uid, "allowed": true});
        if let Some(patch) = &self.patch {
            let bytes = serde_json::to_vec(patch).unwrap_or_default();
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        if !self.warnings.is_empty() {
            response["warnings"] = json!(self.warnings);
        }
        json!({
            "apiVersion": review.api_version,
            "kind": "AdmissionReview",
            "response": response,
        })
    }
}

/// What the webhook knows about itself.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The webhook's own namespace, never injected.
    pub own_namespace: String,
    pub settings: InjectSettings,
}

/// After [`examine`]: inject, reading the settings from the owner ReplicaSet's
/// workload first when `owner` names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub owner: Option<String>,
}

/// Decides whether the pod is to be injected, and whether its settings must be looked
/// up; `Err` is the final answer (passed through).
pub fn examine(review: &Review, policy: &Policy) -> Result<Plan, Answer> {
    if let Some(problem) = &review.unsupported {
        return Err(Answer::warned(Outcome::NotInjected, problem.clone()));
    }
    let r = &review.request;
    let k = &r.kind;
    if !(k.group.is_empty() && k.version == "v1" && k.kind == "Pod") {
        return Err(Answer::warned(
            Outcome::NotInjected,
            format!(
                "only core/v1 Pods are injected, got {}{}/{} {}; check the webhook's rules",
                k.group,
                if k.group.is_empty() { "core" } else { "" },
                k.version,
                k.kind
            ),
        ));
    }
    if r.operation.as_deref() != Some("CREATE") {
        return Err(Answer::warned(
            Outcome::NotInjected,
            format!(
                "only pods being created are injected, got {}; check the webhook's rules",
                r.operation.as_deref().unwrap_or("no operation")
            ),
        ));
    }
    if r.sub_resource.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(Answer::skipped("a subresource"));
    }
    let Some(pod) = r.object.as_ref().filter(|o| o.is_object()) else {
        return Err(Answer::warned(
            Outcome::NotInjected,
            "the request carries no pod".to_owned(),
        ));
    };
    let meta = pod.get("metadata").cloned().unwrap_or(Value::Null);
    let namespace = namespace_of(review);
    if namespace == policy.own_namespace {
        return Err(Answer::skipped("in Thaw's own namespace"));
    }
    let labels = meta.get("labels");
    if labels
        .and_then(|l| l.get(PART_OF_LABEL))
        .and_then(Value::as_str)
        == Some(PART_OF_THAW)
    {
        return Err(Answer::skipped("one of Thaw's own pods"));
    }
    if !inject_requested(&meta) {
        return Err(Answer::skipped("not opted in"));
    }
    if pod.get("spec").is_some_and(has_sidecar) {
        return Err(Answer::skipped("has the sidecar already"));
    }
    let owner = if opted_in(&string_annotations(&meta)) {
        None
    } else {
        replica_set_owner(&meta)
    };
    Ok(Plan { owner })
}

/// The pod with the sidecar, as a patch. `owner` is the lookup [`examine`] asked for.
pub fn inject(
    review: &Review,
    owner: Option<Result<Workload, OwnerError>>,
    policy: &Policy,
) -> Answer {
    let Some(pod) = review.request.object.as_ref() else {
        return Answer::warned(Outcome::NotInjected, "the request carries no pod".into());
    };
    let namespace = namespace_of(review);
    let ns = (!namespace.is_empty()).then_some(namespace);
    let mut warnings = Vec::new();
    let config = match owner {
        Some(Ok(workload)) => {
            let meta = pod.get("metadata").cloned().unwrap_or(Value::Null);
            // The workload's annotations, with the pod's filling in names it lacks: the
            // same precedence as `queue-proxy inject` on a manifest.
            let mut merged = string_annotations(&meta);
            merged.extend(workload.annotations.clone());
            // A bad annotation must not leave an opted-in pod without its sidecar: the
            // activators could never reach it. Each bad one is dropped (its default
            // applies to this pod) and named in a warning; the activators keep their
            // last good settings and record an Event on the workload.
            loop {
                match SidecarConfig::from_annotations(ns, &workload.name, &merged) {
                    Err(e) if merged.remove(e.name).is_some() => warnings.push(format!(
                        "thaw-webhook: {} {}: {e}; injected with its default",
                        workload.kind, workload.name
                    )),
                    other => {
                        break other.map_err(|e| {
                            format!("not injected: {} {}: {e}", workload.kind, workload.name)
                        })
                    }
                }
            }
        }
        Some(Err(e)) => {
            warnings.push(format!(
                "thaw-webhook: could not read the owner's thaw.dev/* annotations ({e}); injected with the defaults"
            ));
            config_for_pod(pod, ns, &mut warnings)
        }
        None => config_for_pod(pod, ns, &mut warnings),
    };
    let config = match config {
        Ok(c) => c,
        Err(message) => {
            let mut a = Answer::warned(Outcome::NotInjected, message);
            a.warnings.splice(0..0, warnings);
            return a;
        }
    };
    match injected_pod(pod, &config, &policy.settings) {
        Ok(after) => {
            let patch = json_patch::diff(pod, &after);
            Answer {
                outcome: if patch.0.is_empty() {
                    Outcome::Skipped("unchanged by injection")
                } else {
                    Outcome::Injected
                },
                patch: (!patch.0.is_empty()).then_some(patch),
                warnings,
            }
        }
        Err(e) => {
            let mut a = Answer::warned(Outcome::NotInjected, format!("not injected: {e}"));
            a.warnings.splice(0..0, warnings);
            a
        }
    }
}

/// [`SidecarConfig::for_pod`], with each bad `thaw.dev/*` annotation of the pod dropped
/// (its default applies) and named in a warning, as for a workload's: an opted-in pod
/// left without its sidecar could never be reached.
fn config_for_pod(
    pod: &Value,
    ns: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<SidecarConfig, String> {
    let mut pod = std::borrow::Cow::Borrowed(pod);
    loop {
        match SidecarConfig::for_pod(&pod, ns) {
            Err(InjectError::Annotation { source, .. }) => {
                // Each round removes one annotation, so this ends.
                let removed = pod
                    .to_mut()
                    .pointer_mut("/metadata/annotations")
                    .and_then(Value::as_object_mut)
                    .and_then(|a| a.remove(source.name));
                if removed.is_none() {
                    return Err(format!("not injected: {source}"));
                }
                warnings.push(format!(
                    "thaw-webhook: pod: {source}; injected with its default"
                ));
            }
            other => return other.map_err(|e| format!("not injected: {e}")),
        }
    }
}

/// The pod's namespace: the request's (a pod being created often has none itself).
fn namespace_of(review: &Review) -> &str {
    review
        .request
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            review
                .request
                .object
                .as_ref()?
                .pointer("/metadata/namespace")?
                .as_str()
        })
        .unwrap_or("")
}

/// The annotations with string values (the API server has already refused others).
fn string_annotations(meta: &Value) -> BTreeMap<String, String> {
    meta.get("annotations")
        .and_then(Value::as_object)
        .map(|a| {
            a.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The ReplicaSet managing the pod, if that is what manages it.
fn replica_set_owner(meta: &Value) -> Option<String> {
    meta.get("ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
        .filter(|o| {
            o.get("kind").and_then(Value::as_str) == Some("ReplicaSet")
                && o.get("apiVersion")
                    .and_then(Value::as_str)
                    .is_some_and(|v| v.starts_with("apps/"))
        })
        .and_then(|o| o.get("name")?.as_str())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            own_namespace: "thaw-system".into(),
            settings: InjectSettings::with_image("thaw.local/queue-proxy"),
        }
    }

    fn pod(labels: Value, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": "web-5d4f8b7c9-",
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-5d4f8b7c9", "uid": "1", "controller": true}]
            },
            "spec": {"containers": [{
                "name": "app", "image": "thaw.local/testapp",
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}
            }]}
        })
    }

    fn opted(annotations: Value) -> Value {
        pod(
            json!({"app": "web", "pod-template-hash": "5d4f8b7c9", "thaw.dev/inject": "enabled"}),
            annotations,
        )
    }

    fn review_of(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "prod", "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object, "oldObject": null, "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        }))
        .unwrap()
    }

    fn review(object: Value) -> Review {
        decode(&review_of(object)).unwrap()
    }

    /// Applies the answer's patch the way the API server does, to the object it sent.
    fn patched(review: &Review, answer: &Answer) -> Value {
        let mut pod = review.request.object.clone().unwrap();
        json_patch::patch(&mut pod, answer.patch.as_ref().unwrap()).unwrap();
        pod
    }

    fn container_names(pod: &Value) -> Vec<&str> {
        pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    fn env<'a>(pod: &'a Value, name: &str) -> Option<&'a str> {
        pod["spec"]["containers"][1]["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)?["value"]
            .as_str()
    }

    #[test]
    fn decodes_a_real_admission_review() {
        let r = review(opted(json!({})));
        assert_eq!(r.api_version, V1);
        assert_eq!(r.request.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r.request.namespace.as_deref(), Some("prod"));
        assert_eq!(r.request.kind.kind, "Pod");
        assert_eq!(r.unsupported, None);
    }

    #[test]
    fn bad_bodies_are_errors_with_a_reason() {
        assert!(matches!(decode(b"{not json"), Err(DecodeError::Json(_))));
        assert!(matches!(decode(b"\"text\""), Err(DecodeError::Json(_))));
        assert!(matches!(decode(b"[]"), Err(DecodeError::NoRequest)));
        assert!(matches!(
            decode(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
            Err(DecodeError::NoRequest)
        ));
        assert!(matches!(
            decode(br#"{"request":{"uid":""}}"#),
            Err(DecodeError::NoUid)
        ));
        let e = decode(br#"{"request":{"kind":"Pod"}}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the body is not an AdmissionReview"),
            "{e}"
        );
    }

    #[test]
    fn another_version_is_answered_in_its_own_version_with_a_warning() {
        let r = decode(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u","object":{}}}"#).unwrap();
        assert_eq!(r.api_version, "admission.k8s.io/v1beta1");
        let a = examine(&r, &policy()).unwrap_err();
        assert_eq!(a.patch, None);
        assert!(
            a.warnings[0].contains(
                "expected a admission.k8s.io/v1 AdmissionReview, got admission.k8s.io/v1beta1"
            ),
            "{:?}",
            a.warnings
        );
        let out = a.to_review(&r);
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1beta1");
        assert_eq!(
            out["response"],
            json!({"uid": "u", "allowed": true, "warnings": a.warnings})
        );

        let r = decode(br#"{"apiVersion":"v1","kind":"Pod","request":{"uid":"u"}}"#).unwrap();
        assert_eq!(r.api_version, V1);
        assert!(r.unsupported.unwrap().contains("got v1 Pod"));
    }

    #[test]
    fn an_opted_in_pod_gets_the_sidecar_as_a_patch() {
        let r = review(opted(json!({"thaw.dev/container-concurrency": "3"})));
        let plan = examine(&r, &policy()).unwrap();
        assert_eq!(plan, Plan { owner: None }, "its own annotations: no lookup");
        let a = inject(&r, None, &policy());
        assert_eq!(a.outcome, Outcome::Injected);
        assert!(a.warnings.is_empty(), "{:?}", a.warnings);
        let after = patched(&r, &a);
        assert_eq!(container_names(&after), ["app", "queue-proxy"]);
        assert_eq!(
            after["spec"]["containers"][1]["image"],
            "thaw.local/queue-proxy"
        );
        assert_eq!(env(&after, "CONTAINER_CONCURRENCY"), Some("3"));
        assert_eq!(env(&after, "SERVING_REVISION"), Some("web"));
        assert_eq!(env(&after, "SERVING_NAMESPACE"), Some("prod"));
        // Exactly what the transform builds, nothing lost or added by the diff.
        let config =
            SidecarConfig::for_pod(r.request.object.as_ref().unwrap(), Some("prod")).unwrap();
        let expected = injected_pod(
            r.request.object.as_ref().unwrap(),
            &config,
            &policy().settings,
        )
        .unwrap();
        assert_eq!(after, expected);

        let out = a.to_review(&r);
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(out["response"]["uid"], r.request.uid);
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        let ops: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(&ops, a.patch.as_ref().unwrap());
    }

    #[test]
    fn the_patch_is_small_and_escapes_keys() {
        let r = review(opted(json!({"thaw.dev/timeout-seconds": "60"})));
        let a = inject(&r, None, &policy());
        let ops = serde_json::to_value(a.patch.as_ref().unwrap()).unwrap();
        let paths: Vec<&str> = ops
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&"/spec/containers/1"), "{paths:?}");
        assert!(
            paths.contains(&"/metadata/annotations/kubectl.kubernetes.io~1default-container"),
            "{paths:?}"
        );
        // The sidecar is one `add`, not a field-by-field build.
        assert!(
            !paths.iter().any(|p| p.starts_with("/spec/containers/1/")),
            "{paths:?}"
        );
    }

    #[test]
    fn settings_come_from_the_owner_when_the_pod_has_none() {
        let r = review(opted(json!({})));
        let plan = examine(&r, &policy()).unwrap();
        assert_eq!(plan.owner.as_deref(), Some("web-5d4f8b7c9"));
        let workload = Workload {
            kind: "Deployment",
            name: "web".into(),
            annotations: [
                ("thaw.dev/container-concurrency".to_owned(), "7".to_owned()),
                ("thaw.dev/service".to_owned(), "web-svc".to_owned()),
            ]
            .into(),
        };
        let a = inject(&r, Some(Ok(workload)), &policy());
        assert_eq!(a.outcome, Outcome::Injected);
        let after = patched(&r, &a);
        assert_eq!(env(&after, "CONTAINER_CONCURRENCY"), Some("7"));
        assert_eq!(env(&after, "SERVING_SERVICE"), Some("web-svc"));
    }

    #[test]
    fn a_failed_lookup_injects_the_defaults_and_says_so() {
        let r = review(opted(json!({})));
        let a = inject(&r, Some(Err(OwnerError::Timeout)), &policy());
        assert_eq!(a.outcome, Outcome::Injected);
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("could not read the owner's thaw.dev/* annotations (no answer from the API server within 2s); injected with the defaults"), "{:?}", a.warnings);
        let after = patched(&r, &a);
        assert_eq!(env(&after, "CONTAINER_CONCURRENCY"), Some("0"));
        assert_eq!(env(&after, "SERVING_REVISION"), Some("web"));
    }

    #[test]
    fn a_bad_annotation_is_named_and_falls_back_to_its_default() {
        // On the pod: the other annotations still apply.
        let r = review(opted(json!({
            "thaw.dev/container-concurrency": "many",
            "thaw.dev/timeout-seconds": "soon",
            "thaw.dev/idle-timeout-seconds": "9",
        })));
        let a = inject(&r, None, &policy());
        assert_eq!(a.outcome, Outcome::Injected);
        assert_eq!(a.warnings.len(), 2, "{:?}", a.warnings);
        assert!(
            a.warnings
                .iter()
                .any(|w| w.contains("thaw.dev/container-concurrency")
                    && w.ends_with("injected with its default"))
                && a.warnings
                    .iter()
                    .any(|w| w.contains("thaw.dev/timeout-seconds")),
            "{:?}",
            a.warnings
        );
        let after = patched(&r, &a);
        assert_eq!(env(&after, "CONTAINER_CONCURRENCY"), Some("0"));
        assert_eq!(env(&after, "REVISION_TIMEOUT_SECONDS"), Some("300"));
        assert_eq!(env(&after, "REVISION_IDLE_TIMEOUT_SECONDS"), Some("9"));
        // The pod itself keeps what it was given: only the sidecar's settings fall back.
        assert_eq!(
            after["metadata"]["annotations"]["thaw.dev/container-concurrency"],
            "many"
        );
        let w = Workload {
            kind: "Deployment",
            name: "web".into(),
            annotations: [("thaw.dev/min-scale".to_owned(), "-1".to_owned())].into(),
        };
        // A bad annotation on the Deployment: the sidecar is still injected (an
        // opted-in pod without it could never be reached), with that field's default.
        let a = inject(&review(opted(json!({}))), Some(Ok(w)), &policy());
        assert_eq!(a.outcome, Outcome::Injected);
        assert!(
            a.warnings[0].contains("Deployment web")
                && a.warnings[0].contains("thaw.dev/min-scale")
                && a.warnings[0].contains("injected with its default"),
            "{:?}",
            a.warnings
        );
    }

    #[test]
    fn a_pod_injection_cannot_handle_is_passed_with_the_reason() {
        let mut p = opted(json!({"thaw.dev/target": "10"}));
        p["spec"]["containers"] = json!([
            {"name": "a", "image": "x", "ports": [{"containerPort": 1}]},
            {"name": "b", "image": "y", "ports": [{"containerPort": 2}]}
        ]);
        let a = inject(&review(p), None, &policy());
        assert_eq!(
            (a.outcome.clone(), a.patch.clone()),
            (Outcome::NotInjected, None)
        );
        assert!(
            a.warnings[0].starts_with("thaw-webhook: not injected: "),
            "{:?}",
            a.warnings
        );
    }

    #[test]
    fn opt_outs_pass_untouched() {
        let p = policy();
        // No label.
        let r = review(pod(json!({"app": "web"}), json!({})));
        assert_eq!(
            examine(&r, &p).unwrap_err(),
            Answer::skipped("not opted in")
        );
        // Another value.
        let r = review(pod(json!({"thaw.dev/inject": "disabled"}), json!({})));
        assert_eq!(
            examine(&r, &p).unwrap_err().outcome,
            Outcome::Skipped("not opted in")
        );
        // Thaw's own namespace, even when labelled.
        let mut raw: Value = serde_json::from_slice(&review_of(opted(json!({})))).unwrap();
        raw["request"]["namespace"] = json!("thaw-system");
        let r = decode(&serde_json::to_vec(&raw).unwrap()).unwrap();
        assert_eq!(
            examine(&r, &p).unwrap_err().outcome,
            Outcome::Skipped("in Thaw's own namespace")
        );
        // Thaw's own pods, anywhere.
        let r = review(pod(
            json!({"thaw.dev/inject": "enabled", "app.kubernetes.io/part-of": "thaw"}),
            json!({}),
        ));
        assert_eq!(
            examine(&r, &p).unwrap_err().outcome,
            Outcome::Skipped("one of Thaw's own pods")
        );
        // Not a pod, not a create, a subresource, no object.
        for (field, value) in [
            (
                "kind",
                json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
            ),
            ("operation", json!("UPDATE")),
            ("subResource", json!("binding")),
            ("object", Value::Null),
        ] {
            let mut raw: Value = serde_json::from_slice(&review_of(opted(json!({})))).unwrap();
            raw["request"][field] = value;
            let r = decode(&serde_json::to_vec(&raw).unwrap()).unwrap();
            let a = examine(&r, &p).unwrap_err();
            assert_eq!(a.patch, None, "{field}");
            let out = a.to_review(&r);
            assert_eq!(out["response"]["allowed"], true, "{field}");
            assert!(out["response"].get("patch").is_none(), "{field}");
            if field != "subResource" {
                assert_eq!(a.warnings.len(), 1, "{field}: {:?}", a.warnings);
            }
        }
    }

    #[test]
    fn injection_is_idempotent() {
        let r = review(opted(json!({"thaw.dev/container-concurrency": "1"})));
        let a = inject(&r, None, &policy());
        let once = patched(&r, &a);
        // The injected pod submitted again: no patch at all.
        let again = review(once.clone());
        assert_eq!(
            examine(&again, &policy()).unwrap_err(),
            Answer::skipped("has the sidecar already")
        );
        assert_eq!(
            Answer::skipped("has the sidecar already").to_review(&again)["response"],
            json!({"uid": again.request.uid, "allowed": true})
        );
        // And were it injected again anyway, the transform would change nothing.
        assert_eq!(inject(&again, None, &policy()).patch, None);
    }
}
