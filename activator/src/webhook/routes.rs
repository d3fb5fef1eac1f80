//! The webhook's two endpoints: `POST /inject` (an AdmissionReview in, one out) and
//! `GET /healthz`. Everything around them (tracing, the timeout, the body limit) is
//! layered on in [`super::service`].

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};

use super::admission::{self, Outcome, Policy};
use super::owner::Owners;

type BoxError = Box<dyn StdError + Send + Sync>;

/// What the endpoints share.
pub struct State {
    pub policy: Policy,
    pub owners: Owners,
    /// Set on SIGTERM: `/healthz` fails so that the pod leaves its Service's endpoints.
    pub draining: AtomicBool,
}

/// Routes one request.
pub async fn handle<B>(state: &State, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            if state.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining")
            } else {
                text(StatusCode::OK, "ok")
            }
        }
        (&Method::POST, "/inject") => inject(state, req).await,
        (_, "/healthz") => not_allowed("GET"),
        (_, "/inject") => not_allowed("POST"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: the webhook serves POST /inject and GET /healthz",
        ),
    }
}

async fn inject<B>(state: &State, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let e: BoxError = e.into();
            // The body limit layer turns a too-long body into this error when no
            // Content-Length announced it (a chunked body).
            if is_length_limit(e.as_ref()) {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded");
            }
            return text(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
            );
        }
    };
    let review = match admission::decode(&body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "not an AdmissionReview");
            return text(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    let answer = match admission::examine(&review, &state.policy) {
        Err(answer) => answer,
        Ok(plan) => {
            let owner = match &plan.owner {
                Some(rs) => {
                    let ns = review.request.namespace.as_deref().unwrap_or("");
                    Some(state.owners.workload(ns, rs).await)
                }
                None => None,
            };
            admission::inject(&review, owner, &state.policy)
        }
    };
    let r = &review.request;
    let pod = r
        .object
        .as_ref()
        .and_then(|o| {
            o.pointer("/metadata/name")
                .or_else(|| o.pointer("/metadata/generateName"))
        })
        .and_then(|v| v.as_str())
        .or(r.name.as_deref())
        .unwrap_or("");
    let namespace = r.namespace.as_deref().unwrap_or("");
    match &answer.outcome {
        Outcome::Injected if answer.warnings.is_empty() => {
            tracing::info!(uid = %r.uid, namespace, pod, "injected the sidecar")
        }
        Outcome::Injected => {
            tracing::info!(uid = %r.uid, namespace, pod, warnings = ?answer.warnings, "injected the sidecar")
        }
        Outcome::Skipped(why) => {
            tracing::debug!(uid = %r.uid, namespace, pod, reason = why, "left as it is")
        }
        Outcome::NotInjected => {
            tracing::warn!(uid = %r.uid, namespace, pod, warnings = ?answer.warnings, "not injected")
        }
    }
    let body = serde_json::to_vec(&answer.to_review(&review)).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn is_length_limit(e: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        next = e.source();
    }
    false
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allow}"));
    resp.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use thaw_queue_proxy::inject::InjectSettings;

    fn state() -> State {
        State {
            policy: Policy {
                own_namespace: "thaw-system".into(),
                settings: InjectSettings::default(),
            },
            owners: Owners::new(None),
            draining: AtomicBool::new(false),
        }
    }

    async fn call(state: &State, method: Method, path: &str, body: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = handle(state, req).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn healthz_fails_while_draining() {
        let s = state();
        assert_eq!(
            call(&s, Method::GET, "/healthz", "").await.0,
            StatusCode::OK
        );
        s.draining.store(true, Ordering::Relaxed);
        assert_eq!(
            call(&s, Method::GET, "/healthz", "").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn wrong_routes_and_methods() {
        let s = state();
        assert_eq!(
            call(&s, Method::GET, "/inject", "").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            call(&s, Method::POST, "/healthz", "").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            call(&s, Method::GET, "/", "").await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn bad_json_is_400_with_the_reason() {
        let (status, body) = call(&state(), Method::POST, "/inject", "{").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body.starts_with("the body is not an AdmissionReview: "),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_lookup_without_a_client_injects_with_a_warning() {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "prod", "operation": "CREATE",
                "object": {"metadata": {"generateName": "web-abc-", "labels": {"thaw.dev/inject": "enabled", "pod-template-hash": "abc"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc", "uid": "x", "controller": true}]},
                  "spec": {"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 8080}]}]}}}
        });
        let (status, body) = call(&state(), Method::POST, "/inject", &review.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        let out: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(out["response"]["uid"], "u1");
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        assert!(
            out["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("no Kubernetes client"),
            "{out}"
        );
    }

    #[test]
    fn the_length_limit_is_found_in_the_error_chain() {
        #[derive(Debug)]
        struct Wrapper(http_body_util::LengthLimitError);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "wrapped")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let limited = http_body_util::Limited::new(Full::new(Bytes::from_static(b"12345")), 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt.block_on(limited.collect()).unwrap_err();
        assert!(is_length_limit(e.as_ref()));
        let inner = e.downcast::<http_body_util::LengthLimitError>().unwrap();
        assert!(is_length_limit(&Wrapper(*inner)));
        assert!(!is_length_limit(&std::io::Error::other("x")));
    }
}
