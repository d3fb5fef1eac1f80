//! The three per-request timeouts of CONTRACT §1.7: revision (total), response-start and
//! idle.
//!
//! Before the response head arrives, whichever deadline comes first turns into a `504`.
//! After it, [`TimeoutBody`] keeps watching the total and idle deadlines while the body
//! streams; when one fires it appends the timeout text and ends the stream cleanly. In
//! both cases the upstream future or body is dropped, which cancels the app-side request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Duration, Instant, Sleep};

use crate::upstream_h1::{VerbatimLines, VerbatimSource};

/// The body Knative writes for any of the three timeouts.
pub const TIMEOUT_BODY: &str = "request timeout";

/// A request's timeouts; `None` means off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Revision timeout: fires even after the response started.
    pub total: Option<Duration>,
    /// Fires only when nothing was written yet.
    pub response_start: Option<Duration>,
    /// Fires when nothing was written for that long.
    pub idle: Option<Duration>,
}

/// A deadline passed before the response head arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", TIMEOUT_BODY)]
pub struct TimedOut;

impl Timeouts {
    /// Seconds as Knative configures them, where 0 means off.
    pub fn from_secs(total: u64, response_start: u64, idle: u64) -> Self {
        // Clamped, so that a deadline `now + timeout` can never overflow; parsers refuse
        // anything larger with a message first.
        let on = |s: u64| (s > 0).then(|| Duration::from_secs(s.min(crate::limits::MAX_SECONDS)));
        Self {
            total: on(total),
            response_start: on(response_start),
            idle: on(idle),
        }
    }

    /// The earliest deadline that applies before the first byte is written.
    pub fn head_deadline(&self, started: Instant) -> Option<Instant> {
        [self.total, self.response_start, self.idle]
            .into_iter()
            .flatten()
            .map(|d| started + d)
            .min()
    }

    /// Waits for `head` (anything up to the response head), unless a deadline passes first.
    pub async fn before_first_byte<F: Future>(
        &self,
        started: Instant,
        head: F,
    ) -> Result<F::Output, TimedOut> {
        match self.head_deadline(started) {
            Some(deadline) => tokio::time::timeout_at(deadline, head)
                .await
                .map_err(|_| TimedOut),
            None => Ok(head.await),
        }
    }

    /// Wraps a response body so the total and idle deadlines keep applying to it.
    pub fn body<B>(&self, started: Instant, inner: B) -> TimeoutBody<B> {
        let now = Instant::now();
        TimeoutBody {
            inner,
            total: self.total.map(|d| tokio::time::sleep_until(started + d)),
            idle: self.idle.map(|d| tokio::time::sleep_until(now + d)),
            idle_after: self.idle.unwrap_or_default(),
            last_write: now,
            state: State::Streaming,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Streaming,
    TimedOut,
    Done,
}

pin_project! {
    /// A response body that ends with the timeout text when the total or idle deadline
    /// passes mid-stream.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        #[pin]
        total: Option<Sleep>,
        #[pin]
        idle: Option<Sleep>,
        idle_after: Duration,
        last_write: Instant,
        state: State,
    }
}

/// The head's lines pass through: the timeouts concern the body only.
impl<B: VerbatimSource> VerbatimSource for TimeoutBody<B> {
    fn take_verbatim(&mut self) -> Option<VerbatimLines> {
        self.inner.take_verbatim()
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        match *this.state {
            State::Done => return Poll::Ready(None),
            State::TimedOut => {
                *this.state = State::Done;
                return Poll::Ready(None);
            }
            State::Streaming => {}
        }
        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            match &frame {
                // Moving a timer on every chunk would cost a timer-wheel update per
                // frame; remembering the instant and re-arming lazily is enough.
                Some(Ok(f)) if f.is_data() && this.idle.is_some() => {
                    *this.last_write = Instant::now();
                }
                None => *this.state = State::Done,
                _ => {}
            }
            return Poll::Ready(frame);
        }
        let total_fired = match this.total.as_mut().as_pin_mut() {
            Some(sleep) => sleep.poll(cx).is_ready(),
            None => false,
        };
        let idle_fired =
            !total_fired && poll_idle(this.idle.as_mut(), cx, *this.last_write, *this.idle_after);
        if total_fired || idle_fired {
            *this.state = State::TimedOut;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                TIMEOUT_BODY.as_bytes(),
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match self.state {
            State::Done => true,
            State::TimedOut => false,
            State::Streaming => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Streaming => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

/// Polls the idle timer, re-arming it from the last write when data flowed since it was set.
fn poll_idle(
    mut idle: Pin<&mut Option<Sleep>>,
    cx: &mut Context<'_>,
    last_write: Instant,
    idle_after: Duration,
) -> bool {
    loop {
        let Some(mut sleep) = idle.as_mut().as_pin_mut() else {
            return false;
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        let due = last_write + idle_after;
        if due <= Instant::now() {
            return true;
        }
        sleep.reset(due);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
        StreamBody<tokio_stream_shim::Rx>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        (tx, StreamBody::new(tokio_stream_shim::Rx(rx)))
    }

    /// A tiny receiver-to-stream adapter so the tests need no extra crate.
    mod tokio_stream_shim {
        use super::*;
        pub struct Rx(pub tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);
        impl futures_util::Stream for Rx {
            type Item = Result<Frame<Bytes>, Infallible>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                self.0.poll_recv(cx)
            }
        }
    }

    #[test]
    fn head_deadline_is_the_earliest() {
        let t = Timeouts::from_secs(10, 3, 5);
        let now = Instant::now();
        assert_eq!(t.head_deadline(now), Some(now + Duration::from_secs(3)));
        assert_eq!(Timeouts::from_secs(0, 0, 0).head_deadline(now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn head_times_out() {
        let t = Timeouts::from_secs(0, 2, 0);
        let r = t
            .before_first_byte(Instant::now(), std::future::pending::<()>())
            .await;
        assert_eq!(r, Err(TimedOut));
        let ok = t.before_first_byte(Instant::now(), async { 7 }).await;
        assert_eq!(ok, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn total_deadline_appends_text_and_ends_mid_stream() {
        let t = Timeouts::from_secs(5, 0, 0);
        let (tx, inner) = channel_body();
        let mut body = std::pin::pin!(t.body(Instant::now(), inner));
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .unwrap();
        let f = body.as_mut().frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "first");
        // Nothing more arrives; the total deadline passes.
        let f = body.as_mut().frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), TIMEOUT_BODY);
        assert!(body.as_mut().frame().await.is_none());
        assert!(body.is_end_stream());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_deadline_moves_with_each_write() {
        let t = Timeouts {
            idle: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let (tx, inner) = channel_body();
        let mut body = std::pin::pin!(t.body(Instant::now(), inner));
        let writer = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .unwrap();
            }
            // Then stay silent past the idle timeout, keeping the sender alive.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        let started = Instant::now();
        let mut data = Vec::new();
        while let Some(f) = body.as_mut().frame().await {
            data.extend_from_slice(&f.unwrap().into_data().unwrap());
        }
        assert_eq!(data, b"xxxxxrequest timeout");
        // Five writes 1.5 s apart, then 2 s of silence.
        assert_eq!(started.elapsed(), Duration::from_millis(7500 + 2000));
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_finishes_in_time_is_untouched() {
        let t = Timeouts::from_secs(5, 0, 1);
        let body = Box::pin(t.body(
            Instant::now(),
            http_body_util::Full::new(Bytes::from_static(b"all")),
        ));
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(out, "all");
    }
}
