//! One accepted connection: the IO hyper reads and writes, and what a handler knows of it.
//!
//! hyper leaves three things to the IO it is given, and a proxy needs all three:
//! - **A connection that sends nothing is never closed.** The HTTP/1-or-2 detection
//!   ([`ConnIo::protocol`]) waits for the first bytes before hyper's own header timer
//!   starts, and an HTTP/2 connection has no header timer, so a silent connection would
//!   hold its file descriptor forever. [`ConnIo`] closes a connection on which no
//!   request has arrived within the read-header timeout.
//! - **A client that stops reading holds its response forever.** hyper stops polling a
//!   response body while its write is blocked, so the body's timeouts never fire and the
//!   request keeps its breaker slot or pod permit. [`ConnIo`] fails the blocked write once
//!   the current response's total deadline passes, or once nothing could be written for
//!   its idle timeout; hyper then drops the connection and, with it, the response's guard.
//! - **hyper's server cannot send a `1xx`.** [`Connection::informational`] writes one
//!   straight onto the socket, ahead of the final head, as Go's ReverseProxy forwards them.
//!
//! A connection may also have been read before hyper saw it (see `serve::BeforeHyper`):
//! [`ConnIo::with_prefix`] hands hyper those bytes first, and [`Connection::take_admission`]
//! carries what was decided about its first request.

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderValue, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// What a handler knows of the connection its request came on.
#[derive(Debug)]
pub struct Connection {
    client_ip: HeaderValue,
    /// Requests arrived so far; until the first, [`ConnIo`] enforces the read-header
    /// timeout.
    requests: AtomicU64,
    /// For HTTP/1 only: one response at a time, so one set of limits at a time.
    limits: Mutex<WriteLimits>,
    /// The socket, for `1xx` heads; `None` under TLS, where raw bytes cannot go.
    raw: Option<Arc<TcpStream>>,
    /// `1xx` bytes the socket did not take at once; written before anything of hyper's.
    pending: Mutex<Vec<u8>>,
    has_pending: AtomicBool,
    /// What was decided about the first request before hyper parsed it, for its handler.
    admission: Mutex<Option<Box<dyn Any + Send>>>,
    /// Whether `admission` holds one: the lock is only taken when it does.
    has_admission: AtomicBool,
    /// While [`crate::downstream_h1`] serves the connection: it writes each response head
    /// itself, and can take an upstream's header lines as they came rather than in a map.
    plain_path: AtomicBool,
}

/// How long the response being written may stall on a client that does not read.
#[derive(Debug, Clone, Copy, Default)]
struct WriteLimits {
    total: Option<Instant>,
    idle: Option<Duration>,
}

/// A vectored write of at most this many bytes is copied into one buffer first.
const COALESCE_BYTES: usize = 2048;

/// Why [`ConnIo`] ended a connection.
const NO_REQUEST: &str = "no request within the read-header timeout";
const STALLED: &str = "the client stopped reading the response";

impl Connection {
    /// A connection with no socket of its own (tests, and listeners built elsewhere).
    pub fn detached(client_ip: HeaderValue) -> Self {
        Self::new(client_ip, None)
    }

    fn new(client_ip: HeaderValue, raw: Option<Arc<TcpStream>>) -> Self {
        Self {
            client_ip,
            requests: AtomicU64::new(0),
            limits: Mutex::new(WriteLimits::default()),
            raw,
            pending: Mutex::new(Vec::new()),
            has_pending: AtomicBool::new(false),
            admission: Mutex::new(None),
            has_admission: AtomicBool::new(false),
            plain_path: AtomicBool::new(false),
        }
    }

    /// Whether this connection's responses are written by [`crate::downstream_h1`] for
    /// now, which writes an upstream's header lines as they came
    /// ([`crate::upstream_h1::VerbatimLines`]). hyper, which writes the rest, sees only
    /// a response's `HeaderMap`.
    pub fn on_plain_path(&self) -> bool {
        self.plain_path.load(Ordering::Relaxed)
    }

    pub(crate) fn set_plain_path(&self, on: bool) {
        self.plain_path.store(on, Ordering::Relaxed);
    }

    /// Leaves `admission` for the handler of this connection's first request.
    pub fn set_admission(&self, admission: Box<dyn Any + Send>) {
        if let Ok(mut slot) = self.admission.lock() {
            *slot = Some(admission);
            self.has_admission.store(true, Ordering::Release);
        }
    }

    /// Takes what was decided about this request before hyper parsed it, if anything
    /// was: only ever for the first request of a connection. One atomic load otherwise.
    pub fn take_admission<T: Any>(&self) -> Option<Box<T>> {
        if !self.has_admission.load(Ordering::Acquire) {
            return None;
        }
        self.has_admission.store(false, Ordering::Release);
        let taken = self.admission.lock().ok()?.take()?;
        taken.downcast::<T>().ok()
    }

    /// Whether a request has arrived on this connection.
    pub fn request_seen(&self) -> bool {
        self.requests() > 0
    }

    /// How many requests have arrived on this connection.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The client's address as `X-Forwarded-For` wants it.
    pub fn client_ip(&self) -> &HeaderValue {
        &self.client_ip
    }

    /// Counts a request that arrived, which ends the wait for a first request. Not a
    /// read-modify-write: HTTP/2's streams may race and lose a count, but the count only
    /// has to grow.
    pub fn request_started(&self) {
        let n = self.requests.load(Ordering::Relaxed);
        self.requests
            .store(n.wrapping_add(1).max(1), Ordering::Relaxed);
    }

    /// Sets how long the HTTP/1 response about to be written may be blocked by a client
    /// that does not read: until `total` at the latest, and never `idle` without progress.
    /// (HTTP/2 multiplexes responses over one connection; its streams are watched apart.)
    pub fn limit_writes(&self, total: Option<Instant>, idle: Option<Duration>) {
        if let Ok(mut limits) = self.limits.lock() {
            *limits = WriteLimits { total, idle };
        }
    }

    fn write_limits(&self) -> WriteLimits {
        self.limits.lock().map(|l| *l).unwrap_or_default()
    }

    /// True when `1xx` heads can be written to this client (a plain TCP connection).
    pub fn relays_informational(&self) -> bool {
        self.raw.is_some()
    }

    /// Forwards a `1xx` head from the upstream to an HTTP/1.1 client, before the final
    /// response. `100 Continue` is hyper's to send (it does when the body is read) and
    /// `101` is the upgrade's; HTTP/1.0 clients get none (RFC 9110 §15.2).
    pub fn informational(&self, version: Version, status: StatusCode, headers: &http::HeaderMap) {
        if version != Version::HTTP_11
            || !status.is_informational()
            || status == StatusCode::CONTINUE
            || status == StatusCode::SWITCHING_PROTOCOLS
        {
            return;
        }
        let Some(raw) = &self.raw else {
            return;
        };
        let mut head = Vec::with_capacity(64 + headers.len() * 32);
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        // Behind bytes already waiting, or whatever the socket does not take now: the
        // rest goes out ahead of hyper's next write.
        let written = if pending.is_empty() {
            raw.try_write(&head).unwrap_or(0)
        } else {
            0
        };
        if written < head.len() {
            pending.extend_from_slice(&head[written..]);
            self.has_pending.store(true, Ordering::Release);
        }
    }
}

/// What a client speaks on a plain connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// h2c with prior knowledge: the connection opens with HTTP/2's preface.
    Http2,
}

/// What an h2c client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Protocol {
    /// The protocol a connection opening with `seen` speaks; `None` while `seen` is a
    /// strict start of HTTP/2's preface (or empty).
    pub fn of(seen: &[u8]) -> Option<Self> {
        let n = seen.len().min(H2_PREFACE.len());
        if seen[..n] != H2_PREFACE[..n] {
            Some(Self::Http1)
        } else if n == H2_PREFACE.len() {
            Some(Self::Http2)
        } else {
            None
        }
    }
}

/// A TCP connection as hyper drives it, with the limits described in the module docs.
pub struct ConnIo {
    stream: Arc<TcpStream>,
    conn: Arc<Connection>,
    /// Bytes read from the socket before hyper got it, served before the socket's own.
    prefix: Bytes,
    /// Until the first request: when the connection is closed for sending none.
    first_request: Option<Pin<Box<Sleep>>>,
    /// Armed while a write is blocked.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl ConnIo {
    /// Wraps an accepted stream. `raw_informational` lets handlers write `1xx` heads
    /// onto it, which only a plain (not TLS) connection allows.
    pub fn new(
        stream: TcpStream,
        client_ip: HeaderValue,
        read_header_timeout: Duration,
        raw_informational: bool,
    ) -> (Self, Arc<Connection>) {
        Self::with_prefix(
            stream,
            Bytes::new(),
            client_ip,
            read_header_timeout,
            raw_informational,
        )
    }

    /// As [`ConnIo::new`], for a stream from which `prefix` was already read: hyper reads
    /// those bytes first.
    pub fn with_prefix(
        stream: TcpStream,
        prefix: Bytes,
        client_ip: HeaderValue,
        read_header_timeout: Duration,
        raw_informational: bool,
    ) -> (Self, Arc<Connection>) {
        let stream = Arc::new(stream);
        let raw = raw_informational.then(|| Arc::clone(&stream));
        let conn = Arc::new(Connection::new(client_ip, raw));
        let first_request = Some(Box::pin(tokio::time::sleep(read_header_timeout)));
        let io = Self {
            stream,
            conn: Arc::clone(&conn),
            prefix,
            first_request,
            stall: None,
            stalled: false,
        };
        (io, conn)
    }

    /// Takes the bytes read before, which the next read would have served first.
    pub(crate) fn take_prefix(&mut self) -> Bytes {
        std::mem::take(&mut self.prefix)
    }

    /// Puts `read` back to be served before the socket's own bytes: what was read of a
    /// connection before hyper takes it over.
    pub(crate) fn unread(&mut self, read: Bytes) {
        debug_assert!(self.prefix.is_empty());
        self.prefix = read;
    }

    /// Which protocol the client speaks, from its first bytes; fails once the
    /// read-header timeout passes without them.
    ///
    /// The bytes are peeked, not read, so the HTTP/1 server's first read takes the whole
    /// head. hyper-util's detection read the first 24 bytes and handed them over alone;
    /// hyper then grew its 8 KiB read buffer to 16 KiB to read the rest, on every
    /// connection, and 10 000 idle connections held 80 MiB more.
    pub async fn protocol(&mut self) -> io::Result<Protocol> {
        std::future::poll_fn(|cx| self.poll_protocol(cx)).await
    }

    fn poll_protocol(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Protocol>> {
        let mut seen = [0u8; H2_PREFACE.len()];
        loop {
            if let Some(protocol) = Protocol::of(&self.prefix) {
                return Poll::Ready(Ok(protocol));
            }
            self.poll_first_request(cx)?;
            if self.prefix.is_empty() {
                let mut peeked = ReadBuf::new(&mut seen);
                ready!(self.stream.poll_peek(cx, &mut peeked))?;
                match peeked.filled() {
                    // The client left: the HTTP/1 server sees the end and closes.
                    [] => return Poll::Ready(Ok(Protocol::Http1)),
                    filled => {
                        if let Some(protocol) = Protocol::of(filled) {
                            return Poll::Ready(Ok(protocol));
                        }
                    }
                }
            }
            // A strict start of the preface: peeking again would find the same bytes at
            // once, so they are read, and served before the socket's own.
            let want = H2_PREFACE.len() - self.prefix.len();
            let n = loop {
                ready!(self.stream.poll_read_ready(cx))?;
                match self.stream.try_read(&mut seen[..want]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            if n == 0 {
                return Poll::Ready(Ok(Protocol::Http1));
            }
            let mut read = Vec::with_capacity(self.prefix.len() + n);
            read.extend_from_slice(&self.prefix);
            read.extend_from_slice(&seen[..n]);
            self.prefix = Bytes::from(read);
        }
    }

    /// Fails once the connection has gone the read-header timeout without a request.
    fn poll_first_request(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(deadline) = self.first_request.as_mut() else {
            return Ok(());
        };
        if self.conn.request_seen() {
            self.first_request = None;
            return Ok(());
        }
        if deadline.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, NO_REQUEST));
        }
        Ok(())
    }

    /// A write is blocked: fails once the response's limits are past, else stays pending.
    fn poll_stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let now = Instant::now();
        if !self.stalled {
            self.stalled = true;
            let limits = self.conn.write_limits();
            let deadline = match (limits.total, limits.idle.map(|d| now + d)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(deadline) = deadline else {
                self.stall = None;
                return Poll::Pending;
            };
            match self.stall.as_mut() {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let fired = self
            .stall
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
        if fired {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, STALLED)));
        }
        Poll::Pending
    }

    /// Writes `1xx` bytes a handler queued; ready once none are left.
    fn poll_pending_informational(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.conn.has_pending.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let Ok(mut pending) = self.conn.pending.lock() else {
            return Poll::Ready(Ok(()));
        };
        while !pending.is_empty() {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(&pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.conn.has_pending.store(false, Ordering::Release);
        Poll::Ready(Ok(()))
    }

    /// One write attempt through `op`, with the stall limits applied when it blocks.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        op: impl Fn(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        if self.poll_pending_informational(cx).is_pending() {
            return self.poll_stalled(cx);
        }
        loop {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return self.poll_stalled(cx),
            }
            match op(&self.stream) {
                Ok(n) => {
                    self.stalled = false;
                    return Poll::Ready(Ok(n));
                }
                // Readiness was stale; `try_write` cleared it, so poll again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if !this.prefix.has_remaining() {
                // An empty slice still holds its whole allocation.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        this.poll_first_request(cx)?;
        let stream = &this.stream;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let room = buf.remaining();
            let mut read = 0;
            // A read that leaves room in `buf` drained the socket. Answering WouldBlock
            // from inside `try_io` then makes tokio forget the socket's readiness, with
            // the snapshot it took before the read (so bytes arriving since are not
            // missed), and the next poll waits for the socket instead of paying a `recv`
            // that can only say EAGAIN: one system call per request. tokio's own
            // `poll_read` does the same; `try_read_buf` alone does not.
            let result = stream.try_io(Interest::READABLE, || {
                // `try_read_buf` fills the unfilled part without zeroing it first.
                read = stream.try_read_buf(buf)?;
                if read > 0 && read < room {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match result {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => {
                    return Poll::Ready(Ok(()))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper hands a response's head and its body as separate slices. For a small
        // response the kernel takes one copied buffer for less CPU than two slices (about
        // 3 % of the queue-proxy's CPU per request, README "Performance"); a large one
        // goes as it is, uncopied. hyper's own flattening would copy large bodies too, and
        // keep a write buffer as large as the largest response on every connection.
        let total = bufs.iter().map(|b| b.len()).sum::<usize>();
        if bufs.len() > 1 && total <= COALESCE_BYTES {
            let mut flat = [0u8; COALESCE_BYTES];
            let mut at = 0;
            for b in bufs {
                flat[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
            let flat = &flat[..at];
            return self.get_mut().poll_write_with(cx, |s| s.try_write(flat));
        }
        self.get_mut()
            .poll_write_with(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP has no buffer of its own to flush; queued `1xx` bytes are the only ones.
        let this = self.get_mut();
        match this.poll_pending_informational(cx) {
            Poll::Pending => this.poll_stalled(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A FIN now, though handlers may still hold the socket for `1xx` writes.
        let sock = socket2::SockRef::from(&*self.stream);
        match sock.shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair(read_header_timeout: Duration) -> (ConnIo, Arc<Connection>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let ip = HeaderValue::from_static("127.0.0.1");
        let (io, conn) = ConnIo::new(server, ip, read_header_timeout, true);
        (io, conn, client)
    }

    #[tokio::test]
    async fn a_silent_connection_fails_after_the_read_header_timeout() {
        let (mut io, _conn, _client) = pair(Duration::from_millis(50)).await;
        let mut buf = [0u8; 16];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), NO_REQUEST);
    }

    /// Writes `slices` with one vectored write and reads back what the peer got.
    async fn write_vectored_once(slices: &[&[u8]]) -> (usize, Vec<u8>) {
        let (mut io, _conn, mut client) = pair(Duration::from_secs(60)).await;
        let bufs: Vec<io::IoSlice<'_>> = slices.iter().map(|s| io::IoSlice::new(s)).collect();
        let written = io.write_vectored(&bufs).await.unwrap();
        let mut got = vec![0; written];
        client.read_exact(&mut got).await.unwrap();
        (written, got)
    }

    #[tokio::test]
    async fn a_small_vectored_write_arrives_whole_and_in_order() {
        let (written, got) =
            write_vectored_once(&[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"hello"]).await;
        assert_eq!(written, 24);
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n\r\nhello");
        // At the limit the slices are still copied into one buffer.
        let (head, body) = (vec![b'h'; 1000], vec![b'b'; COALESCE_BYTES - 1000]);
        let (written, got) = write_vectored_once(&[&head, &body]).await;
        assert_eq!(written, COALESCE_BYTES);
        assert_eq!(got, [head, body].concat());
    }

    #[tokio::test]
    async fn a_large_vectored_write_goes_uncopied_and_arrives_in_order() {
        let (head, body) = (vec![b'h'; 100], vec![b'b'; COALESCE_BYTES]);
        let (written, got) = write_vectored_once(&[&head, &body]).await;
        // One write: the kernel may take less than all of it, never out of order.
        assert!(
            written > 0 && written <= head.len() + body.len(),
            "{written}"
        );
        assert_eq!(got, [head, body].concat()[..written]);
    }

    #[tokio::test]
    async fn bytes_read_before_hyper_come_first_then_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let ip = HeaderValue::from_static("127.0.0.1");
        let prefix = Bytes::from_static(b"GET / HTTP/1.1\r\n");
        let (mut io, conn) = ConnIo::with_prefix(server, prefix, ip, Duration::from_secs(5), true);
        client.write_all(b"host: a\r\n\r\n").await.unwrap();
        drop(client);
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
        assert!(conn.take_admission::<u32>().is_none());
        conn.set_admission(Box::new(7u32));
        assert!(
            conn.take_admission::<String>().is_none(),
            "a wrong type is dropped"
        );
        conn.set_admission(Box::new(7u32));
        assert_eq!(conn.take_admission::<u32>().as_deref(), Some(&7));
        assert!(conn.take_admission::<u32>().is_none(), "taken once");
    }

    #[test]
    fn the_protocol_is_told_by_the_first_bytes() {
        assert_eq!(Protocol::of(b""), None);
        assert_eq!(Protocol::of(b"PRI * HTTP/2"), None);
        assert_eq!(Protocol::of(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            Protocol::of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Some(Protocol::Http2)
        );
        assert_eq!(Protocol::of(b"G"), Some(Protocol::Http1));
        assert_eq!(Protocol::of(b"PUT / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(Protocol::of(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn an_http1_head_is_peeked_and_left_whole_for_the_server() {
        let (mut io, _conn, mut client) = pair(Duration::from_secs(60)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(io.protocol().await.unwrap(), Protocol::Http1);
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
            "one read, whole"
        );
    }

    #[tokio::test]
    async fn a_preface_sent_in_pieces_is_read_and_served_first() {
        let (mut io, _conn, mut client) = pair(Duration::from_secs(60)).await;
        let (first, rest) = H2_PREFACE.split_at(5);
        client.write_all(first).await.unwrap();
        let sniff = tokio::spawn(async move {
            let protocol = io.protocol().await.unwrap();
            (protocol, io)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(rest).await.unwrap();
        client.write_all(b"frames").await.unwrap();
        drop(client);
        let (protocol, mut io) = sniff.await.unwrap();
        assert_eq!(protocol, Protocol::Http2);
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [H2_PREFACE, b"frames"].concat());
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_has_no_protocol() {
        let (mut io, _conn, _client) = pair(Duration::from_millis(50)).await;
        let err = io.protocol().await.unwrap_err();
        assert_eq!(err.to_string(), NO_REQUEST);
    }

    #[tokio::test]
    async fn after_a_request_the_connection_may_go_quiet() {
        let (mut io, conn, mut client) = pair(Duration::from_millis(50)).await;
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.unwrap(), 3);
        conn.request_started();
        let quiet = tokio::time::timeout(Duration::from_millis(300), io.read(&mut buf)).await;
        assert!(quiet.is_err(), "the read must still be waiting: {quiet:?}");
    }

    #[tokio::test]
    async fn a_blocked_write_fails_at_the_idle_limit() {
        let (mut io, conn, _client) = pair(Duration::from_secs(60)).await;
        conn.request_started();
        conn.limit_writes(None, Some(Duration::from_millis(200)));
        // The client never reads: the socket buffers fill, then the write blocks.
        let chunk = vec![0u8; 64 * 1024];
        let started = Instant::now();
        let err = loop {
            if let Err(e) = io.write(&chunk).await {
                break e;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "never blocked");
        };
        assert_eq!(err.to_string(), STALLED);
    }

    #[tokio::test]
    async fn without_limits_a_blocked_write_waits() {
        let (mut io, conn, _client) = pair(Duration::from_secs(60)).await;
        conn.request_started();
        let chunk = vec![0u8; 64 * 1024];
        let blocked = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                io.write_all(&chunk).await.unwrap();
            }
        })
        .await;
        assert!(blocked.is_err());
    }

    #[tokio::test]
    async fn informational_heads_go_out_before_the_next_write() {
        let (mut io, conn, mut client) = pair(Duration::from_secs(60)).await;
        let mut headers = http::HeaderMap::new();
        headers.insert("link", HeaderValue::from_static("</a.css>; rel=preload"));
        conn.informational(Version::HTTP_11, StatusCode::EARLY_HINTS, &headers);
        // Not to HTTP/1.0 clients, and never 100 or 101.
        conn.informational(Version::HTTP_10, StatusCode::EARLY_HINTS, &headers);
        conn.informational(Version::HTTP_11, StatusCode::CONTINUE, &headers);
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        io.shutdown().await.unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(
            got,
            "HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
