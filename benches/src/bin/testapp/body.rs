//! The one response body type every route answers with.
//!
//! An enum rather than a boxed trait object keeps the common responses
//! (fixed text, `/bytes`, `/echo`) free of per-request allocation, and lets
//! the in-flight guard ride along with the body so a request counts as in
//! flight until its last byte has been produced.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Interval, Sleep};

use crate::counters::InFlight;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Size of the chunks `/bytes` is cut into.
const FILL_LEN: usize = 64 * 1024;
static FILL: [u8; FILL_LEN] = [b'x'; FILL_LEN];

/// How long `/reset` waits between its first chunk and the abort, so the
/// status line and the chunk reach the wire before the connection is torn
/// down (without it hyper may discard both, and HTTP/2 drops queued data
/// when a stream is reset).
const RESET_PAUSE: Duration = Duration::from_millis(10);

pub struct AppBody {
    kind: Kind,
    in_flight: Option<InFlight>,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    /// `remaining` bytes of `FILL`.
    Repeat {
        remaining: u64,
    },
    Echo(Incoming),
    Paced(Paced),
    /// One chunk, a pause, then an error.
    FailAfter {
        first: Option<Bytes>,
        pause: Pin<Box<Sleep>>,
    },
    /// One chunk, then nothing ever again.
    HangAfter(Option<Bytes>),
    /// One data frame then trailers, as a unary gRPC response needs.
    WithTrailers {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

/// The error `/reset` fails its body with.
#[derive(Debug)]
struct Aborted;

impl fmt::Display for Aborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("response aborted on purpose")
    }
}

impl StdError for Aborted {}

impl AppBody {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            in_flight: None,
        }
    }

    pub fn empty() -> Self {
        Self::new(Kind::Empty)
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::new(Kind::Full(Some(bytes.into())))
    }

    /// `n` bytes of `x`, served from one static buffer.
    pub fn repeat(n: u64) -> Self {
        Self::new(Kind::Repeat { remaining: n })
    }

    pub fn echo(incoming: Incoming) -> Self {
        Self::new(Kind::Echo(incoming))
    }

    pub fn paced(paced: Paced) -> Self {
        Self::new(Kind::Paced(paced))
    }

    pub fn fail_after(first: Bytes) -> Self {
        Self::new(Kind::FailAfter {
            first: Some(first),
            pause: Box::pin(tokio::time::sleep(RESET_PAUSE)),
        })
    }

    pub fn hang_after(first: Bytes) -> Self {
        Self::new(Kind::HangAfter(Some(first)))
    }

    pub fn with_trailers(data: Bytes, trailers: HeaderMap) -> Self {
        Self::new(Kind::WithTrailers {
            data: Some(data),
            trailers: Some(trailers),
        })
    }

    /// Keeps the request in flight until this body is finished or dropped.
    pub fn hold(&mut self, in_flight: InFlight) {
        self.in_flight = Some(in_flight);
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.kind.poll_frame(cx);
        // Release as soon as the last frame is produced rather than when hyper
        // drops the body: hyper may write that frame (and the client may send
        // its next request) before the drop, which would show up here as a
        // false concurrency violation.
        if this.in_flight.is_some()
            && (matches!(polled, Poll::Ready(None | Some(Err(_)))) || this.kind.is_end_stream())
        {
            this.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty | Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Repeat { remaining } => SizeHint::with_exact(*remaining),
            Kind::Echo(incoming) => incoming.size_hint(),
            Kind::Paced(_)
            | Kind::FailAfter { .. }
            | Kind::HangAfter(_)
            | Kind::WithTrailers { .. } => SizeHint::default(),
        }
    }
}

impl Kind {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Repeat { remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = usize::try_from(*remaining).map_or(FILL_LEN, |r| r.min(FILL_LEN));
                *remaining -= n as u64;
                let chunk = Bytes::from_static(&FILL).slice(..n);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Kind::Echo(incoming) => Pin::new(incoming)
                .poll_frame(cx)
                .map(|frame| frame.map(|result| result.map_err(BoxError::from))),
            Kind::Paced(paced) => paced.poll_frame(cx),
            Kind::FailAfter { first, pause } => {
                if let Some(first) = first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(first))));
                }
                ready!(pause.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(Aborted))))
            }
            Kind::HangAfter(first) => match first.take() {
                Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
                // No waker is kept on purpose: nothing will ever wake it, and
                // the body is dropped with the connection.
                None => Poll::Pending,
            },
            Kind::WithTrailers { data, trailers } => {
                if let Some(data) = data.take() {
                    Poll::Ready(Some(Ok(Frame::data(data))))
                } else {
                    Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Kind::Empty | Kind::Full(None) => true,
            Kind::Full(Some(_)) => false,
            Kind::Repeat { remaining } => *remaining == 0,
            Kind::Echo(incoming) => incoming.is_end_stream(),
            Kind::Paced(paced) => paced.is_done(),
            Kind::FailAfter { .. } | Kind::HangAfter(_) => false,
            Kind::WithTrailers { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }
}

/// A body of `total` chunks, the first at once and then one per tick, each
/// made by `render(index, size)`. Used by `/stream` and `/sse`.
pub struct Paced {
    sent: u64,
    total: u64,
    /// `None` when there is no interval: every chunk is ready at once.
    ticker: Option<Interval>,
    size: usize,
    render: fn(u64, usize) -> Bytes,
}

impl Paced {
    /// Must be called inside the runtime, as it may start a timer.
    pub fn new(
        total: u64,
        interval: Duration,
        size: usize,
        render: fn(u64, usize) -> Bytes,
    ) -> Self {
        let ticker = (!interval.is_zero()).then(|| {
            let mut ticker = tokio::time::interval(interval);
            // A slow reader should get the remaining chunks spaced out, not
            // in a burst.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        Self {
            sent: 0,
            total,
            ticker,
            size,
            render,
        }
    }

    fn is_done(&self) -> bool {
        self.sent >= self.total
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.is_done() {
            return Poll::Ready(None);
        }
        if let Some(ticker) = &mut self.ticker {
            // The first tick completes at once, so chunk 0 is not delayed.
            ready!(ticker.poll_tick(cx));
        }
        let chunk = (self.render)(self.sent, self.size);
        self.sent += 1;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn repeat_is_exact_and_chunked() {
        let body = AppBody::repeat(FILL_LEN as u64 * 2 + 3);
        assert_eq!(body.size_hint().exact(), Some(FILL_LEN as u64 * 2 + 3));
        let collected = body.collect().await.map(|c| c.to_bytes());
        let bytes = collected.unwrap_or_default();
        assert_eq!(bytes.len(), FILL_LEN * 2 + 3);
        assert!(bytes.iter().all(|&b| b == b'x'));
    }

    #[tokio::test]
    async fn trailers_follow_data() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let collected = AppBody::with_trailers(Bytes::from_static(b"abc"), trailers)
            .collect()
            .await;
        let Ok(collected) = collected else {
            panic!("body failed");
        };
        assert_eq!(
            collected.trailers().and_then(|t| t.get("grpc-status")),
            Some(&http::HeaderValue::from_static("0"))
        );
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
    }

    #[tokio::test]
    async fn fail_after_errors() {
        assert!(AppBody::fail_after(Bytes::from_static(b"partial"))
            .collect()
            .await
            .is_err());
    }
}
