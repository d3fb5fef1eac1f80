//! The response body both binaries answer with: either a small local one (probes,
//! errors) or an upstream's streamed body under the timeouts, carrying a guard `G` that is
//! dropped the moment the stream ends (breaker slot, pod permit, in-flight count, latency).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::timeout::TimeoutBody;

pin_project! {
    #[project = ResponseBodyProj]
    pub enum ResponseBody<G> {
        Local { data: Option<Bytes> },
        Proxied {
            #[pin]
            body: TimeoutBody<Incoming>,
            guard: Option<G>,
        },
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

    pub fn proxied(body: TimeoutBody<Incoming>, guard: G) -> Self {
        ResponseBody::Proxied {
            body,
            guard: Some(guard),
        }
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local { data } => data.is_none(),
            ResponseBody::Proxied { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseBody::Proxied { body, .. } => body.size_hint(),
        }
    }
}
