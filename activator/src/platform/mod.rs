//! Where revisions and their pods come from, and how scale-up is asked for. The request
//! path knows nothing about which platform is in use: it sees only [`PlatformUpdate`]s and
//! calls [`Platform::need_capacity`].

pub mod local;
pub mod memory;
pub mod process;

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
}
