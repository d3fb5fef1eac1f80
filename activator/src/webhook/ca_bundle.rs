//! Publishing the CA: every `webhooks[*].clientConfig.caBundle` of the webhook's own
//! MutatingWebhookConfiguration is kept equal to the CA being served.
//!
//! The configuration is watched (by name), not written once: it may be applied after
//! the webhook starts, re-applied or re-created with an empty `caBundle`, and the CA may
//! change (a Secret rotated). Each time the watch shows the configuration, and each
//! time the CA changes, the webhooks that disagree are patched: a strategic merge
//! patch keyed on each webhook's `name`, so webhooks another writer adds in the meantime
//! are left alone. While the API server is away the watch backs off and a failed patch
//! is retried with backoff; a 403 is one log line naming the verb and the resource.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::certs::CaWatch;
use super::retry::{Backoff, Complaint};
use crate::platform::kubernetes::sync::describe;

/// How long the API server may take to answer one patch before it counts as away.
pub const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

const RESOURCE: &str = "mutatingwebhookconfigurations.admissionregistration.k8s.io";

/// The strategic merge patch that sets `ca` on every webhook of `config` whose
/// `caBundle` differs, or `None` when all agree already.
pub fn patch_for(config: &MutatingWebhookConfiguration, ca: &str) -> Option<Value> {
    let stale: Vec<Value> = config
        .webhooks
        .iter()
        .flatten()
        .filter(|w| {
            w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca.as_bytes())
        })
        .map(|w| {
            json!({
                "name": w.name,
                "clientConfig": {"caBundle": k8s_openapi::ByteString(ca.as_bytes().to_vec())},
            })
        })
        .collect();
    (!stale.is_empty()).then(|| json!({"webhooks": stale}))
}

/// Keeps `name`'s `caBundle` equal to the CA `ca` follows, until the process ends.
pub async fn run(client: Client, name: String, mut ca: CaWatch) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api.clone(), config)
        .backoff(Backoff::default())
        .boxed();
    let mut latest: Option<MutatingWebhookConfiguration> = None;
    let mut watching = Complaint::new("watching the MutatingWebhookConfiguration");
    let mut patching = Complaint::new("writing the caBundle");
    let mut backoff = Backoff::default();
    let mut retry_at: Option<Instant> = None;
    let mut announced_missing = false;
    loop {
        let mut due = false;
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(Event::Apply(o) | Event::InitApply(o))) => {
                    watching.clear();
                    latest = Some(o);
                    due = true;
                }
                Some(Ok(Event::Delete(_))) => latest = None,
                Some(Ok(Event::InitDone)) => {
                    watching.clear();
                    if latest.is_none() && !announced_missing {
                        announced_missing = true;
                        tracing::info!(config = %name, "MutatingWebhookConfiguration not found yet; caBundle is written once it is created");
                    }
                }
                Some(Ok(Event::Init)) => latest = None,
                Some(Err(e)) => {
                    if let Some(message) = describe_watch(&e, &name) {
                        watching.report(message);
                    }
                }
                None => return,
            },
            changed = ca.changed() => {
                if !changed {
                    return;
                }
                due = true;
            }
            () = sleep_until(retry_at) => {
                retry_at = None;
                due = true;
            }
        }
        // A retry already scheduled is not brought forward by each watch event.
        if !due || retry_at.is_some() {
            continue;
        }
        let (Some(current), Some(pem)) = (&latest, ca.ca()) else {
            continue;
        };
        let Some(patch) = patch_for(current, &pem) else {
            patching.clear();
            continue;
        };
        let patched = tokio::time::timeout(
            PATCH_TIMEOUT,
            api.patch(&name, &PatchParams::default(), &Patch::Strategic(&patch)),
        )
        .await;
        let scope = format!("the cluster (resourceNames: {name})");
        let failure = match patched {
            Ok(Ok(updated)) => {
                patching.clear();
                backoff.reset();
                let webhooks = updated.webhooks.as_ref().map_or(0, Vec::len);
                tracing::info!(config = %name, webhooks, "wrote the CA into caBundle");
                latest = Some(updated);
                continue;
            }
            Ok(Err(e)) => describe(&e, "patch", RESOURCE, &scope),
            Err(_) => format!(
                "patch {RESOURCE} {name}: no answer within {}s",
                PATCH_TIMEOUT.as_secs()
            ),
        };
        patching.report(failure);
        retry_at = Some(Instant::now() + backoff.next_delay());
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One line for a watch failure; `None` for `410 Gone`, which is routine (the watch fell
/// behind and the watcher relists at once).
fn describe_watch(error: &watcher::Error, name: &str) -> Option<String> {
    let scope = format!("the cluster (resourceNames: {name})");
    Some(match error {
        watcher::Error::InitialListFailed(e) => describe(e, "list", RESOURCE, &scope),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            describe(e, "watch", RESOURCE, &scope)
        }
        watcher::Error::WatchError(status) if status.code == 410 => return None,
        watcher::Error::WatchError(status) if status.code == 403 => format!(
            "forbidden: RBAC must allow watch {RESOURCE} in {scope} for this service account ({})",
            status.message
        ),
        other => other.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn config(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        let webhooks: Vec<Value> = bundles
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut client =
                    json!({"service": {"name": "thaw-webhook", "namespace": "thaw-system"}});
                if let Some(b) = b {
                    client["caBundle"] = json!(base64_of(b));
                }
                json!({"name": format!("w{i}.thaw.dev"), "clientConfig": client,
                       "admissionReviewVersions": ["v1"], "sideEffects": "None"})
            })
            .collect();
        serde_json::from_value(json!({"metadata": {"name": "c"}, "webhooks": webhooks})).unwrap()
    }

    fn base64_of(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn only_webhooks_that_disagree_are_patched_by_name() {
        let ca = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        let c = config(&[None, Some(ca), Some("old")]);
        let patch = patch_for(&c, ca).unwrap();
        assert_eq!(
            patch,
            json!({"webhooks": [
                {"name": "w0.thaw.dev", "clientConfig": {"caBundle": base64_of(ca)}},
                {"name": "w2.thaw.dev", "clientConfig": {"caBundle": base64_of(ca)}},
            ]})
        );
        assert_eq!(patch_for(&config(&[Some(ca), Some(ca)]), ca), None);
        assert_eq!(patch_for(&config(&[]), ca), None);
    }

    #[test]
    fn watch_failures_name_verb_and_resource_and_410_is_routine() {
        let status = |code: u16| kube::core::Status::failure("nope", "Reason").with_code(code);
        let gone = watcher::Error::WatchError(Box::new(status(410)));
        assert_eq!(describe_watch(&gone, "c"), None);
        let forbidden = watcher::Error::WatchError(Box::new(status(403)));
        assert!(describe_watch(&forbidden, "c").unwrap().starts_with(
            "forbidden: RBAC must allow watch mutatingwebhookconfigurations.admissionregistration.k8s.io in the cluster (resourceNames: c)"
        ));
        let list = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status(403))));
        assert!(describe_watch(&list, "c")
            .unwrap()
            .starts_with("forbidden: RBAC must allow list mutatingwebhookconfigurations"));
    }

    #[test]
    fn an_empty_ca_bundle_is_stale() {
        let c = config(&[Some("")]);
        assert!(patch_for(&c, "ca").is_some());
    }
}
