//! The leader's stat websocket: where the other activators' [`Reporter`]s send their load
//! (CONTRACT §2.5, §3), and what the built-in autoscaler reads of it.
//!
//! It speaks what Knative's autoscaler serves on :8080 (`pkg/autoscaler/statserver`): a
//! websocket on any path whose binary messages are `WireStatMessages` protobufs; entries
//! without a `stat` are skipped (Knative: "to allow for future protobuf schema changes");
//! on shutdown every client gets close code 1012 (Service Restart), which the reporter
//! answers by reconnecting at once (to the new leader, once the Lease names it).
//!
//! What the autoscaler does with the stats (`pkg/autoscaler/metrics/collector.go`,
//! `cmd/autoscaler/main.go`), and how [`ReportedStats`] matches it:
//!
//! * Knative records each stat's `average_concurrent_requests −
//!   average_proxied_concurrent_requests` (proxied requests are counted by the activator
//!   already) into time buckets at its arrival time, summing everything that lands in one
//!   bucket, and averages over the stable and panic windows. Here the windows are the
//!   scaler's (it samples [`ReportedStats::load`] every tick); this module keeps, per
//!   revision and sending pod (`Stat.pod_name`), the latest figure with its arrival time,
//!   and [`load`](ReportedStats::load) sums the fresh ones, so the scaler sees the same
//!   sum Knative's bucket holds for one reporting period. Activators send no proxied
//!   figures, so the subtraction (kept, floored at 0) changes nothing for them.
//! * **Pokes.** The reporter sends `{average_concurrent_requests: 1, request_count: 1}`
//!   alone in a batch the moment an idle revision gets its first request, and subtracts
//!   it from its next regular report, because in Knative both land in the same bucket
//!   and sum. Keeping only the latest figure would lose the poke at the next report and
//!   under-count it, so a poke is held as a pending `+1` that the sender's next report
//!   absorbs: after a poke the load is 1 at once, then the real figure. A poke is
//!   recognised as that exact stat, alone in its batch, from a sender whose last fresh
//!   figure for the revision was 0 (the only time the reporter pokes).
//! * Knative's `MultiScaler.Poke` wakes a revision's scaler when a stat with non-zero
//!   concurrency arrives while its scale is 0. This server does not know scales, so it
//!   wakes the scaler ([`pokes`](ReportedStats::pokes), a [`Notify`], plus the revisions
//!   in [`take_poked`](ReportedStats::take_poked)) on every poke and whenever a
//!   revision's reported load goes from 0 to more, which is when its scale may be 0.
//!
//! Where this differs from Knative, on purpose:
//! * A frame that does not decode, or a text frame, closes *that* connection with 1002
//!   (Protocol Error) after one log line; Knative logs every such frame and carries on.
//!   A sender that sends garbage has a bug, and one line per connection says so without
//!   flooding the log. A frame over `max_message_bytes` closes with 1009 (Message Too
//!   Big); Knative sets no limit.
//! * A figure that is not finite, is negative, or is above
//!   `thaw_shared::limits::MAX_REPORTED_CONCURRENCY` (1e9) is invalid, so that
//!   [`load`](ReportedStats::load)'s sum over senders stays finite; Knative takes any
//!   float.
//! * Figures expire: an entry older than `staleness` (three reporting periods) counts
//!   for nothing and is swept, so a sender that disconnects or dies is forgotten after
//!   the bound. (Knative's buckets age out of the window the same way.)
//! * Memory is bounded: at most `max_revisions` revisions × `max_senders_per_revision`
//!   senders × one small entry, `max_connections` connections, and frames of
//!   `max_message_bytes`.
//! * Knative answers kubelet probes on this port; Thaw's activators are probed on their
//!   serving port, so this server only speaks websocket.
//!
//! [`Reporter`]: crate::reporter::Reporter

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use thaw_shared::limits::MAX_REPORTED_CONCURRENCY;
use thaw_shared::proto::{Stat, WireStatMessages};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::revision::RevisionId;

/// Limits and timings of the stat server.
#[derive(Debug, Clone, PartialEq)]
pub struct StatServerSettings {
    /// Largest websocket message (and frame) accepted; a bigger one closes the
    /// connection with 1009. A batch is ~60 bytes per revision, so 1 MiB carries
    /// more than ten thousand revisions.
    pub max_message_bytes: usize,
    /// A sender's figure counts for this long after it arrived: three reporting
    /// periods (the reporter sends every second while a revision has load).
    pub staleness: Duration,
    /// Revisions tracked at once.
    pub max_revisions: usize,
    /// Sending pods tracked per revision (one per activator).
    pub max_senders_per_revision: usize,
    /// Open connections at once; more are refused.
    pub max_connections: usize,
    /// Limit on the websocket handshake.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long (the reporter pings every 3.3 s)
    /// is dropped.
    pub idle_timeout: Duration,
}

impl Default for StatServerSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            staleness: Duration::from_secs(3),
            max_revisions: 10_000,
            max_senders_per_revision: 128,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Longest namespace, name or pod name accepted (a DNS subdomain).
const MAX_NAME: usize = 253;

/// Why a stat was not kept.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejected {
    #[error("stat for {revision}: {reason}")]
    Invalid { revision: String, reason: String },
    #[error("tracking {0} already (the cap); stats for new ones are dropped until some go stale")]
    TooManyRevisions(usize),
    #[error("{revision} has {count} senders already (the cap); new senders are dropped until some go stale")]
    TooManySenders { revision: RevisionId, count: usize },
}

impl Rejected {
    /// The sender is at fault (as opposed to this server being full).
    fn is_invalid(&self) -> bool {
        matches!(self, Rejected::Invalid { .. })
    }
}

/// One sender's latest figure for one revision.
#[derive(Debug, Clone, Copy)]
struct Figure {
    concurrency: f64,
    /// A poke arrived since the sender's last regular report: counts as +1 until that
    /// report (which has it subtracted) arrives.
    poke_pending: bool,
    at: Instant,
}

impl Figure {
    fn fresh(&self, now: Instant, staleness: Duration) -> bool {
        now.saturating_duration_since(self.at) <= staleness
    }

    fn load(&self) -> f64 {
        self.concurrency + if self.poke_pending { 1.0 } else { 0.0 }
    }
}

type Senders = HashMap<String, Figure>;

/// What the other activators reported, per revision and sender. Shared between the
/// server's connections and the autoscaler.
#[derive(Debug)]
pub struct ReportedStats {
    settings: StatServerSettings,
    revisions: Mutex<HashMap<RevisionId, Senders>>,
    poked: Mutex<Vec<RevisionId>>,
    pokes: Arc<Notify>,
    /// A "full" warning was logged; cleared when a sweep makes room.
    full_warned: AtomicBool,
}

impl ReportedStats {
    pub fn new(settings: StatServerSettings) -> Self {
        Self {
            settings,
            revisions: Mutex::new(HashMap::new()),
            poked: Mutex::new(Vec::new()),
            pokes: Arc::new(Notify::new()),
            full_warned: AtomicBool::new(false),
        }
    }

    /// The reported concurrency of `revision` at `now`: the sum over senders of their
    /// latest fresh figure (plus a pending poke each).
    pub fn load(&self, revision: &RevisionId, now: Instant) -> f64 {
        let staleness = self.settings.staleness;
        self.lock().get(revision).map_or(0.0, |senders| {
            senders
                .values()
                .filter(|f| f.fresh(now, staleness))
                .map(Figure::load)
                .sum()
        })
    }

    /// Senders with a fresh figure for `revision`.
    pub fn senders(&self, revision: &RevisionId, now: Instant) -> usize {
        let staleness = self.settings.staleness;
        self.lock().get(revision).map_or(0, |senders| {
            senders.values().filter(|f| f.fresh(now, staleness)).count()
        })
    }

    /// Revisions with any entry, fresh or not yet swept.
    pub fn revisions(&self) -> usize {
        self.lock().len()
    }

    /// Notified (one stored permit) when a revision may need to scale from zero: a poke,
    /// or its reported load rising from 0. The scaler awaits `pokes().notified()`.
    pub fn pokes(&self) -> Arc<Notify> {
        Arc::clone(&self.pokes)
    }

    /// The revisions that woke the scaler since the last call, each once.
    pub fn take_poked(&self) -> Vec<RevisionId> {
        std::mem::take(&mut *self.poked.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Keeps one stat for `revision`, arrived at `now`; `alone`: it was the only entry
    /// of its batch (pokes are).
    pub fn record(
        &self,
        revision: RevisionId,
        stat: &Stat,
        alone: bool,
        now: Instant,
    ) -> Result<(), Rejected> {
        validate(&revision, stat)?;
        let concurrency =
            (stat.average_concurrent_requests - stat.average_proxied_concurrent_requests).max(0.0);
        let staleness = self.settings.staleness;
        let wake = {
            let mut revisions = self.lock();
            if !revisions.contains_key(&revision) && revisions.len() >= self.settings.max_revisions
            {
                sweep(&mut revisions, now, staleness);
                if revisions.len() >= self.settings.max_revisions {
                    return Err(Rejected::TooManyRevisions(revisions.len()));
                }
            }
            let senders = revisions.entry(revision.clone()).or_default();
            let before: f64 = senders
                .values()
                .filter(|f| f.fresh(now, staleness))
                .map(Figure::load)
                .sum();
            let previous = senders
                .get(stat.pod_name.as_str())
                .filter(|f| f.fresh(now, staleness))
                .copied();
            if previous.is_none()
                && !senders.contains_key(stat.pod_name.as_str())
                && senders.len() >= self.settings.max_senders_per_revision
            {
                senders.retain(|_, f| f.fresh(now, staleness));
                if senders.len() >= self.settings.max_senders_per_revision {
                    let count = senders.len();
                    return Err(Rejected::TooManySenders { revision, count });
                }
            }
            let was_idle = previous.is_none_or(|p| p.concurrency == 0.0 && !p.poke_pending);
            let is_poke = alone
                && stat.average_concurrent_requests == 1.0
                && stat.request_count == 1.0
                && stat.average_proxied_concurrent_requests == 0.0
                && was_idle;
            let figure = if is_poke {
                Figure {
                    concurrency: 0.0,
                    poke_pending: true,
                    at: now,
                }
            } else {
                // A report after a poke had the poke subtracted: add it back.
                let absorbed = previous.is_some_and(|p| p.poke_pending);
                Figure {
                    concurrency: concurrency + if absorbed { 1.0 } else { 0.0 },
                    poke_pending: false,
                    at: now,
                }
            };
            let after = before - previous.map_or(0.0, |p| p.load()) + figure.load();
            senders.insert(stat.pod_name.clone(), figure);
            is_poke || (before == 0.0 && after > 0.0)
        };
        if wake {
            {
                let mut poked = self.poked.lock().unwrap_or_else(PoisonError::into_inner);
                if !poked.contains(&revision) && poked.len() < self.settings.max_revisions {
                    poked.push(revision);
                }
            }
            self.pokes.notify_one();
        }
        Ok(())
    }

    /// Drops stale figures and revisions left without any.
    pub fn sweep(&self, now: Instant) {
        let mut revisions = self.lock();
        sweep(&mut revisions, now, self.settings.staleness);
        if revisions.len() < self.settings.max_revisions {
            self.full_warned.store(false, Ordering::Relaxed);
        }
    }

    /// Logs a cap being hit, once until a sweep makes room.
    fn warn_full(&self, rejected: &Rejected) {
        if !self.full_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %rejected, "stat server full");
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RevisionId, Senders>> {
        // Plain data; a panic elsewhere leaves it consistent enough to keep using.
        self.revisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn sweep(revisions: &mut HashMap<RevisionId, Senders>, now: Instant, staleness: Duration) {
    revisions.retain(|_, senders| {
        senders.retain(|_, f| f.fresh(now, staleness));
        !senders.is_empty()
    });
}

fn validate(revision: &RevisionId, stat: &Stat) -> Result<(), Rejected> {
    let invalid = |reason: String| Rejected::Invalid {
        revision: format!("{}/{}", revision.namespace, revision.name),
        reason,
    };
    for (what, value) in [
        ("namespace", &*revision.namespace),
        ("name", &*revision.name),
    ] {
        if value.is_empty() || value.len() > MAX_NAME {
            return Err(invalid(format!(
                "{what} must be 1 to {MAX_NAME} bytes, not {}",
                value.len()
            )));
        }
    }
    if stat.pod_name.len() > MAX_NAME {
        return Err(invalid(format!(
            "pod_name is {} bytes (at most {MAX_NAME})",
            stat.pod_name.len()
        )));
    }
    for (what, value) in [
        (
            "average_concurrent_requests",
            stat.average_concurrent_requests,
        ),
        (
            "average_proxied_concurrent_requests",
            stat.average_proxied_concurrent_requests,
        ),
        ("request_count", stat.request_count),
    ] {
        if !value.is_finite() || value < 0.0 {
            return Err(invalid(format!("{what} is {value}")));
        }
        if value > MAX_REPORTED_CONCURRENCY {
            return Err(invalid(format!(
                "{what} is {value}, above the most accepted ({MAX_REPORTED_CONCURRENCY:e})"
            )));
        }
    }
    Ok(())
}

/// Keeps every stat of one decoded batch; the first sender error is returned (the rest
/// of the batch is still kept), a full server only logs.
fn record_batch(
    stats: &ReportedStats,
    batch: &WireStatMessages,
    now: Instant,
) -> Result<(), Rejected> {
    let alone = batch.messages.len() == 1;
    let mut first_error = None;
    for message in &batch.messages {
        // Entries without a stat are skipped, as Knative does, for future schemas.
        let Some(stat) = &message.stat else { continue };
        let revision = RevisionId::new(&message.namespace, &message.name);
        match stats.record(revision, stat, alone, now) {
            Ok(()) => {}
            Err(e) if e.is_invalid() => {
                first_error.get_or_insert(e);
            }
            Err(e) => stats.warn_full(&e),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The stat websocket server. Dropping it stops accepting and drops every connection;
/// [`shutdown`](Self::shutdown) closes them with 1012 first.
#[derive(Debug)]
pub struct StatServer {
    stats: Arc<ReportedStats>,
    local_addr: Option<SocketAddr>,
    connections: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl StatServer {
    /// Serves on `listener` (THAW_STAT_PORT, 8080) on the current tokio runtime.
    #[must_use = "dropping the StatServer stops it"]
    pub fn spawn(listener: TcpListener, settings: StatServerSettings) -> StatServer {
        let stats = Arc::new(ReportedStats::new(settings));
        let local_addr = listener.local_addr().ok();
        let connections = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&stats),
            Arc::clone(&connections),
            stopped,
        ));
        StatServer {
            stats,
            local_addr,
            connections,
            stop,
            task: Some(task),
        }
    }

    /// What the connections report, for the autoscaler.
    pub fn stats(&self) -> Arc<ReportedStats> {
        Arc::clone(&self.stats)
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Open websocket connections right now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting, tells every client to reconnect at once (close 1012, as
    /// Knative's autoscaler does when it restarts), and returns when they are closed
    /// (at most about a second).
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for StatServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How long a closing handshake may take before the socket is just dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: TcpListener,
    stats: Arc<ReportedStats>,
    connections: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    let settings = stats.settings.clone();
    let mut open = JoinSet::new();
    let mut sweeper = time::interval(settings.staleness.max(Duration::from_millis(100)));
    sweeper.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut accept_failing = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = open.join_next(), if !open.is_empty() => {}
            _ = sweeper.tick() => stats.sweep(Instant::now()),
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    accept_failing = false;
                    if open.len() >= settings.max_connections {
                        tracing::warn!(%peer, max = settings.max_connections, "stat server: too many connections; refusing one");
                        continue;
                    }
                    let _ = tcp.set_nodelay(true);
                    open.spawn(connection(
                        tcp,
                        peer,
                        Arc::clone(&stats),
                        Arc::clone(&connections),
                        stop.clone(),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    if !accept_failing {
                        tracing::warn!(error = %e, "stat server cannot accept connections; retrying");
                        accept_failing = true;
                    }
                    time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Stopping: connections see the same signal and close with 1012.
    drop(listener);
    let _ = time::timeout(CLOSE_GRACE, async {
        while open.join_next().await.is_some() {}
    })
    .await;
}

/// Decrements the connection count however the connection task ends.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    stats: Arc<ReportedStats>,
    connections: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    let settings = &stats.settings;
    let config = WebSocketConfig::default()
        .max_message_size(Some(settings.max_message_bytes))
        .max_frame_size(Some(settings.max_message_bytes));
    let handshake = tokio_tungstenite::accept_async_with_config(tcp, Some(config));
    let mut ws = match time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "stat server: websocket handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "stat server: no websocket handshake in time");
            return;
        }
    };
    connections.fetch_add(1, Ordering::Relaxed);
    let _counted = Counted(connections);
    tracing::debug!(%peer, "stat server: activator connected");
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                close(&mut ws, CloseCode::Restart, "restarting").await;
                return;
            }
            () = time::sleep_until(last_heard + settings.idle_timeout) => {
                tracing::info!(%peer, idle = ?settings.idle_timeout, "stat server: nothing heard from an activator; dropping its connection");
                close(&mut ws, CloseCode::Away, "idle").await;
                return;
            }
            frame = ws.next() => {
                last_heard = Instant::now();
                match frame {
                    Some(Ok(Message::Binary(bytes))) => {
                        let outcome = WireStatMessages::decode(bytes.as_ref())
                            .map_err(|e| format!("not a WireStatMessages protobuf: {e}"))
                            .and_then(|batch| {
                                record_batch(&stats, &batch, last_heard).map_err(|e| e.to_string())
                            });
                        if let Err(reason) = outcome {
                            tracing::warn!(%peer, %reason, "stat server: bad stat frame; closing the connection");
                            close(&mut ws, CloseCode::Protocol, "bad stat frame").await;
                            return;
                        }
                    }
                    Some(Ok(Message::Text(_))) => {
                        tracing::warn!(%peer, "stat server: text frame (stats are binary WireStatMessages); closing the connection");
                        close(&mut ws, CloseCode::Protocol, "stats are binary protobuf").await;
                        return;
                    }
                    Some(Ok(Message::Close(_))) => {
                        // Our reply is queued; let it flush.
                        let _ = time::timeout(CLOSE_GRACE, ws.close(None)).await;
                        tracing::debug!(%peer, "stat server: activator closed the connection");
                        return;
                    }
                    // Pings are answered by tungstenite; pongs and raw frames only
                    // show the peer is alive.
                    Some(Ok(_)) => {}
                    Some(Err(WsError::Capacity(e))) => {
                        tracing::warn!(%peer, error = %e, max = settings.max_message_bytes, "stat server: oversized frame; closing the connection");
                        close(&mut ws, CloseCode::Size, "message too big").await;
                        return;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "stat server: connection failed");
                        return;
                    }
                    None => return,
                }
            }
        }
    }
}

async fn close(ws: &mut WebSocketStream<TcpStream>, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_owned().into(),
    };
    let _ = time::timeout(CLOSE_GRACE, async {
        if ws.send(Message::Close(Some(frame))).await.is_ok() {
            // Wait for the peer's close reply (or the end), so the close code arrives
            // before the TCP connection goes.
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reporter::{Reporter, ReporterSettings, RevisionStats};
    use futures_util::{SinkExt, StreamExt};
    use thaw_shared::proto::WireStatMessage;
    use thaw_shared::stats::ConcurrencyRecorder;

    fn stat(pod: &str, average: f64, count: f64) -> Stat {
        Stat {
            pod_name: pod.into(),
            average_concurrent_requests: average,
            request_count: count,
            ..Stat::default()
        }
    }

    fn rev(name: &str) -> RevisionId {
        RevisionId::new("ns", name)
    }

    fn settings() -> StatServerSettings {
        StatServerSettings {
            staleness: Duration::from_secs(3),
            ..StatServerSettings::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn load_sums_fresh_senders_and_forgets_stale_ones() {
        let s = ReportedStats::new(settings());
        let r = rev("a");
        let t0 = Instant::now();
        s.record(r.clone(), &stat("act-1", 2.5, 10.0), false, t0)
            .unwrap();
        s.record(r.clone(), &stat("act-2", 1.5, 3.0), false, t0)
            .unwrap();
        assert_eq!(s.load(&r, t0), 4.0);
        assert_eq!(s.senders(&r, t0), 2);
        // The latest figure per sender replaces the previous one.
        let t1 = t0 + Duration::from_secs(2);
        s.record(r.clone(), &stat("act-1", 0.5, 1.0), false, t1)
            .unwrap();
        assert_eq!(s.load(&r, t1), 2.0);
        // act-2 stopped reporting at t0: gone after the staleness bound.
        let t2 = t0 + Duration::from_millis(3001);
        assert_eq!(s.load(&r, t2), 0.5);
        assert_eq!(s.senders(&r, t2), 1);
        assert_eq!(s.load(&rev("unknown"), t2), 0.0);
        s.sweep(t1 + Duration::from_millis(3001));
        assert_eq!(s.revisions(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn proxied_concurrency_is_subtracted_as_knative_does() {
        let s = ReportedStats::new(settings());
        let r = rev("a");
        let now = Instant::now();
        let mut st = stat("act", 3.0, 5.0);
        st.average_proxied_concurrent_requests = 1.0;
        s.record(r.clone(), &st, false, now).unwrap();
        assert_eq!(s.load(&r, now), 2.0);
        st.average_proxied_concurrent_requests = 4.0;
        s.record(r.clone(), &st, false, now).unwrap();
        assert_eq!(s.load(&r, now), 0.0, "floored at 0");
    }

    #[tokio::test(start_paused = true)]
    async fn a_poke_counts_at_once_and_is_absorbed_by_the_next_report() {
        let s = ReportedStats::new(settings());
        let r = rev("cold");
        let pokes = s.pokes();
        let t0 = Instant::now();
        s.record(r.clone(), &stat("act", 1.0, 1.0), true, t0)
            .unwrap();
        assert_eq!(s.load(&r, t0), 1.0);
        // The permit is stored: a scaler that starts waiting afterwards still wakes.
        time::timeout(Duration::from_millis(1), pokes.notified())
            .await
            .expect("poke wakes the scaler");
        assert_eq!(s.take_poked(), vec![r.clone()]);
        assert!(s.take_poked().is_empty());

        // The next report had the poke subtracted ({1, 1} measured → {0, 0} sent).
        let t1 = t0 + Duration::from_secs(1);
        s.record(r.clone(), &stat("act", 0.0, 0.0), false, t1)
            .unwrap();
        assert_eq!(s.load(&r, t1), 1.0);
        // Later reports are taken as they are.
        let t2 = t1 + Duration::from_secs(1);
        s.record(r.clone(), &stat("act", 1.0, 1.0), true, t2)
            .unwrap();
        assert_eq!(s.load(&r, t2), 1.0, "{{1,1}} from a busy sender is no poke");
        s.record(r.clone(), &stat("act", 2.0, 0.0), true, t2)
            .unwrap();
        assert_eq!(s.load(&r, t2), 2.0);
        assert!(s.take_poked().is_empty(), "load was not rising from 0");
    }

    #[tokio::test(start_paused = true)]
    async fn rising_from_zero_wakes_the_scaler() {
        let s = ReportedStats::new(settings());
        let r = rev("a");
        let now = Instant::now();
        s.record(r.clone(), &stat("act", 0.0, 0.0), false, now)
            .unwrap();
        assert!(s.take_poked().is_empty());
        s.record(r.clone(), &stat("act", 0.7, 2.0), false, now)
            .unwrap();
        assert_eq!(s.take_poked(), vec![r.clone()]);
        s.record(r.clone(), &stat("other", 3.0, 2.0), false, now)
            .unwrap();
        assert!(s.take_poked().is_empty(), "already above 0");
    }

    #[tokio::test(start_paused = true)]
    async fn caps_bound_memory_until_entries_go_stale() {
        let s = ReportedStats::new(StatServerSettings {
            max_revisions: 2,
            max_senders_per_revision: 2,
            ..settings()
        });
        let t0 = Instant::now();
        s.record(rev("a"), &stat("p1", 1.0, 0.0), false, t0)
            .unwrap();
        s.record(rev("b"), &stat("p1", 1.0, 0.0), false, t0)
            .unwrap();
        assert_eq!(
            s.record(rev("c"), &stat("p1", 1.0, 0.0), false, t0),
            Err(Rejected::TooManyRevisions(2))
        );
        s.record(rev("a"), &stat("p2", 1.0, 0.0), false, t0)
            .unwrap();
        assert!(matches!(
            s.record(rev("a"), &stat("p3", 1.0, 0.0), false, t0),
            Err(Rejected::TooManySenders { count: 2, .. })
        ));
        // Known senders and revisions keep updating.
        s.record(rev("a"), &stat("p2", 2.0, 0.0), false, t0)
            .unwrap();
        assert_eq!(s.load(&rev("a"), t0), 3.0);
        // Once stale, their room is reused.
        let later = t0 + Duration::from_secs(4);
        s.record(rev("c"), &stat("p1", 1.0, 0.0), false, later)
            .unwrap();
        s.record(rev("c"), &stat("p2", 1.0, 0.0), false, later)
            .unwrap();
        assert_eq!(s.revisions(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_stats_are_rejected_with_the_field() {
        let s = ReportedStats::new(settings());
        let now = Instant::now();
        let nan = s.record(rev("a"), &stat("p", f64::NAN, 0.0), false, now);
        assert!(
            matches!(&nan, Err(Rejected::Invalid { reason, .. }) if reason.contains("average_concurrent_requests")),
            "{nan:?}"
        );
        let negative = s.record(rev("a"), &stat("p", 1.0, -1.0), false, now);
        assert!(
            matches!(&negative, Err(Rejected::Invalid { reason, .. }) if reason.contains("request_count"))
        );
        let unnamed = s.record(RevisionId::new("", "x"), &stat("p", 1.0, 0.0), false, now);
        assert!(
            matches!(&unnamed, Err(Rejected::Invalid { reason, .. }) if reason.contains("namespace"))
        );
        let long_pod = s.record(rev("a"), &stat(&"p".repeat(300), 1.0, 0.0), false, now);
        assert!(
            matches!(&long_pod, Err(Rejected::Invalid { reason, .. }) if reason.contains("pod_name"))
        );
        assert_eq!(s.revisions(), 0);
    }

    /// Found by the `stat_proto` fuzz target's invariant (a hand-written batch): two
    /// senders' finite `1.7e308` summed to an infinite load, which the scaler reads as no
    /// traffic, so a flood of demand scaled the revision to zero.
    #[tokio::test(start_paused = true)]
    async fn huge_figures_are_rejected_so_the_load_stays_finite() {
        let s = ReportedStats::new(settings());
        let now = Instant::now();
        let huge = |pod: &str| WireStatMessage {
            namespace: "ns".into(),
            name: "n".into(),
            stat: Some(stat(pod, 1.7e308, 0.0)),
        };
        let batch = WireStatMessages {
            messages: vec![huge("a"), huge("b")],
        };
        let bytes = batch.encode_to_vec();
        let decoded = WireStatMessages::decode(bytes.as_slice()).unwrap();
        let e = record_batch(&s, &decoded, now).unwrap_err();
        assert!(e.to_string().contains("above the most accepted"), "{e}");
        assert_eq!(s.load(&RevisionId::new("ns", "n"), now), 0.0);
        // The largest accepted figure, from every sender the server tracks, sums finitely.
        let r = rev("max");
        for i in 0..settings().max_senders_per_revision {
            s.record(r.clone(), &stat(&format!("p{i}"), 1e9, 1e9), false, now)
                .unwrap();
        }
        assert!(s.load(&r, now).is_finite());
        let over = s.record(r.clone(), &stat("p0", 1.000_001e9, 0.0), false, now);
        assert!(matches!(over, Err(Rejected::Invalid { .. })), "{over:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn batches_skip_entries_without_a_stat() {
        let s = ReportedStats::new(settings());
        let now = Instant::now();
        let batch = WireStatMessages {
            messages: vec![
                WireStatMessage {
                    namespace: "ns".into(),
                    name: "nostat".into(),
                    stat: None,
                },
                WireStatMessage {
                    namespace: "ns".into(),
                    name: "a".into(),
                    stat: Some(stat("p", 2.0, 1.0)),
                },
            ],
        };
        record_batch(&s, &batch, now).unwrap();
        assert_eq!(s.load(&rev("a"), now), 2.0);
        assert_eq!(s.revisions(), 1);
    }

    // ---- over real websockets ----

    async fn server(settings: StatServerSettings) -> (StatServer, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = StatServer::spawn(listener, settings);
        let addr = server.local_addr().unwrap();
        (server, addr)
    }

    fn reporter_settings(addr: SocketAddr, pod: &str) -> ReporterSettings {
        ReporterSettings {
            period: Duration::from_millis(100),
            ping_interval: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(1),
            backoff_max: Duration::from_millis(500),
            ..ReporterSettings::new(format!("ws://{addr}/"), pod)
        }
    }

    async fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn close_code(frame: Option<Result<Message, WsError>>) -> Option<CloseCode> {
        match frame {
            Some(Ok(Message::Close(Some(f)))) => Some(f.code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_real_reporter_load_appears_then_goes_stale_after_disconnect() {
        let (server, addr) = server(StatServerSettings {
            staleness: Duration::from_millis(500),
            ..StatServerSettings::default()
        })
        .await;
        let reported = server.stats();
        let pokes = reported.pokes();
        let stats = Arc::new(RevisionStats::new());
        let reporter = Reporter::spawn(reporter_settings(addr, "act-a"), Arc::clone(&stats));
        until("connected", Duration::from_secs(3), || {
            server.connections() == 1
        })
        .await;

        let r = RevisionId::new("default", "hello-00001");
        let r_load = Arc::new(ConcurrencyRecorder::untracked());
        let woke = pokes.notified();
        let held = [stats.arrive(&r, &r_load), stats.arrive(&r, &r_load)];
        time::timeout(Duration::from_secs(1), woke)
            .await
            .expect("the reporter's poke wakes the scaler");
        assert_eq!(reported.take_poked(), vec![r.clone()]);
        // Two in flight: the poke counts 1, then every report says 2 (the first has the
        // poke subtracted and gets it back).
        until("load 2", Duration::from_secs(2), || {
            (reported.load(&r, Instant::now()) - 2.0).abs() < 1e-6
        })
        .await;
        for _ in 0..10 {
            let load = reported.load(&r, Instant::now());
            assert!((load - 2.0).abs() < 1e-6, "load {load}");
            time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(reported.senders(&r, Instant::now()), 1);

        // The reporter goes away with its requests still open: its figure stays until
        // the staleness bound, then counts for nothing.
        drop(reporter);
        let gone = Instant::now();
        until("disconnected", Duration::from_secs(2), || {
            server.connections() == 0
        })
        .await;
        until("stale", Duration::from_secs(2), || {
            reported.load(&r, Instant::now()) == 0.0
        })
        .await;
        assert!(
            gone.elapsed() >= Duration::from_millis(400),
            "{:?}",
            gone.elapsed()
        );
        until("swept", Duration::from_secs(2), || {
            reported.revisions() == 0
        })
        .await;
        drop(held);
    }

    #[tokio::test]
    async fn bad_frames_close_only_their_connection() {
        let (server, addr) = server(StatServerSettings {
            max_message_bytes: 4096,
            ..StatServerSettings::default()
        })
        .await;
        let reported = server.stats();
        let stats = Arc::new(RevisionStats::new());
        let _reporter = Reporter::spawn(reporter_settings(addr, "good"), Arc::clone(&stats));
        let r = RevisionId::new("ns", "busy");
        let r_load = Arc::new(ConcurrencyRecorder::untracked());
        let _held = stats.arrive(&r, &r_load);
        until("good load", Duration::from_secs(3), || {
            reported.load(&r, Instant::now()) == 1.0
        })
        .await;
        let url = format!("ws://{addr}/");

        // Not a protobuf (an unterminated length-delimited field).
        let (mut bad, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        bad.send(Message::Binary(vec![0x0a, 0xff, 0x01].into()))
            .await
            .unwrap();
        assert_eq!(close_code(bad.next().await), Some(CloseCode::Protocol));

        // A text frame.
        let (mut text, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        text.send(Message::Text("{\"stat\": 1}".into()))
            .await
            .unwrap();
        assert_eq!(close_code(text.next().await), Some(CloseCode::Protocol));

        // A decodable batch with an impossible figure.
        let (mut nan, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let batch = WireStatMessages {
            messages: vec![WireStatMessage {
                namespace: "ns".into(),
                name: "busy".into(),
                stat: Some(stat("liar", f64::INFINITY, 0.0)),
            }],
        };
        nan.send(Message::Binary(batch.encode_to_vec().into()))
            .await
            .unwrap();
        assert_eq!(close_code(nan.next().await), Some(CloseCode::Protocol));

        // Over the size limit.
        let (mut big, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let _ = big.send(Message::Binary(vec![0u8; 64 * 1024].into())).await;
        assert_eq!(close_code(big.next().await), Some(CloseCode::Size));

        // The well-behaved reporter never noticed.
        until("bad ones gone", Duration::from_secs(2), || {
            server.connections() == 1
        })
        .await;
        for _ in 0..5 {
            assert_eq!(reported.load(&r, Instant::now()), 1.0);
            time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            reported.senders(&r, Instant::now()),
            1,
            "the liar was not kept"
        );
    }

    #[tokio::test]
    async fn shutdown_tells_clients_to_reconnect_at_once() {
        let (server, addr) = server(StatServerSettings::default()).await;
        let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        until("connected", Duration::from_secs(2), || {
            server.connections() == 1
        })
        .await;
        let closing = tokio::spawn(server.shutdown());
        assert_eq!(close_code(client.next().await), Some(CloseCode::Restart));
        drop(client);
        time::timeout(Duration::from_secs(3), closing)
            .await
            .expect("shutdown returns")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }
}
