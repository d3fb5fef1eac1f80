//! `thaw-testbed-node whoami`: run inside a pod, proves that kube-rs's in-cluster
//! configuration works there unchanged. It reads `KUBERNETES_SERVICE_HOST`/`_PORT` and
//! the service-account files, reaches the API server through the `kubernetes` Service,
//! and asks who it is (a SelfSubjectReview, which every authenticated user may create).

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::PostParams;
use kube::{Api, Client, Config};

/// The user name the API server sees for this pod's token.
pub async fn whoami() -> Result<String, String> {
    let config = Config::incluster().map_err(|e| format!("in-cluster config: {e}"))?;
    let client = Client::try_from(config).map_err(|e| format!("client: {e}"))?;
    let review: SelfSubjectReview = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
        "metadata": {}
    }))
    .map_err(|e| e.to_string())?;
    let answer = Api::<SelfSubjectReview>::all(client)
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| format!("SelfSubjectReview: {e}"))?;
    answer
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .ok_or_else(|| "the review named no user".to_owned())
}
