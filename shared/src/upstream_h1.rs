//! An HTTP/1.1 exchange with an upstream, driven by the task serving the client.
//!
//! hyper's client runs each connection as a task of its own: the request crosses a channel
//! to that task and the response crosses back, two task wake-ups per request, and its
//! parser prepares state for every header line allowed (256 here) on each response.
//! Counted with callgrind through the queue-proxy, that connection task was 31 % of a
//! request's instructions. A request with no body and no upgrade (most of what functions
//! are sent) is exchanged here instead: its head goes out in one write, the answer's head
//! is parsed by httparse straight into an `http::HeaderMap` whose values share the read
//! buffer, and the body is decoded from the same socket as the client takes it. Requests
//! with a body, and upgrades, still go through hyper's client ([`crate::pool`]). When
//! the client's response head is written by [`crate::downstream_h1`], a plain answer's
//! lines skip the map: they are handed on in one piece ([`VerbatimLines`]).
//!
//! The rules are hyper's, which are RFC 9112's: a `1xx` head is passed to the caller and
//! skipped, a `HEAD` answer and `204` / `304` have no body, `Transfer-Encoding` wins over
//! `Content-Length`, differing `Content-Length`s are refused, a body with neither runs to
//! the end of the connection. A connection is reused only when its answer was read to the
//! end, said nothing of closing, and left no byte behind.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::TRANSFER_ENCODING;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pool::AddedLines;
use crate::quickack::UpstreamStream;
use crate::serve::{MAX_HEADERS, MAX_HEADER_BYTES};

/// How much room a read asks for at first: one small response whole.
const READ_CHUNK: usize = 8 * 1024;

/// The most a read asks for: a large body is read in pieces that double while they fill
/// the room given, up to this (hyper's client grows its reads the same way).
const MAX_READ_CHUNK: usize = 64 * 1024;

/// The longest chunk-size line accepted (its extensions included).
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// How an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection closed or broke before a whole response head came back: the
    /// upstream is likely gone, and may or may not have seen the request.
    #[error("connection closed before a response: {0}")]
    Lost(#[source] io::Error),
    /// The answer is not HTTP/1.1 this proxy can pass on.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The connection failed after the head: the body cannot be finished.
    #[error("{0}")]
    Body(#[source] io::Error),
}

impl ExchangeError {
    fn malformed(what: impl Into<String>) -> Self {
        ExchangeError::Malformed(what.into())
    }

    /// True when no response head was seen before the connection went away.
    pub fn is_lost(&self) -> bool {
        matches!(self, ExchangeError::Lost(_))
    }
}

/// One keep-alive connection to an upstream, with its buffers.
#[derive(Debug)]
pub struct UpstreamConn {
    io: UpstreamStream,
    /// What was read and not yet handed on.
    read: BytesMut,
    /// The request head being written; kept to reuse its allocation.
    write: Vec<u8>,
    /// The room the next body read asks for.
    chunk: usize,
    /// The upstream's address, the `Host` of a request that has none.
    host: HeaderValue,
}

impl UpstreamConn {
    pub fn new(stream: TcpStream, quick_ack: bool, host: HeaderValue) -> Self {
        Self {
            io: UpstreamStream::new(stream, quick_ack),
            read: BytesMut::new(),
            write: Vec::new(),
            chunk: READ_CHUNK,
            host,
        }
    }

    /// Whether a connection that sat idle can carry another request: the upstream has not
    /// closed it, nor sent anything unasked. No system call unless the socket reported
    /// an event since the last response was read.
    pub fn is_open(&self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let stream = self.io.get_ref();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends `req`'s head (its body must be empty) and reads the answer's head. `1xx`
    /// heads before it go to `informational`. The body is then read through [`H1Body`].
    /// With `verbatim`, a plain answer's header lines are returned as they came, and its
    /// `HeaderMap` left empty (see [`VerbatimLines`]).
    pub async fn exchange<B>(
        &mut self,
        req: &Request<B>,
        added: &AddedLines,
        verbatim: bool,
        mut informational: impl FnMut(StatusCode, &HeaderMap),
    ) -> Result<Head, ExchangeError> {
        encode_head(req, &self.host, added, &mut self.write);
        self.chunk = READ_CHUNK;
        if let Err(e) = self.io.write_all(&self.write).await {
            return Err(ExchangeError::Lost(e));
        }
        let no_body = req.method() == Method::HEAD;
        loop {
            let Some(end) = head_end(&self.read) else {
                if self.read.len() > MAX_HEADER_BYTES {
                    return Err(ExchangeError::malformed(format!(
                        "response head exceeds {MAX_HEADER_BYTES} bytes"
                    )));
                }
                self.read.reserve(READ_CHUNK);
                match self.io.read_buf(&mut self.read).await {
                    Ok(0) => {
                        return Err(ExchangeError::Lost(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the upstream closed the connection",
                        )))
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(ExchangeError::Lost(e)),
                }
            };
            if end > MAX_HEADER_BYTES {
                return Err(ExchangeError::malformed(format!(
                    "response head exceeds {MAX_HEADER_BYTES} bytes"
                )));
            }
            let head = self.read.split_to(end).freeze();
            match parse_head(&head, no_body, verbatim)? {
                Parsed::Informational(status, headers) => informational(status, &headers),
                Parsed::Final(head) => return Ok(head),
            }
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(self.chunk);
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read);
        if let Poll::Ready(Ok(n)) = read {
            if n >= self.chunk {
                self.chunk = (self.chunk * 2).min(MAX_READ_CHUNK);
            }
        }
        read
    }
}

/// Writes the request line and header lines as hyper's client does: origin form, the
/// names as they are held (lower case), no body framing (the body is empty). A request
/// with no `Host` is sent with `host`, which HTTP/1.1 requires (RFC 9112 §3.2).
fn encode_head<B>(req: &Request<B>, host: &HeaderValue, added: &AddedLines, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    for (name, value) in req.headers().iter().chain(added.iter()) {
        has_host |= name == HOST;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Where a head ends: just past its empty line (`\r\n\r\n`, or the bare `\n\n` httparse
/// also accepts).
fn head_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf).find_map(|at| match buf.get(at + 1..) {
        Some([b'\n', ..]) => Some(at + 2),
        Some([b'\r', b'\n', ..]) => Some(at + 3),
        _ => None,
    })
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// To the end of the connection.
    Close,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
    Trailers,
}

enum Parsed {
    Informational(StatusCode, HeaderMap),
    Final(Head),
}

/// A final answer's head: its parts, how its body is framed, and its header lines as
/// they came when they are in `verbatim` rather than in the parts' map.
#[derive(Debug)]
pub struct Head {
    pub parts: http::response::Parts,
    pub decode: Decode,
    pub verbatim: Option<VerbatimLines>,
}

/// An answer's header lines as the upstream sent them, for a client whose response head
/// [`crate::downstream_h1`] writes: copied out in one piece rather than parsed into a
/// `HeaderMap` and written back line by line, which was 2 000 of the queue-proxy's
/// 21 700 instructions per request (callgrind). Only for a plain answer: HTTP/1.1, a
/// status with a body, one `Content-Length`, no line a proxy must drop or re-frame
/// ([`passes_verbatim`]), and every line ending in CRLF right after its value. The lines
/// keep the upstream's spelling of names, as nginx and Envoy pass them on.
#[derive(Debug)]
pub struct VerbatimLines {
    /// Whole lines, each ending in CRLF; the head's empty line is not in them.
    lines: Bytes,
    /// The `Content-Length`.
    length: u64,
    has_date: bool,
}

impl VerbatimLines {
    #[cfg(test)]
    pub(crate) fn of(lines: &'static [u8], length: u64, has_date: bool) -> Self {
        Self {
            lines: Bytes::from_static(lines),
            length,
            has_date,
        }
    }

    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    pub fn content_length(&self) -> u64 {
        self.length
    }

    /// Whether a `Date` line is among them (else the writer adds one, as hyper does).
    pub fn has_date(&self) -> bool {
        self.has_date
    }
}

/// A response body that may carry its head's [`VerbatimLines`], which the writer of the
/// head takes before it reads the body.
pub trait VerbatimSource {
    fn take_verbatim(&mut self) -> Option<VerbatimLines> {
        None
    }
}

/// Whether a line of this name may go on as it came: not one that is hop-by-hop
/// (`headers::HOP_BY_HOP`, and `Upgrade`), nor one the writer of the head interprets
/// (`Trailer`, and `Transfer-Encoding` again).
fn passes_verbatim(name: &[u8]) -> bool {
    const HELD_BACK: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
    ];
    !HELD_BACK
        .iter()
        .any(|held| held.len() == name.len() && held.eq_ignore_ascii_case(name))
}

/// `lines`, when they can be passed on as they came (see [`VerbatimLines`]). Each line
/// must start where the one before it ended, and end in CRLF right after its value, so
/// that the span from the first name to the last CRLF holds exactly these lines.
fn verbatim_lines(head: &Bytes, lines: &[httparse::Header<'_>]) -> Option<VerbatimLines> {
    let base = head.as_ptr() as usize;
    let offset = |part: &[u8]| (part.as_ptr() as usize).wrapping_sub(base);
    let start = offset(lines.first()?.name.as_bytes());
    let mut next = start;
    let mut length = None;
    let mut has_date = false;
    for line in lines {
        let name = line.name.as_bytes();
        // An empty value's slice need not point into the head.
        if offset(name) != next || line.value.is_empty() {
            return None;
        }
        let end = offset(line.value).checked_add(line.value.len())?;
        if head.get(end..end.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        next = end + 2;
        if name.len() == 4 && name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        } else if name.len() == 14 && name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() {
                return None;
            }
            length = Some(decimal(line.value)?);
        } else if !passes_verbatim(name) {
            return None;
        }
    }
    Some(VerbatimLines {
        lines: head.slice(start..next),
        length: length?,
        has_date,
    })
}

/// The final answer's head that `bytes` start with, read as an exchange reads it, with
/// its lines kept verbatim when `verbatim` allows: `Ok(None)` when no complete head is
/// there, or it is a `1xx`. The body (after the head) is not looked at. For the
/// `response_head` fuzz target.
pub fn read_final_head(bytes: &[u8], verbatim: bool) -> Result<Option<Head>, ExchangeError> {
    let Some(end) = head_end(bytes) else {
        return Ok(None);
    };
    match parse_head(&Bytes::copy_from_slice(&bytes[..end]), false, verbatim)? {
        Parsed::Final(head) => Ok(Some(head)),
        Parsed::Informational(..) => Ok(None),
    }
}

/// Parses a complete head into the parts of a response, its values sharing `head`.
/// Never inlined: inlined into the exchange, its 256 header slots (8 KiB) became part
/// of the exchange's future, which every request copies into its box (callgrind: 8 500
/// more instructions per request).
#[inline(never)]
fn parse_head(head: &Bytes, no_body: bool, verbatim: bool) -> Result<Parsed, ExchangeError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, head, &mut slots)
    {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(ExchangeError::malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::malformed(format!(
                "more than {MAX_HEADERS} header lines"
            )))
        }
        Err(e) => return Err(ExchangeError::malformed(e.to_string())),
    }
    let code = res.code.unwrap_or_default();
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::malformed(format!("invalid status {code}")))?;
    let version = if res.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let verbatim = if verbatim && version == Version::HTTP_11 && !no_body && can_have_body(status) {
        verbatim_lines(head, res.headers)
    } else {
        None
    };
    if let Some(verbatim) = verbatim {
        let decode = match verbatim.length {
            0 => Decode::Done,
            n => Decode::Length(n),
        };
        return Ok(Parsed::Final(Head {
            parts: final_parts(status, version, res.reason),
            decode,
            verbatim: Some(verbatim),
        }));
    }
    let mut headers = HeaderMap::with_capacity(res.headers.len());
    let mut keep_alive = version == Version::HTTP_11;
    let mut saw_close = false;
    // The framing is read off the lines as they go into the map: looking the names up
    // afterwards cost three hash probes per answer.
    // For the last `Transfer-Encoding` line: whether it ends in `chunked`.
    let mut transfer_encoding = None;
    let mut content_length = ContentLength::Absent;
    for h in res.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ExchangeError::malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(shared_slice(head, h.value))
            .map_err(|_| ExchangeError::malformed("invalid header value"))?;
        if name == CONNECTION {
            // A later `keep-alive` does not undo an earlier `close`.
            if saw_close || has_token(&value, b"close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(&value, b"keep-alive");
            }
        } else if name == TRANSFER_ENCODING {
            transfer_encoding = Some(last_token_is(&value, b"chunked"));
        } else if name == CONTENT_LENGTH {
            content_length.add(&value);
        }
        headers.append(name, value);
    }
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ExchangeError::malformed(
                "101 Switching Protocols to a request that asked for no upgrade",
            ));
        }
        return Ok(Parsed::Informational(status, headers));
    }
    let decode =
        if no_body || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Decode::Done
        } else if let Some(chunked) = transfer_encoding {
            if version == Version::HTTP_10 {
                return Err(ExchangeError::malformed(
                    "Transfer-Encoding in an HTTP/1.0 response",
                ));
            }
            // Sent with a Content-Length too, the message may be an attempt at response
            // splitting: the body is read as chunked, and the connection not trusted again.
            if content_length != ContentLength::Absent {
                keep_alive = false;
            }
            if chunked {
                Decode::Chunked(Chunk::Size)
            } else {
                Decode::Close
            }
        } else {
            match content_length {
                ContentLength::Absent => Decode::Close,
                ContentLength::Valid(0) => Decode::Done,
                ContentLength::Valid(n) => Decode::Length(n),
                ContentLength::Invalid => {
                    return Err(ExchangeError::malformed("invalid Content-Length"))
                }
            }
        };
    if decode == Decode::Close {
        keep_alive = false;
    }
    let mut parts = final_parts(status, version, res.reason);
    parts.headers = headers;
    if !keep_alive {
        parts.extensions.insert(NotReusable);
    }
    Ok(Parsed::Final(Head {
        parts,
        decode,
        verbatim: None,
    }))
}

/// A final answer's parts with no header lines yet. A reason phrase other than the
/// standard one is kept, which hyper's server writes back out.
fn final_parts(
    status: StatusCode,
    version: Version,
    reason: Option<&str>,
) -> http::response::Parts {
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    if let Some(reason) = reason {
        if Some(reason) != status.canonical_reason() && !reason.is_empty() {
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.as_bytes()) {
                parts.extensions.insert(reason);
            }
        }
    }
    parts
}

/// Whether an answer with this status has a body at all (RFC 9110 §6.4.1).
pub(crate) fn can_have_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Marks a response after which its connection closes.
#[derive(Debug, Clone, Copy)]
pub struct NotReusable;

/// `part` of `whole`, as a `Bytes` sharing its memory.
fn shared_slice(whole: &Bytes, part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= whole.len() && !part.is_empty() => whole.slice(start..end),
        _ => Bytes::new(),
    }
}

fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
}

pub(crate) fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

pub(crate) fn last_token_is(value: &HeaderValue, token: &[u8]) -> bool {
    tokens(value)
        .last()
        .is_some_and(|t| t.eq_ignore_ascii_case(token))
}

/// What an answer's `Content-Length` lines say: one length every value names (RFC 9110
/// §8.6: a list of equal values is one value), or nothing usable if they differ or one is
/// not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentLength {
    Absent,
    Valid(u64),
    Invalid,
}

impl ContentLength {
    fn add(&mut self, value: &HeaderValue) {
        for t in tokens(value) {
            *self = match (*self, decimal(t)) {
                (ContentLength::Invalid, _) | (_, None) => ContentLength::Invalid,
                (ContentLength::Valid(f), Some(n)) if f != n => ContentLength::Invalid,
                (_, Some(n)) => ContentLength::Valid(n),
            };
        }
    }
}

/// Digits only, no sign, no overflow.
pub(crate) fn decimal(t: &[u8]) -> Option<u64> {
    if t.is_empty() {
        return None;
    }
    t.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// A response body read from its connection. Once it has ended, [`H1Body::finished`]
/// gives back a connection fit for another request.
#[derive(Debug)]
pub struct H1Body {
    conn: Option<Box<UpstreamConn>>,
    decode: Decode,
    reusable: bool,
}

impl H1Body {
    pub fn new(conn: Box<UpstreamConn>, decode: Decode, reusable: bool) -> Self {
        let mut body = Self {
            conn: Some(conn),
            decode,
            reusable,
        };
        if decode == Decode::Done {
            body.end();
        }
        body
    }

    /// The connection, once the body ended and left it fit for another request.
    pub fn finished(&mut self) -> Option<Box<UpstreamConn>> {
        // `end` keeps the connection only when it can carry another request.
        if self.decode == Decode::Done {
            return self.conn.take();
        }
        None
    }

    /// Lets go of the connection (a `101`: it now belongs to the upgrade).
    pub fn forget_connection(&mut self) {
        self.conn = None;
    }

    fn end(&mut self) {
        self.decode = Decode::Done;
        // Not with bytes past the response's end, nor after an answer that said it closes.
        if !(self.reusable && self.conn.as_ref().is_some_and(|c| c.read.is_empty())) {
            self.conn = None;
        }
    }

    fn broken(&mut self, err: io::Error) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.conn = None;
        self.decode = Decode::Done;
        Poll::Ready(Some(Err(ExchangeError::Body(err))))
    }

    fn malformed(&mut self, what: &str) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.broken(io::Error::new(io::ErrorKind::InvalidData, what.to_owned()))
    }
}

/// The EOF that ends a body early.
fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the upstream closed the connection before the body ended",
    )
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = &mut *self;
        loop {
            if this.decode == Decode::Done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decode {
                Decode::Done => return Poll::Ready(None),
                Decode::Length(left) | Decode::Chunked(Chunk::Data(left))
                    if !conn.read.is_empty() =>
                {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(conn.read.len());
                    let data = conn.read.split_to(take).freeze();
                    let left = left - take as u64;
                    match this.decode {
                        Decode::Length(_) if left == 0 => this.end(),
                        Decode::Length(_) => this.decode = Decode::Length(left),
                        _ if left == 0 => this.decode = Decode::Chunked(Chunk::DataEnd),
                        _ => this.decode = Decode::Chunked(Chunk::Data(left)),
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Close if !conn.read.is_empty() => {
                    let data = conn.read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Chunked(Chunk::Size) => match httparse::parse_chunk_size(&conn.read) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.read.advance(used);
                        this.decode = Decode::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                        continue;
                    }
                    Ok(httparse::Status::Partial) if conn.read.len() > MAX_CHUNK_LINE => {
                        return this.malformed("chunk size line too long");
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return this.malformed("invalid chunk size"),
                },
                Decode::Chunked(Chunk::DataEnd) => {
                    if conn.read.starts_with(b"\r\n") {
                        conn.read.advance(2);
                        this.decode = Decode::Chunked(Chunk::Size);
                        continue;
                    }
                    if conn.read.starts_with(b"\n") {
                        conn.read.advance(1);
                        this.decode = Decode::Chunked(Chunk::Size);
                        continue;
                    }
                    if conn.read.len() >= 2 || conn.read.first().is_some_and(|b| *b != b'\r') {
                        return this.malformed("chunk data not followed by a line end");
                    }
                }
                Decode::Chunked(Chunk::Trailers) => match trailers(&mut conn.read) {
                    Ok(Some(map)) => {
                        this.end();
                        if map.is_empty() {
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Ok(Frame::trailers(map))));
                    }
                    Ok(None) if conn.read.len() > MAX_HEADER_BYTES => {
                        return this.malformed("trailers too large");
                    }
                    Ok(None) => {}
                    Err(what) => return this.malformed(what),
                },
                // Length, data or close-delimited with nothing buffered: read below.
                _ => {}
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.broken(e),
                Poll::Ready(Ok(0)) if this.decode == Decode::Close => {
                    this.decode = Decode::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return this.broken(cut_short()),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decode == Decode::Done || self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Length(n) => SizeHint::with_exact(n),
            Decode::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The trailer section after the last chunk, taken from `buf` once whole: `Ok(None)`
/// while more must be read.
fn trailers(buf: &mut BytesMut) -> Result<Option<HeaderMap>, &'static str> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Some(HeaderMap::new()));
    }
    if buf.starts_with(b"\n") {
        buf.advance(1);
        return Ok(Some(HeaderMap::new()));
    }
    // The section ends at the first empty line; the parser wants its line ends whole.
    let Some(end) = head_end(buf) else {
        return Ok(None);
    };
    let section = buf.split_to(end).freeze();
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let parsed = match httparse::parse_headers(&section, &mut slots) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        Ok(httparse::Status::Partial) => return Err("incomplete trailers"),
        Err(httparse::Error::TooManyHeaders) => return Err("more than 64 trailer lines"),
        Err(_) => return Err("malformed trailers"),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "invalid trailer name")?;
        let value = HeaderValue::from_maybe_shared(shared_slice(&section, h.value))
            .map_err(|_| "invalid trailer value")?;
        map.append(name, value);
    }
    Ok(Some(map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::NO_ADDED_LINES;

    fn parsed(head: &'static [u8]) -> Result<Parsed, ExchangeError> {
        parse_head(&Bytes::from_static(head), false, false)
    }

    fn decode_of(head: &'static [u8]) -> (Decode, bool) {
        match parsed(head) {
            Ok(Parsed::Final(Head { parts, decode, .. })) => {
                (decode, parts.extensions.get::<NotReusable>().is_none())
            }
            Ok(Parsed::Informational(..)) => panic!("informational"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_head_ends_at_its_empty_line() {
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\na: b\r\n\r\nbody"), Some(25));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\na: b\n\nbody"), Some(22));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\na: b\r\n"), None);
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\na: b\r\n\r"), None);
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            decode_of(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            (Decode::Length(5), true)
        );
        assert_eq!(
            decode_of(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n"),
            (Decode::Length(5), true)
        );
        assert_eq!(
            decode_of(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            (Decode::Done, true)
        );
        assert_eq!(
            decode_of(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            (Decode::Chunked(Chunk::Size), true)
        );
        // Both: chunked wins, and the connection is not trusted again.
        assert_eq!(
            decode_of(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
            ),
            (Decode::Chunked(Chunk::Size), false)
        );
        assert_eq!(
            decode_of(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            (Decode::Close, false)
        );
        assert_eq!(
            decode_of(b"HTTP/1.1 200 OK\r\n\r\n"),
            (Decode::Close, false)
        );
        assert_eq!(
            decode_of(b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n"),
            (Decode::Done, true)
        );
        assert_eq!(
            decode_of(b"HTTP/1.1 304 Not Modified\r\n\r\n"),
            (Decode::Done, true)
        );
        match parse_head(
            &Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"),
            true,
            true,
        ) {
            Ok(Parsed::Final(head)) => {
                assert_eq!(head.decode, Decode::Done);
                assert!(
                    head.verbatim.is_none(),
                    "a HEAD answer's lines go through the map"
                );
            }
            _ => panic!("a HEAD answer has no body"),
        }
    }

    #[test]
    fn keep_alive_follows_connection_and_version() {
        assert!(!decode_of(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n").1);
        assert!(
            !decode_of(
                b"HTTP/1.1 200 OK\r\nconnection: close\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n"
            )
            .1
        );
        assert!(!decode_of(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").1);
        assert!(
            decode_of(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n").1
        );
    }

    #[test]
    fn malformed_heads_are_refused_with_a_reason() {
        for (head, why) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"[..],
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5,\r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                "HTTP/1.0",
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "upgrade"),
            (b"HTTP/1.1 2000 OK\r\n\r\n", "status"),
            (b"HTTQ/1.1 200 OK\r\n\r\n", "version"),
            (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "header"),
        ] {
            // Refused alike whether or not the client could take the lines as they came.
            for verbatim in [false, true] {
                match parse_head(&Bytes::copy_from_slice(head), false, verbatim) {
                    Err(e) => assert!(e.to_string().contains(why), "{e} should say {why}"),
                    Ok(_) => panic!("{} was accepted", String::from_utf8_lossy(head)),
                }
            }
        }
    }

    #[test]
    fn informational_heads_are_passed_on_and_a_custom_reason_kept() {
        assert!(matches!(
            parsed(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"),
            Ok(Parsed::Informational(StatusCode::EARLY_HINTS, h)) if h.contains_key("link")
        ));
        match parsed(b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 0\r\n\r\n") {
            Ok(Parsed::Final(Head { parts, .. })) => assert_eq!(
                parts
                    .extensions
                    .get::<hyper::ext::ReasonPhrase>()
                    .map(|r| r.as_bytes()),
                Some(&b"Fine Thanks"[..])
            ),
            _ => panic!("not parsed"),
        }
    }

    #[test]
    fn values_share_the_head() {
        let head = Bytes::from_static(b"HTTP/1.1 200 OK\r\nx-a: one\r\nx-b:\r\n\r\n");
        match parse_head(&head, false, false) {
            Ok(Parsed::Final(Head { parts, .. })) => {
                assert_eq!(parts.headers["x-a"], "one");
                assert_eq!(parts.headers["x-b"], "");
            }
            _ => panic!("not parsed"),
        }
    }

    #[test]
    fn the_request_head_is_written_as_hyper_writes_it() {
        let req = Request::get("/a?b=c")
            .header("host", "example.com")
            .header("x-y", "z")
            .body(())
            .unwrap();
        let mut out = Vec::new();
        let pod = HeaderValue::from_static("10.0.0.1:8012");
        encode_head(&req, &pod, &NO_ADDED_LINES, &mut out);
        assert_eq!(
            out,
            b"GET /a?b=c HTTP/1.1\r\nhost: example.com\r\nx-y: z\r\n\r\n"
        );
        // With no Host of its own, the request names the upstream.
        let req = Request::get("/").header("x-y", "z").body(()).unwrap();
        encode_head(&req, &pod, &NO_ADDED_LINES, &mut out);
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nx-y: z\r\nhost: 10.0.0.1:8012\r\n\r\n"
        );
    }

    #[test]
    fn added_lines_follow_the_requests_own() {
        let req = Request::get("/").header("x-y", "z").body(()).unwrap();
        let added = AddedLines::of(&[
            ("k-original-host", "hello.local"),
            ("x-forwarded-for", "10.0.0.9"),
        ]);
        let mut out = Vec::new();
        let pod = HeaderValue::from_static("10.0.0.1:8012");
        encode_head(&req, &pod, &added, &mut out);
        assert_eq!(
            out,
            &b"GET / HTTP/1.1\r\nx-y: z\r\nk-original-host: hello.local\r\n\
               x-forwarded-for: 10.0.0.9\r\nhost: 10.0.0.1:8012\r\n\r\n"[..]
        );
        // An added Host stands for the request's: the upstream's is not written too.
        let mut added = AddedLines::new();
        added.push(HOST, HeaderValue::from_static("a.example"));
        encode_head(&req, &pod, &added, &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nx-y: z\r\nhost: a.example\r\n\r\n");
    }

    #[test]
    fn trailers_are_parsed_once_whole() {
        let mut buf = BytesMut::from(&b"grpc-status: 0\r\n"[..]);
        assert_eq!(trailers(&mut buf), Ok(None));
        buf.extend_from_slice(b"\r\nnext");
        let map = trailers(&mut buf).unwrap().unwrap();
        assert_eq!(map["grpc-status"], "0");
        assert_eq!(&buf[..], b"next");
        let mut empty = BytesMut::from(&b"\r\n"[..]);
        assert_eq!(
            trailers(&mut empty).map(|m| m.map(|m| m.len())),
            Ok(Some(0))
        );
    }

    fn verbatim_of(head: &[u8]) -> Option<(VerbatimLines, http::response::Parts, Decode)> {
        match parse_head(&Bytes::copy_from_slice(head), false, true) {
            Ok(Parsed::Final(Head {
                parts,
                decode,
                verbatim,
            })) => verbatim.map(|v| (v, parts, decode)),
            Ok(Parsed::Informational(..)) => panic!("informational"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_plain_answers_lines_come_as_they_came_and_its_map_stays_empty() {
        let lines = b"Content-Type: text/plain\r\nX-Mixed-Case: a, b\r\ncontent-length: 12\r\n";
        let head = [&b"HTTP/1.1 404 Not Found\r\n"[..], lines, b"\r\n"].concat();
        let (verbatim, parts, decode) = verbatim_of(&head).expect("a plain answer");
        assert_eq!(verbatim.lines(), lines);
        assert_eq!(verbatim.content_length(), 12);
        assert!(!verbatim.has_date());
        assert_eq!(decode, Decode::Length(12));
        assert_eq!(parts.status, StatusCode::NOT_FOUND);
        assert!(parts.headers.is_empty());
        assert!(parts.extensions.get::<NotReusable>().is_none());

        let (verbatim, _, decode) = verbatim_of(
            b"HTTP/1.1 200 Fine\r\ndate: Mon, 07 Dec 2026 22:46:53 GMT\r\ncontent-length: 0\r\n\r\n",
        )
        .expect("a plain empty answer");
        assert!(verbatim.has_date());
        assert_eq!(decode, Decode::Done);
    }

    #[test]
    fn answers_a_proxy_must_rework_go_through_the_map() {
        for head in [
            // What a proxy drops or re-frames.
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: close\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nkeep-alive: timeout=5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nUpgrade: h2c\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntrailer: x-sum\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nProxy-Authenticate: Basic\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            // Framed otherwise than by one Content-Length.
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n",
            // Lines that would not go out as a sender must write them.
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\nx-a: 1\n\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1 \r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-empty:\r\n\r\n",
        ] {
            let shown = String::from_utf8_lossy(head);
            assert!(verbatim_of(head).is_none(), "{shown} came verbatim");
            // The map holds them instead.
            match parse_head(&Bytes::copy_from_slice(head), false, true) {
                Ok(Parsed::Final(Head { parts, .. })) => {
                    assert!(!parts.headers.is_empty(), "{shown} lost its lines")
                }
                _ => panic!("{shown} not parsed"),
            }
        }
        // And only a client that can take them gets them.
        match parse_head(
            &Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"),
            false,
            false,
        ) {
            Ok(Parsed::Final(head)) => assert!(head.verbatim.is_none()),
            _ => panic!("not parsed"),
        }
    }

    #[test]
    fn every_hop_by_hop_name_is_held_back_in_any_case() {
        for name in crate::headers::HOP_BY_HOP
            .iter()
            .chain([&http::header::UPGRADE, &http::header::TRAILER])
        {
            assert!(!passes_verbatim(name.as_str().as_bytes()), "{name}");
            let upper = name.as_str().to_ascii_uppercase();
            assert!(!passes_verbatim(upper.as_bytes()), "{upper}");
        }
        for name in [
            "content-type",
            "x-connection",
            "tee",
            "upgrades",
            "set-cookie",
        ] {
            assert!(passes_verbatim(name.as_bytes()), "{name}");
        }
    }
}
