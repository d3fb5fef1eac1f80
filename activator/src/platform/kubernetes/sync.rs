//! Keeping an index in step with the API server: one kube-rs watcher per kind of object,
//! feeding index calls, and what readiness says about them. Generic over the index, so
//! the Knative platform ([`crate::platform::knative`]) watches the same way.
//!
//! The watcher lists, then watches; after a `410 Gone` (the watch fell too far behind) or
//! any break it relists, and the list *resets* the index, so nothing deleted while we
//! were away lingers. Between attempts it backs off (capped at a few seconds, so a short
//! API-server outage costs seconds, not the half minute client-go's default allows).
//! While the API server is away the index keeps its last state and the activator serves
//! on it.

use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::index::{Change, Index};

/// One watched kind: its name for messages and the index calls it makes, on an index `I`
/// whose calls return `C`s (the standalone platform's by default).
pub struct Source<K, I = Index, C = Change> {
    /// As RBAC names it, e.g. `deployments.apps`.
    pub resource: &'static str,
    /// Where: `all namespaces` or `namespace thaw-system`.
    pub scope: String,
    pub apply: fn(&mut I, &K) -> Vec<C>,
    pub delete: fn(&mut I, &K) -> Vec<C>,
    pub reset: fn(&mut I, &[K]) -> Vec<C>,
    /// Drops what the index never reads, so a list of a big cluster stays small.
    pub trim: fn(&mut K),
}

/// How one watcher is doing.
#[derive(Debug, Clone, Default)]
struct SourceHealth {
    synced: bool,
    /// The last failure, while it lasts, and since when.
    failing: Option<(String, Instant)>,
}

/// How every watcher is doing, for readiness and logs.
#[derive(Debug, Default)]
pub struct Health {
    sources: Mutex<Vec<(String, SourceHealth)>>,
}

impl Health {
    fn update(&self, what: &str, f: impl FnOnce(&mut SourceHealth)) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        match sources.iter_mut().find(|(w, _)| w == what) {
            Some((_, h)) => f(h),
            None => {
                let mut h = SourceHealth::default();
                f(&mut h);
                sources.push((what.to_owned(), h));
            }
        }
    }

    /// Registers a source before it first reports, so readiness waits for it.
    pub fn expect(&self, what: &str) {
        self.update(what, |_| {});
    }

    /// `Err`: not ready, and why. `Ok(Some)`: serving, with a warning worth showing.
    pub fn readiness(&self) -> Result<Option<String>, String> {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let describe = |what: &str, h: &SourceHealth| match &h.failing {
            Some((e, since)) => format!(
                "{what}: failing for {}s: {e}",
                now.duration_since(*since).as_secs()
            ),
            None => format!("{what}: not listed yet"),
        };
        let waiting: Vec<String> = sources
            .iter()
            .filter(|(_, h)| !h.synced)
            .map(|(w, h)| describe(w, h))
            .collect();
        if !waiting.is_empty() {
            return Err(format!(
                "waiting for the first list from the API server ({})",
                waiting.join("; ")
            ));
        }
        let failing: Vec<String> = sources
            .iter()
            .filter(|(_, h)| h.failing.is_some())
            .map(|(w, h)| describe(w, h))
            .collect();
        Ok((!failing.is_empty())
            .then(|| format!("serving on the last-known state; {}", failing.join("; "))))
    }
}

/// One line for an error from the API server. A 403 names what RBAC must allow.
pub fn describe(error: &kube::Error, verb: &str, resource: &str, scope: &str) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden: RBAC must allow {verb} {resource} in {scope} for this service account ({})",
            status.message
        ),
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => other.to_string(),
    }
}

fn describe_watch(error: &watcher::Error, resource: &str, scope: &str) -> String {
    match error {
        watcher::Error::InitialListFailed(e) => describe(e, "list", resource, scope),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            describe(e, "watch", resource, scope)
        }
        watcher::Error::WatchError(status) if status.code == 403 => format!(
            "forbidden: RBAC must allow watch {resource} in {scope} for this service account ({})",
            status.message
        ),
        other => other.to_string(),
    }
}

/// Capped exponential backoff with jitter: 250 ms doubling to 5 s, reset once a
/// watch works again.
struct Retry {
    next: Duration,
}

const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        // ±25 %, so many activators do not knock on a recovering API server in step.
        Some(current.mul_f64(0.75 + fastrand::f64() * 0.5))
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.next = RETRY_MIN;
    }
}

/// Runs one watcher until the process stops, applying what it sees with `apply` (which
/// takes the index lock and publishes the changes).
pub async fn run<K, I, C>(
    api: Api<K>,
    config: watcher::Config,
    source: Source<K, I, C>,
    health: &Health,
    mut apply: impl FnMut(&dyn Fn(&mut I) -> Vec<C>),
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let what = format!("{} in {}", source.resource, source.scope);
    health.expect(&what);
    let trim = source.trim;
    let mut stream = watcher(api, config)
        .modify(trim)
        .backoff(Retry { next: RETRY_MIN })
        .boxed();
    // Objects of a list in progress; applied together when it completes.
    let mut listing: Vec<K> = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(object)) => listing.push(object),
            Ok(Event::InitDone) => {
                let all = std::mem::take(&mut listing);
                apply(&|index| (source.reset)(index, &all));
                health.update(&what, |h| {
                    if h.failing.is_some() {
                        tracing::info!(source = %what, "in sync with the API server again");
                    }
                    h.synced = true;
                    h.failing = None;
                });
            }
            Ok(Event::Apply(object)) => apply(&|index| (source.apply)(index, &object)),
            Ok(Event::Delete(object)) => apply(&|index| (source.delete)(index, &object)),
            // 410 Gone: the watch fell behind; the watcher relists at once and the list
            // resets the index. Routine, not a failure worth a line.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {}
            Err(error) => {
                let message = describe_watch(&error, source.resource, &source.scope);
                health.update(&what, |h| {
                    // One line when the failure starts or changes, not one per retry.
                    if h.failing.as_ref().map(|(m, _)| m) != Some(&message) {
                        tracing::warn!(source = %what, error = %message, "cannot watch the API server; serving on the last-known state");
                        let since = h.failing.as_ref().map_or_else(Instant::now, |(_, s)| *s);
                        h.failing = Some((message, since));
                    }
                });
            }
        }
    }
}

/// Uses a watcher's events directly.
fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures_util::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_every_first_list_then_warns_on_failures() {
        let health = Health::default();
        health.expect("deployments.apps in all namespaces");
        let e = health.readiness().unwrap_err();
        assert!(
            e.contains("deployments.apps in all namespaces: not listed yet"),
            "{e}"
        );
        health.update("deployments.apps in all namespaces", |h| h.synced = true);
        assert_eq!(health.readiness(), Ok(None));
        health.update("deployments.apps in all namespaces", |h| {
            h.failing = Some(("connection refused".into(), Instant::now()))
        });
        let w = health.readiness().unwrap().unwrap();
        assert!(
            w.starts_with("serving on the last-known state; deployments.apps"),
            "{w}"
        );
        assert!(w.contains("connection refused"), "{w}");
    }

    #[test]
    fn forbidden_names_verb_resource_and_scope() {
        let status = kube::core::Status::failure("deployments.apps is forbidden", "Forbidden")
            .with_code(403);
        let e = kube::Error::Api(Box::new(status));
        let m = describe(&e, "list", "deployments.apps", "all namespaces");
        assert!(
            m.starts_with("forbidden: RBAC must allow list deployments.apps in all namespaces"),
            "{m}"
        );
    }

    #[test]
    fn retries_back_off_to_a_cap_and_reset() {
        let mut r = Retry { next: RETRY_MIN };
        let waits: Vec<Duration> = (&mut r).take(8).collect();
        assert!(waits[0] <= RETRY_MIN.mul_f64(1.25));
        assert!(waits.iter().all(|w| *w <= RETRY_MAX.mul_f64(1.25)));
        assert!(waits[7] >= RETRY_MAX.mul_f64(0.75));
        r.reset();
        assert!(r.next().unwrap() <= RETRY_MIN.mul_f64(1.25));
    }
}
