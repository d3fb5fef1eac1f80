//! Finding the workload a pod is created for, where the `thaw.dev/*` annotations live.
//!
//! A Deployment's pod arrives at admission owned by a ReplicaSet; the annotations the
//! activator reads are on the Deployment owning that ReplicaSet. Two metadata-only gets
//! (ReplicaSet, then Deployment) within a short timeout find them: RBAC `get` on
//! `replicasets.apps` and `deployments.apps`. A ReplicaSet with no Deployment over it is
//! the workload itself.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client};

use crate::platform::kubernetes::sync::describe;

/// The whole lookup must finish within this: admission has a 5 s budget in all.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The workload over a pod: its kind, name and annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: &'static str,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
}

/// Why the workload could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    #[error("no Kubernetes client (not in a cluster and no kubeconfig)")]
    NoClient,
    #[error("no answer from the API server within {}s", LOOKUP_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Api(String),
}

/// Looks up pods' owners; without a client every lookup fails (and the webhook injects
/// with defaults, saying so).
#[derive(Clone)]
pub struct Owners {
    client: Option<Client>,
}

impl Owners {
    pub fn new(client: Option<Client>) -> Self {
        Self { client }
    }

    /// The workload over ReplicaSet `replica_set` in `namespace`.
    pub async fn workload(
        &self,
        namespace: &str,
        replica_set: &str,
    ) -> Result<Workload, OwnerError> {
        let client = self.client.clone().ok_or(OwnerError::NoClient)?;
        tokio::time::timeout(LOOKUP_TIMEOUT, lookup(client, namespace, replica_set))
            .await
            .map_err(|_| OwnerError::Timeout)?
    }
}

async fn lookup(
    client: Client,
    namespace: &str,
    replica_set: &str,
) -> Result<Workload, OwnerError> {
    let scope = format!("namespace {namespace}");
    let rs = Api::<ReplicaSet>::namespaced(client.clone(), namespace)
        .get_metadata(replica_set)
        .await
        .map_err(|e| {
            OwnerError::Api(format!(
                "get ReplicaSet {replica_set}: {}",
                describe(&e, "get", "replicasets.apps", &scope)
            ))
        })?;
    let deployment = rs
        .metadata
        .owner_references
        .as_deref()
        .and_then(controller)
        .filter(|o| o.kind == "Deployment" && o.api_version.starts_with("apps/"));
    let Some(owner) = deployment else {
        return Ok(Workload {
            kind: "ReplicaSet",
            name: replica_set.to_owned(),
            annotations: rs.metadata.annotations.unwrap_or_default(),
        });
    };
    let d = Api::<Deployment>::namespaced(client, namespace)
        .get_metadata(&owner.name)
        .await
        .map_err(|e| {
            OwnerError::Api(format!(
                "get Deployment {}: {}",
                owner.name,
                describe(&e, "get", "deployments.apps", &scope)
            ))
        })?;
    Ok(Workload {
        kind: "Deployment",
        name: owner.name.clone(),
        annotations: d.metadata.annotations.unwrap_or_default(),
    })
}

/// The managing controller among owners (the one with `controller: true`).
fn controller(owners: &[OwnerReference]) -> Option<&OwnerReference> {
    owners.iter().find(|o| o.controller == Some(true))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_is_the_owner_that_says_so() {
        let o = |name: &str, controller: Option<bool>| OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: name.into(),
            uid: "u".into(),
            controller,
            block_owner_deletion: None,
        };
        assert_eq!(
            controller(&[o("a", None), o("b", Some(true))]).map(|o| o.name.as_str()),
            Some("b")
        );
        assert!(controller(&[o("a", Some(false))]).is_none());
    }

    #[tokio::test]
    async fn without_a_client_the_lookup_fails_with_a_reason() {
        let e = Owners::new(None)
            .workload("ns", "web-abc")
            .await
            .unwrap_err();
        assert_eq!(e, OwnerError::NoClient);
        assert!(e.to_string().contains("no Kubernetes client"));
    }
}
