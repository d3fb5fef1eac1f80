//! Upstream connections that acknowledge what they read at once (`TCP_QUICKACK`).
//!
//! Why: many apps write a response's head and body in two `send`s (Python's
//! `BaseHTTPRequestHandler`, naive servers in any language) and leave Nagle on. On a
//! kept-alive connection, the kernel of the side that reads (the proxy) delays its ACK of
//! the head by up to 40 ms, hoping to piggyback it on the next request; the app's Nagle
//! holds the body until that ACK comes. Every warm request then takes 40 ms instead of
//! one. Knative's Go queue-proxy pays it too.
//!
//! Setting `TCP_QUICKACK` after a read sends an ACK that is due at once and leaves the
//! kernel's "interactive" mode, so the app's next segment is not held. The flag is not
//! permanent (the kernel goes back to delaying), so it is set again per read. Its price
//! is a `setsockopt`, and a pure ACK where one would have ridden on the next request, so
//! it is paid only where a second segment is likely: after a read that ended at a line
//! end (`\r\n`), that is, at the end of a response head or of a chunk-size line or
//! chunk. A whole response read at once ends in its body, which rarely ends in `\r\n`;
//! then nothing is paid.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pin_project! {
    /// A TCP stream to an upstream, acknowledging every read at once when `quick` is on.
    #[derive(Debug)]
    pub struct UpstreamStream {
        #[pin]
        inner: TcpStream,
        quick: bool,
    }
}

impl UpstreamStream {
    pub fn new(inner: TcpStream, quick: bool) -> Self {
        Self { inner, quick }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let before = buf.filled().len();
        let ready = this.inner.as_mut().poll_read(cx, buf);
        if *this.quick
            && matches!(ready, Poll::Ready(Ok(())))
            && may_continue(&buf.filled()[before..])
        {
            // Best effort: a failure here only means the ACK keeps its normal timing.
            let _ = quick_ack(&this.inner);
        }
        ready
    }
}

/// Whether bytes just read end where a sender that writes piecemeal would pause: at a
/// line end, as a response head and each chunk do.
fn may_continue(read: &[u8]) -> bool {
    read.ends_with(b"\r\n")
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn quick_ack(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).set_tcp_quickack(true)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn quick_ack(_: &TcpStream) -> io::Result<()> {
    Ok(())
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A peer that, like a naive app, answers each request with two small writes and
    /// Nagle on; returns the median time of the exchanges, the first and the last left out
    /// (the last is flushed early by the peer's close).
    async fn exchange(quick: bool, rounds: usize) -> Duration {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            for _ in 0..rounds {
                s.read_exact(&mut buf[..4]).await.unwrap();
                s.write_all(b"head\r\n\r\n").await.unwrap();
                s.write_all(b"body").await.unwrap();
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut up = UpstreamStream::new(tcp, quick);
        let mut times = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            up.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 12];
            up.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"head\r\n\r\nbody");
            times.push(started.elapsed());
        }
        app.await.unwrap();
        let mut middle = times[1..rounds - 1].to_vec();
        middle.sort();
        middle[middle.len() / 2]
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_split_response_is_not_held_by_a_delayed_ack() {
        // Kept alive, the reading side's kernel delays its ACKs (by 40 ms or more) unless
        // asked not to. Medians are compared, so a busy machine cannot make the quick case
        // look slow, nor the plain case fast.
        let plain = exchange(false, 11).await;
        assert!(
            plain >= Duration::from_millis(30),
            "the scenario no longer reproduces a delayed ACK ({plain:?}): the test proves nothing"
        );
        let quick = exchange(true, 11).await;
        assert!(quick < Duration::from_millis(30), "{quick:?}");
    }

    #[test]
    fn only_reads_ending_at_a_line_end_ask_for_a_quick_ack() {
        assert!(may_continue(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
        ));
        assert!(may_continue(b"5\r\nhello\r\n"));
        assert!(!may_continue(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"
        ));
        assert!(!may_continue(b"{\"json\": true}\n"));
        assert!(!may_continue(b""));
    }

    #[tokio::test]
    async fn reads_and_writes_pass_through_unchanged() {
        // Without the option, bytes are the same; only their timing may differ.
        exchange(false, 3).await;
        exchange(true, 3).await;
    }
}
