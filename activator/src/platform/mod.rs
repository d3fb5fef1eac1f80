//! Where revisions and their pods come from, and how scale-up is asked for. The request
//! path knows nothing about which platform is in use: it sees only [`PlatformUpdate`]s and
//! calls [`Platform::need_capacity`].

pub mod knative;
pub mod kubernetes;
pub mod local;
pub mod memory;
pub mod ports;
pub mod process;
pub mod scrape;

use std::net::{IpAddr, SocketAddr};

use tokio::sync::mpsc;

use crate::revision::{RevisionId, RevisionSpec};

/// One change in what the platform knows.
#[derive(Debug, Clone, PartialEq)]
pub enum PlatformUpdate {
    /// A revision appeared or its settings changed.
    Revision(RevisionSpec),
    /// A revision is gone; its waiting requests fail.
    RevisionRemoved(RevisionId),
    /// The revision's pods, by the address of their queue-proxy serving port. Not all of
    /// them are ready: the activator probes each before using it.
    Pods {
        revision: RevisionId,
        pods: Vec<SocketAddr>,
    },
    /// The activators in the path, for subsetting pods between them.
    Activators(Vec<IpAddr>),
    /// The activators in one revision's path (Knative lists them per revision, in its
    /// public Endpoints); overrides [`PlatformUpdate::Activators`] for that revision.
    RevisionActivators {
        revision: RevisionId,
        activators: Vec<IpAddr>,
    },
    /// The platform could not start a pod for the revision: requests waiting for it fail
    /// now with this reason instead of waiting for their timeout.
    Unavailable {
        revision: RevisionId,
        reason: String,
    },
}

/// A source of revisions and pods, and a sink for "needs capacity" signals.
pub trait Platform: Send + Sync + 'static {
    /// A stream of updates, starting with the full current state.
    fn subscribe(&self) -> mpsc::UnboundedReceiver<PlatformUpdate>;

    /// The activator holds requests for `revision` and has no pod with room for them.
    /// Called on the slow path only; platforms may receive it many times per second.
    fn need_capacity(&self, revision: &RevisionId);

    /// The name shown in logs (`local`, `kubernetes`, `knative`, `memory`).
    fn name(&self) -> &'static str;

    /// Whether the platform can feed the activator: `Err` says why not (readiness
    /// fails with it), `Ok(Some)` is a warning readiness shows while still passing.
    fn readiness(&self) -> Result<Option<String>, String> {
        Ok(None)
    }

    /// Whether to write a request log line per request (Knative's `config-observability`
    /// switches it). Read once per request.
    fn request_log(&self) -> bool {
        false
    }

    /// The activator is stopping: release what the platform runs (the local platform
    /// stops its processes, draining them). Returns when done.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The activator must exit now: kill at once whatever the platform runs, without
    /// waiting (a second signal).
    fn kill_now(&self) {}
}

/// A boxed future, so the trait stays usable as `dyn Platform`.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
