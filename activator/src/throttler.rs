//! The per-revision throttler (CONTRACT §2.3): which ready pod a request goes to, and a
//! bounded FIFO wait while no pod has a free slot.
//!
//! - **Capacity** is `CC × assigned pods`. A pod never holds more than `CC` permits from
//!   this throttler at once (`CC = 0`: unlimited per pod).
//! - **Subsetting** (only when `CC > 0`): the revision's pods, sorted, are split between
//!   the activators in contiguous slices ([`subset`]).
//! - **Load balancing** among the assigned pods: random choice of two for `CC = 0`, first
//!   available for `CC` 1–3, round robin skipping full pods above that.
//! - **Waiting** is first come, first served, bounded by a count and by the body bytes
//!   the waiters hold ([beyond]: Knative's activator queue is effectively unbounded).
//!
//! Everything lives behind one `std` mutex that is never held across an `.await`. A
//! request that finds a free slot and nobody ahead of it takes the slot under the lock and
//! leaves: no allocation, no channel. A request that must wait parks a `oneshot` sender in
//! the queue; a freed slot is handed straight to the head waiter through it, so a waiter
//! never races newcomers for a slot it was promised.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot::{self, error::TryRecvError};
use tokio::sync::watch;

use crate::revision::RevisionId;

/// How much may wait for one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottlerSettings {
    /// Requests that may wait at once.
    pub max_waiting: usize,
    /// Sum of the waiting requests' `body_cost` that may be held at once.
    pub max_waiting_body_bytes: u64,
}

impl ThrottlerSettings {
    /// Knative's activator queue depth.
    pub const DEFAULT_MAX_WAITING: usize = 10_000;
    /// 64 MiB of buffered bodies per revision.
    pub const DEFAULT_MAX_WAITING_BODY_BYTES: u64 = 64 << 20;
}

impl Default for ThrottlerSettings {
    fn default() -> Self {
        Self {
            max_waiting: Self::DEFAULT_MAX_WAITING,
            max_waiting_body_bytes: Self::DEFAULT_MAX_WAITING_BODY_BYTES,
        }
    }
}

/// Why a request got no pod.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ThrottleError {
    #[error("activator queue full: {waiting} requests are waiting for revision {revision}")]
    QueueFull {
        revision: RevisionId,
        waiting: usize,
    },
    #[error(
        "activator body budget exhausted: {waiting_bytes} bytes are waiting for revision \
         {revision}, {body_cost} more would exceed {budget}"
    )]
    BodyBudget {
        revision: RevisionId,
        waiting_bytes: u64,
        body_cost: u64,
        budget: u64,
    },
    /// The revision was removed while the request waited (or before it arrived).
    #[error("revision {0} was removed")]
    RevisionGone(RevisionId),
    /// The platform cannot give the revision a pod (its command does not start, say).
    #[error("revision {revision} is unavailable: {reason}")]
    Unavailable {
        revision: RevisionId,
        reason: Arc<str>,
    },
}

/// The pods this activator sends to, out of `pods_sorted` (CONTRACT §2.3).
///
/// `activators_sorted` are the revision's ready activator IPs, sorted; `own` is this
/// activator's IP. Each activator takes a contiguous slice of `n / activators` pods, the
/// first `n mod activators` activators one more; with more activators than pods,
/// activator `i` takes pod `i mod n`; when `own` is not in the list, all pods.
/// Subsetting applies only when `CC > 0`; the throttler does not call this for `CC = 0`.
/// Every activator runs this same code, so any shared order works: pods are in
/// `SocketAddr` order (Knative compares the `ip:port` strings), activators in `IpAddr`
/// order.
pub fn subset<'a>(
    pods_sorted: &'a [SocketAddr],
    activators_sorted: &[IpAddr],
    own: IpAddr,
) -> &'a [SocketAddr] {
    let index = activators_sorted.binary_search(&own).ok();
    &pods_sorted[subset_range(pods_sorted.len(), activators_sorted.len(), index)]
}

/// The index range of [`subset`], for `pods` pods and `activators` activators, this one
/// being number `index` (`None`: unknown).
fn subset_range(pods: usize, activators: usize, index: Option<usize>) -> Range<usize> {
    let Some(i) = index else { return 0..pods };
    if pods == 0 || activators <= 1 || i >= activators {
        return 0..pods;
    }
    if activators > pods {
        let pod = i % pods;
        return pod..pod + 1;
    }
    let size = pods / activators;
    let extra = pods % activators;
    let start = i * size + i.min(extra);
    start..start + size + usize::from(i < extra)
}

/// The permits per pod this activator may hold, for container concurrency `cc`, `pods`
/// pods and `activators` activators, this one number `index`. With at least as many pods
/// as activators each pod belongs to one activator, which holds all its `cc`. With more
/// activators than pods, activator `i` uses pod `i mod pods` like others do, so that pod's
/// `cc` is split between them (the first ones take the remainder), and the pod never gets
/// more than `cc` from all of them together. [beyond]: Knative gives each at least one,
/// which lets a pod with small `cc` be sent more than `cc`.
fn pod_share(cc: usize, pods: usize, activators: usize, index: Option<usize>) -> usize {
    let Some(i) = index else { return cc };
    if pods == 0 || activators <= pods || i >= activators {
        return cc;
    }
    let pod = i % pods;
    let sharing = activators / pods + usize::from(pod < activators % pods);
    let rank = i / pods;
    cc / sharing + usize::from(rank < cc % sharing)
}

/// One revision's throttler: a handle, cloned into what needs it (the revision, its
/// backends), with the state behind one pointer.
#[derive(Clone)]
pub struct Throttler {
    shared: Arc<Shared>,
}

/// The lock and the hot part of [`State`] first (`repr(C)`): see there.
#[repr(C)]
struct Shared {
    state: Mutex<State>,
    revision: RevisionId,
    settings: ThrottlerSettings,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, but a poisoned lock must not take the
        // whole revision down with it: the state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A ready pod's slots as this throttler sees them.
#[derive(Debug)]
struct Pod {
    addr: SocketAddr,
    /// Permits out for this pod.
    in_flight: usize,
}

/// A parked request. The slot is sent through `tx`; a closed `tx` is a waiter that left.
struct Waiter {
    tx: oneshot::Sender<SocketAddr>,
    body_cost: u64,
}

/// `repr(C)`, in this order: what every request reads and writes (taking a slot, giving
/// it back) comes first, next to the lock, so that with thousands of revisions a request
/// misses on two or three cache lines of its throttler rather than on every field.
#[repr(C)]
struct State {
    /// The revision was removed.
    closed: bool,
    /// Container concurrency; 0 = unlimited.
    cc: usize,
    /// Ready pods, sorted by address.
    pods: Vec<Pod>,
    /// Permits out, for all pods (draining ones included).
    in_flight: usize,
    /// The slice of `pods` assigned to this activator.
    assigned: Range<usize>,
    /// The permits this activator may hold per assigned pod: `cc`, or its share of `cc`
    /// when more activators than pods share each pod (see [`pod_share`]).
    pod_cc: usize,
    /// Live waiters in `queue`.
    waiting: usize,
    /// Waiters in arrival order, including `abandoned` ones not yet swept.
    queue: VecDeque<Waiter>,
    /// Round-robin cursor into the assigned slice.
    next_rr: usize,
    /// Pods no longer ready that still have permits out. They get no new permits; the
    /// entry keeps their count so a pod that comes back is not given more than CC.
    draining: Vec<Pod>,
    /// The revision's ready activators, sorted, and this activator's IP.
    activators: Vec<IpAddr>,
    own_ip: Option<IpAddr>,
    /// Entries in `queue` whose waiter left.
    abandoned: usize,
    /// Sum of the live waiters' `body_cost`.
    waiting_bytes: u64,
    /// Why the platform last failed to provide a pod, for waiters woken by it.
    failure: Option<Arc<str>>,
    /// `waiting > 0`, as last published.
    has_waiters: watch::Sender<bool>,
}

/// Sweep the queue once this many abandoned entries outnumber the live ones.
const SWEEP_AT: usize = 64;
/// Give back the queue's memory once it is empty and this large.
const SHRINK_ABOVE: usize = 1024;

impl State {
    fn reassign(&mut self) {
        let n = self.pods.len();
        let index = self
            .own_ip
            .and_then(|ip| self.activators.binary_search(&ip).ok());
        (self.assigned, self.pod_cc) = if self.cc == 0 {
            (0..n, 0)
        } else {
            let share = pod_share(self.cc, n, self.activators.len(), index);
            match share {
                // Every permit of our pod belongs to activators ahead of us: we hold none
                // (our waiters count as demand, and the autoscaler adds pods).
                0 => (0..0, 0),
                share => (subset_range(n, self.activators.len(), index), share),
            }
        };
    }

    fn capacity(&self) -> usize {
        match self.assigned.len() {
            0 => 0,
            _ if self.cc == 0 => usize::MAX,
            n => self.pod_cc.saturating_mul(n),
        }
    }

    /// The pod (index into `pods`) the next request goes to, if one has a free slot.
    fn pick(&mut self) -> Option<usize> {
        let start = self.assigned.start;
        let pods = self.pods.get(self.assigned.clone())?;
        let n = pods.len();
        if n == 0 {
            return None;
        }
        let cc = self.pod_cc;
        // The policy follows the revision's CC; the limit is this activator's share.
        let i = match self.cc {
            // Random choice of two, the one with fewer in flight.
            0 if n == 1 => 0,
            0 => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                if pods[b].in_flight < pods[a].in_flight {
                    b
                } else {
                    a
                }
            }
            // First available in sorted order.
            1..=3 => pods.iter().position(|p| p.in_flight < cc)?,
            // Round robin, skipping full pods.
            _ => {
                let first = self.next_rr % n;
                let i = (first..n)
                    .chain(0..first)
                    .find(|&i| pods[i].in_flight < cc)?;
                self.next_rr = i + 1;
                i
            }
        };
        Some(start + i)
    }

    /// Whether [`Self::pick`] would find a pod, without moving its cursor.
    fn has_free_slot(&self) -> bool {
        let Some(pods) = self.pods.get(self.assigned.clone()) else {
            return false;
        };
        match self.cc {
            0 => !pods.is_empty(),
            _ => pods.iter().any(|p| p.in_flight < self.pod_cc),
        }
    }

    /// Takes a slot at once, if one is free.
    fn take_slot(&mut self) -> Option<SocketAddr> {
        let i = self.pick()?;
        let pod = &mut self.pods[i];
        pod.in_flight += 1;
        self.in_flight += 1;
        Some(pod.addr)
    }

    /// A permit for `addr` is given back; its slot goes to the head waiter if any.
    fn release(&mut self, addr: SocketAddr) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Ok(i) = self.pods.binary_search_by(|p| p.addr.cmp(&addr)) {
            let pod = &mut self.pods[i];
            pod.in_flight = pod.in_flight.saturating_sub(1);
        } else if let Some(i) = self.draining.iter().position(|p| p.addr == addr) {
            let pod = &mut self.draining[i];
            pod.in_flight = pod.in_flight.saturating_sub(1);
            if pod.in_flight == 0 {
                self.draining.swap_remove(i);
            }
        }
        self.dispatch();
    }

    /// Hands free slots to the waiters at the head of the queue, in order, while any.
    fn dispatch(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        while self.waiting > 0 {
            match self.queue.front() {
                None => break,
                Some(w) if w.tx.is_closed() => {
                    self.queue.pop_front();
                    self.abandoned = self.abandoned.saturating_sub(1);
                    continue;
                }
                Some(_) => {}
            }
            let Some(i) = self.pick() else { break };
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            let pod = &mut self.pods[i];
            // Waiters close their receiver under this lock, so this cannot fail after the
            // check above; if it does, the waiter is gone and the slot stays free.
            if w.tx.send(pod.addr).is_ok() {
                pod.in_flight += 1;
                self.in_flight += 1;
                self.waiting -= 1;
                self.waiting_bytes = self.waiting_bytes.saturating_sub(w.body_cost);
            } else {
                self.abandoned = self.abandoned.saturating_sub(1);
            }
        }
        self.settle();
    }

    /// Sweeps abandoned entries and publishes whether anyone waits.
    fn settle(&mut self) {
        if self.waiting == 0 {
            self.queue.clear();
            self.abandoned = 0;
            if self.queue.capacity() > SHRINK_ABOVE {
                self.queue.shrink_to(SWEEP_AT);
            }
        } else if self.abandoned > SWEEP_AT && self.abandoned > self.waiting {
            self.queue.retain(|w| !w.tx.is_closed());
            self.abandoned = 0;
        }
        let has = self.waiting > 0;
        if *self.has_waiters.borrow() != has {
            self.has_waiters.send_replace(has);
        }
    }
}

impl Throttler {
    pub fn new(
        revision: RevisionId,
        container_concurrency: usize,
        settings: ThrottlerSettings,
    ) -> Self {
        let state = State {
            cc: container_concurrency,
            pod_cc: container_concurrency,
            pods: Vec::new(),
            draining: Vec::new(),
            assigned: 0..0,
            activators: Vec::new(),
            own_ip: None,
            next_rr: 0,
            in_flight: 0,
            queue: VecDeque::new(),
            waiting: 0,
            abandoned: 0,
            waiting_bytes: 0,
            closed: false,
            failure: None,
            has_waiters: watch::Sender::new(false),
        };
        Self {
            shared: Arc::new(Shared {
                revision,
                settings,
                state: Mutex::new(state),
            }),
        }
    }

    pub fn revision(&self) -> &RevisionId {
        &self.shared.revision
    }

    pub fn settings(&self) -> ThrottlerSettings {
        self.shared.settings
    }

    /// The revision's pods that passed their readiness probe (`ip:port`). A pod missing
    /// from the list gets no new permits; permits already out for it stay valid.
    pub fn update_pods(&self, mut ready: Vec<SocketAddr>) {
        ready.sort_unstable();
        ready.dedup();
        let mut st = self.shared.lock();
        let mut old = std::mem::take(&mut st.pods).into_iter().peekable();
        let mut pods = Vec::with_capacity(ready.len());
        for addr in ready {
            while let Some(gone) = old.next_if(|p| p.addr < addr) {
                if gone.in_flight > 0 {
                    st.draining.push(gone);
                }
            }
            let in_flight = if let Some(kept) = old.next_if(|p| p.addr == addr) {
                kept.in_flight
            } else if let Some(i) = st.draining.iter().position(|p| p.addr == addr) {
                st.draining.swap_remove(i).in_flight
            } else {
                0
            };
            pods.push(Pod { addr, in_flight });
        }
        for gone in old {
            if gone.in_flight > 0 {
                st.draining.push(gone);
            }
        }
        st.pods = pods;
        st.reassign();
        tracing::debug!(
            revision = %self.shared.revision,
            ready = st.pods.len(),
            assigned = st.assigned.len(),
            draining = st.draining.len(),
            "throttler pods updated"
        );
        st.dispatch();
    }

    /// The revision's ready activators and this activator's IP, for subsetting. `own_ip`
    /// unknown or not in the list: this activator takes all pods.
    pub fn update_activators(&self, mut activator_ips: Vec<IpAddr>, own_ip: Option<IpAddr>) {
        activator_ips.sort_unstable();
        activator_ips.dedup();
        let mut st = self.shared.lock();
        st.activators = activator_ips;
        st.own_ip = own_ip;
        st.reassign();
        tracing::debug!(
            revision = %self.shared.revision,
            activators = st.activators.len(),
            assigned = st.assigned.len(),
            "throttler activators updated"
        );
        st.dispatch();
    }

    /// Permits already out stay valid; a pod over the new limit gets no new permit until
    /// it is back under it.
    pub fn set_container_concurrency(&self, cc: usize) {
        let mut st = self.shared.lock();
        st.cc = cc;
        st.reassign();
        st.dispatch();
    }

    /// The revision was removed: every waiter fails with [`ThrottleError::RevisionGone`],
    /// and so does every later `acquire`. Permits already out stay valid.
    pub fn close(&self) {
        let mut st = self.shared.lock();
        st.closed = true;
        // Dropping the senders wakes the waiters with an error.
        st.queue.clear();
        st.waiting = 0;
        st.abandoned = 0;
        st.waiting_bytes = 0;
        st.settle();
    }

    /// The platform failed to provide a pod: every request waiting now fails with
    /// [`ThrottleError::Unavailable`] rather than waiting for its timeout. Later requests
    /// wait as usual, since the platform keeps trying.
    pub fn fail_waiting(&self, reason: &str) {
        let mut st = self.shared.lock();
        st.failure = Some(Arc::from(reason));
        // Dropping the senders wakes the waiters with an error.
        st.queue.clear();
        st.waiting = 0;
        st.abandoned = 0;
        st.waiting_bytes = 0;
        st.settle();
    }

    /// Waits, first come first served, until an assigned pod has a free slot.
    ///
    /// `body_cost` counts against the byte budget while the request waits (not when a slot
    /// is free at once). Fails at once when the count or byte bound would be exceeded.
    /// The caller bounds the wait (`tokio::time::timeout`): dropping the future removes
    /// the waiter without a trace, and a slot already handed to it goes to the next waiter
    /// or back to its pod.
    /// Whether a request arriving now would wait: others already do, or no assigned pod
    /// has a free slot. A closed revision's requests do not wait; they are refused.
    pub fn would_wait(&self) -> bool {
        let st = self.shared.lock();
        !st.closed && (st.waiting > 0 || !st.has_free_slot())
    }

    /// A slot now, if one is free and nobody is waiting (so FIFO order holds); `None`
    /// means the request would have to wait.
    pub fn try_acquire(&self) -> Result<Option<PodPermit>, ThrottleError> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(self.gone());
        }
        if st.waiting > 0 {
            return Ok(None);
        }
        Ok(st.take_slot().map(|addr| self.permit(addr)))
    }

    pub async fn acquire(&self, body_cost: u64) -> Result<PodPermit, ThrottleError> {
        let rx = {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(self.gone());
            }
            if st.waiting == 0 {
                if let Some(addr) = st.take_slot() {
                    return Ok(self.permit(addr));
                }
            }
            let limits = self.shared.settings;
            if st.waiting >= limits.max_waiting {
                return Err(ThrottleError::QueueFull {
                    revision: self.shared.revision.clone(),
                    waiting: st.waiting,
                });
            }
            if st.waiting_bytes.saturating_add(body_cost) > limits.max_waiting_body_bytes {
                return Err(ThrottleError::BodyBudget {
                    revision: self.shared.revision.clone(),
                    waiting_bytes: st.waiting_bytes,
                    body_cost,
                    budget: limits.max_waiting_body_bytes,
                });
            }
            let (tx, rx) = oneshot::channel();
            st.queue.push_back(Waiter { tx, body_cost });
            st.waiting += 1;
            st.waiting_bytes += body_cost;
            st.settle();
            rx
        };
        let mut parked = Parked {
            shared: &self.shared,
            rx,
            body_cost,
            armed: true,
        };
        let slot = (&mut parked.rx).await;
        parked.armed = false;
        match slot {
            Ok(addr) => Ok(self.permit(addr)),
            Err(_) => {
                let st = self.shared.lock();
                match (&st.failure, st.closed) {
                    (Some(reason), false) => Err(ThrottleError::Unavailable {
                        revision: self.shared.revision.clone(),
                        reason: Arc::clone(reason),
                    }),
                    _ => Err(self.gone()),
                }
            }
        }
    }

    /// Whether both handles are the same revision's throttler.
    #[cfg(test)]
    pub(crate) fn same_as(&self, other: &Throttler) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    fn permit(&self, addr: SocketAddr) -> PodPermit {
        PodPermit {
            shared: Arc::clone(&self.shared),
            addr,
        }
    }

    fn gone(&self) -> ThrottleError {
        ThrottleError::RevisionGone(self.shared.revision.clone())
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.shared.lock().waiting
    }

    /// Sum of the waiting requests' `body_cost`.
    pub fn waiting_body_bytes(&self) -> u64 {
        self.shared.lock().waiting_bytes
    }

    /// Permits outstanding, on any pod (removed ones included).
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// All the revision's ready pods.
    pub fn ready_pods(&self) -> usize {
        self.shared.lock().pods.len()
    }

    /// Ready pods in this activator's subset.
    pub fn assigned_pods(&self) -> usize {
        self.shared.lock().assigned.len()
    }

    /// `CC × assigned pods`; `usize::MAX` for `CC = 0` with at least one pod; 0 without.
    pub fn capacity(&self) -> usize {
        self.shared.lock().capacity()
    }

    pub fn container_concurrency(&self) -> usize {
        self.shared.lock().cc
    }

    /// Whether any request waits now.
    pub fn has_waiters(&self) -> bool {
        self.shared.lock().waiting > 0
    }

    /// Follows [`Self::has_waiters`]: changes when the first request starts waiting and
    /// when the last one stops.
    pub fn subscribe_waiters(&self) -> watch::Receiver<bool> {
        self.shared.lock().has_waiters.subscribe()
    }

    /// Resolves when at least one request waits (at once if one does). The backend prober
    /// uses this to switch to fast probing.
    pub async fn waiters_present(&self) {
        let mut rx = self.subscribe_waiters();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|has| *has).await;
    }
}

impl fmt::Debug for Throttler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Throttler")
            .field("revision", &self.shared.revision)
            .field("cc", &st.cc)
            .field("pods", &st.pods)
            .field("assigned", &st.assigned)
            .field("in_flight", &st.in_flight)
            .field("waiting", &st.waiting)
            .field("waiting_bytes", &st.waiting_bytes)
            .finish_non_exhaustive()
    }
}

/// The waiting part of an `acquire`; dropping it while armed is a cancellation.
struct Parked<'a> {
    shared: &'a Shared,
    rx: oneshot::Receiver<SocketAddr>,
    body_cost: u64,
    armed: bool,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.shared.lock();
        match self.rx.try_recv() {
            // Served but never picked up: the slot goes on.
            Ok(addr) => st.release(addr),
            // Still queued: leave a tombstone (swept lazily) and give the budget back.
            Err(TryRecvError::Empty) => {
                st.waiting = st.waiting.saturating_sub(1);
                st.waiting_bytes = st.waiting_bytes.saturating_sub(self.body_cost);
                st.abandoned += 1;
            }
            // The revision was closed: its counters are already reset.
            Err(TryRecvError::Closed) => {}
        }
        // Closed under the lock, so no slot can be sent to it any more.
        self.rx.close();
        st.settle();
    }
}

/// A slot on one pod; dropping it frees the slot and hands it to the head waiter.
pub struct PodPermit {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl PodPermit {
    /// The pod to send the request to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for PodPermit {
    fn drop(&mut self) {
        self.shared.lock().release(self.addr);
    }
}

impl fmt::Debug for PodPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodPermit")
            .field("revision", &self.shared.revision)
            .field("addr", &self.addr)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use futures_util::FutureExt;
    use tokio::task::{yield_now, JoinHandle};

    fn pod(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8012))
    }

    fn activator(i: u8) -> IpAddr {
        IpAddr::from([10, 1, 0, i])
    }

    fn throttler(cc: usize) -> Arc<Throttler> {
        with_settings(cc, ThrottlerSettings::default())
    }

    fn with_settings(cc: usize, settings: ThrottlerSettings) -> Arc<Throttler> {
        Arc::new(Throttler::new(RevisionId::new("ns", "rev"), cc, settings))
    }

    /// Yields until `cond` holds; panics if it never does.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..200_000 {
            if cond() {
                return;
            }
            yield_now().await;
        }
        panic!("never reached: {what}");
    }

    /// Acquires at once or panics.
    fn now(t: &Throttler) -> PodPermit {
        t.acquire(0)
            .now_or_never()
            .expect("a free slot")
            .expect("a permit")
    }

    /// Spawns a waiter that holds its permit until aborted.
    fn park(t: &Arc<Throttler>, body_cost: u64) -> JoinHandle<()> {
        let t = Arc::clone(t);
        tokio::spawn(async move {
            let _permit = t.acquire(body_cost).await;
            std::future::pending::<()>().await;
        })
    }

    fn per_pod(permits: &[PodPermit]) -> HashMap<SocketAddr, usize> {
        let mut counts = HashMap::new();
        for p in permits {
            *counts.entry(p.addr()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn subset_splits_in_contiguous_slices_the_first_taking_the_remainder() {
        let pods: Vec<_> = (1..=5).map(pod).collect();
        let acts = [activator(1), activator(2)];
        assert_eq!(subset(&pods, &acts, activator(1)), &pods[0..3]);
        assert_eq!(subset(&pods, &acts, activator(2)), &pods[3..5]);

        // 7 pods over 3 activators: 3, 2, 2, covering every pod exactly once.
        let pods: Vec<_> = (1..=7).map(pod).collect();
        let acts = [activator(1), activator(2), activator(3)];
        let slices: Vec<_> = acts.iter().map(|a| subset(&pods, &acts, *a)).collect();
        assert_eq!(slices[0], &pods[0..3]);
        assert_eq!(slices[1], &pods[3..5]);
        assert_eq!(slices[2], &pods[5..7]);
    }

    #[test]
    fn subset_with_more_activators_than_pods_takes_index_mod_pods() {
        let pods = [pod(1), pod(2)];
        let acts: Vec<_> = (1..=5).map(activator).collect();
        for (i, a) in acts.iter().enumerate() {
            assert_eq!(
                subset(&pods, &acts, *a),
                &pods[i % 2..i % 2 + 1],
                "activator {i}"
            );
        }
        // One pod: everyone takes it.
        assert_eq!(subset(&pods[..1], &acts, activator(3)), &pods[..1]);
    }

    #[test]
    fn pods_shared_by_several_activators_split_their_cc() {
        // Whatever the numbers, the activators on one pod hold at most CC together.
        for cc in 1..=7 {
            for pods in 1..=4 {
                for activators in 1..=9 {
                    let mut per_pod = vec![0; pods];
                    for i in 0..activators {
                        let share = pod_share(cc, pods, activators, Some(i));
                        let range = subset_range(pods, activators, Some(i));
                        for p in range {
                            per_pod[p] += share;
                        }
                    }
                    assert!(
                        per_pod.iter().all(|&n| n == cc),
                        "cc {cc}, {pods} pods, {activators} activators: {per_pod:?}"
                    );
                }
            }
        }
        assert_eq!(pod_share(2, 1, 3, Some(0)), 1);
        assert_eq!(pod_share(2, 1, 3, Some(2)), 0);
        assert_eq!(pod_share(2, 1, 3, None), 2);
    }

    #[test]
    fn an_activator_with_no_share_holds_no_permit() {
        let t = throttler(1);
        t.update_pods(vec![pod(1)]);
        t.update_activators(vec![activator(1), activator(2)], Some(activator(2)));
        assert_eq!(t.capacity(), 0);
        assert_eq!(t.assigned_pods(), 0);
        let first = throttler(1);
        first.update_pods(vec![pod(1)]);
        first.update_activators(vec![activator(1), activator(2)], Some(activator(1)));
        assert_eq!(first.capacity(), 1);
        // A second pod gives each its own.
        t.update_pods(vec![pod(1), pod(2)]);
        assert_eq!(t.capacity(), 1);
    }

    #[test]
    fn subset_with_unknown_index_takes_all() {
        let pods: Vec<_> = (1..=4).map(pod).collect();
        let acts = [activator(1), activator(2)];
        assert_eq!(subset(&pods, &acts, activator(9)), &pods[..]);
        assert_eq!(subset(&pods, &[], activator(1)), &pods[..]);
        assert_eq!(subset(&pods, &[activator(1)], activator(1)), &pods[..]);
        assert!(subset(&[], &acts, activator(1)).is_empty());
    }

    #[test]
    fn throttler_subsets_only_when_cc_is_positive() {
        let t = throttler(0);
        t.update_pods((1..=4).map(pod).collect());
        t.update_activators(vec![activator(2), activator(1)], Some(activator(1)));
        assert_eq!(t.ready_pods(), 4);
        assert_eq!(t.assigned_pods(), 4, "CC = 0: no subsetting");
        assert_eq!(t.capacity(), usize::MAX);

        t.set_container_concurrency(3);
        assert_eq!(t.assigned_pods(), 2);
        assert_eq!(t.capacity(), 6);
        // The first activator's slice is the first two pods.
        let permits: Vec<_> = (0..6).map(|_| now(&t)).collect();
        let counts = per_pod(&permits);
        assert_eq!(counts.get(&pod(1)), Some(&3));
        assert_eq!(counts.get(&pod(2)), Some(&3));

        // Own IP unknown: all pods.
        t.update_activators(vec![activator(2), activator(1)], None);
        assert_eq!(t.assigned_pods(), 4);
        assert_eq!(t.capacity(), 12);

        t.update_pods(Vec::new());
        assert_eq!(t.capacity(), 0);
    }

    #[tokio::test]
    async fn cc0_random_of_two_spreads_and_prefers_the_less_loaded() {
        let t = throttler(0);
        t.update_pods(vec![pod(1), pod(2)]);
        // With two pods both are always the candidates: the less loaded one wins.
        let mut permits = Vec::new();
        for _ in 0..100 {
            permits.push(now(&t));
            let c = per_pod(&permits);
            let (a, b) = (c.get(&pod(1)).copied(), c.get(&pod(2)).copied());
            assert!(a.unwrap_or(0).abs_diff(b.unwrap_or(0)) <= 1, "{c:?}");
        }
        // Free pod 1 entirely: the next 50 all go to it.
        permits.retain(|p| p.addr() != pod(1));
        for _ in 0..50 {
            assert_eq!(now(&t).addr(), pod(1));
            // (dropped at once: pod 1 stays the less loaded)
        }
        permits.clear();

        t.update_pods((1..=4).map(pod).collect());
        let permits: Vec<_> = (0..400).map(|_| now(&t)).collect();
        let counts = per_pod(&permits);
        assert_eq!(counts.len(), 4);
        assert!(
            counts.values().all(|&n| (60..=140).contains(&n)),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn cc2_first_available_fills_pods_in_order() {
        let t = throttler(2);
        t.update_pods(vec![pod(3), pod(1), pod(2)]);
        let mut permits: Vec<_> = (0..4).map(|_| now(&t)).collect();
        let addrs: Vec<_> = permits.iter().map(PodPermit::addr).collect();
        assert_eq!(addrs, [pod(1), pod(1), pod(2), pod(2)]);
        // A slot freed on the first pod is the first available.
        permits.remove(0);
        assert_eq!(now(&t).addr(), pod(1));
        permits.push(now(&t));
        permits.push(now(&t));
        let addrs: Vec<_> = permits.iter().map(PodPermit::addr).collect();
        assert_eq!(addrs, [pod(1), pod(2), pod(2), pod(1), pod(3)]);
        permits.push(now(&t));
        assert_eq!(t.in_flight(), 6);
        // Full: one more would wait.
        assert!(t.acquire(0).now_or_never().is_none());
        assert_eq!(t.waiting(), 0, "the cancelled attempt left no trace");
    }

    #[tokio::test]
    async fn cc10_round_robin_cycles_and_skips_full_pods() {
        let t = throttler(10);
        t.update_pods(vec![pod(1), pod(2), pod(3)]);
        let mut permits: Vec<_> = (0..6).map(|_| now(&t)).collect();
        let addrs: Vec<_> = permits.iter().map(PodPermit::addr).collect();
        assert_eq!(addrs, [pod(1), pod(2), pod(3), pod(1), pod(2), pod(3)]);
        permits.extend((0..24).map(|_| now(&t)));
        assert!(per_pod(&permits).values().all(|&n| n == 10));
        assert!(t.acquire(0).now_or_never().is_none());

        // Free one slot on pods 1 and 3: pod 2 is full and skipped.
        let i1 = permits.iter().position(|p| p.addr() == pod(1));
        permits.remove(i1.expect("pod 1"));
        let i3 = permits.iter().position(|p| p.addr() == pod(3));
        permits.remove(i3.expect("pod 3"));
        let a = now(&t);
        let b = now(&t);
        assert_eq!([a.addr(), b.addr()], [pod(1), pod(3)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_cc_on_a_pod_under_churn() {
        const CC: usize = 2;
        const REQUESTS: usize = 2_000;
        let t = throttler(CC);
        t.update_pods(vec![pod(1), pod(2), pod(3)]);
        let counts = Arc::new(Mutex::new(HashMap::<SocketAddr, usize>::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));

        // Checks the throttler's own books while everything runs.
        let checker = {
            let (t, done) = (Arc::clone(&t), Arc::clone(&done));
            tokio::spawn(async move {
                let mut checks = 0usize;
                while !done.load(Ordering::Acquire) {
                    {
                        let st = t.shared.lock();
                        for p in st.pods.iter().chain(&st.draining) {
                            assert!(p.in_flight <= CC, "{} holds {}", p.addr, p.in_flight);
                        }
                        let sum: usize = st
                            .pods
                            .iter()
                            .chain(&st.draining)
                            .map(|p| p.in_flight)
                            .sum();
                        assert_eq!(sum, st.in_flight);
                    }
                    checks += 1;
                    yield_now().await;
                }
                checks
            })
        };

        // Every 50th request to be served changes the pod set while it holds its permit;
        // there is always at least one pod.
        const SETS: [&[u8]; 6] = [&[1, 2], &[2, 3, 4], &[4], &[1, 4, 5], &[5], &[1, 2, 3]];
        let arrivals = Arc::new(AtomicUsize::new(0));
        let changes = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..REQUESTS)
            .map(|_| {
                let (t, counts, served) =
                    (Arc::clone(&t), Arc::clone(&counts), Arc::clone(&served));
                let (arrivals, changes) = (Arc::clone(&arrivals), Arc::clone(&changes));
                tokio::spawn(async move {
                    let permit = t.acquire(10).await.expect("served");
                    let addr = permit.addr();
                    {
                        let mut c = counts.lock().expect("counts");
                        let n = c.entry(addr).or_default();
                        *n += 1;
                        assert!(*n <= CC, "{addr} has {n} permits");
                    }
                    let nth = arrivals.fetch_add(1, Ordering::Relaxed) + 1;
                    if nth % 50 == 0 {
                        let set = SETS[(nth / 50) % SETS.len()];
                        t.update_pods(set.iter().map(|&i| pod(i)).collect());
                        changes.fetch_add(1, Ordering::Relaxed);
                    }
                    for _ in 0..fastrand::usize(0..4) {
                        yield_now().await;
                    }
                    if fastrand::u8(..) < 16 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    *counts.lock().expect("counts").entry(addr).or_default() -= 1;
                    drop(permit);
                    served.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();

        t.update_pods(vec![pod(1), pod(2), pod(3)]);

        for task in tasks {
            task.await.expect("request task");
        }
        done.store(true, Ordering::Release);
        assert!(checker.await.expect("checker") > 0);
        assert_eq!(served.load(Ordering::Relaxed), REQUESTS);
        assert_eq!(changes.load(Ordering::Relaxed), REQUESTS / 50);
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.waiting_body_bytes(), 0);
        assert_eq!(t.in_flight(), 0);
        assert!(t.shared.lock().draining.is_empty());
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let t = throttler(1);
        t.update_pods(vec![pod(1)]);
        let held = now(&t);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..20 {
            let (t2, tx) = (Arc::clone(&t), tx.clone());
            tokio::spawn(async move {
                let permit = t2.acquire(0).await.expect("permit");
                tx.send(i).expect("send");
                yield_now().await;
                drop(permit);
            });
            until("enqueued", || t.waiting() == i + 1).await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..20 {
            order.push(rx.recv().await.expect("order"));
        }
        assert_eq!(order, (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_waiting_count_is_bounded() {
        let settings = ThrottlerSettings {
            max_waiting: 5,
            ..ThrottlerSettings::default()
        };
        let t = with_settings(1, settings);
        let parked: Vec<_> = (0..5).map(|_| park(&t, 0)).collect();
        until("five waiting", || t.waiting() == 5).await;
        let err = t.acquire(0).now_or_never().expect("fails at once");
        assert_eq!(
            err.expect_err("queue full"),
            ThrottleError::QueueFull {
                revision: RevisionId::new("ns", "rev"),
                waiting: 5
            }
        );
        for p in &parked {
            p.abort();
        }
        for p in parked {
            let _ = p.await;
        }
        assert_eq!(t.waiting(), 0);
        assert!(t.acquire(0).now_or_never().is_none(), "room to wait again");
    }

    #[tokio::test]
    async fn the_waiting_bytes_are_bounded() {
        let settings = ThrottlerSettings {
            max_waiting_body_bytes: 100,
            ..ThrottlerSettings::default()
        };
        let t = with_settings(1, settings);
        let first = park(&t, 60);
        until("first waiting", || t.waiting_body_bytes() == 60).await;
        let err = t.acquire(60).now_or_never().expect("fails at once");
        assert!(
            matches!(
                err,
                Err(ThrottleError::BodyBudget {
                    waiting_bytes: 60,
                    body_cost: 60,
                    budget: 100,
                    ..
                })
            ),
            "{err:?}"
        );
        let second = park(&t, 40);
        until("second waiting", || t.waiting_body_bytes() == 100).await;

        // A waiter that leaves gives its bytes back.
        first.abort();
        let _ = first.await;
        assert_eq!(t.waiting_body_bytes(), 40);
        assert_eq!(t.waiting(), 1);

        // A waiter that is served gives its bytes back.
        t.update_pods(vec![pod(1)]);
        assert_eq!(t.waiting_body_bytes(), 0);
        assert_eq!(t.waiting(), 0);
        until("second holds its permit", || t.in_flight() == 1).await;
        second.abort();
        let _ = second.await;
        assert_eq!(t.in_flight(), 0);

        // A slot taken without waiting does not count against the budget.
        let big = t.acquire(1_000).now_or_never().expect("at once");
        assert!(big.is_ok());
        assert_eq!(t.waiting_body_bytes(), 0);
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_no_trace() {
        let t = throttler(2);
        let parked: Vec<_> = (0..1_000).map(|_| park(&t, 7)).collect();
        until("all waiting", || t.waiting() == 1_000).await;
        assert_eq!(t.waiting_body_bytes(), 7_000);
        assert!(t.has_waiters());
        for p in &parked {
            p.abort();
        }
        for p in parked {
            let _ = p.await;
        }
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.waiting_body_bytes(), 0);
        assert!(!t.has_waiters());
        assert!(t.shared.lock().queue.is_empty());

        // The whole capacity is there.
        t.update_pods(vec![pod(1), pod(2)]);
        let permits: Vec<_> = (0..4).map(|_| now(&t)).collect();
        assert!(t.acquire(0).now_or_never().is_none());
        assert_eq!(t.in_flight(), 4);
        drop(permits);
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn many_interleaved_cancellations_keep_the_queue_small() {
        let t = throttler(1);
        t.update_pods(vec![pod(1)]);
        let _held = now(&t);
        let keep = park(&t, 1);
        until("first waiting", || t.waiting() == 1).await;
        for round in 0..50 {
            let parked: Vec<_> = (0..100).map(|_| park(&t, 1)).collect();
            until("round waiting", || t.waiting() == 101).await;
            for p in &parked {
                p.abort();
            }
            for p in parked {
                let _ = p.await;
            }
            assert_eq!(t.waiting(), 1, "round {round}");
            assert!(t.shared.lock().queue.len() <= 1 + 2 * SWEEP_AT + 2);
        }
        keep.abort();
        let _ = keep.await;
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.waiting_body_bytes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancellation_racing_with_a_pod_appearing_keeps_capacity() {
        for round in 0..5 {
            let t = throttler(2);
            let parked: Vec<_> = (0..1_000).map(|_| park(&t, 3)).collect();
            until("all waiting", || t.waiting() == 1_000).await;
            let pods = {
                let t = Arc::clone(&t);
                tokio::spawn(async move {
                    for _ in 0..round * 10 {
                        yield_now().await;
                    }
                    t.update_pods(vec![pod(1), pod(2), pod(3)]);
                })
            };
            for p in &parked {
                p.abort();
            }
            pods.await.expect("pods");
            for p in parked {
                let _ = p.await;
            }
            assert_eq!(t.waiting(), 0, "round {round}");
            assert_eq!(t.waiting_body_bytes(), 0, "round {round}");
            assert_eq!(t.in_flight(), 0, "round {round}");
            let permits: Vec<_> = (0..6).map(|_| now(&t)).collect();
            assert!(per_pod(&permits).values().all(|&n| n == 2));
            assert!(t.acquire(0).now_or_never().is_none());
        }
    }

    #[tokio::test]
    async fn a_slot_handed_to_a_waiter_that_left_goes_to_the_next() {
        let t = throttler(1);
        t.update_pods(vec![pod(1)]);
        let held = now(&t);
        let first = park(&t, 0);
        until("first waiting", || t.waiting() == 1).await;
        let second = park(&t, 0);
        until("second waiting", || t.waiting() == 2).await;
        // The slot is sent to `first`, which is aborted before it runs.
        drop(held);
        first.abort();
        let _ = first.await;
        until("second holds the slot", || {
            t.waiting() == 0 && t.in_flight() == 1
        })
        .await;
        second.abort();
        let _ = second.await;
        assert_eq!(t.in_flight(), 0);
        drop(now(&t));
    }

    #[tokio::test]
    async fn waiters_park_without_pods_and_follow_pod_changes() {
        let t = throttler(1);
        assert_eq!(t.capacity(), 0);
        let (release_tx, release_rx) = watch::channel(false);
        let (addr_tx, mut addr_rx) = tokio::sync::mpsc::unbounded_channel();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let (t, addr_tx, mut release) =
                    (Arc::clone(&t), addr_tx.clone(), release_rx.clone());
                tokio::spawn(async move {
                    let permit = t.acquire(0).await.expect("permit");
                    addr_tx.send(permit.addr()).expect("send");
                    let _ = release.wait_for(|r| *r).await;
                    drop(permit);
                })
            })
            .collect();
        until("three waiting", || t.waiting() == 3).await;

        t.update_pods(vec![pod(1), pod(2)]);
        let mut got = vec![
            addr_rx.recv().await.expect("addr"),
            addr_rx.recv().await.expect("addr"),
        ];
        got.sort();
        assert_eq!(got, [pod(1), pod(2)]);
        assert_eq!(t.waiting(), 1);

        // Pod 1 goes away with its permit out; the last waiter gets the new pod 3.
        t.update_pods(vec![pod(2), pod(3)]);
        assert_eq!(addr_rx.recv().await.expect("addr"), pod(3));
        assert_eq!(t.ready_pods(), 2);
        assert_eq!(t.in_flight(), 3);

        // Pod 1 comes back while its old permit is still out: it is full.
        t.update_pods(vec![pod(1), pod(2), pod(3)]);
        assert!(t.acquire(0).now_or_never().is_none());

        let _ = release_tx.send(true);
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(t.in_flight(), 0);
        assert!(t.shared.lock().draining.is_empty());
        let permits: Vec<_> = (0..3).map(|_| now(&t)).collect();
        drop(permits);

        // A pod removed for good: its permits drop fine and nothing is tracked for it.
        let p = now(&t);
        assert_eq!(p.addr(), pod(1));
        t.update_pods(vec![pod(2)]);
        assert_eq!(t.shared.lock().draining.len(), 1);
        drop(p);
        assert!(t.shared.lock().draining.is_empty());
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.capacity(), 1);
    }

    #[tokio::test]
    async fn ten_thousand_parked_waiters_are_all_served() {
        const N: usize = 10_000;
        let t = throttler(100);
        let served = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let (t, served) = (Arc::clone(&t), Arc::clone(&served));
                tokio::spawn(async move {
                    let permit = t.acquire(100).await.expect("permit");
                    yield_now().await;
                    drop(permit);
                    served.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        until("all parked", || t.waiting() == N).await;
        assert_eq!(t.waiting_body_bytes(), 100 * N as u64);
        assert_eq!(t.in_flight(), 0);

        t.update_pods(vec![pod(1)]);
        assert_eq!(t.in_flight(), 100);
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(served.load(Ordering::Relaxed), N);
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.waiting_body_bytes(), 0);
        assert_eq!(t.in_flight(), 0);
        assert!(t.shared.lock().queue.capacity() <= SHRINK_ABOVE);
    }

    #[tokio::test]
    async fn lowering_cc_keeps_existing_permits() {
        let t = throttler(2);
        t.update_pods(vec![pod(1)]);
        let a = now(&t);
        let b = now(&t);
        t.set_container_concurrency(1);
        assert_eq!(t.capacity(), 1);
        assert!(t.acquire(0).now_or_never().is_none());
        drop(a);
        assert!(
            t.acquire(0).now_or_never().is_none(),
            "still at the new limit"
        );
        let waiter = park(&t, 0);
        until("waiting", || t.waiting() == 1).await;
        drop(b);
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.in_flight(), 1);
        // Raising it serves waiters at once.
        let more: Vec<_> = (0..2).map(|_| park(&t, 0)).collect();
        until("two waiting", || t.waiting() == 2).await;
        t.set_container_concurrency(3);
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.in_flight(), 3);
        waiter.abort();
        for m in &more {
            m.abort();
        }
        let _ = waiter.await;
        for m in more {
            let _ = m.await;
        }
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn closing_fails_waiters_and_newcomers() {
        let t = throttler(1);
        t.update_pods(vec![pod(1)]);
        let held = now(&t);
        let waiter = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.acquire(5).await.map(|p| p.addr()) })
        };
        until("waiting", || t.waiting() == 1).await;
        t.close();
        let gone = ThrottleError::RevisionGone(RevisionId::new("ns", "rev"));
        assert_eq!(waiter.await.expect("task"), Err(gone.clone()));
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.waiting_body_bytes(), 0);
        assert_eq!(
            t.acquire(0)
                .now_or_never()
                .expect("at once")
                .map(|p| p.addr()),
            Err(gone)
        );
        drop(held);
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn waiters_are_announced() {
        let t = throttler(1);
        let mut seen = t.subscribe_waiters();
        assert!(!*seen.borrow_and_update());
        assert!(t.waiters_present().now_or_never().is_none());
        let waiter = park(&t, 0);
        tokio::time::timeout(Duration::from_secs(5), t.waiters_present())
            .await
            .expect("announced");
        assert!(t.has_waiters());
        seen.changed().await.expect("changed");
        assert!(*seen.borrow_and_update());
        t.update_pods(vec![pod(1)]);
        seen.changed().await.expect("changed");
        assert!(!*seen.borrow_and_update());
        assert!(!t.has_waiters());
        waiter.abort();
        let _ = waiter.await;
    }

    #[test]
    fn a_queue_entry_is_two_words() {
        assert_eq!(std::mem::size_of::<Waiter>(), 16);
    }
}
