//! The local platform: revisions declared in a YAML file, on one machine, no cluster.
//!
//! Each revision lists the queue-proxies that serve it (`endpoints`). The activator
//! probes them like any pod and balances onto the ready ones.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thaw_shared::timeout::Timeouts;
use tokio::sync::mpsc;

use super::{Platform, PlatformUpdate};
use crate::revision::{RevisionId, RevisionSpec};

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    revisions: Vec<RevisionEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RevisionEntry {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    container_concurrency: usize,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
    #[serde(default)]
    response_start_timeout_seconds: u64,
    #[serde(default)]
    idle_timeout_seconds: u64,
    #[serde(default)]
    endpoints: Vec<SocketAddr>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_timeout() -> u64 {
    300
}

/// The revisions of one config file.
#[derive(Debug, Clone)]
pub struct LocalPlatform {
    revisions: Vec<(RevisionSpec, Vec<SocketAddr>)>,
}

impl LocalPlatform {
    pub fn from_file(path: &Path) -> Result<Self, LocalConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|message| LocalConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses the YAML text; the error names the field that is wrong.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let file: File = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut seen = HashSet::new();
        let mut hosts = HashSet::new();
        let mut revisions = Vec::new();
        for (i, r) in file.revisions.into_iter().enumerate() {
            if r.name.is_empty() {
                return Err(format!("revisions[{i}].name: must not be empty"));
            }
            if !seen.insert((r.namespace.clone(), r.name.clone())) {
                return Err(format!(
                    "revisions[{i}].name: {}/{} is declared twice",
                    r.namespace, r.name
                ));
            }
            for h in &r.hosts {
                if !hosts.insert(h.to_ascii_lowercase()) {
                    return Err(format!(
                        "revisions[{i}].hosts: {h:?} is routed to two revisions"
                    ));
                }
            }
            let spec = RevisionSpec {
                id: RevisionId::new(&r.namespace, &r.name),
                container_concurrency: r.container_concurrency,
                timeouts: Timeouts::from_secs(
                    r.timeout_seconds,
                    r.response_start_timeout_seconds,
                    r.idle_timeout_seconds,
                ),
                hosts: r.hosts,
            };
            revisions.push((spec, r.endpoints));
        }
        Ok(Self { revisions })
    }

    pub fn revisions(&self) -> impl Iterator<Item = &RevisionSpec> {
        self.revisions.iter().map(|(s, _)| s)
    }
}

impl Platform for LocalPlatform {
    fn subscribe(&self) -> mpsc::UnboundedReceiver<PlatformUpdate> {
        let (tx, rx) = mpsc::unbounded_channel();
        for (spec, endpoints) in &self.revisions {
            let _ = tx.send(PlatformUpdate::Revision(spec.clone()));
            let _ = tx.send(PlatformUpdate::Pods {
                revision: spec.id.clone(),
                pods: endpoints.clone(),
            });
        }
        rx
    }

    fn need_capacity(&self, revision: &RevisionId) {
        // Endpoints listed in the file are all there is; waiting requests are served
        // as soon as one of them becomes ready.
        tracing::debug!(%revision, "capacity requested; endpoints are fixed by the config file");
    }

    fn name(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_revisions_with_defaults() {
        let p = LocalPlatform::from_yaml(
            "revisions:\n  - name: hello\n    hosts: [hello.local]\n    containerConcurrency: 2\n    endpoints: [\"127.0.0.1:8012\"]\n",
        )
        .unwrap();
        let specs: Vec<_> = p.revisions().collect();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].id, RevisionId::new("default", "hello"));
        assert_eq!(specs[0].container_concurrency, 2);
        assert_eq!(specs[0].timeouts, Timeouts::from_secs(300, 0, 0));
    }

    #[test]
    fn errors_name_the_field() {
        let err = LocalPlatform::from_yaml(
            "revisions:\n  - name: a\n  - name: b\n    containerConcurrency: lots\n",
        )
        .unwrap_err();
        assert!(err.contains("revisions[1].containerConcurrency"), "{err}");
        let err =
            LocalPlatform::from_yaml("revisions:\n  - name: a\n    colour: blue\n").unwrap_err();
        assert!(err.contains("colour"), "{err}");
        let err = LocalPlatform::from_yaml(
            "revisions:\n  - name: a\n    hosts: [x]\n  - name: b\n    hosts: [x]\n",
        )
        .unwrap_err();
        assert!(err.starts_with("revisions[1].hosts"), "{err}");
        let err = LocalPlatform::from_yaml("revisions:\n  - name: a\n    endpoints: [nowhere]\n")
            .unwrap_err();
        assert!(err.contains("revisions[0].endpoints[0]"), "{err}");
    }
}
