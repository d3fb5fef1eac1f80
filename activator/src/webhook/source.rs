//! Where the serving certificate comes from, and keeping it current.
//!
//! - [`CertSource::Secret`] (`THAW_WEBHOOK_CERT_SECRET`): someone else's certificate
//!   (cert-manager, an operator's PKI) in a Secret with `tls.crt`, `tls.key` and,
//!   optionally, `ca.crt`. It is read again every minute, so a rotation is picked up.
//! - [`CertSource::Shared`] (the default, Secret `thaw-webhook-certs`): made here. Every
//!   replica serves the same CA and certificate, so `caBundle` names one CA and does not
//!   flap between replicas: the first replica to find the Secret missing creates it (a
//!   create races safely: the loser gets `409 AlreadyExists` and reads the winner's),
//!   the others read it. The CA and its key are kept there too, so a renewal (30 days
//!   before the end of the certificate's year) is signed by the same CA and `caBundle`
//!   stays as it is; the replica that renews replaces the Secret with its
//!   `resourceVersion` (a conflict means another one did, whose result it adopts), and
//!   every replica picks up the Secret's content within a minute.
//! - [`CertSource::Own`]: made here and held in memory only: for one replica without
//!   access to Secrets, and for tests without a cluster.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, Client};

use super::certs::{Bundle, CertError, Served};
use super::retry::{Backoff, Complaint};
use crate::platform::kubernetes::sync::describe;

/// How often the certificate's source is looked at again.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// A shared Secret is rewritten at most this many times in a row when others race us.
const MAX_CONFLICTS: usize = 5;

/// The Secret keys of a certificate (those of `kubernetes.io/tls`, plus the CA's).
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// A Secret someone else keeps.
    Secret(String),
    /// Made here and shared between replicas through this Secret.
    Shared(String),
    /// Made here, in memory.
    Own,
}

/// Why the certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The API server refused or is away; the message names what RBAC must allow.
    #[error("{0}")]
    Api(String),
    /// The Secret is there but does not hold a usable certificate.
    #[error("Secret {namespace}/{name}: {problem}")]
    Secret {
        namespace: String,
        name: String,
        problem: String,
    },
    #[error("{0}")]
    Cert(#[from] CertError),
    #[error(
        "Secret {namespace}/{name} kept changing under us ({MAX_CONFLICTS} conflicts in a row)"
    )]
    Conflicts { namespace: String, name: String },
}

/// The certificate's source, with what reaching it needs.
pub struct Certs {
    pub source: CertSource,
    /// Required for the Secret-based sources.
    pub client: Option<Client>,
    pub namespace: String,
    /// The DNS names a certificate made here is for.
    pub names: Vec<String>,
    /// The name the API server dials (`<svc>.<ns>.svc`): all a foreign certificate must
    /// be valid for.
    pub dialled: String,
}

impl Certs {
    fn secrets(&self) -> Option<Api<Secret>> {
        self.client
            .as_ref()
            .map(|c| Api::namespaced(c.clone(), &self.namespace))
    }

    fn api_error(&self, error: &kube::Error, verb: &str, name: &str) -> SourceError {
        SourceError::Api(format!(
            "{verb} Secret {}/{name}: {}",
            self.namespace,
            describe(
                error,
                verb,
                "secrets",
                &format!("namespace {}", self.namespace)
            )
        ))
    }

    /// The certificate to start serving with. Waits (with backoff, one log line per new
    /// problem) while the API server is away or the Secret is missing; a Secret that
    /// exists but holds no usable certificate is an error at once, being configuration.
    pub async fn load(&self) -> Result<Bundle, SourceError> {
        let mut backoff = Backoff::default();
        let mut complaint = Complaint::new("reading the webhook certificate");
        loop {
            let attempt = match &self.source {
                CertSource::Own => return Ok(Bundle::generate(&self.names, SystemTime::now())?),
                CertSource::Secret(name) => self.read(name).await,
                CertSource::Shared(name) => self.shared(name, None).await,
            };
            match attempt {
                Ok(bundle) => {
                    complaint.clear();
                    return Ok(bundle);
                }
                Err(e @ (SourceError::Secret { .. } | SourceError::Cert(_))) => return Err(e),
                Err(e) => {
                    complaint.report(e.to_string());
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Keeps `served` current for as long as the process runs: rereads a foreign
    /// Secret, renews or adopts the shared one, renews an in-memory certificate.
    pub async fn maintain(self, served: Served, interval: Duration) {
        let mut complaint = Complaint::new("keeping the webhook certificate current");
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let current = served.bundle();
            let next = match &self.source {
                CertSource::Own => match current.fresh(&self.names, SystemTime::now()) {
                    Ok(()) => Ok(current.clone()),
                    Err(_) => current
                        .renew(&self.names, SystemTime::now())
                        .map_err(SourceError::from),
                },
                CertSource::Secret(name) => self.read(name).await,
                CertSource::Shared(name) => self.shared(name, Some(&current)).await,
            };
            let replaced =
                next.and_then(|bundle| served.replace(bundle).map_err(SourceError::from));
            match replaced {
                Ok(changed) => {
                    complaint.clear();
                    if changed {
                        tracing::info!(source = ?self.source, "serving a new certificate");
                    }
                }
                Err(e) => {
                    // The certificate served so far stays; it is valid for a while yet.
                    complaint.report(e.to_string());
                }
            }
        }
    }

    /// A foreign Secret's certificate. It is checked against its CA when it has one, so
    /// a certificate the API server would refuse is reported here rather than found
    /// out as silently skipped admissions.
    async fn read(&self, name: &str) -> Result<Bundle, SourceError> {
        let api = self.secrets().ok_or_else(|| no_client(name))?;
        let secret = api
            .get_opt(name)
            .await
            .map_err(|e| self.api_error(&e, "get", name))?
            .ok_or_else(|| {
                SourceError::Api(format!(
                    "Secret {}/{name} (THAW_WEBHOOK_CERT_SECRET) does not exist yet",
                    self.namespace
                ))
            })?;
        let bundle = bundle_of(&secret).map_err(|problem| self.secret_error(name, problem))?;
        bundle
            .server_config()
            .map_err(|e| self.secret_error(name, e.to_string()))?;
        bundle
            .check(std::slice::from_ref(&self.dialled), SystemTime::now())
            .map_err(|e| self.secret_error(name, e.to_string()))?;
        Ok(bundle)
    }

    fn secret_error(&self, name: &str, problem: String) -> SourceError {
        SourceError::Secret {
            namespace: self.namespace.clone(),
            name: name.to_owned(),
            problem,
        }
    }

    /// The shared certificate: the Secret's if it is fresh; else a renewal of it, written
    /// back; else (no Secret) `served` or a new one, created. Conflicts with other
    /// replicas doing the same are settled by reading again.
    async fn shared(&self, name: &str, served: Option<&Bundle>) -> Result<Bundle, SourceError> {
        let api = self.secrets().ok_or_else(|| no_client(name))?;
        for _ in 0..MAX_CONFLICTS {
            let now = SystemTime::now();
            let existing = api
                .get_opt(name)
                .await
                .map_err(|e| self.api_error(&e, "get", name))?;
            let Some(existing) = existing else {
                let bundle = match served {
                    Some(b) if b.fresh(&self.names, now).is_ok() => b.clone(),
                    _ => Bundle::generate(&self.names, now)?,
                };
                match api
                    .create(&PostParams::default(), &secret_of(name, &bundle, None))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(secret = name, namespace = %self.namespace, "stored the webhook certificate for every replica");
                        return Ok(bundle);
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(self.api_error(&e, "create", name)),
                }
            };
            let renewed = match bundle_of(&existing) {
                Ok(b) => match b.fresh(&self.names, now) {
                    Ok(()) => return Ok(b),
                    Err(why) => {
                        tracing::info!(secret = name, reason = %why, "renewing the webhook certificate");
                        b.renew(&self.names, now)?
                    }
                },
                Err(problem) => {
                    tracing::warn!(secret = name, %problem, "the stored webhook certificate is unusable; replacing it");
                    Bundle::generate(&self.names, now)?
                }
            };
            let version = existing.metadata.resource_version.clone();
            match api
                .replace(
                    name,
                    &PostParams::default(),
                    &secret_of(name, &renewed, version),
                )
                .await
            {
                Ok(_) => return Ok(renewed),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(self.api_error(&e, "update", name)),
            }
        }
        Err(SourceError::Conflicts {
            namespace: self.namespace.clone(),
            name: name.to_owned(),
        })
    }
}

fn no_client(name: &str) -> SourceError {
    SourceError::Api(format!(
        "no Kubernetes client to read Secret {name} (not in a cluster and no kubeconfig)"
    ))
}

/// A certificate from a Secret's data: `tls.crt` and `tls.key` required, `ca.crt` and
/// `ca.key` optional.
pub fn bundle_of(secret: &Secret) -> Result<Bundle, String> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let text = |key: &str| -> Result<Option<String>, String> {
        match data.get(key) {
            None => Ok(None),
            Some(ByteString(bytes)) if bytes.is_empty() => Ok(None),
            Some(ByteString(bytes)) => String::from_utf8(bytes.clone())
                .map(Some)
                .map_err(|_| format!("{key} is not PEM text")),
        }
    };
    let required = |key: &str| {
        text(key)?
            .ok_or_else(|| format!("has no {key} (keys: {TLS_CRT}, {TLS_KEY}, optional {CA_CRT})"))
    };
    Ok(Bundle {
        cert_pem: required(TLS_CRT)?,
        key_pem: required(TLS_KEY)?,
        ca_pem: text(CA_CRT)?,
        ca_key_pem: text(CA_KEY)?,
    })
}

/// The shared Secret holding `bundle`.
pub fn secret_of(name: &str, bundle: &Bundle, resource_version: Option<String>) -> Secret {
    let mut data = BTreeMap::new();
    data.insert(
        TLS_CRT.to_owned(),
        ByteString(bundle.cert_pem.clone().into_bytes()),
    );
    data.insert(
        TLS_KEY.to_owned(),
        ByteString(bundle.key_pem.clone().into_bytes()),
    );
    if let Some(ca) = &bundle.ca_pem {
        data.insert(CA_CRT.to_owned(), ByteString(ca.clone().into_bytes()));
    }
    if let Some(key) = &bundle.ca_key_pem {
        data.insert(CA_KEY.to_owned(), ByteString(key.clone().into_bytes()));
    }
    let mut labels = BTreeMap::new();
    labels.insert(
        "app.kubernetes.io/name".to_owned(),
        "thaw-webhook".to_owned(),
    );
    labels.insert("app.kubernetes.io/part-of".to_owned(), "thaw".to_owned());
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            resource_version,
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::webhook::certs::dns_names;

    #[test]
    fn a_secret_round_trips_a_bundle() {
        let b = Bundle::generate(&dns_names("w", "ns"), SystemTime::now()).unwrap();
        let s = secret_of("thaw-webhook-certs", &b, Some("7".into()));
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(bundle_of(&s).unwrap(), b);
    }

    #[test]
    fn a_foreign_secret_needs_only_the_pair() {
        let b = Bundle::generate(&dns_names("w", "ns"), SystemTime::now()).unwrap();
        let mut s = secret_of("x", &b, None);
        let data = s.data.as_mut().unwrap();
        data.remove(CA_KEY);
        data.remove(CA_CRT);
        let read = bundle_of(&s).unwrap();
        assert_eq!((read.ca_pem, read.ca_key_pem), (None, None));
        s.data.as_mut().unwrap().remove(TLS_KEY);
        assert!(bundle_of(&s).unwrap_err().contains("has no tls.key"));
        s.data
            .as_mut()
            .unwrap()
            .insert(TLS_KEY.into(), ByteString(vec![0xff, 0xfe]));
        assert_eq!(bundle_of(&s).unwrap_err(), "tls.key is not PEM text");
        assert!(bundle_of(&Secret::default())
            .unwrap_err()
            .contains("has no tls.crt"));
    }

    #[tokio::test]
    async fn without_a_client_a_secret_source_says_so() {
        let certs = Certs {
            source: CertSource::Secret("s".into()),
            client: None,
            namespace: "ns".into(),
            names: dns_names("w", "ns"),
            dialled: "w.ns.svc".into(),
        };
        let e = certs.read("s").await.unwrap_err();
        assert!(e.to_string().contains("no Kubernetes client"), "{e}");
        let own = Certs {
            source: CertSource::Own,
            ..certs
        };
        own.load()
            .await
            .unwrap()
            .check(&own.names, SystemTime::now())
            .unwrap();
    }
}
