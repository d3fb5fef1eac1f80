//! Which of a revision's pods may take traffic (CONTRACT §2.4). A pod is used only after
//! its queue-proxy answers the activator's probe; while requests wait for the revision,
//! pods that are not ready yet are probed every few milliseconds so a pod is picked up
//! within ~10 ms of becoming ready ([beyond]; Knative probes every 200 ms).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use thaw_shared::headers;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::revision::RevisionId;
use crate::throttler::Throttler;

/// How often a not-yet-ready pod is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSchedule {
    /// While requests are waiting for the revision.
    pub eager: Duration,
    /// Otherwise (Knative's pace).
    pub idle: Duration,
    /// One probe attempt.
    pub timeout: Duration,
}

impl Default for ProbeSchedule {
    fn default() -> Self {
        Self {
            eager: Duration::from_millis(2),
            idle: Duration::from_millis(200),
            timeout: Duration::from_millis(300),
        }
    }
}

/// Why a pod did not pass its probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("answered with an unexpected body")]
    Body,
    #[error("timed out")]
    Timeout,
    #[error("answered for revision {0}")]
    OtherRevision(String),
}

/// The activator's probe of a queue-proxy: `GET /healthz` with `K-Network-Probe: queue`;
/// ready means `200` with body exactly `queue`. A Thaw queue-proxy also names its
/// revision (`Thaw-Revision`, [beyond]): a pod naming another revision than `revision` is
/// never ready for it, so a reused address cannot send a request to the wrong revision.
/// Knative's queue-proxy sends no such header, and is taken at its word; so is any pod
/// when `revision` is `None` (the platform cannot vouch for the names its pods were given).
pub async fn probe_pod(addr: SocketAddr, revision: Option<&RevisionId>) -> Result<(), ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = Request::get("/healthz")
        .header(http::header::HOST, addr.to_string())
        .header(headers::K_NETWORK_PROBE, headers::PROBE_QUEUE)
        .header(http::header::USER_AGENT, headers::ACTIVATOR_PROBE_UA)
        .body(Empty::<Bytes>::new())
        .map_err(|_| ProbeError::Body)?;
    let result = async {
        let resp = sender.send_request(req).await?;
        if let (Some(revision), Some(answered)) =
            (revision, resp.headers().get(headers::THAW_REVISION))
        {
            let expected = headers::revision_identity(&revision.namespace, &revision.name);
            if answered.as_bytes() != expected.as_bytes() {
                return Err(ProbeError::OtherRevision(
                    String::from_utf8_lossy(answered.as_bytes()).into_owned(),
                ));
            }
        }
        if resp.status() != StatusCode::OK {
            return Err(ProbeError::Status(resp.status()));
        }
        let body = Limited::new(resp.into_body(), 64)
            .collect()
            .await
            .map_err(|_| ProbeError::Body)?;
        if body.to_bytes() != headers::PROBE_QUEUE.as_bytes() {
            return Err(ProbeError::Body);
        }
        Ok(())
    }
    .await;
    conn.abort();
    result
}

struct Pod {
    ready: bool,
    prober: Option<JoinHandle<()>>,
}

struct Inner {
    pods: Mutex<HashMap<SocketAddr, Pod>>,
    /// Whether the first response after the revision last had no ready pod was logged.
    cold_start_logged: AtomicBool,
    /// Whether a pod must not answer for another revision (`RevisionSpec::verify_pod_identity`).
    verify_identity: AtomicBool,
    throttler: Throttler,
    schedule: ProbeSchedule,
}

/// The pods of one revision and their readiness; feeds the revision's throttler.
#[derive(Clone)]
pub struct Backends {
    inner: Arc<Inner>,
}

impl Backends {
    pub fn new(throttler: Throttler, schedule: ProbeSchedule) -> Self {
        Self {
            inner: Arc::new(Inner {
                pods: Mutex::new(HashMap::new()),
                cold_start_logged: AtomicBool::new(true),
                verify_identity: AtomicBool::new(false),
                throttler,
                schedule,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Pod>> {
        self.inner.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The platform's current pod list: new pods start being probed, vanished pods are
    /// dropped at once (requests already sent to them finish on their own).
    pub fn set_pods(&self, pods: &[SocketAddr]) {
        let mut map = self.lock();
        map.retain(|addr, pod| {
            let keep = pods.contains(addr);
            if !keep {
                if let Some(task) = pod.prober.take() {
                    task.abort();
                }
            }
            keep
        });
        for addr in pods {
            if !map.contains_key(addr) {
                let prober = self.spawn_prober(*addr);
                map.insert(
                    *addr,
                    Pod {
                        ready: false,
                        prober: Some(prober),
                    },
                );
            }
        }
        self.publish(&map);
    }

    /// A request could not connect to `addr`, or lost its connection before an answer:
    /// take it out of rotation and probe it again.
    pub fn unreachable(&self, addr: SocketAddr) {
        let mut map = self.lock();
        let Some(pod) = map.get_mut(&addr) else {
            return;
        };
        if !pod.ready {
            return;
        }
        pod.ready = false;
        pod.prober = Some(self.spawn_prober(addr));
        self.publish(&map);
    }

    /// Refuse pods that answer for another revision from the next probe on.
    pub fn verify_identity(&self, on: bool) {
        self.inner.verify_identity.store(on, Ordering::Relaxed);
    }

    pub fn ready(&self) -> usize {
        self.lock().values().filter(|p| p.ready).count()
    }

    /// Stops probing; the revision is gone.
    pub fn shutdown(&self) {
        for (_, mut pod) in self.lock().drain() {
            if let Some(task) = pod.prober.take() {
                task.abort();
            }
        }
    }

    /// True for the first caller after the revision went without ready pods: the one
    /// cold-start response worth a log line.
    pub fn first_cold_response(&self) -> bool {
        !self.inner.cold_start_logged.swap(true, Ordering::Relaxed)
    }

    fn publish(&self, map: &HashMap<SocketAddr, Pod>) {
        let mut ready: Vec<SocketAddr> = map
            .iter()
            .filter(|(_, p)| p.ready)
            .map(|(a, _)| *a)
            .collect();
        if ready.is_empty() {
            self.inner.cold_start_logged.store(false, Ordering::Relaxed);
        }
        ready.sort_unstable();
        self.inner.throttler.update_pods(ready);
    }

    fn spawn_prober(&self, addr: SocketAddr) -> JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(probe_until_ready(weak, addr))
    }
}

async fn probe_until_ready(inner: Weak<Inner>, addr: SocketAddr) {
    let Some(me) = inner.upgrade() else {
        return;
    };
    let (throttler, schedule) = (me.throttler.clone(), me.schedule);
    let verify = me.verify_identity.load(Ordering::Relaxed);
    drop(me);
    let mut waiters = throttler.subscribe_waiters();
    let revision = throttler.revision().clone();
    let mut warned = false;
    loop {
        let expected = verify.then_some(&revision);
        match tokio::time::timeout(schedule.timeout, probe_pod(addr, expected)).await {
            Ok(Ok(())) => break,
            Ok(Err(e @ ProbeError::OtherRevision(_))) => {
                // A misrouting caught: worth saying once, not at every probe.
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(%addr, %revision, error = %e, "pod listed for this revision belongs to another; not using it");
                }
            }
            Ok(Err(e)) => tracing::trace!(%addr, error = %e, "pod not ready"),
            Err(_) => tracing::trace!(%addr, "pod probe timed out"),
        }
        if throttler.has_waiters() {
            tokio::time::sleep(schedule.eager).await;
        } else {
            // Sleep at Knative's pace, but wake as soon as requests start waiting.
            let _ = tokio::time::timeout(schedule.idle, waiters.changed()).await;
        }
    }
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let backends = Backends { inner };
    let mut map = backends.lock();
    if let Some(pod) = map.get_mut(&addr) {
        pod.ready = true;
        pod.prober = None;
        tracing::debug!(%addr, "pod ready");
        backends.publish(&map);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revision::RevisionId;
    use crate::throttler::ThrottlerSettings;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A queue-proxy stand-in: answers the activator's probe with `queue` once `ready`.
    async fn fake_queue_proxy(ready: Arc<AtomicBool>, probes: Arc<AtomicUsize>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (ready, probes) = (Arc::clone(&ready), Arc::clone(&probes));
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            probes.fetch_add(1, Ordering::SeqCst);
                            let ok = ready.load(Ordering::SeqCst)
                                && req
                                    .headers()
                                    .get(headers::K_NETWORK_PROBE)
                                    .is_some_and(|v| v == "queue");
                            let (status, body) = if ok { (200, "queue") } else { (503, "") };
                            async move {
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(http_body_util::Full::new(Bytes::from_static(
                                            body.as_bytes(),
                                        )))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn throttler() -> Throttler {
        Throttler::new(
            RevisionId::new("ns", "rev"),
            1,
            ThrottlerSettings::default(),
        )
    }

    #[tokio::test]
    async fn a_pod_is_used_only_after_its_probe_and_dropped_at_once_when_gone() {
        let ready = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicUsize::new(0));
        let addr = fake_queue_proxy(Arc::clone(&ready), Arc::clone(&probes)).await;
        let t = throttler();
        let backends = Backends::new(
            t.clone(),
            ProbeSchedule {
                idle: Duration::from_millis(20),
                ..Default::default()
            },
        );
        backends.set_pods(&[addr]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(probes.load(Ordering::SeqCst) >= 2, "the pod is probed");
        assert_eq!(t.ready_pods(), 0, "not ready until the probe passes");
        ready.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), async {
            while t.ready_pods() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(backends.ready(), 1);
        let permit = t.acquire(0).await.unwrap();
        assert_eq!(permit.addr(), addr);
        // The platform drops the pod: no new request may go there, the one in flight is fine.
        backends.set_pods(&[]);
        assert_eq!(t.ready_pods(), 0);
        drop(permit);
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn waiting_requests_switch_probing_to_the_eager_pace() {
        let probes = Arc::new(AtomicUsize::new(0));
        let addr = fake_queue_proxy(Arc::new(AtomicBool::new(false)), Arc::clone(&probes)).await;
        let t = throttler();
        let backends = Backends::new(t.clone(), ProbeSchedule::default());
        backends.set_pods(&[addr]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = probes.load(Ordering::SeqCst);
        // Knative's pace: a few probes in half a second.
        assert!(idle <= 5, "{idle} probes while nothing waits");
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { t2.acquire(0).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let eager = probes.load(Ordering::SeqCst) - idle;
        assert!(
            eager >= 4 * idle.max(1),
            "{eager} probes while a request waits vs {idle} idle"
        );
        waiter.abort();
        backends.shutdown();
    }

    /// A queue-proxy stand-in answering `200 queue`, with `Thaw-Revision` if given.
    async fn answering_for(identity: Option<&'static str>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"queue"),
                        ));
                        if let Some(identity) = identity {
                            resp.headers_mut().insert(
                                headers::THAW_REVISION,
                                http::HeaderValue::from_static(identity),
                            );
                        }
                        async move { Ok::<_, Infallible>(resp) }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_pod_answering_for_another_revision_is_never_ready() {
        let rev = RevisionId::new("ns", "rev");
        let other = answering_for(Some("ns/other")).await;
        match probe_pod(other, Some(&rev)).await {
            Err(ProbeError::OtherRevision(answered)) => assert_eq!(answered, "ns/other"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let other_namespace = answering_for(Some("elsewhere/rev")).await;
        assert!(matches!(
            probe_pod(other_namespace, Some(&rev)).await,
            Err(ProbeError::OtherRevision(_))
        ));
        // Its own revision, or no claim at all (Knative's queue-proxy), is ready.
        probe_pod(answering_for(Some("ns/rev")).await, Some(&rev))
            .await
            .unwrap();
        probe_pod(answering_for(None).await, Some(&rev))
            .await
            .unwrap();
        // A platform that cannot vouch for its pods' names does not check them.
        probe_pod(other, None).await.unwrap();

        // Through the backends: the pod is probed but never handed to the throttler.
        let t = throttler();
        let backends = Backends::new(t.clone(), ProbeSchedule::default());
        backends.verify_identity(true);
        backends.set_pods(&[other]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(t.ready_pods(), 0);
        backends.shutdown();
    }

    #[tokio::test]
    async fn probe_requires_the_exact_queue_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"queue-ish"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        let rev = RevisionId::new("ns", "rev");
        assert!(matches!(
            probe_pod(addr, Some(&rev)).await,
            Err(ProbeError::Body)
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            probe_pod(closed, Some(&rev)).await,
            Err(ProbeError::Connect(_))
        ));
    }
}
