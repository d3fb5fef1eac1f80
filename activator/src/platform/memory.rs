//! A platform held in memory, driven by its owner: tests, and embedders that manage
//! revisions themselves.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{mpsc, watch};

use super::{Platform, PlatformUpdate};
use crate::revision::{RevisionId, RevisionSpec};

#[derive(Default)]
struct State {
    revisions: BTreeMap<RevisionId, RevisionSpec>,
    pods: BTreeMap<RevisionId, Vec<SocketAddr>>,
    activators: Vec<IpAddr>,
    subscribers: Vec<mpsc::UnboundedSender<PlatformUpdate>>,
}

/// Revisions and pods set by calls; "needs capacity" signals are counted.
pub struct MemoryPlatform {
    state: Mutex<State>,
    capacity_requests: watch::Sender<Vec<RevisionId>>,
}

impl Default for MemoryPlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryPlatform {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity_requests: watch::Sender::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(state: &mut State, update: PlatformUpdate) {
        state.subscribers.retain(|s| s.send(update.clone()).is_ok());
    }

    pub fn upsert_revision(&self, spec: RevisionSpec) {
        let mut s = self.lock();
        s.revisions.insert(spec.id.clone(), spec.clone());
        Self::publish(&mut s, PlatformUpdate::Revision(spec));
    }

    pub fn remove_revision(&self, id: &RevisionId) {
        let mut s = self.lock();
        s.revisions.remove(id);
        s.pods.remove(id);
        Self::publish(&mut s, PlatformUpdate::RevisionRemoved(id.clone()));
    }

    pub fn set_pods(&self, revision: &RevisionId, pods: Vec<SocketAddr>) {
        let mut s = self.lock();
        s.pods.insert(revision.clone(), pods.clone());
        Self::publish(
            &mut s,
            PlatformUpdate::Pods {
                revision: revision.clone(),
                pods,
            },
        );
    }

    pub fn set_activators(&self, ips: Vec<IpAddr>) {
        let mut s = self.lock();
        s.activators = ips.clone();
        Self::publish(&mut s, PlatformUpdate::Activators(ips));
    }

    /// Every "needs capacity" signal received so far, in order.
    pub fn capacity_requests(&self) -> watch::Receiver<Vec<RevisionId>> {
        self.capacity_requests.subscribe()
    }
}

impl Platform for MemoryPlatform {
    fn subscribe(&self) -> mpsc::UnboundedReceiver<PlatformUpdate> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.lock();
        // Replay the current state so a late subscriber starts complete.
        let replay = s
            .revisions
            .values()
            .cloned()
            .map(PlatformUpdate::Revision)
            .chain(s.pods.iter().map(|(r, p)| PlatformUpdate::Pods {
                revision: r.clone(),
                pods: p.clone(),
            }))
            .chain(
                (!s.activators.is_empty())
                    .then(|| PlatformUpdate::Activators(s.activators.clone())),
            );
        for update in replay {
            let _ = tx.send(update);
        }
        s.subscribers.push(tx);
        rx
    }

    fn need_capacity(&self, revision: &RevisionId) {
        self.capacity_requests
            .send_modify(|v| v.push(revision.clone()));
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_shared::timeout::Timeouts;

    fn spec(name: &str) -> RevisionSpec {
        RevisionSpec {
            id: RevisionId::new("default", name),
            container_concurrency: 1,
            timeouts: Timeouts::default(),
            hosts: vec![],
            verify_pod_identity: false,
        }
    }

    #[tokio::test]
    async fn late_subscribers_get_the_current_state_then_changes() {
        let p = MemoryPlatform::new();
        p.upsert_revision(spec("a"));
        p.set_pods(&spec("a").id, vec!["127.0.0.1:1".parse().unwrap()]);
        let mut rx = p.subscribe();
        assert_eq!(
            rx.recv().await.unwrap(),
            PlatformUpdate::Revision(spec("a"))
        );
        assert!(matches!(
            rx.recv().await.unwrap(),
            PlatformUpdate::Pods { .. }
        ));
        p.remove_revision(&spec("a").id);
        assert_eq!(
            rx.recv().await.unwrap(),
            PlatformUpdate::RevisionRemoved(spec("a").id)
        );
        p.need_capacity(&spec("a").id);
        assert_eq!(p.capacity_requests().borrow().len(), 1);
    }
}
