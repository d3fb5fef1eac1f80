//! The response body both binaries answer with: either a small local one (probes,
//! errors) or an upstream's streamed body under the timeouts, carrying a guard `G` that is
//! dropped the moment the stream ends (breaker slot, pod permit, in-flight count, latency).

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::conn::Connection;
use crate::pool::BodyError;
use crate::proxy::{TunnelHold, UpstreamBody};
use crate::timeout::{TimeoutBody, Timeouts, TIMEOUT_BODY};
use crate::upstream_h1::{VerbatimLines, VerbatimSource};

pin_project! {
    #[project = ResponseBodyProj]
    pub enum ResponseBody<G> {
        Local { data: Option<Bytes> },
        Proxied {
            #[pin]
            body: TimeoutBody<UpstreamBody>,
            guard: Option<G>,
        },
        /// An HTTP/2 response under a watchdog; see [`ResponseBody::watched`].
        Watched { watched: Arc<Mutex<Watched<G>>> },
    }
}

/// What a watched response shares with its watchdog.
pub struct Watched<G> {
    body: Option<Pin<Box<TimeoutBody<UpstreamBody>>>>,
    guard: Option<G>,
    /// When the client last took a data frame.
    last_progress: Instant,
    timed_out: bool,
    done: bool,
    /// Dropped when the response ends or is dropped, which ends the watchdog at once.
    /// Without it every HTTP/2 response left a task asleep until its `total` deadline
    /// (the revision timeout, 300 s by default): at 30 000 responses a second the
    /// queue-proxy grew by about 20 MB a second, and kept it.
    ender: Option<oneshot::Sender<()>>,
}

impl<G> Watched<G> {
    /// Releases what the request holds (the upstream body, the slot) and the watchdog.
    fn release(&mut self) {
        self.body = None;
        self.guard = None;
        self.ender = None;
    }

    /// The exchange is over.
    fn finish(&mut self) {
        self.done = true;
        self.release();
    }
}

impl<G> ResponseBody<G> {
    pub fn empty() -> Self {
        ResponseBody::Local { data: None }
    }

    pub fn text(text: &'static str) -> Self {
        Self::bytes(Bytes::from_static(text.as_bytes()))
    }

    pub fn bytes(data: Bytes) -> Self {
        ResponseBody::Local {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn proxied(body: TimeoutBody<UpstreamBody>, guard: G) -> Self {
        ResponseBody::Proxied {
            body,
            guard: Some(guard),
        }
    }
}

impl<G: Send + 'static> ResponseBody<G> {
    /// A proxied HTTP/2 response whose deadlines hold even when the client stops taking
    /// data. HTTP/2 flow control stalls a stream without blocking the socket, and hyper
    /// then stops polling the body, so [`TimeoutBody`]'s timers never fire. A watchdog
    /// task drops the upstream body and the guard (breaker slot, pod permit) once `total`
    /// passes, or once the client took nothing for `idle`. HTTP/1 needs none of this: a
    /// stalled client blocks the socket, which [`crate::conn::ConnIo`] watches.
    pub fn watched(
        body: TimeoutBody<UpstreamBody>,
        guard: G,
        total: Option<Instant>,
        idle: Option<Duration>,
    ) -> Self {
        if total.is_none() && idle.is_none() {
            return Self::proxied(body, guard);
        }
        Self::watch(Some(Box::pin(body)), guard, total, idle)
    }

    fn watch(
        body: Option<Pin<Box<TimeoutBody<UpstreamBody>>>>,
        guard: G,
        total: Option<Instant>,
        idle: Option<Duration>,
    ) -> Self {
        let (ender, ended) = oneshot::channel();
        let watched = Arc::new(Mutex::new(Watched {
            body,
            guard: Some(guard),
            last_progress: Instant::now(),
            timed_out: false,
            done: false,
            ender: Some(ender),
        }));
        tokio::spawn(watchdog(Arc::downgrade(&watched), total, idle, ended));
        ResponseBody::Watched { watched }
    }
}

/// The response to a proxied request, holding `guard` for exactly as long as the exchange
/// lasts: an upgraded connection keeps it until the tunnel closes; otherwise the body
/// streams under `timeouts`, which also bound how long a client that stops reading may
/// hold it (through the connection on HTTP/1, a watchdog on HTTP/2).
pub fn proxied_response<G: Send + 'static>(
    resp: Response<UpstreamBody>,
    guard: G,
    conn: &Connection,
    version: Version,
    timeouts: &Timeouts,
    started: Instant,
) -> Response<ResponseBody<G>> {
    let (mut parts, body) = resp.into_parts();
    if let Some(hold) = TunnelHold::take(&mut parts) {
        hold.keep(guard);
        return Response::from_parts(parts, ResponseBody::empty());
    }
    let total = timeouts.total.and_then(|d| started.checked_add(d));
    let body = timeouts.body(started, body);
    let body = if version == Version::HTTP_2 {
        ResponseBody::watched(body, guard, total, timeouts.idle)
    } else {
        conn.limit_writes(total, timeouts.idle);
        ResponseBody::proxied(body, guard)
    };
    Response::from_parts(parts, body)
}

/// Ends a watched response whose client stalled past its deadlines; returns as soon as
/// the response ends (`ended`), whatever its deadlines.
async fn watchdog<G>(
    watched: Weak<Mutex<Watched<G>>>,
    total: Option<Instant>,
    idle: Option<Duration>,
    mut ended: oneshot::Receiver<()>,
) {
    let mut last_progress = Instant::now();
    loop {
        let idle_due = idle.and_then(|d| last_progress.checked_add(d));
        let due = match (total, idle_due) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return,
        };
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            _ = &mut ended => return,
        }
        let Some(watched) = watched.upgrade() else {
            return; // hyper dropped the response: nothing left to free
        };
        let Ok(mut state) = watched.lock() else {
            return;
        };
        if state.done {
            return;
        }
        if state.last_progress > last_progress && total.is_none_or(|t| t > Instant::now()) {
            last_progress = state.last_progress;
            continue;
        }
        // Dropping the upstream body cancels the app's request; dropping the guard frees
        // the slot. The stream itself ends when hyper next polls it.
        state.release();
        state.timed_out = true;
        return;
    }
}

/// `text/plain` for the short answers both proxies make themselves.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
/// Prometheus' text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A response the proxy makes itself: `status` with `body` of `content_type`.
pub fn local<G>(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody<G>> {
    let mut resp = Response::new(ResponseBody::bytes(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A plain-text answer (probe bodies, error reasons).
pub fn text<G>(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody<G>> {
    local(status, TEXT_PLAIN, body)
}

/// An answer with no body.
pub fn empty<G>(status: StatusCode) -> Response<ResponseBody<G>> {
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = status;
    resp
}

impl<G> VerbatimSource for ResponseBody<G> {
    fn take_verbatim(&mut self) -> Option<VerbatimLines> {
        match self {
            ResponseBody::Proxied { body, .. } => body.take_verbatim(),
            ResponseBody::Local { .. } | ResponseBody::Watched { .. } => None,
        }
    }
}

impl<G> Body for ResponseBody<G> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            ResponseBodyProj::Local { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            ResponseBodyProj::Proxied { body, guard } => {
                let polled = body.poll_frame(cx);
                if let Poll::Ready(Some(Err(_)) | None) = &polled {
                    // The exchange is over: release what the request holds now rather
                    // than whenever hyper gets around to dropping the body.
                    guard.take();
                }
                polled
            }
            ResponseBodyProj::Watched { watched } => {
                let Ok(mut state) = watched.lock() else {
                    return Poll::Ready(None);
                };
                if state.done {
                    return Poll::Ready(None);
                }
                if state.timed_out {
                    state.finish();
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        TIMEOUT_BODY.as_bytes(),
                    )))));
                }
                let Some(body) = state.body.as_mut() else {
                    state.finish();
                    return Poll::Ready(None);
                };
                let polled = body.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(_))) => state.last_progress = Instant::now(),
                    Poll::Ready(Some(Err(_)) | None) => state.finish(),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local { data } => data.is_none(),
            ResponseBody::Proxied { body, .. } => body.is_end_stream(),
            ResponseBody::Watched { watched } => watched.lock().map_or(true, |s| {
                s.done || (!s.timed_out && s.body.as_ref().is_none_or(|b| b.is_end_stream()))
            }),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseBody::Proxied { body, .. } => body.size_hint(),
            ResponseBody::Watched { watched } => watched
                .lock()
                .ok()
                .and_then(|s| s.body.as_ref().map(|b| b.size_hint()))
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set when dropped: stands for a breaker slot or a pod permit.
    struct Slot(Arc<AtomicBool>);

    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn far() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(300))
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_watched_response_that_ends_takes_its_watchdog_with_it() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let freed = Arc::new(AtomicBool::new(false));
        let mut body = std::pin::pin!(ResponseBody::watch(
            None,
            Slot(Arc::clone(&freed)),
            far(),
            Some(Duration::from_secs(60)),
        ));
        settle().await;
        assert_eq!(metrics.num_alive_tasks(), before + 1, "the watchdog runs");
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert!(frame.is_none());
        assert!(freed.load(Ordering::SeqCst), "the slot is freed at the end");
        assert!(body.is_end_stream());
        settle().await;
        // Before the fix the watchdog slept until `total`, 300 s, for every response.
        assert_eq!(
            metrics.num_alive_tasks(),
            before,
            "the watchdog ended with the response"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_watched_response_dropped_unfinished_takes_its_watchdog_with_it() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let freed = Arc::new(AtomicBool::new(false));
        let body: ResponseBody<Slot> =
            ResponseBody::watch(None, Slot(Arc::clone(&freed)), far(), None);
        settle().await;
        assert_eq!(metrics.num_alive_tasks(), before + 1);
        // A client that resets its stream: hyper drops the body without polling it.
        drop(body);
        assert!(freed.load(Ordering::SeqCst));
        settle().await;
        assert_eq!(metrics.num_alive_tasks(), before);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_stalled_watched_response_is_ended_at_its_deadline() {
        let freed = Arc::new(AtomicBool::new(false));
        let total = Some(Instant::now() + Duration::from_secs(5));
        let mut body = std::pin::pin!(ResponseBody::watch(
            None,
            Slot(Arc::clone(&freed)),
            total,
            None
        ));
        // Never polled: a client whose flow-control window stays shut.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!freed.load(Ordering::SeqCst), "not before the deadline");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            freed.load(Ordering::SeqCst),
            "the slot is freed at the deadline"
        );
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        let data = frame
            .and_then(Result::ok)
            .and_then(|f| f.into_data().ok())
            .unwrap_or_default();
        assert_eq!(data, Bytes::from_static(TIMEOUT_BODY.as_bytes()));
        let end = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert!(end.is_none());
    }
}
