//! Per-revision load as this activator sees it, and the websocket that streams it to
//! Knative's autoscaler (CONTRACT §2.5, §3).
//!
//! Two halves:
//!
//! * [`RevisionStats`] is the collector the request path calls: [`RevisionStats::arrive`]
//!   takes only the short lock of the revision's own recorder (kept in its
//!   [`Revision`](crate::revision::Revision)) when the revision has load, and only the
//!   first request of an idle revision enters the map and queues a **poke**.
//! * [`Reporter`] is the websocket client task: every period it cuts the windows
//!   ([`RevisionStats::tick`]) and sends one binary `WireStatMessages`; pokes are sent the
//!   moment they are queued (the collector wakes the task through a [`Notify`]); it pings,
//!   watches for pongs, and reconnects forever with capped exponential backoff.
//!
//! ## Fixed or followed target
//! Under Knative the autoscaler has one address ([`Reporter::spawn`]). On the Kubernetes
//! platform the autoscaler is whichever activator holds the Lease, so
//! [`Reporter::spawn_following`] takes a `watch` of URLs: it reconnects (at once, without
//! backoff) when the URL changes, and with `None` (no leader known, or this activator
//! is the leader and feeds its stats in process) it does not connect at all. Either
//! way stats are cut every period and dropped while not connected. Only a fixed target
//! gates readiness ([`Reporter::blocks_readiness`]): Knative's activator is not ready
//! without its autoscaler, but an activator must not go unready because the activators'
//! own leader is changing.
//!
//! ## Poke queue
//! Pokes are kept as revision ids in a small mutex-guarded `Vec` inside `RevisionStats`
//! plus a [`Notify`]. `Notify::notify_one` stores a permit when the reporter is not
//! waiting, so a poke is never missed, and the reporter needs no receiver handed to it.
//! A poke is queued while the new entry's shard lock is still held, so any tick that
//! subtracts a poke finds it already queued; the reporter sends queued pokes *before* the
//! tick's batch, so the autoscaler never sees a subtraction ahead of its poke.
//!
//! ## Empty batches
//! A tick with no revisions sends nothing. Knative's activator does the same
//! (`if len(msgs) > 0 { statCh <- msgs }` in `concurrency_reporter.go`), and an empty
//! `WireStatMessages` encodes to zero bytes, which carries no information for the
//! autoscaler anyway. A revision that has just gone quiet is still sent once with zeros
//! (the tick that drops its entry), which is what tells the autoscaler the load went away.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use thaw_shared::proto::{Stat, WireStatMessage, WireStatMessages};
use thaw_shared::stats::{ConcurrencyRecorder, InFlight};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{self, Duration, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::revision::RevisionId;

/// What the activator has seen of one revision since its entry was created.
#[derive(Debug)]
struct Entry {
    recorder: Arc<ConcurrencyRecorder>,
    /// A poke `{1, 1}` was queued for this revision since the last tick; the next tick
    /// subtracts it.
    poked: bool,
}

/// Per-revision load through this activator. Share it as `Arc<RevisionStats>` between the
/// request path ([`arrive`](Self::arrive)) and the [`Reporter`].
#[derive(Debug)]
pub struct RevisionStats {
    entries: DashMap<RevisionId, Entry>,
    pokes: Mutex<Vec<RevisionId>>,
    poke_ready: Notify,
}

impl Default for RevisionStats {
    fn default() -> Self {
        Self::new()
    }
}

impl RevisionStats {
    pub fn new() -> Self {
        Self {
            entries: DashMap::new(),
            pokes: Mutex::new(Vec::new()),
            poke_ready: Notify::new(),
        }
    }

    /// Counts a request for `rev` as arrived on the revision's own `recorder`; it stays
    /// in flight until the returned guard drops. The request path touches only that
    /// recorder, not this map: with thousands of revisions a map lookup (hashing both
    /// names, the shard lock, the key compare) is several cache misses. Only the first
    /// request of an idle revision enters it here and queues a poke (and wakes the
    /// reporter).
    pub fn arrive(&self, rev: &RevisionId, recorder: &Arc<ConcurrencyRecorder>) -> InFlight {
        let (guard, untracked) = recorder.arrive_tracked();
        if untracked {
            self.track(rev, recorder);
        }
        guard
    }

    /// Enters a recorder that has just counted the first arrival of an idle revision.
    fn track(&self, rev: &RevisionId, recorder: &Arc<ConcurrencyRecorder>) {
        // Each poke is queued while the entry's guard still holds its shard lock: a
        // tick that sees `poked` also finds the poke queued (see the module docs).
        match self.entries.entry(rev.clone()) {
            MapEntry::Vacant(vacant) => {
                let entry = vacant.insert(Entry {
                    recorder: Arc::clone(recorder),
                    poked: true,
                });
                self.lock_pokes().push(rev.clone());
                drop(entry);
            }
            // A revision removed and added again under its name while the old one's
            // entry waited for its idle tick: the new recorder takes its place, and the
            // autoscaler gets one poke for both.
            MapEntry::Occupied(mut occupied) => {
                let entry = occupied.get_mut();
                entry.recorder = Arc::clone(recorder);
                if std::mem::replace(&mut entry.poked, true) {
                    return;
                }
                self.lock_pokes().push(rev.clone());
                drop(occupied);
            }
        }
        self.poke_ready.notify_one();
    }

    /// Requests for `rev` in flight right now.
    pub fn in_flight(&self, rev: &RevisionId) -> u64 {
        self.entries
            .get(rev)
            .map_or(0, |entry| entry.recorder.in_flight())
    }

    /// Revisions with a current entry.
    pub fn tracked(&self) -> usize {
        self.entries.len()
    }

    /// Cuts every revision's window at `now` and returns this tick's batch (sorted by
    /// revision), one entry per revision: `average_concurrent_requests` time-weighted,
    /// `request_count` = arrivals in the window, each minus a poke sent since the last
    /// tick (floored at 0); other fields 0. A revision whose window was entirely idle
    /// (no load, no arrivals, nothing in flight) is reported this once with zeros and
    /// its entry dropped, so its next request pokes again.
    pub fn tick(&self, pod_name: &str, now: Instant) -> WireStatMessages {
        let mut cut = Vec::with_capacity(self.entries.len());
        // `retain` holds each shard's write lock while deciding, so no arrival can slip
        // in between reading the figures and dropping the entry.
        // An idle recorder is retired under its own lock as it is cut, so an arrival
        // racing this tick is either in the window or re-enters the map itself.
        self.entries.retain(|rev, entry| {
            let (report, idle) = entry.recorder.report_or_retire_at(now);
            let poked = std::mem::take(&mut entry.poked);
            cut.push((rev.clone(), report, poked));
            !idle
        });
        cut.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let messages = cut
            .into_iter()
            .map(|(rev, report, poked)| {
                let adjust = if poked { 1.0 } else { 0.0 };
                let average = (report.average_concurrency - adjust).max(0.0);
                let count = (report.request_count as f64 - adjust).max(0.0);
                wire_message(&rev, pod_name, average, count)
            })
            .collect();
        WireStatMessages { messages }
    }

    /// Pokes queued since the last call, each its own one-entry batch
    /// `{average_concurrent_requests: 1, request_count: 1}`.
    pub fn take_pokes(&self, pod_name: &str) -> Vec<WireStatMessages> {
        let queued = std::mem::take(&mut *self.lock_pokes());
        queued
            .iter()
            .map(|rev| WireStatMessages {
                messages: vec![wire_message(rev, pod_name, 1.0, 1.0)],
            })
            .collect()
    }

    /// Completes when a poke may have been queued since the last wake-up (it may be
    /// spurious: [`take_pokes`](Self::take_pokes) can come back empty). Meant for the
    /// one reporter task.
    pub async fn poked(&self) {
        self.poke_ready.notified().await;
    }

    fn discard_pokes(&self) {
        self.lock_pokes().clear();
    }

    fn lock_pokes(&self) -> std::sync::MutexGuard<'_, Vec<RevisionId>> {
        // Only a Vec of ids behind it; a panic elsewhere leaves it usable.
        self.pokes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn wire_message(rev: &RevisionId, pod_name: &str, average: f64, count: f64) -> WireStatMessage {
    WireStatMessage {
        namespace: rev.namespace.to_string(),
        name: rev.name.to_string(),
        stat: Some(Stat {
            pod_name: pod_name.to_owned(),
            average_concurrent_requests: average,
            request_count: count,
            ..Default::default()
        }),
    }
}

/// How the [`Reporter`] connects and paces itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ReporterSettings {
    /// `ws://autoscaler.<SYSTEM_NAMESPACE>.svc.<cluster-domain>:8080/`; see
    /// [`autoscaler_url`](Self::autoscaler_url).
    pub url: String,
    /// This activator's `POD_NAME`, sent as every `Stat.pod_name`.
    pub pod_name: String,
    /// Reporting period (Knative: 1 s).
    pub period: Duration,
    /// Websocket ping period (Knative: a third of the pong timeout, ~3.3 s).
    pub ping_interval: Duration,
    /// The connection counts as broken when nothing (pong or otherwise) was heard for
    /// this long (Knative: 10 s).
    pub pong_timeout: Duration,
    /// Limit on the TCP connect plus websocket handshake (Knative: 3 s); also bounds each
    /// send, so a peer that stops reading cannot stall the reporter.
    pub connect_timeout: Duration,
    /// First reconnect delay (Knative: 100 ms).
    pub backoff_initial: Duration,
    /// Growth of the delay per failed attempt (Knative: 1.3).
    pub backoff_factor: f64,
    /// Each delay is scaled by a random factor in `[1 - jitter, 1 + jitter]` (0..=1).
    pub backoff_jitter: f64,
    /// Cap of the (un-jittered) delay. Knative retries forever; so do we. Knative's
    /// delays grow to about 15 s before its schedule restarts; ours stop at 3 s, so an
    /// activator is back (and ready) within seconds of the autoscaler, at the cost of
    /// one refused connection every few seconds while it is down.
    pub backoff_max: Duration,
}

impl ReporterSettings {
    /// Knative's defaults for the given target and pod name.
    pub fn new(url: impl Into<String>, pod_name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pod_name: pod_name.into(),
            period: Duration::from_secs(1),
            ping_interval: Duration::from_secs(10) / 3,
            pong_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            backoff_initial: Duration::from_millis(100),
            backoff_factor: 1.3,
            backoff_jitter: 0.2,
            backoff_max: Duration::from_secs(3),
        }
    }

    /// The autoscaler's websocket address (CONTRACT §2.5).
    pub fn autoscaler_url(system_namespace: &str, cluster_domain: &str) -> String {
        format!("ws://autoscaler.{system_namespace}.svc.{cluster_domain}:8080/")
    }
}

/// Capped exponential backoff with jitter.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    factor: f64,
    jitter: f64,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(settings: &ReporterSettings) -> Self {
        let max = settings.backoff_max.max(Duration::from_millis(1));
        let initial = settings.backoff_initial.min(max);
        let factor = if settings.backoff_factor.is_finite() {
            settings.backoff_factor.max(1.0)
        } else {
            1.0
        };
        let jitter = if settings.backoff_jitter.is_finite() {
            settings.backoff_jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Self {
            initial,
            factor,
            jitter,
            max,
            next: initial,
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = Duration::try_from_secs_f64(base.as_secs_f64() * self.factor)
            .unwrap_or(self.max)
            .min(self.max);
        let scale = 1.0 + self.jitter * (2.0 * fastrand::f64() - 1.0);
        Duration::try_from_secs_f64(base.as_secs_f64() * scale).unwrap_or(base)
    }
}

/// How a connection ended.
enum Ended {
    /// Close code 1012 (Service Restart): reconnect at once.
    Restart,
    /// The target changed: reconnect at once, to the new one.
    Retarget,
    /// Any other close frame.
    Closed(Option<CloseFrame>),
    /// I/O or protocol error, silence past the pong timeout, or a stalled send.
    Failed(String),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Restart => f.write_str("closed by the autoscaler: service restart (1012)"),
            Ended::Retarget => f.write_str("the autoscaler moved"),
            Ended::Closed(Some(frame)) => write!(f, "closed by the autoscaler: {frame}"),
            Ended::Closed(None) => f.write_str("closed by the autoscaler"),
            Ended::Failed(reason) => f.write_str(reason),
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long to wait for our close reply to flush before dropping the socket.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// The websocket client that streams [`RevisionStats`] to the autoscaler. Its task runs
/// until the `Reporter` is dropped.
#[derive(Debug)]
pub struct Reporter {
    connected: watch::Receiver<bool>,
    /// The target is a `watch` given by the caller (not a fixed URL).
    following: bool,
    task: JoinHandle<()>,
}

impl Reporter {
    /// Starts the reporter task on the current tokio runtime. The first connection
    /// attempt is made at once; until it succeeds [`is_connected`](Self::is_connected)
    /// is false.
    #[must_use = "dropping the Reporter stops it"]
    pub fn spawn(settings: ReporterSettings, stats: Arc<RevisionStats>) -> Reporter {
        let (fixed, target) = watch::channel(Some(settings.url.clone()));
        Self::start(settings, target, Some(fixed), stats)
    }

    /// Starts a reporter that streams to whatever URL `target` holds, reconnecting at
    /// once when it changes; `None` means do not connect (no leader known, or this
    /// activator is the leader). `settings.url` is not used. If the sender is dropped,
    /// the last URL stays the target.
    #[must_use = "dropping the Reporter stops it"]
    pub fn spawn_following(
        settings: ReporterSettings,
        target: watch::Receiver<Option<String>>,
        stats: Arc<RevisionStats>,
    ) -> Reporter {
        Self::start(settings, target, None, stats)
    }

    fn start(
        settings: ReporterSettings,
        target: watch::Receiver<Option<String>>,
        fixed: Option<watch::Sender<Option<String>>>,
        stats: Arc<RevisionStats>,
    ) -> Reporter {
        let following = fixed.is_none();
        let (tx, rx) = watch::channel(false);
        let mut ticker = time::interval_at(Instant::now() + settings.period, settings.period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let worker = Worker {
            backoff: Backoff::new(&settings),
            settings,
            stats,
            ticker,
            connected: tx,
            target,
            watching: true,
            _fixed: fixed,
        };
        Reporter {
            connected: rx,
            following,
            task: tokio::spawn(worker.run()),
        }
    }

    /// Readiness: whether the websocket to the autoscaler is up right now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// A receiver that sees every change of [`is_connected`](Self::is_connected).
    pub fn connected_changed(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Whether readiness must fail for this reporter right now: a fixed target (Knative's
    /// autoscaler) that is not connected. A following reporter never blocks readiness.
    pub fn blocks_readiness(&self) -> bool {
        !self.following && !self.is_connected()
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Worker {
    settings: ReporterSettings,
    stats: Arc<RevisionStats>,
    ticker: time::Interval,
    backoff: Backoff,
    connected: watch::Sender<bool>,
    target: watch::Receiver<Option<String>>,
    /// `false` once the target's sender is gone: the last URL stays.
    watching: bool,
    /// Keeps a fixed target's channel open.
    _fixed: Option<watch::Sender<Option<String>>>,
}

impl Worker {
    async fn run(mut self) {
        let mut connect_now = true;
        let mut failing = false;
        let mut idle_announced = false;
        loop {
            let Some(url) = self.target.borrow_and_update().clone() else {
                if !idle_announced {
                    tracing::info!("no autoscaler to report to; not connecting");
                    idle_announced = true;
                }
                // Until the target changes; stats are cut and dropped meanwhile.
                self.idle(std::future::pending::<()>(), None).await;
                connect_now = true;
                failing = false;
                self.backoff.reset();
                continue;
            };
            idle_announced = false;
            if !connect_now {
                let delay = self.backoff.next_delay();
                if self.idle(time::sleep(delay), Some(&url)).await.is_none() {
                    connect_now = true;
                    failing = false;
                    self.backoff.reset();
                    continue;
                }
            }
            connect_now = false;
            let attempt = time::timeout(
                self.settings.connect_timeout,
                tokio_tungstenite::connect_async(url.as_str()),
            );
            let Some(attempt) = self.idle(attempt, Some(&url)).await else {
                // Retargeted while connecting: try the new target at once.
                connect_now = true;
                failing = false;
                self.backoff.reset();
                continue;
            };
            let error = match attempt {
                Ok(Ok((mut ws, _response))) => {
                    failing = false;
                    self.backoff.reset();
                    self.connected.send_replace(true);
                    tracing::info!(%url, "connected to the autoscaler");
                    let ended = self.serve(&mut ws, &url).await;
                    self.connected.send_replace(false);
                    drop(ws);
                    match ended {
                        Ended::Restart => {
                            tracing::info!(%url, "autoscaler restarting (close 1012); reconnecting now");
                            connect_now = true;
                        }
                        Ended::Retarget => {
                            tracing::info!(%url, "the autoscaler moved; leaving this one");
                            connect_now = true;
                        }
                        ended => {
                            tracing::warn!(%url, reason = %ended, "lost the connection to the autoscaler; reconnecting");
                        }
                    }
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "no websocket handshake within {:?}",
                    self.settings.connect_timeout
                ),
            };
            if failing {
                tracing::debug!(%url, %error, "connecting to the autoscaler");
            } else {
                failing = true;
                tracing::warn!(%url, %error, "cannot connect to the autoscaler; retrying with backoff");
            }
        }
    }

    /// Drives `fut` while disconnected: windows keep being cut and pokes drained, but
    /// nothing is sent (stats are dropped while disconnected). Returns `None`, dropping
    /// `fut`, as soon as the target differs from `current`.
    async fn idle<F: Future>(&mut self, fut: F, current: Option<&str>) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                changed = self.target.changed(), if self.watching => {
                    if changed.is_err() {
                        self.watching = false;
                    } else if self.target.borrow_and_update().as_deref() != current {
                        return None;
                    }
                }
                out = &mut fut => return Some(out),
                () = self.stats.poked() => self.stats.discard_pokes(),
                _ = self.ticker.tick() => {
                    self.stats.tick(&self.settings.pod_name, Instant::now());
                    self.stats.discard_pokes();
                }
            }
        }
    }

    /// Streams stats over an open connection until it ends.
    async fn serve(&mut self, ws: &mut Ws, url: &str) -> Ended {
        let ping_every = self.settings.ping_interval;
        let mut ping = time::interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                changed = self.target.changed(), if self.watching => {
                    if changed.is_err() {
                        self.watching = false;
                    } else if self.target.borrow_and_update().as_deref() != Some(url) {
                        self.connected.send_replace(false);
                        let frame = CloseFrame {
                            code: CloseCode::Normal,
                            reason: "the autoscaler moved".into(),
                        };
                        let _ = time::timeout(CLOSE_GRACE, ws.close(Some(frame))).await;
                        return Ended::Retarget;
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Close(frame))) => {
                        self.connected.send_replace(false);
                        // Our close reply is already queued; give it a moment to flush.
                        let _ = time::timeout(CLOSE_GRACE, ws.close(None)).await;
                        return match frame {
                            Some(f) if f.code == CloseCode::Restart => Ended::Restart,
                            other => Ended::Closed(other),
                        };
                    }
                    Some(Ok(_)) => last_heard = Instant::now(),
                    Some(Err(e)) => return Ended::Failed(e.to_string()),
                    None => return Ended::Failed("connection ended without a close frame".into()),
                },
                () = self.stats.poked() => {
                    for batch in self.stats.take_pokes(&self.settings.pod_name) {
                        if let Err(e) = self.send_batch(ws, &batch).await {
                            return e;
                        }
                    }
                }
                _ = self.ticker.tick() => {
                    let pod = &self.settings.pod_name;
                    let batch = self.stats.tick(pod, Instant::now());
                    // Pokes first: any poke this batch subtracts is already queued.
                    for poke in self.stats.take_pokes(pod) {
                        if let Err(e) = self.send_batch(ws, &poke).await {
                            return e;
                        }
                    }
                    if !batch.messages.is_empty() {
                        if let Err(e) = self.send_batch(ws, &batch).await {
                            return e;
                        }
                    }
                }
                _ = ping.tick() => {
                    let silent = last_heard.elapsed();
                    if silent > self.settings.pong_timeout {
                        return Ended::Failed(format!("nothing heard from the autoscaler for {silent:?}"));
                    }
                    if let Err(e) = self.send(ws, Message::Ping(Default::default())).await {
                        return e;
                    }
                }
            }
        }
    }

    async fn send_batch(&self, ws: &mut Ws, batch: &WireStatMessages) -> Result<(), Ended> {
        self.send(ws, Message::Binary(batch.encode_to_vec().into()))
            .await
    }

    async fn send(&self, ws: &mut Ws, message: Message) -> Result<(), Ended> {
        match time::timeout(self.settings.connect_timeout, ws.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Ended::Failed(e.to_string())),
            Err(_) => Err(Ended::Failed(format!(
                "send stalled for {:?}",
                self.settings.connect_timeout
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::task::JoinSet;

    const VECTORS: &str = include_str!("../../shared/tests/knative-wire-vectors.txt");

    fn vector(name: &str) -> Vec<u8> {
        let line = VECTORS
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .unwrap_or_else(|| panic!("vector {name} missing"));
        let hex = line.split_once(' ').map_or("", |(_, h)| h.trim());
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn stat_of(batch: &WireStatMessages, rev: &RevisionId) -> Option<Stat> {
        batch
            .messages
            .iter()
            .find(|m| *m.namespace == *rev.namespace && *m.name == *rev.name)
            .and_then(|m| m.stat.clone())
    }

    fn figures(batch: &WireStatMessages, rev: &RevisionId) -> (f64, f64) {
        let s = stat_of(batch, rev).expect("revision in batch");
        (s.average_concurrent_requests, s.request_count)
    }

    // ---- RevisionStats ----

    #[tokio::test(start_paused = true)]
    async fn tick_subtracts_the_poke_then_reports_then_drops_idle_entries() {
        let stats = RevisionStats::new();
        let rev = RevisionId::new("default", "hello-00001");
        let rev_load = Arc::new(ConcurrencyRecorder::untracked());

        let held = stats.arrive(&rev, &rev_load);
        assert_eq!(stats.in_flight(&rev), 1);
        let pokes = stats.take_pokes("act");
        assert_eq!(pokes.len(), 1);
        assert_eq!(figures(&pokes[0], &rev), (1.0, 1.0));
        assert_eq!(stats.take_pokes("act"), vec![], "a poke is taken once");

        // First tick: {1, 1} measured minus the poke {1, 1}.
        time::advance(Duration::from_secs(1)).await;
        let b = stats.tick("act", Instant::now());
        assert_eq!(b.messages.len(), 1);
        let s = stat_of(&b, &rev).unwrap();
        assert_eq!(
            s,
            Stat {
                pod_name: "act".into(),
                ..Default::default()
            }
        );

        // Second tick: still one in flight throughout, no arrivals, nothing subtracted.
        time::advance(Duration::from_secs(1)).await;
        let b = stats.tick("act", Instant::now());
        assert_eq!(figures(&b, &rev), (1.0, 0.0));

        // A request on a known revision does not poke.
        let short = stats.arrive(&rev, &rev_load);
        assert!(stats.take_pokes("act").is_empty());
        time::advance(Duration::from_millis(250)).await;
        drop(short);
        time::advance(Duration::from_millis(250)).await;
        drop(held);
        time::advance(Duration::from_millis(500)).await;
        let b = stats.tick("act", Instant::now());
        // 2 for 0.25 s, 1 for 0.25 s, 0 for 0.5 s.
        let (avg, count) = figures(&b, &rev);
        assert!((avg - 0.75).abs() < 1e-9, "{avg}");
        assert_eq!(count, 1.0);
        assert_eq!(stats.in_flight(&rev), 0);

        // A full tick at zero: reported once with zeros, then the entry is gone.
        time::advance(Duration::from_secs(1)).await;
        let b = stats.tick("act", Instant::now());
        assert_eq!(figures(&b, &rev), (0.0, 0.0));
        assert_eq!(stats.tracked(), 0);
        time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            stats.tick("act", Instant::now()),
            WireStatMessages::default()
        );

        // The next request is again the first of an idle revision.
        let _again = stats.arrive(&rev, &rev_load);
        assert_eq!(stats.take_pokes("act").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn poke_subtraction_floors_at_zero_and_counts_stay_exact() {
        let stats = RevisionStats::new();
        let rev = RevisionId::new("ns", "r");
        let rev_load = Arc::new(ConcurrencyRecorder::untracked());
        // A quarter-second request: 0.25 - 1 floors at 0; three arrivals minus one.
        let a = stats.arrive(&rev, &rev_load);
        drop(stats.arrive(&rev, &rev_load));
        drop(stats.arrive(&rev, &rev_load));
        time::advance(Duration::from_millis(250)).await;
        drop(a);
        time::advance(Duration::from_millis(750)).await;
        let b = stats.tick("p", Instant::now());
        assert_eq!(figures(&b, &rev), (0.0, 2.0));
        assert_eq!(
            stats.take_pokes("p").len(),
            1,
            "one poke for three requests"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn arrivals_in_an_otherwise_idle_window_keep_the_entry() {
        let stats = RevisionStats::new();
        let rev = RevisionId::new("ns", "r");
        let rev_load = Arc::new(ConcurrencyRecorder::untracked());
        drop(stats.arrive(&rev, &rev_load));
        time::advance(Duration::from_secs(1)).await;
        stats.tick("p", Instant::now());
        // A zero-length request: average 0 but one arrival, so not a zero tick.
        drop(stats.arrive(&rev, &rev_load));
        time::advance(Duration::from_secs(1)).await;
        let b = stats.tick("p", Instant::now());
        assert_eq!(figures(&b, &rev), (0.0, 1.0));
        assert_eq!(stats.tracked(), 1);
        assert_eq!(
            stats.take_pokes("p").len(),
            1,
            "the entry was never dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_revision_added_again_under_its_name_is_reported_from_its_new_recorder() {
        let stats = RevisionStats::new();
        let rev = RevisionId::new("ns", "r");
        let old_load = Arc::new(ConcurrencyRecorder::untracked());
        drop(stats.arrive(&rev, &old_load));
        assert_eq!(stats.take_pokes("p").len(), 1);
        time::advance(Duration::from_secs(1)).await;
        stats.tick("p", Instant::now());

        // Removed and added again before the old entry's idle tick: a new recorder.
        let new_load = Arc::new(ConcurrencyRecorder::untracked());
        let held = stats.arrive(&rev, &new_load);
        assert_eq!(stats.take_pokes("p").len(), 1, "the new revision pokes");
        assert_eq!(stats.in_flight(&rev), 1, "the map follows the new recorder");
        let also = stats.arrive(&rev, &new_load);
        assert!(stats.take_pokes("p").is_empty(), "once");
        time::advance(Duration::from_secs(1)).await;
        let b = stats.tick("p", Instant::now());
        // Two in flight for the whole window, two arrivals, minus the poke.
        assert_eq!(figures(&b, &rev), (1.0, 1.0));
        assert_eq!(stats.tracked(), 1);
        drop((held, also));
    }

    #[tokio::test(start_paused = true)]
    async fn poke_is_byte_exact() {
        let stats = RevisionStats::new();
        let _g = stats.arrive(
            &RevisionId::new("default", "hello-00001"),
            &Arc::new(ConcurrencyRecorder::untracked()),
        );
        let pokes = stats.take_pokes("activator-7d9c");
        assert_eq!(pokes.len(), 1);
        assert_eq!(pokes[0].encode_to_vec(), vector("wire-poke"));
    }

    #[tokio::test(start_paused = true)]
    async fn tick_batch_is_byte_exact() {
        let stats = RevisionStats::new();
        let hello = RevisionId::new("default", "hello-00001");
        let hello_load = Arc::new(ConcurrencyRecorder::untracked());
        let api = RevisionId::new("team-a", "api-00042");
        let api_load = Arc::new(ConcurrencyRecorder::untracked());

        // team-a: one zero-length request, so its first tick is {0, 1} - poke = {0, 0}.
        drop(stats.arrive(&api, &api_load));
        time::advance(Duration::from_secs(1)).await;
        stats.tick("activator-7d9c", Instant::now());

        // hello: 4 in flight for 0.75 s then 3 for 0.25 s (3.75), and 12 arrivals; minus
        // the poke → {2.75, 11}. team-a: a full zero tick → {0, 0}.
        let mut held: Vec<_> = (0..4).map(|_| stats.arrive(&hello, &hello_load)).collect();
        time::advance(Duration::from_millis(500)).await;
        for _ in 0..8 {
            drop(stats.arrive(&hello, &hello_load));
        }
        time::advance(Duration::from_millis(250)).await;
        drop(held.pop());
        time::advance(Duration::from_millis(250)).await;
        let batch = stats.tick("activator-7d9c", Instant::now());
        assert_eq!(figures(&batch, &hello), (2.75, 11.0));
        assert_eq!(figures(&batch, &api), (0.0, 0.0));

        // The golden `wire-batch` is these two entries plus one without a stat, which
        // the activator never sends; repeated fields concatenate, so ours is its prefix.
        let ours = batch.encode_to_vec();
        let golden = vector("wire-batch");
        let tail = WireStatMessages {
            messages: vec![WireStatMessage {
                namespace: "ns".into(),
                name: "nostat".into(),
                stat: None,
            }],
        }
        .encode_to_vec();
        assert_eq!([ours, tail].concat(), golden);
        assert_eq!(stats.tracked(), 1, "team-a dropped after its zero tick");
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut settings = ReporterSettings::new("ws://x/", "p");
        settings.backoff_jitter = 0.0;
        settings.backoff_max = Duration::from_millis(250);
        let mut b = Backoff::new(&settings);
        let delays: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 130, 169, 219, 250, 250]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);

        settings.backoff_jitter = 0.2;
        let mut b = Backoff::new(&settings);
        for _ in 0..100 {
            b.reset();
            let d = b.next_delay().as_secs_f64();
            assert!((0.08 - 1e-9..=0.12 + 1e-9).contains(&d), "{d}");
        }
        assert_eq!(
            ReporterSettings::autoscaler_url("knative-serving", "cluster.local"),
            "ws://autoscaler.knative-serving.svc.cluster.local:8080/"
        );
    }

    // ---- Reporter against a real websocket server ----

    enum Event {
        Connected(mpsc::UnboundedSender<CloseCode>),
        Binary(WireStatMessages, Instant),
        Ping,
        Closed,
    }

    /// A websocket server on `listener` that reports what it sees; aborting the returned
    /// task drops the listener and every connection.
    fn ws_server(listener: TcpListener) -> (JoinHandle<()>, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let events = events.clone();
                conns.spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let (close_tx, mut close_rx) = mpsc::unbounded_channel();
                    let _ = events.send(Event::Connected(close_tx));
                    loop {
                        tokio::select! {
                            msg = ws.next() => match msg {
                                Some(Ok(Message::Binary(b))) => {
                                    let m = WireStatMessages::decode(b.as_ref()).expect("protobuf");
                                    let _ = events.send(Event::Binary(m, Instant::now()));
                                }
                                Some(Ok(Message::Ping(_))) => {
                                    let _ = events.send(Event::Ping);
                                }
                                Some(Ok(Message::Text(t))) => panic!("unexpected text message {t}"),
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => {
                                    let _ = events.send(Event::Closed);
                                    return;
                                }
                            },
                            Some(code) = close_rx.recv() => {
                                let frame = CloseFrame { code, reason: "".into() };
                                let _ = ws.close(Some(frame)).await;
                            }
                        }
                    }
                });
            }
        });
        (task, rx)
    }

    fn test_settings(addr: SocketAddr) -> ReporterSettings {
        ReporterSettings {
            period: Duration::from_millis(150),
            ping_interval: Duration::from_millis(200),
            pong_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            ..ReporterSettings::new(format!("ws://{addr}/"), "activator-test")
        }
    }

    async fn next_event(
        rx: &mut mpsc::UnboundedReceiver<Event>,
        within: Duration,
    ) -> Option<Event> {
        time::timeout(within, rx.recv()).await.ok().flatten()
    }

    /// Every event in the next `span`.
    async fn events_for(rx: &mut mpsc::UnboundedReceiver<Event>, span: Duration) -> Vec<Event> {
        let deadline = Instant::now() + span;
        let mut seen = Vec::new();
        while let Ok(Some(ev)) = time::timeout_at(deadline, rx.recv()).await {
            seen.push(ev);
        }
        seen
    }

    /// Waits for the next connection, skipping other events.
    async fn connection(
        rx: &mut mpsc::UnboundedReceiver<Event>,
        within: Duration,
    ) -> Option<mpsc::UnboundedSender<CloseCode>> {
        let deadline = Instant::now() + within;
        loop {
            match time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Connected(close))) => return Some(close),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    async fn wait_connected(reporter: &Reporter, want: bool, within: Duration) -> bool {
        let mut rx = reporter.connected_changed();
        let reached = time::timeout(within, rx.wait_for(|c| *c == want)).await;
        matches!(reached, Ok(Ok(_)))
    }

    async fn free_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[tokio::test]
    async fn pokes_at_once_then_batches_every_period_and_pings() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, mut events) = ws_server(listener);
        let stats = Arc::new(RevisionStats::new());
        let reporter = Reporter::spawn(test_settings(addr), Arc::clone(&stats));

        connection(&mut events, Duration::from_secs(2))
            .await
            .expect("reporter connects");
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);
        // Nothing is sent for ticks without revisions.
        for ev in events_for(&mut events, Duration::from_millis(400)).await {
            if let Event::Binary(m, _) = ev {
                panic!("empty batch sent: {m:?}");
            }
        }

        let rev = RevisionId::new("default", "hello-00001");
        let rev_load = Arc::new(ConcurrencyRecorder::untracked());
        let arrived = Instant::now();
        let held = stats.arrive(&rev, &rev_load);
        let poke = loop {
            match next_event(&mut events, Duration::from_secs(1)).await {
                Some(Event::Binary(m, at)) => break (m, at),
                Some(Event::Ping) => {}
                _ => panic!("no poke"),
            }
        };
        assert!(
            poke.1 - arrived < Duration::from_millis(100),
            "poke took {:?}",
            poke.1 - arrived
        );
        assert_eq!(poke.0, stats_poke_for(&rev, "activator-test"));

        let mut batches = Vec::new();
        let mut pings = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {
            match next_event(&mut events, Duration::from_millis(500)).await {
                Some(Event::Binary(m, at)) => batches.push((m, at)),
                Some(Event::Ping) => pings += 1,
                Some(Event::Connected(_) | Event::Closed) => panic!("connection changed"),
                None => {}
            }
        }
        assert!(reporter.is_connected());
        assert!(
            (6..=14).contains(&batches.len()),
            "{} batches in 1.5 s at 150 ms",
            batches.len()
        );
        let span = batches.last().unwrap().1 - batches[0].1;
        let mean = span / (batches.len() as u32 - 1);
        assert!(
            (Duration::from_millis(100)..=Duration::from_millis(250)).contains(&mean),
            "mean interval {mean:?}"
        );
        assert!(pings >= 4, "{pings} pings in 1.5 s at 200 ms");
        for (i, (batch, _)) in batches.iter().enumerate() {
            assert_eq!(batch.messages.len(), 1);
            let stat = stat_of(batch, &rev).unwrap();
            assert_eq!(stat.pod_name, "activator-test");
            assert_eq!(stat.average_proxied_concurrent_requests, 0.0);
            assert_eq!(stat.process_uptime, 0.0);
            assert_eq!(stat.timestamp, 0);
            if i == 0 {
                // One in flight since the poke: {1, 1} minus the poke.
                assert_eq!(
                    (stat.average_concurrent_requests, stat.request_count),
                    (0.0, 0.0)
                );
            } else {
                assert!(
                    (stat.average_concurrent_requests - 1.0).abs() < 1e-6,
                    "{stat:?}"
                );
                assert_eq!(stat.request_count, 0.0);
            }
        }

        // The request ends: a partial tick, one zero tick, then nothing more.
        drop(held);
        let tail: Vec<_> = events_for(&mut events, Duration::from_millis(1000))
            .await
            .into_iter()
            .filter_map(|ev| match ev {
                Event::Binary(m, _) => Some(m),
                _ => None,
            })
            .collect();
        let last = tail.last().expect("zero tick sent");
        assert_eq!(figures(last, &rev), (0.0, 0.0));
        assert_eq!(stats.tracked(), 0);
        assert!(
            tail.len() <= 3,
            "{} batches after the request ended",
            tail.len()
        );

        drop(reporter);
        server.abort();
    }

    fn stats_poke_for(rev: &RevisionId, pod: &str) -> WireStatMessages {
        WireStatMessages {
            messages: vec![wire_message(rev, pod, 1.0, 1.0)],
        }
    }

    #[tokio::test]
    async fn close_1012_reconnects_at_once_other_closes_back_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, mut events) = ws_server(listener);
        let settings = ReporterSettings {
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(2),
            ..test_settings(addr)
        };
        let reporter = Reporter::spawn(settings, Arc::new(RevisionStats::new()));

        let close = connection(&mut events, Duration::from_secs(2))
            .await
            .expect("reporter connects");
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);

        let sent = Instant::now();
        close.send(CloseCode::Restart).unwrap();
        let close = connection(&mut events, Duration::from_secs(2))
            .await
            .expect("reconnects after 1012");
        assert!(
            sent.elapsed() < Duration::from_millis(500),
            "1012 reconnect took {:?}",
            sent.elapsed()
        );
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);

        // A normal close waits out the backoff (2 s ± 20%).
        let sent = Instant::now();
        close.send(CloseCode::Normal).unwrap();
        assert!(wait_connected(&reporter, false, Duration::from_secs(1)).await);
        assert!(connection(&mut events, Duration::from_millis(1300))
            .await
            .is_none());
        assert!(!reporter.is_connected());
        connection(&mut events, Duration::from_secs(3))
            .await
            .expect("reconnects after the backoff");
        assert!(
            sent.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            sent.elapsed()
        );
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);

        drop(reporter);
        server.abort();
    }

    #[tokio::test]
    async fn server_gone_backs_off_and_resumes_when_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, mut events) = ws_server(listener);
        let stats = Arc::new(RevisionStats::new());
        let reporter = Reporter::spawn(test_settings(addr), Arc::clone(&stats));
        connection(&mut events, Duration::from_secs(2))
            .await
            .expect("reporter connects");
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);
        let rev = RevisionId::new("ns", "busy");
        let rev_load = Arc::new(ConcurrencyRecorder::untracked());
        let _held = stats.arrive(&rev, &rev_load);

        // The server goes away: listener and connection dropped without a close frame.
        server.abort();
        let _ = server.await;
        assert!(wait_connected(&reporter, false, Duration::from_secs(2)).await);

        // Something on the port that accepts TCP but never speaks websocket: each
        // reconnect attempt is one accept, and the gaps between them grow.
        let raw = TcpListener::bind(addr).await.unwrap();
        let mut attempts = Vec::new();
        let watch_until = Instant::now() + Duration::from_millis(2500);
        while let Ok(Ok((tcp, _))) = time::timeout_at(watch_until, raw.accept()).await {
            attempts.push(Instant::now());
            drop(tcp);
            assert!(!reporter.is_connected());
        }
        drop(raw);
        let gaps: Vec<_> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            (4..=14).contains(&attempts.len()),
            "{} attempts in 2.5 s: {gaps:?}",
            attempts.len()
        );
        assert!(
            *gaps.last().unwrap() > gaps[0] * 2,
            "backoff does not grow: {gaps:?}"
        );

        // The server is back on the same port: the reporter reconnects and resumes.
        let (server, mut events) = ws_server(TcpListener::bind(addr).await.unwrap());
        connection(&mut events, Duration::from_secs(3))
            .await
            .expect("reconnects when the server is back");
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);
        let batch = loop {
            match next_event(&mut events, Duration::from_secs(1)).await {
                Some(Event::Binary(m, _)) => break m,
                Some(Event::Ping) => {}
                _ => panic!("no batch after reconnecting"),
            }
        };
        let (avg, count) = figures(&batch, &rev);
        assert!((avg - 1.0).abs() < 1e-6 && count == 0.0, "{batch:?}");

        drop(reporter);
        server.abort();
    }

    #[tokio::test]
    async fn not_ready_until_the_first_connection() {
        let addr = free_addr().await;
        let reporter = Reporter::spawn(test_settings(addr), Arc::new(RevisionStats::new()));
        assert!(!reporter.is_connected());
        time::sleep(Duration::from_millis(300)).await;
        assert!(!reporter.is_connected(), "nothing listens yet");

        let (server, mut events) = ws_server(TcpListener::bind(addr).await.unwrap());
        connection(&mut events, Duration::from_secs(3))
            .await
            .expect("connects once the server is up");
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);
        server.abort();
    }

    #[tokio::test]
    async fn silent_peer_is_dropped_after_the_pong_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Completes the handshake, then never reads, so pings go unanswered.
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            time::sleep(Duration::from_secs(10)).await;
            drop(ws);
        });
        let settings = ReporterSettings {
            ping_interval: Duration::from_millis(100),
            pong_timeout: Duration::from_millis(400),
            ..test_settings(addr)
        };
        let reporter = Reporter::spawn(settings, Arc::new(RevisionStats::new()));
        assert!(wait_connected(&reporter, true, Duration::from_secs(2)).await);
        let up = Instant::now();
        assert!(wait_connected(&reporter, false, Duration::from_secs(2)).await);
        assert!(
            up.elapsed() >= Duration::from_millis(300),
            "{:?}",
            up.elapsed()
        );
        server.abort();
    }

    // ---- following a moving target ----

    /// Accepts TCP on `listener` and counts attempts, never speaking websocket.
    async fn attempts_within(listener: &TcpListener, span: Duration) -> usize {
        let until = Instant::now() + span;
        let mut n = 0;
        while let Ok(Ok((tcp, _))) = time::timeout_at(until, listener.accept()).await {
            n += 1;
            drop(tcp);
        }
        n
    }

    #[tokio::test]
    async fn following_none_never_connects_nor_blocks_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(None::<String>);
        let stats = Arc::new(RevisionStats::new());
        let reporter = Reporter::spawn_following(test_settings(addr), rx, Arc::clone(&stats));
        // Load and pokes while there is no target are cut and dropped, not queued.
        let rev = RevisionId::new("ns", "r");
        let rev_load = Arc::new(ConcurrencyRecorder::untracked());
        let _held = stats.arrive(&rev, &rev_load);
        assert_eq!(
            attempts_within(&listener, Duration::from_millis(600)).await,
            0
        );
        assert!(!reporter.is_connected());
        assert!(!reporter.blocks_readiness());
        drop(listener);

        // A fixed reporter that is not connected does block readiness.
        let fixed = Reporter::spawn(test_settings(addr), Arc::new(RevisionStats::new()));
        assert!(fixed.blocks_readiness());
        drop(tx);
    }

    #[tokio::test]
    async fn following_reconnects_at_once_when_the_target_moves() {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a_addr = a.local_addr().unwrap();
        let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b_addr = b.local_addr().unwrap();
        let (server_a, mut events_a) = ws_server(a);
        let (server_b, mut events_b) = ws_server(b);
        let (tx, rx) = watch::channel(Some(format!("ws://{a_addr}/")));
        let stats = Arc::new(RevisionStats::new());
        let settings = ReporterSettings {
            // A long backoff, so only an immediate retarget passes the timing checks.
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(5),
            ..test_settings(a_addr)
        };
        let reporter = Reporter::spawn_following(settings, rx, Arc::clone(&stats));
        connection(&mut events_a, Duration::from_secs(2))
            .await
            .expect("connects to the first target");
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);
        assert!(!reporter.blocks_readiness());
        let rev = RevisionId::new("ns", "busy");
        let rev_load = Arc::new(ConcurrencyRecorder::untracked());
        let _held = stats.arrive(&rev, &rev_load);

        // The leader moves to B: A's connection ends, B gets one at once, with stats.
        let moved = Instant::now();
        tx.send_replace(Some(format!("ws://{b_addr}/")));
        connection(&mut events_b, Duration::from_secs(2))
            .await
            .expect("connects to the new target");
        assert!(
            moved.elapsed() < Duration::from_secs(1),
            "retarget took {:?}",
            moved.elapsed()
        );
        let a_seen = events_for(&mut events_a, Duration::from_millis(300)).await;
        assert!(
            a_seen.iter().any(|e| matches!(e, Event::Closed)),
            "the old target's connection closed"
        );
        let batch = loop {
            match next_event(&mut events_b, Duration::from_secs(1)).await {
                Some(Event::Binary(m, _)) => break m,
                Some(Event::Ping) => {}
                _ => panic!("no batch on the new target"),
            }
        };
        assert!(stat_of(&batch, &rev).is_some());

        // Setting the same URL again changes nothing.
        tx.send_replace(Some(format!("ws://{b_addr}/")));
        for ev in events_for(&mut events_b, Duration::from_millis(300)).await {
            assert!(!matches!(ev, Event::Closed | Event::Connected(_)));
        }

        // No leader (or this activator leads): disconnect and stay away.
        tx.send_replace(None);
        assert!(wait_connected(&reporter, false, Duration::from_secs(1)).await);
        let after: Vec<_> = events_for(&mut events_b, Duration::from_millis(600)).await;
        assert!(after.iter().any(|e| matches!(e, Event::Closed)));
        assert!(!after.iter().any(|e| matches!(e, Event::Connected(_))));
        assert!(events_for(&mut events_a, Duration::from_millis(100))
            .await
            .iter()
            .all(|e| !matches!(e, Event::Connected(_))));

        // A target again, even while a backoff would be running: at once.
        let back = Instant::now();
        tx.send_replace(Some(format!("ws://{a_addr}/")));
        connection(&mut events_a, Duration::from_secs(2))
            .await
            .expect("reconnects when a leader is known again");
        assert!(
            back.elapsed() < Duration::from_secs(1),
            "{:?}",
            back.elapsed()
        );

        // The sender going away keeps the last target.
        drop(tx);
        assert!(wait_connected(&reporter, true, Duration::from_secs(1)).await);
        for ev in events_for(&mut events_a, Duration::from_millis(400)).await {
            assert!(!matches!(ev, Event::Closed));
        }
        drop(reporter);
        server_a.abort();
        server_b.abort();
    }

    #[tokio::test]
    async fn following_retargets_during_a_backoff() {
        // Nothing listens on the first target: the reporter is backing off (5 s) when
        // the target moves, and must not wait the backoff out.
        let dead = free_addr().await;
        let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b_addr = b.local_addr().unwrap();
        let (server_b, mut events_b) = ws_server(b);
        let (tx, rx) = watch::channel(Some(format!("ws://{dead}/")));
        let settings = ReporterSettings {
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(5),
            ..test_settings(dead)
        };
        let reporter = Reporter::spawn_following(settings, rx, Arc::new(RevisionStats::new()));
        time::sleep(Duration::from_millis(300)).await;
        assert!(!reporter.is_connected());
        let moved = Instant::now();
        tx.send_replace(Some(format!("ws://{b_addr}/")));
        connection(&mut events_b, Duration::from_secs(2))
            .await
            .expect("connects to the new target");
        assert!(
            moved.elapsed() < Duration::from_secs(1),
            "{:?}",
            moved.elapsed()
        );
        drop(reporter);
        server_b.abort();
    }
}
