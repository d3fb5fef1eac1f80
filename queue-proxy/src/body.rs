//! The response body of every queue-proxy answer: either a small local one (probes,
//! errors) or the app's streamed body, which carries the request's guards so the breaker
//! slot, the in-flight count and the latency are settled when the last byte is sent.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use thaw_shared::breaker::BreakerPermit;
use thaw_shared::stats::InFlight;
use thaw_shared::timeout::TimeoutBody;

use crate::metrics::RequestRecord;

/// Everything a request holds until its response is over. Fields drop in order: the
/// latency is recorded, then the breaker slot and the in-flight count are released.
#[derive(Debug)]
pub struct RequestGuard {
    pub record: Option<RequestRecord>,
    pub permit: Option<BreakerPermit>,
    pub in_flight: Option<InFlight>,
}

pin_project! {
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        Local { data: Option<Bytes> },
        Proxied {
            #[pin]
            body: TimeoutBody<Incoming>,
            guard: RequestGuard,
        },
    }
}

impl ResponseBody {
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
}

impl Body for ResponseBody {
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
                    // The exchange is over: release the slot now rather than when hyper
                    // gets around to dropping the body.
                    guard.record.take();
                    guard.permit.take();
                    guard.in_flight.take();
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
