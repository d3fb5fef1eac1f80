//! Leader election through a `coordination.k8s.io` Lease, so that the built-in KPA runs on
//! one activator at a time while every activator serves traffic.
//!
//! The semantics are client-go's `leaderelection` package (read for facts, not copied):
//!
//! * A candidate **takes** the Lease when it has no holder, when it holds it itself, or
//!   when the holder's lease has **expired as observed**: the record last *changed*, by
//!   this candidate's own clock, more than `leaseDurationSeconds` ago. `renewTime` is
//!   written for humans and other tools but never trusted, because the writer's clock may
//!   be skewed against ours.
//! * Every write is a `replace` carrying the `resourceVersion` that was read, so two
//!   candidates racing for an expired Lease cannot both win: the loser gets `409
//!   Conflict`. A leader that gets a 409 stops leading at once.
//! * A leader stops acting as leader when it has not renewed for its **renew deadline**
//!   (two thirds of the lease duration, as client-go's 10 s of 15 s), measured from when
//!   it *sent* its last successful renewal. The API server committed that renewal no
//!   earlier, and other candidates start counting the lease duration no earlier than they
//!   see the commit, so the old leader has stopped a third of the lease duration before
//!   anyone else may start: two leaders never act at once, even while the API server is
//!   unreachable (the leader keeps its role only until the deadline passes).
//! * [`Elector::release`] clears `holderIdentity`, so a follower takes over at its next
//!   attempt instead of waiting the lease out.
//! * `leaseTransitions` counts changes of holder; `acquireTime` is when the current holder
//!   took it.
//!
//! Followers must reach the leader's stat websocket (`crate::stat_server`), so the
//! holder writes its `ip:port` into the annotation [`STAT_ADDRESS_ANNOTATION`] whenever it
//! acquires or renews; [`Elector::leader`] shows it, and [`Elector::stat_target`] turns it
//! into the URL a follower's `Reporter` follows (`None` on the leader itself, which feeds
//! its own stats in process).
//!
//! ## Timing (the defaults)
//! Lease duration 10 s, renew every 2 s, retry every 2 s (+ up to 20 % jitter), renew
//! deadline 6.7 s. A follower sees each renewal at its next poll (at most one retry period,
//! plus jitter, after the commit) and, besides polling, wakes exactly when the lease it
//! observed would expire. So when a leader dies without releasing, the follower takes
//! over between `duration - renew_every` and `duration + retry_every × 1.2` after the
//! death: 8 to 12.4 s, under the 15 s the platform promises. A leader survives two failed
//! renewals in a row (an API server hiccup) before it steps down. Shorter leases would
//! fail over faster but make a busy API server (or a 2-core testbed) flap leadership.
//!
//! ## Logs
//! One line per change of role (leading, following whom, no leader) and per change of
//! problem (a new error, or the API server answering again), never one per retry. A 403
//! names the verb and the resource, e.g. `get leases.coordination.k8s.io in namespace
//! thaw-system`.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{self, Instant};

use super::sync::describe;

/// The annotation on the Lease naming the holder's stat websocket, `ip:port`.
pub const STAT_ADDRESS_ANNOTATION: &str = "thaw.dev/stat-address";

/// The resource as RBAC names it, for error messages.
const RESOURCE: &str = "leases.coordination.k8s.io";

/// How long leases last and how often candidates act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Written to the Lease as `leaseDurationSeconds` (rounded up to whole seconds):
    /// how long others wait, after they last saw the record change, before taking it.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    /// How often a follower tries to take the lease (jittered by up to +20 %).
    pub retry_every: Duration,
}

impl Default for LeaseSettings {
    /// 10 s / 2 s / 2 s: failover within 12.4 s (see the module docs).
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// Why an elector cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElectionError {
    #[error("lease duration {0:?} is too short: a Lease counts whole seconds, so at least 1s")]
    DurationTooShort(Duration),
    #[error("lease duration {0:?} does not fit a Lease's leaseDurationSeconds")]
    DurationTooLong(Duration),
    #[error("renew period {renew_every:?} must be positive and leave room for two renewals before the renew deadline {deadline:?} (two thirds of the lease duration)")]
    RenewTooSlow {
        renew_every: Duration,
        deadline: Duration,
    },
    #[error("retry period must be positive")]
    NoRetry,
    #[error("the elector's identity is empty (set POD_NAME)")]
    NoIdentity,
    #[error("the lease name is empty")]
    NoLeaseName,
}

impl LeaseSettings {
    /// A leader that has not renewed for this long (since it sent its last successful
    /// renewal) stops leading: two thirds of the lease duration, as client-go's defaults.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// Checks that the settings keep the safety argument of the module docs.
    pub fn check(&self) -> Result<(), ElectionError> {
        if self.lease_duration < Duration::from_secs(1) {
            return Err(ElectionError::DurationTooShort(self.lease_duration));
        }
        if self.lease_duration > Duration::from_secs(i32::MAX as u64) {
            return Err(ElectionError::DurationTooLong(self.lease_duration));
        }
        let deadline = self.renew_deadline();
        if self.renew_every.is_zero() || self.renew_every * 2 > deadline {
            return Err(ElectionError::RenewTooSlow {
                renew_every: self.renew_every,
                deadline,
            });
        }
        if self.retry_every.is_zero() {
            return Err(ElectionError::NoRetry);
        }
        Ok(())
    }

    /// `leaseDurationSeconds`, rounded up so others never wait less than we assume.
    fn duration_seconds(&self) -> i32 {
        let whole =
            self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        i32::try_from(whole).unwrap_or(i32::MAX)
    }

    /// The bound on one API request: half the renew deadline, so a leader whose first
    /// renewal hangs still has time for another before it must step down.
    fn request_timeout(&self) -> Duration {
        (self.renew_deadline() / 2).max(self.renew_every)
    }
}

/// The holder of the Lease as this activator last observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The holder's identity (its pod name).
    pub identity: String,
    /// Its stat websocket, `ip:port`, when it wrote one.
    pub address: Option<String>,
}

impl Leader {
    /// The websocket URL of the leader's stat server.
    pub fn stat_url(&self) -> Option<String> {
        self.address.as_ref().map(|a| format!("ws://{a}/"))
    }
}

/// What a Lease says, as far as the election is concerned. Two reads that give equal
/// records mean nobody wrote in between (client-go compares the raw record the same way).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// `None` for an absent or empty `holderIdentity`.
    pub holder: Option<String>,
    pub lease_duration_seconds: Option<i32>,
    pub transitions: i32,
    pub acquire_time: Option<MicroTime>,
    pub renew_time: Option<MicroTime>,
    /// The [`STAT_ADDRESS_ANNOTATION`].
    pub address: Option<String>,
}

impl Record {
    pub fn from_lease(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration_seconds: spec.lease_duration_seconds,
            transitions: spec.lease_transitions.unwrap_or(0).max(0),
            acquire_time: spec.acquire_time,
            renew_time: spec.renew_time,
            address: lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(STAT_ADDRESS_ANNOTATION))
                .filter(|a| !a.is_empty())
                .cloned(),
        }
    }

    /// How long the holder's claim lasts after it was observed; a missing or negative
    /// duration lasts no time at all (client-go reads a missing one as 0 too).
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.lease_duration_seconds.unwrap_or(0)).unwrap_or(0))
    }
}

/// What a candidate should do about a Lease it has just read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write ourselves as holder. `transition`: the holder changes (from nobody, or from
    /// someone whose lease expired), so `leaseTransitions` grows and `acquireTime` is now;
    /// otherwise this renews our own lease.
    Acquire { transition: bool },
    /// Someone else holds it until `expires`, by our clock.
    Follow { leader: Leader, expires: Instant },
}

/// The election's one decision, as a pure function of the record, when we saw it change
/// (`observed_at`), and now, all by our own clock.
pub fn decide(identity: &str, record: &Record, observed_at: Instant, now: Instant) -> Decision {
    match record.holder.as_deref() {
        None => Decision::Acquire { transition: true },
        Some(holder) if holder == identity => Decision::Acquire { transition: false },
        Some(holder) => {
            let expires = observed_at + record.lease_duration();
            if now >= expires {
                Decision::Acquire { transition: true }
            } else {
                Decision::Follow {
                    leader: Leader {
                        identity: holder.to_owned(),
                        address: record.address.clone(),
                    },
                    expires,
                }
            }
        }
    }
}

/// The Lease as we write it to take or renew it: `base` (the one read, with its
/// `resourceVersion`, or a fresh one) with us as holder and our address annotated.
fn claimed(
    base: Lease,
    identity: &str,
    address: &str,
    settings: &LeaseSettings,
    transition: bool,
    now: Timestamp,
) -> Lease {
    let mut lease = base;
    let old = Record::from_lease(&lease);
    // A Lease that exists has a resourceVersion; a fresh one starts at 0 transitions.
    let exists = lease.metadata.resource_version.is_some();
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some(identity.to_owned());
    spec.lease_duration_seconds = Some(settings.duration_seconds());
    spec.renew_time = Some(MicroTime(now));
    if transition || old.acquire_time.is_none() {
        spec.acquire_time = Some(MicroTime(now));
    }
    // Every change of holder counts, also taking a released (holderless) Lease.
    spec.lease_transitions = Some(match (transition, exists) {
        (true, true) => old.transitions.saturating_add(1),
        (true, false) => 0,
        (false, _) => old.transitions,
    });
    lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(STAT_ADDRESS_ANNOTATION.to_owned(), address.to_owned());
    lease
}

/// The Lease as we write it to release it: no holder, no address.
fn released(base: Lease, now: Timestamp) -> Lease {
    let mut lease = base;
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(now));
    if let Some(a) = lease.metadata.annotations.as_mut() {
        a.remove(STAT_ADDRESS_ANNOTATION);
    }
    lease
}

/// A running candidate. Dropping it stops the candidate *without* releasing the Lease
/// (as if the process died): others take over when the lease expires. Call
/// [`release`](Self::release) on a graceful stop instead.
#[derive(Debug)]
pub struct Elector {
    leader: watch::Receiver<Option<Leader>>,
    leading: watch::Receiver<bool>,
    target: watch::Receiver<Option<String>>,
    problem: watch::Receiver<Option<String>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// The leader election for one Lease.
pub struct LeaseElector;

impl LeaseElector {
    /// Starts a candidate for the Lease `namespace/lease_name` (created if absent) on the
    /// current tokio runtime. `identity` is this activator's pod name; `address` the
    /// `ip:port` of its stat server, written to the Lease while it leads.
    pub fn spawn(
        client: Client,
        namespace: &str,
        lease_name: &str,
        identity: &str,
        address: &str,
        settings: LeaseSettings,
    ) -> Result<Elector, ElectionError> {
        settings.check()?;
        if identity.is_empty() {
            return Err(ElectionError::NoIdentity);
        }
        if lease_name.is_empty() {
            return Err(ElectionError::NoLeaseName);
        }
        let (leader_tx, leader) = watch::channel(None);
        let (leading_tx, leading) = watch::channel(false);
        let (target_tx, target) = watch::channel(None);
        let (problem_tx, problem) = watch::channel(None);
        let (stop, stopped) = oneshot::channel();
        let candidate = Candidate {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: lease_name.to_owned(),
            identity: identity.to_owned(),
            address: address.to_owned(),
            settings,
            observed: None,
            deadline: None,
            leader_tx,
            leading_tx,
            target_tx,
            problem_tx,
        };
        Ok(Elector {
            leader,
            leading,
            target,
            problem,
            stop: Some(stop),
            task: Some(tokio::spawn(candidate.run(stopped))),
        })
    }
}

impl Elector {
    /// The holder as last observed (`None`: nobody, or the last holder's lease expired,
    /// or not read yet). On the leader, itself.
    pub fn leader(&self) -> watch::Receiver<Option<Leader>> {
        self.leader.clone()
    }

    /// Whether this activator leads right now (and may act as the autoscaler).
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Sees every change of [`is_leader`](Self::is_leader).
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// The leader's stat websocket URL for this activator's reporter: `None` when this
    /// activator leads (it feeds its own stats in process) or no leader is known.
    pub fn stat_target(&self) -> watch::Receiver<Option<String>> {
        self.target.clone()
    }

    /// The last API failure while it lasts (for readiness warnings), `None` when the
    /// API server answers.
    pub fn problem(&self) -> Option<String> {
        self.problem.borrow().clone()
    }

    /// Stops the candidate gracefully: stops leading first, then clears
    /// `holderIdentity` (if the Lease still names us) so a follower takes over at its
    /// next attempt. Returns when done (bounded by a few request timeouts).
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Elector {
    fn drop(&mut self) {
        // Abort before the stop sender drops, so the task cannot mistake the drop for a
        // graceful stop and release.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Why an API request failed.
enum Failure {
    Api(kube::Error),
    Timeout(Duration),
}

impl Failure {
    fn is_conflict(&self) -> bool {
        matches!(self, Failure::Api(kube::Error::Api(s)) if s.code == 409)
    }
}

struct Candidate {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    address: String,
    settings: LeaseSettings,
    /// The last record read or written, and when it last changed, by our clock.
    observed: Option<(Record, Instant)>,
    /// `Some` while leading: when we stop unless renewed before.
    deadline: Option<Instant>,
    leader_tx: watch::Sender<Option<Leader>>,
    leading_tx: watch::Sender<bool>,
    target_tx: watch::Sender<Option<String>>,
    problem_tx: watch::Sender<Option<String>>,
}

impl Candidate {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        loop {
            let started = Instant::now();
            let stopped = tokio::select! {
                biased;
                s = &mut stop => Some(s.is_ok()),
                () = self.attempt() => None,
            };
            if let Some(graceful) = stopped {
                return self.finish(graceful).await;
            }
            let next = self.next_attempt(started);
            let stopped = tokio::select! {
                biased;
                s = &mut stop => Some(s.is_ok()),
                () = self.pause_until(next) => None,
            };
            if let Some(graceful) = stopped {
                return self.finish(graceful).await;
            }
        }
    }

    async fn finish(&mut self, graceful: bool) {
        self.step_down(None);
        if graceful {
            self.release().await;
        }
    }

    /// One read, and the write the decision asks for.
    async fn attempt(&mut self) {
        let (api, name) = (self.api.clone(), self.name.clone());
        let read = self.io(async move { api.get_opt(&name).await }).await;
        let lease = match read {
            Ok(lease) => lease,
            Err(failure) => {
                self.failed("get", &failure);
                return self.publish();
            }
        };
        let Some(lease) = lease else {
            return self.create().await;
        };
        let now = Instant::now();
        let record = Record::from_lease(&lease);
        let observed_at = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => now,
        };
        self.observed = Some((record.clone(), observed_at));
        match decide(&self.identity, &record, observed_at, now) {
            Decision::Follow { leader, .. } => {
                self.healthy();
                self.step_down(Some(&format!("the Lease is held by {}", leader.identity)));
            }
            Decision::Acquire { transition } => {
                let body = claimed(
                    lease,
                    &self.identity,
                    &self.address,
                    &self.settings,
                    transition,
                    Timestamp::now(),
                );
                let (api, name) = (self.api.clone(), self.name.clone());
                let sent = Instant::now();
                let written = self
                    .io(async move { api.replace(&name, &PostParams::default(), &body).await })
                    .await;
                match written {
                    Ok(lease) => {
                        self.healthy();
                        self.won(&lease, sent);
                    }
                    Err(failure) if failure.is_conflict() => {
                        // Someone else wrote first: whoever it was, we are not the
                        // leader this round. The next read shows who is.
                        self.healthy();
                        self.step_down(Some("the Lease changed under us (409 Conflict)"));
                    }
                    Err(failure) => self.failed("update", &failure),
                }
            }
        }
        self.publish();
    }

    async fn create(&mut self) {
        let fresh = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: None,
        };
        let body = claimed(
            fresh,
            &self.identity,
            &self.address,
            &self.settings,
            true,
            Timestamp::now(),
        );
        let api = self.api.clone();
        let sent = Instant::now();
        match self
            .io(async move { api.create(&PostParams::default(), &body).await })
            .await
        {
            Ok(lease) => {
                self.healthy();
                self.won(&lease, sent);
            }
            // Another candidate created it first; the next read shows it.
            Err(failure) if failure.is_conflict() => self.healthy(),
            Err(failure) => self.failed("create", &failure),
        }
        self.publish();
    }

    /// Our write of `lease`, sent at `sent`, succeeded.
    fn won(&mut self, lease: &Lease, sent: Instant) {
        let now = Instant::now();
        self.observed = Some((Record::from_lease(lease), now));
        let deadline = sent + self.settings.renew_deadline();
        if deadline > now {
            self.deadline = Some(deadline);
        } else {
            // The write took longer than the whole deadline: by our own rule this
            // renewal is already too old to lead on.
            self.step_down(Some("the renewal took longer than the renew deadline"));
        }
    }

    /// Stops leading, if we were; `reason` is logged (`None`: quietly, on stop).
    fn step_down(&mut self, reason: Option<&str>) {
        if self.deadline.take().is_some() {
            self.leading_tx.send_replace(false);
            if let Some(reason) = reason {
                tracing::warn!(lease = %self.lease(), reason, "stopped leading");
            }
            self.publish();
        }
    }

    /// Runs an API request, bounded by the request timeout; a leader whose renew
    /// deadline passes meanwhile steps down at the deadline, not when the request ends.
    async fn io<T>(
        &mut self,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Failure> {
        let limit = self.settings.request_timeout();
        let timeout = time::sleep(limit);
        tokio::pin!(request, timeout);
        loop {
            let deadline = self.deadline;
            tokio::select! {
                biased;
                () = time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.step_down(Some("could not renew the Lease before the renew deadline"));
                }
                out = &mut request => return out.map_err(Failure::Api),
                () = &mut timeout => return Err(Failure::Timeout(limit)),
            }
        }
    }

    /// Sleeps until `until`, stepping down on the way if the renew deadline passes, and
    /// publishing that a followed leader's lease ran out.
    async fn pause_until(&mut self, until: Instant) {
        loop {
            let deadline = self.deadline;
            tokio::select! {
                biased;
                () = time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.step_down(Some("could not renew the Lease before the renew deadline"));
                }
                () = time::sleep_until(until) => return self.publish(),
            }
        }
    }

    /// When to read the Lease next, given that this attempt started at `started`.
    fn next_attempt(&self, started: Instant) -> Instant {
        if self.deadline.is_some() {
            return started + self.settings.renew_every;
        }
        let jitter = 1.0 + 0.2 * fastrand::f64();
        let retry = started + self.settings.retry_every.mul_f64(jitter);
        // Besides polling, be there the moment the followed lease runs out.
        match self.observed_decision(Instant::now()) {
            Some(Decision::Follow { expires, .. }) => retry.min(expires),
            _ => retry,
        }
    }

    fn observed_decision(&self, now: Instant) -> Option<Decision> {
        let (record, at) = self.observed.as_ref()?;
        Some(decide(&self.identity, record, *at, now))
    }

    /// Publishes who leads, as of now, and logs a change of role.
    fn publish(&mut self) {
        let leader = if self.deadline.is_some() {
            Some(Leader {
                identity: self.identity.clone(),
                address: Some(self.address.clone()),
            })
        } else {
            match self.observed_decision(Instant::now()) {
                Some(Decision::Follow { leader, .. }) => Some(leader),
                // Nobody, an expired holder, or our own record while we do not lead.
                _ => None,
            }
        };
        if self.deadline.is_some() {
            self.leading_tx
                .send_if_modified(|l| !std::mem::replace(l, true));
        }
        let target = match &leader {
            Some(l) if l.identity != self.identity => l.stat_url(),
            _ => None,
        };
        self.target_tx.send_if_modified(|t| {
            let changed = *t != target;
            *t = target;
            changed
        });
        let lease = self.lease();
        self.leader_tx.send_if_modified(|current| {
            if *current == leader {
                return false;
            }
            match &leader {
                Some(l) if l.identity == self.identity => {
                    tracing::info!(lease = %lease, "leading: this activator holds the Lease");
                }
                Some(l) => tracing::info!(
                    lease = %lease,
                    leader = %l.identity,
                    address = l.address.as_deref().unwrap_or("(none)"),
                    "following {}",
                    l.identity
                ),
                None => tracing::info!(lease = %lease, "no leader"),
            }
            *current = leader;
            true
        });
    }

    fn failed(&mut self, verb: &str, failure: &Failure) {
        let message = match failure {
            Failure::Api(e) => format!(
                "{verb} lease {}: {}",
                self.lease(),
                describe(e, verb, RESOURCE, &format!("namespace {}", self.namespace))
            ),
            Failure::Timeout(limit) => format!(
                "{verb} lease {}: the API server did not answer within {limit:?}",
                self.lease()
            ),
        };
        let lease = self.lease();
        self.problem_tx.send_if_modified(|p| {
            if p.as_deref() == Some(message.as_str()) {
                return false;
            }
            tracing::warn!(lease = %lease, error = %message, "leader election failing; retrying");
            *p = Some(message);
            true
        });
    }

    fn healthy(&mut self) {
        let lease = self.lease();
        self.problem_tx.send_if_modified(|p| {
            if p.take().is_some() {
                tracing::info!(lease = %lease, "leader election: the API server answers again");
                true
            } else {
                false
            }
        });
    }

    /// Clears the holder if the Lease still names us, within two request timeouts.
    async fn release(&mut self) {
        let limit = self.settings.request_timeout() * 2;
        let lease = self.lease();
        match time::timeout(limit, self.clear()).await {
            Ok(Ok(true)) => tracing::info!(lease = %lease, "released the Lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(lease = %lease, error = %e, "could not release the Lease; others take it when it expires")
            }
            Err(_) => {
                tracing::warn!(lease = %lease, "the API server did not answer within {limit:?} while releasing the Lease; others take it when it expires")
            }
        }
    }

    async fn clear(&self) -> Result<bool, String> {
        let scope = format!("namespace {}", self.namespace);
        let Some(lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| describe(&e, "get", RESOURCE, &scope))?
        else {
            return Ok(false);
        };
        if Record::from_lease(&lease).holder.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let body = released(lease, Timestamp::now());
        self.api
            .replace(&self.name, &PostParams::default(), &body)
            .await
            .map_err(|e| describe(&e, "update", RESOURCE, &scope))?;
        Ok(true)
    }

    fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, seconds: i32) -> Record {
        Record {
            holder: holder.map(str::to_owned),
            lease_duration_seconds: Some(seconds),
            address: Some("10.0.0.7:8080".into()),
            ..Record::default()
        }
    }

    #[test]
    fn absent_holder_is_taken_as_a_transition() {
        let t = Instant::now();
        assert_eq!(
            decide("me", &record(None, 10), t, t),
            Decision::Acquire { transition: true }
        );
    }

    #[test]
    fn own_record_is_renewed_even_when_expired() {
        let t = Instant::now();
        let r = record(Some("me"), 10);
        assert_eq!(
            decide("me", &r, t, t),
            Decision::Acquire { transition: false }
        );
        assert_eq!(
            decide("me", &r, t, t + Duration::from_secs(60)),
            Decision::Acquire { transition: false }
        );
    }

    #[test]
    fn another_holder_is_followed_until_expiry_by_the_observers_clock() {
        let seen = Instant::now();
        let r = record(Some("other"), 10);
        let expires = seen + Duration::from_secs(10);
        let follow = Decision::Follow {
            leader: Leader {
                identity: "other".into(),
                address: Some("10.0.0.7:8080".into()),
            },
            expires,
        };
        assert_eq!(decide("me", &r, seen, seen), follow);
        assert_eq!(
            decide("me", &r, seen, expires - Duration::from_millis(1)),
            follow
        );
        assert_eq!(
            decide("me", &r, seen, expires),
            Decision::Acquire { transition: true }
        );
    }

    #[test]
    fn renew_time_is_not_trusted() {
        // A renewTime far in the past (a skewed writer clock) does not expire the lease:
        // only when we saw the record change counts.
        let seen = Instant::now();
        let mut r = record(Some("other"), 10);
        r.renew_time = Some(MicroTime(Timestamp::UNIX_EPOCH));
        assert!(matches!(
            decide("me", &r, seen, seen + Duration::from_secs(9)),
            Decision::Follow { .. }
        ));
    }

    #[test]
    fn missing_or_negative_duration_expires_at_once() {
        let t = Instant::now();
        let mut r = record(Some("other"), -5);
        assert_eq!(
            decide("me", &r, t, t),
            Decision::Acquire { transition: true }
        );
        r.lease_duration_seconds = None;
        assert_eq!(
            decide("me", &r, t, t),
            Decision::Acquire { transition: true }
        );
    }

    #[test]
    fn records_from_leases_normalise_empty_fields() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "l", "annotations": {STAT_ADDRESS_ANNOTATION: ""}},
            "spec": {"holderIdentity": "", "leaseTransitions": -3}
        }))
        .unwrap();
        let r = Record::from_lease(&lease);
        assert_eq!(r.holder, None);
        assert_eq!(r.address, None);
        assert_eq!(r.transitions, 0);
        assert_eq!(r.lease_duration(), Duration::ZERO);
    }

    fn existing(holder: Option<&str>, transitions: i32) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "l", "namespace": "ns", "resourceVersion": "42",
                         "annotations": {"keep": "me"}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "leaseTransitions": transitions,
                     "acquireTime": "2020-01-01T00:00:00.000000Z",
                     "renewTime": "2020-01-01T00:00:05.000000Z"}
        }))
        .unwrap()
    }

    #[test]
    fn claiming_counts_transitions_and_keeps_the_resource_version() {
        let s = LeaseSettings::default();
        let now = Timestamp::from_second(1_700_000_000).unwrap();

        let taken = claimed(
            existing(Some("old"), 4),
            "me",
            "10.0.0.9:8080",
            &s,
            true,
            now,
        );
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("42"));
        let r = Record::from_lease(&taken);
        assert_eq!(r.holder.as_deref(), Some("me"));
        assert_eq!(r.transitions, 5);
        assert_eq!(r.lease_duration_seconds, Some(10));
        assert_eq!(r.acquire_time, Some(MicroTime(now)));
        assert_eq!(r.renew_time, Some(MicroTime(now)));
        assert_eq!(r.address.as_deref(), Some("10.0.0.9:8080"));
        assert_eq!(taken.metadata.annotations.as_ref().unwrap()["keep"], "me");

        // Renewing keeps acquireTime and the count.
        let renewed = claimed(
            existing(Some("me"), 4),
            "me",
            "10.0.0.9:8080",
            &s,
            false,
            now,
        );
        let r = Record::from_lease(&renewed);
        assert_eq!(r.transitions, 4);
        assert_ne!(r.acquire_time, Some(MicroTime(now)));
        assert_eq!(r.renew_time, Some(MicroTime(now)));

        // Taking a released Lease is a transition too.
        let after_release = claimed(existing(None, 4), "me", "a:1", &s, true, now);
        assert_eq!(Record::from_lease(&after_release).transitions, 5);

        // A fresh Lease starts at 0.
        let fresh = Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                ..ObjectMeta::default()
            },
            spec: None,
        };
        let created = claimed(fresh, "me", "a:1", &s, true, now);
        assert_eq!(Record::from_lease(&created).transitions, 0);
    }

    #[test]
    fn releasing_clears_holder_and_address_only() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let mut lease = existing(Some("me"), 2);
        lease
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(STAT_ADDRESS_ANNOTATION.into(), "a:1".into());
        let out = released(lease, now);
        let r = Record::from_lease(&out);
        assert_eq!(r.holder, None);
        assert_eq!(r.address, None);
        assert_eq!(r.transitions, 2);
        assert_eq!(out.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(out.metadata.annotations.as_ref().unwrap()["keep"], "me");
    }

    #[test]
    fn settings_keep_the_safety_margins() {
        let s = LeaseSettings::default();
        assert_eq!(s.check(), Ok(()));
        assert!(s.renew_deadline() < s.lease_duration);
        assert!(s.renew_every * 2 <= s.renew_deadline());
        // Worst-case failover after a leader dies: the lease duration after the
        // follower's last observation, which lags the renewal by one jittered retry.
        assert!(s.lease_duration + s.retry_every.mul_f64(1.2) < Duration::from_secs(15));
        assert_eq!(s.duration_seconds(), 10);
        assert_eq!(
            LeaseSettings {
                lease_duration: Duration::from_millis(2500),
                renew_every: Duration::from_millis(500),
                ..s
            }
            .duration_seconds(),
            3
        );
        assert_eq!(
            LeaseSettings {
                lease_duration: Duration::from_millis(500),
                ..s
            }
            .check(),
            Err(ElectionError::DurationTooShort(Duration::from_millis(500)))
        );
        assert!(matches!(
            LeaseSettings {
                renew_every: Duration::from_secs(4),
                ..s
            }
            .check(),
            Err(ElectionError::RenewTooSlow { .. })
        ));
        assert!(matches!(
            LeaseSettings {
                renew_every: Duration::ZERO,
                ..s
            }
            .check(),
            Err(ElectionError::RenewTooSlow { .. })
        ));
        assert_eq!(
            LeaseSettings {
                retry_every: Duration::ZERO,
                ..s
            }
            .check(),
            Err(ElectionError::NoRetry)
        );
    }

    #[test]
    fn leader_urls() {
        let l = Leader {
            identity: "a".into(),
            address: Some("[fd00::1]:8080".into()),
        };
        assert_eq!(l.stat_url().as_deref(), Some("ws://[fd00::1]:8080/"));
        assert_eq!(
            Leader {
                identity: "a".into(),
                address: None
            }
            .stat_url(),
            None
        );
    }
}
