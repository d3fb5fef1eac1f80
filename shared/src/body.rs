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

use tokio::time::Instant;

use crate::conn::Connection;
use crate::proxy::{TunnelHold, UpstreamBody};
use crate::timeout::{TimeoutBody, Timeouts, TIMEOUT_BODY};

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
        let watched = Arc::new(Mutex::new(Watched {
            body: Some(Box::pin(body)),
            guard: Some(guard),
            last_progress: Instant::now(),
            timed_out: false,
            done: false,
        }));
        tokio::spawn(watchdog(Arc::downgrade(&watched), total, idle));
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

/// Ends a watched response whose client stalled past its deadlines.
async fn watchdog<G>(
    watched: Weak<Mutex<Watched<G>>>,
    total: Option<Instant>,
    idle: Option<Duration>,
) {
    let mut last_progress = Instant::now();
    loop {
        let idle_due = idle.and_then(|d| last_progress.checked_add(d));
        let due = match (total, idle_due) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return,
        };
        tokio::time::sleep_until(due).await;
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
        state.body = None;
        state.guard = None;
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

impl<G> Body for ResponseBody<G> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
                    state.done = true;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        TIMEOUT_BODY.as_bytes(),
                    )))));
                }
                let Some(body) = state.body.as_mut() else {
                    return Poll::Ready(None);
                };
                let polled = body.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(_))) => state.last_progress = Instant::now(),
                    Poll::Ready(Some(Err(_)) | None) => {
                        state.done = true;
                        state.body = None;
                        state.guard = None;
                    }
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
