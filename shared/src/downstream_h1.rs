//! An HTTP/1.1 exchange with a client, for the requests most clients send, driven by the
//! task serving the connection.
//!
//! hyper's server parses every head into parser state prepared for all the header lines
//! allowed (256 here), arms, boxes and drops a header-read timer per request, and runs
//! each request through its dispatcher, its body channel and its encoder. For a plain
//! HTTP/1.1 request with no body, no upgrade, no `Expect` or `Transfer-Encoding` header
//! and no `Connection` option but `keep-alive` (what load balancers, probes and most
//! clients send), this
//! module does it instead: the head is parsed by httparse into a `HeaderMap` whose values
//! share the read buffer, one timer per connection is pushed back per request, and the
//! response goes out with its head and a small body in one write.
//!
//! Anything else, and anything malformed, is hyper's: the connection is handed on to it,
//! with the bytes read so far, for the rest of its life, so every rule hyper's server
//! keeps (`400`/`431`/`414` answers, request smuggling, `100 Continue`, upgrades, the
//! keep-alive rules of HTTP/1.0) stays hyper's. The response is encoded by hyper's
//! server rules (hyper 1.x `proto::h1::role`): the `Content-Length` a response carries
//! or its body's exact size, else chunked; no body for `1xx`, `204` and `304`; trailers
//! only those named by `Trailer`, to a client that sent `TE: trailers`; a `Date` header
//! when the handler set none; the connection closed after a `Connection: close` answer,
//! or once the drain began. One difference, on purpose: the status line always says
//! HTTP/1.1, as Go's server writes it, where hyper echoes the version of an HTTP/1.0 app's
//! answer and then ends a body of unknown length by closing the client's connection;
//! here it is chunked and the connection kept.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::conn::{ConnIo, Connection};
use crate::serve::{RequestBody, MAX_HEADER_BYTES};
use crate::upstream_h1::{
    can_have_body, decimal, has_token, last_token_is, VerbatimLines, VerbatimSource,
};

/// Header lines this path parses; a request with more goes to hyper, which allows
/// `serve::MAX_HEADERS`. Few clients send more than a dozen.
const HEADER_LINES: usize = 64;

/// How much one read takes from the socket. The buffer is on the stack of the poll that
/// reads: a connection waiting for its next request holds no read buffer.
const READ_CHUNK: usize = 8 * 1024;

/// Response bytes gathered before they are written; a larger body frame goes out as it
/// is, uncopied.
const GATHER_BYTES: usize = 16 * 1024;

/// How a connection left this path.
pub(crate) enum Served {
    /// It is closed, or is to be: the client left, the drain began, or an exchange failed.
    Closed,
    /// hyper serves the rest of it, reading these bytes first.
    ToHyper(Bytes),
}

/// Serves `io`'s requests while they are the plain kind, until the connection ends or a
/// request that is not is read; see the module docs.
pub(crate) async fn serve<F, Fut, B>(
    io: &mut ConnIo,
    conn: &Arc<Connection>,
    handler: &F,
    read_header_timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Served
where
    F: Fn(&Arc<Connection>, Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + VerbatimSource,
{
    let _plain = PlainPath::enter(conn);
    // Bytes read before this path saw the connection (a request parked before it) are
    // its first request.
    let mut read = BytesMut::from(io.take_prefix());
    let mut out = Vec::new();
    // One timer for the connection, pushed back for each head: tokio moves a later
    // deadline without touching its wheel.
    let mut deadline = pin!(tokio::time::sleep(read_header_timeout));
    let mut stopping = pin!(stop.wait_for(|s| *s));
    let mut stop_seen = false;
    loop {
        deadline
            .as_mut()
            .reset(Instant::now() + read_header_timeout);
        let (req, wants_trailers) = loop {
            match parse(&mut read) {
                Parsed::Request(req, wants_trailers) => break (req, wants_trailers),
                Parsed::Other => return Served::ToHyper(read.freeze()),
                Parsed::Partial => {}
            }
            // Waiting for bytes: closed by the drain when none of a request came yet (as
            // hyper closes an idle connection), by the timer, or by the client.
            let got = poll_fn(|cx| {
                if !stop_seen && stopping.as_mut().poll(cx).is_ready() {
                    stop_seen = true;
                }
                if stop_seen && read.is_empty() {
                    return Poll::Ready(false);
                }
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                match poll_read_some(io, &mut read, cx) {
                    Poll::Ready(Ok(n)) => Poll::Ready(n > 0),
                    Poll::Ready(Err(_)) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            if !got {
                let _ = io.shutdown().await;
                return Served::Closed;
            }
        };
        conn.request_started();
        // Boxed: the stack's future is kilobytes, and a connection waiting for its next
        // request should not hold room for it.
        let mut handling = Box::pin(handler(conn, req));
        // While the handler works, the socket is watched as hyper watches it: a client
        // that leaves ends the request (hyper's default, no half-close), and bytes a
        // client pipelines are kept for the next head.
        let resp = poll_fn(|cx| {
            if let Poll::Ready(resp) = handling.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            while read.len() < MAX_HEADER_BYTES {
                match poll_read_some(io, &mut read, cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => break,
                }
            }
            Poll::Pending
        })
        .await;
        drop(handling);
        let Some(resp) = resp else {
            return Served::Closed;
        };
        let keep_alive = respond(io, &mut out, resp, wants_trailers)
            .await
            .unwrap_or(false);
        // The write buffer is kept between requests only while small.
        if out.capacity() > GATHER_BYTES {
            out = Vec::new();
        }
        if !stop_seen && stopping.as_mut().now_or_never().is_some() {
            stop_seen = true;
        }
        if !keep_alive || stop_seen {
            let _ = io.shutdown().await;
            return Served::Closed;
        }
    }
}

/// Marks the connection as served here until dropped, whichever way [`serve`] returns:
/// a connection handed on to hyper must get its upstreams' header lines in a map.
struct PlainPath<'a>(&'a Connection);

impl<'a> PlainPath<'a> {
    fn enter(conn: &'a Connection) -> Self {
        conn.set_plain_path(true);
        Self(conn)
    }
}

impl Drop for PlainPath<'_> {
    fn drop(&mut self) {
        self.0.set_plain_path(false);
    }
}

/// Reads what the socket has into `read`; `Ok(0)` is the end of the connection.
fn poll_read_some(
    io: &mut ConnIo,
    read: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut chunk = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
    let mut buf = ReadBuf::uninit(&mut chunk);
    ready!(Pin::new(io).poll_read(cx, &mut buf))?;
    read.extend_from_slice(buf.filled());
    Poll::Ready(Ok(buf.filled().len()))
}

/// What the bytes read so far hold.
#[allow(clippy::large_enum_variant)] // a return value, moved once; a box would cost an allocation per request
enum Parsed {
    /// A plain request, its head taken off the buffer, and whether it said `TE: trailers`.
    Request(Request<RequestBody>, bool),
    /// Not a whole head yet.
    Partial,
    /// A request this path leaves to hyper, or bytes that are not one: the buffer is
    /// left as it was.
    Other,
}

/// What the plain path makes of `bytes`, for the fuzz target: the request it takes and how
/// many bytes that consumed, or `None`; and the bytes it leaves in its buffer.
#[doc(hidden)]
pub fn take_plain_request(bytes: &[u8]) -> (Option<(Request<RequestBody>, bool, usize)>, Bytes) {
    let mut read = BytesMut::from(bytes);
    let taken = match parse(&mut read) {
        Parsed::Request(req, wants_trailers) => {
            Some((req, wants_trailers, bytes.len() - read.len()))
        }
        Parsed::Partial | Parsed::Other => None,
    };
    (taken, read.freeze())
}

/// Where one header line's name and value are in the head. `u32`: a head is at most
/// `MAX_HEADER_BYTES`, and `parse` zeroes an array of these for each request (at
/// `usize`, 2 KiB of it).
#[derive(Clone, Copy, Default)]
struct Line {
    name: (u32, u32),
    value: (u32, u32),
}

impl Line {
    fn name<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        &head[self.name.0 as usize..self.name.1 as usize]
    }

    fn value(&self, head: &Bytes) -> Bytes {
        head.slice(self.value.0 as usize..self.value.1 as usize)
    }
}

/// Parses the head at the start of `read`. Never inlined: its header slots stay on the
/// stack of this call rather than in the connection's future.
#[inline(never)]
fn parse(read: &mut BytesMut) -> Parsed {
    if read.is_empty() {
        return Parsed::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; HEADER_LINES];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        read,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if read.len() <= MAX_HEADER_BYTES => return Parsed::Partial,
        // Too large, too many lines, or malformed: hyper answers it.
        _ => return Parsed::Other,
    };
    if len > MAX_HEADER_BYTES || parsed.version != Some(1) {
        return Parsed::Other;
    }
    let method = match parsed.method.map(|m| Method::from_bytes(m.as_bytes())) {
        // HEAD and CONNECT answers follow rules of their own.
        Some(Ok(m)) if m != Method::HEAD && m != Method::CONNECT => m,
        _ => return Parsed::Other,
    };
    let at = |part: &[u8]| {
        let start = (part.as_ptr() as usize).wrapping_sub(read.as_ptr() as usize);
        (start, start + part.len())
    };
    let Some(path) = parsed.path.map(|p| at(p.as_bytes())) else {
        return Parsed::Other;
    };
    let mut lines = [Line::default(); HEADER_LINES];
    let count = parsed.headers.len();
    // Every offset is inside the head, which is at most `MAX_HEADER_BYTES`: `u32` holds it.
    let at32 = |part: &[u8]| {
        let (start, end) = at(part);
        (start as u32, end as u32)
    };
    for (line, h) in lines.iter_mut().zip(parsed.headers.iter()) {
        *line = Line {
            name: at32(h.name.as_bytes()),
            value: at32(h.value),
        };
    }
    let head = read.split_to(len).freeze();
    match build(&head, method, path, &lines[..count]) {
        Some((req, wants_trailers)) => Parsed::Request(req, wants_trailers),
        None => {
            // Put the head back in front of whatever followed it.
            let mut whole = BytesMut::with_capacity(head.len() + read.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(read);
            *read = whole;
            Parsed::Other
        }
    }
}

/// Room for the headers the proxies add before forwarding (the activator's
/// `K-Original-Host`, `K-Proxy-Request` and `X-Forwarded-For`, the queue-proxy's
/// `X-Forwarded-For` and `Forwarded`): a map sized to the client's lines alone grew, and so
/// rehashed, at the first of them (callgrind: 900 instructions per request).
const HEADERS_PROXIES_ADD: usize = 4;

/// The request `head` holds, if it is the plain kind, and whether it accepts trailers.
fn build(
    head: &Bytes,
    method: Method,
    path: (usize, usize),
    lines: &[Line],
) -> Option<(Request<RequestBody>, bool)> {
    let uri = Uri::from_maybe_shared(head.slice(path.0..path.1)).ok()?;
    let mut headers = HeaderMap::with_capacity(lines.len() + HEADERS_PROXIES_ADD);
    let mut length_seen = false;
    let mut wants_trailers = false;
    for line in lines {
        let name = HeaderName::from_bytes(line.name(head)).ok()?;
        let value = HeaderValue::from_maybe_shared(line.value(head)).ok()?;
        if name == CONTENT_LENGTH {
            // No body is `Content-Length: 0`, said once; any other is hyper's to frame.
            if length_seen || value.as_bytes() != b"0" {
                return None;
            }
            length_seen = true;
        } else if name == CONNECTION {
            // Browsers say `keep-alive`, which HTTP/1.1 means anyway; any other option
            // (close, upgrade, names of hop-by-hop headers) is hyper's.
            if !value.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        } else if name == TE {
            // hyper's server sends a response's trailers only to a client that asked.
            wants_trailers |= has_token(&value, b"trailers");
        } else if name == TRANSFER_ENCODING || name == UPGRADE || name == EXPECT {
            return None;
        }
        headers.append(name, value);
    }
    let mut req = Request::new(RequestBody::Right(http_body_util::Empty::new()));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some((req, wants_trailers))
}

/// How a response body is framed on the wire.
enum Framing {
    Length(u64),
    Chunked { trailers: Vec<HeaderName> },
}

/// Why a response could not be encoded; the connection is closed with nothing written.
struct Unencodable;

/// Writes `resp`. `Ok(true)` when the connection may carry another request.
async fn respond<B>(
    io: &mut ConnIo,
    out: &mut Vec<u8>,
    resp: Response<B>,
    wants_trailers: bool,
) -> io::Result<bool>
where
    B: Body<Data = Bytes> + VerbatimSource,
{
    let (parts, mut body) = resp.into_parts();
    let size = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    out.clear();
    let verbatim = body.take_verbatim();
    let Ok((mut framing, mut keep_alive)) = encode_head(&parts, size, verbatim.as_ref(), out)
    else {
        return Ok(false);
    };
    // Its bytes share the upstream connection's read buffer, which may be refilled.
    drop(verbatim);
    let mut body = pin!(body);
    while !matches!(framing, Framing::Length(0)) {
        // A frame the body has at once joins the bytes gathered; only when it has none
        // are they written, so a small response goes out in one write.
        // (The body's error is dropped at once: it need not be `Send`.)
        let mut next = |cx: &mut Context<'_>| {
            body.as_mut()
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(drop)))
        };
        let frame = match poll_fn(|cx| Poll::Ready(next(cx))).now_or_never() {
            Some(Poll::Ready(frame)) => frame,
            _ => {
                io.write_all(out).await?;
                out.clear();
                poll_fn(&mut next).await
            }
        };
        let frame = match frame {
            None => break,
            // The body failed: the client cannot be told but by a cut connection.
            Some(Err(_)) => return Ok(false),
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                match &mut framing {
                    Framing::Length(left) => {
                        // More than the length said is cut, as hyper cuts it.
                        let take = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                        write_data(io, out, data.slice(..take)).await?;
                        *left -= take as u64;
                        if *left == 0 {
                            break;
                        }
                    }
                    Framing::Chunked { .. } if data.is_empty() => {}
                    Framing::Chunked { .. } => {
                        push_number(out, data.len() as u64, 16);
                        out.extend_from_slice(b"\r\n");
                        write_data(io, out, data).await?;
                        out.extend_from_slice(b"\r\n");
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        // Trailers go only to a client that asked for them; others' are dropped.
        if let (Ok(trailers), Framing::Chunked { trailers: allowed }, true) =
            (frame.into_trailers(), &framing, wants_trailers)
        {
            out.extend_from_slice(b"0\r\n");
            encode_trailers(&trailers, allowed, out);
            out.extend_from_slice(b"\r\n");
            framing = Framing::Length(0);
            break;
        }
    }
    match framing {
        Framing::Length(0) => {}
        // The body ended short of its length: the client sees a cut connection.
        Framing::Length(_) => keep_alive = false,
        Framing::Chunked { .. } => out.extend_from_slice(b"0\r\n\r\n"),
    }
    if !out.is_empty() {
        io.write_all(out).await?;
    }
    Ok(keep_alive)
}

/// Gathers `data` behind the bytes in `out`, or writes both at once when it is large.
async fn write_data(io: &mut ConnIo, out: &mut Vec<u8>, data: Bytes) -> io::Result<()> {
    if out.len() + data.len() <= GATHER_BYTES {
        out.extend_from_slice(&data);
        return Ok(());
    }
    let mut both = Buf::chain(&out[..], data);
    io.write_all_buf(&mut both).await?;
    out.clear();
    Ok(())
}

/// Ends a line of comma-joined values.
fn end_joined(out: &mut Vec<u8>, add_chunked: &mut bool) {
    if std::mem::take(add_chunked) {
        out.extend_from_slice(b", chunked");
    }
    out.extend_from_slice(b"\r\n");
}

/// `n` in base `radix` (10 or 16; hex in upper case, as hyper writes chunk sizes),
/// without going through `fmt`.
fn push_number(out: &mut Vec<u8>, n: u64, radix: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b"0123456789ABCDEF"[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Writes the status line and headers into `out` by hyper's server rules; returns how
/// the body is framed and whether the connection may be kept. `verbatim`'s lines, when
/// the body brought them, go first, as they came; the map's follow.
fn encode_head(
    parts: &http::response::Parts,
    size: Option<u64>,
    verbatim: Option<&VerbatimLines>,
    out: &mut Vec<u8>,
) -> Result<(Framing, bool), Unencodable> {
    let status = parts.status;
    let mut keep_alive = true;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
    } else if status.is_informational() {
        // A handler cannot answer with a 1xx; hyper sends a bare 500 instead.
        out.extend_from_slice(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n");
        write_date(out);
        out.extend_from_slice(b"\r\n");
        return Ok((Framing::Length(0), false));
    }
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(reason) => out.extend_from_slice(reason.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    let body_allowed = can_have_body(status);
    let mut framing = None;
    let mut length_written: Option<u64> = None;
    let mut wrote_date = false;
    if let Some(verbatim) = verbatim {
        // Only a status with a body and one `Content-Length` comes verbatim.
        out.extend_from_slice(verbatim.lines());
        let length = verbatim.content_length();
        framing = Some(Framing::Length(length));
        length_written = Some(length);
        wrote_date = verbatim.has_date();
    }
    let mut trailers = Vec::new();
    // A name whose values go on one line, comma-joined, as hyper writes them, and for
    // `Transfer-Encoding`, whether its last value ended in `chunked`.
    let mut joined: Option<&HeaderName> = None;
    let mut add_chunked = false;
    for (name, value) in &parts.headers {
        let continues = joined == Some(name);
        if !continues && joined.take().is_some() {
            end_joined(out, &mut add_chunked);
        }
        if *name == CONTENT_LENGTH {
            if framing.is_some() && length_written.is_none() {
                // Transfer-Encoding came first: hyper refuses the response.
                return Err(Unencodable);
            }
            let n = match size {
                // No body: its length headers are dropped.
                Some(0) => continue,
                // The body's own length is trusted over the header's, as hyper does.
                Some(n) => n,
                None => decimal(value.as_bytes()).ok_or(Unencodable)?,
            };
            match length_written {
                Some(prev) if prev != n && size.is_none() => return Err(Unencodable),
                // Later values are dropped.
                Some(_) => {}
                None => {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(value.as_bytes());
                    out.extend_from_slice(b"\r\n");
                    length_written = Some(n);
                    framing = Some(Framing::Length(n));
                }
            }
            continue;
        }
        if *name == TRANSFER_ENCODING {
            if length_written.is_some() {
                return Err(Unencodable);
            }
            if !body_allowed {
                continue;
            }
            framing = Some(Framing::Chunked {
                trailers: Vec::new(),
            });
            // `chunked` must be the last coding, or it is added.
            add_chunked = !last_token_is(value, b"chunked");
        } else if *name == TRAILER {
            if !body_allowed {
                continue;
            }
            if let Ok(listed) = value.to_str() {
                trailers.extend(
                    listed
                        .split(',')
                        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
                );
            }
        } else if *name == CONNECTION {
            if has_token(value, b"close") {
                keep_alive = false;
            }
        } else {
            if *name == DATE {
                wrote_date = true;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
            continue;
        }
        if continues {
            out.extend_from_slice(b", ");
        } else {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
        }
        out.extend_from_slice(value.as_bytes());
        joined = Some(name);
    }
    if joined.is_some() {
        end_joined(out, &mut add_chunked);
    }
    let framing = match framing {
        Some(Framing::Chunked { .. }) => Framing::Chunked { trailers },
        Some(length) => length,
        None => match size {
            None if body_allowed => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked { trailers }
            }
            // Without a length a 204 or 304 has no body at all.
            None => Framing::Length(0),
            Some(n) if body_allowed => {
                out.extend_from_slice(b"content-length: ");
                push_number(out, n, 10);
                out.extend_from_slice(b"\r\n");
                Framing::Length(n)
            }
            Some(_) => Framing::Length(0),
        },
    };
    let framing = if body_allowed {
        framing
    } else {
        Framing::Length(0)
    };
    if !wrote_date {
        write_date(out);
    }
    out.extend_from_slice(b"\r\n");
    Ok((framing, keep_alive))
}

/// Fields a trailer may never carry (hyper's list): they frame, route or describe the
/// message as a whole. A `static`: a `const` array would be built and dropped per line.
static NOT_IN_TRAILERS: [HeaderName; 12] = [
    http::header::AUTHORIZATION,
    http::header::CACHE_CONTROL,
    http::header::CONTENT_ENCODING,
    CONTENT_LENGTH,
    http::header::CONTENT_RANGE,
    http::header::CONTENT_TYPE,
    http::header::HOST,
    http::header::MAX_FORWARDS,
    http::header::SET_COOKIE,
    TRAILER,
    TRANSFER_ENCODING,
    TE,
];

/// The trailer lines `allowed` names, less those a trailer may never carry.
fn encode_trailers(trailers: &HeaderMap, allowed: &[HeaderName], out: &mut Vec<u8>) {
    for (name, value) in trailers {
        if !allowed.contains(name) || NOT_IN_TRAILERS.contains(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// `date: …\r\n`, formatted at most once a second per thread, as hyper caches it.
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs || cached.1[0] == 0 {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = secs;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&cached.1);
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &'static [u8]) -> (Parsed, BytesMut) {
        let mut read = BytesMut::from(bytes);
        (parse(&mut read), read)
    }

    #[test]
    fn a_plain_request_is_taken_and_what_follows_it_kept() {
        let (p, rest) = parsed(
            b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\nX-A: 1\r\n\r\nGET /next",
        );
        let Parsed::Request(req, wants_trailers) = p else {
            panic!("not taken")
        };
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(req.headers()["x-a"], "1");
        assert_eq!(
            req.headers()["connection"],
            "Keep-Alive",
            "passed on, for the proxy to strip"
        );
        assert!(req.body().is_end_stream());
        assert!(!wants_trailers);
        assert_eq!(&rest[..], b"GET /next");
        let (p, _) = parsed(b"GET / HTTP/1.1\r\nTE: gzip, Trailers\r\n\r\n");
        assert!(matches!(p, Parsed::Request(_, true)));
    }

    #[test]
    fn a_partial_head_waits_for_more() {
        assert!(matches!(
            parsed(b"GET / HTTP/1.1\r\nHost: x\r\n").0,
            Parsed::Partial
        ));
        assert!(matches!(parsed(b"").0, Parsed::Partial));
    }

    #[test]
    fn anything_but_a_plain_request_is_left_to_hyper_untouched() {
        let others: [&'static [u8]; 14] = [
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: keep-alive, x-hop\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\n\r\n",
            b"GET http://[::1 HTTP/1.1\r\n\r\n",
        ];
        for bytes in others {
            let (p, rest) = parsed(bytes);
            assert!(
                matches!(p, Parsed::Other),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(&rest[..], bytes, "the bytes are left as they were");
        }
    }

    #[test]
    fn a_head_past_the_limits_is_left_to_hyper() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..HEADER_LINES + 1 {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let mut read = BytesMut::from(&many[..]);
        assert!(matches!(parse(&mut read), Parsed::Other));
        let mut huge = b"GET / HTTP/1.1\r\nx-big: ".to_vec();
        huge.resize(MAX_HEADER_BYTES + 10, b'a');
        let mut read = BytesMut::from(&huge[..]);
        assert!(matches!(parse(&mut read), Parsed::Other), "no end in sight");
    }

    fn head(resp: Response<()>, size: Option<u64>) -> Result<(String, bool, bool), ()> {
        let (parts, ()) = resp.into_parts();
        let mut out = Vec::new();
        let (framing, keep) = encode_head(&parts, size, None, &mut out).map_err(|_| ())?;
        let text = String::from_utf8(out).unwrap();
        let date = text.find("date: ").expect("a date header");
        let text = format!("{}{}", &text[..date], &text[date + 37..]);
        Ok((text, matches!(framing, Framing::Chunked { .. }), keep))
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> Response<()> {
        let mut b = Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn verbatim_lines_go_first_as_they_came_then_the_maps() {
        let lines = b"Content-Type: text/plain\r\ncontent-length: 2\r\n";
        let verbatim = VerbatimLines::of(lines, 2, false);
        let mut out = Vec::new();
        let (parts, ()) = resp(404, &[("x-added", "1")]).into_parts();
        let (framing, keep) = encode_head(&parts, Some(2), Some(&verbatim), &mut out)
            .unwrap_or_else(|_| panic!("encodable"));
        let text = String::from_utf8(out).unwrap();
        let expected = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\ncontent-length: 2\r\nx-added: 1\r\ndate: ";
        assert!(text.starts_with(expected), "{text}");
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
        assert!(matches!(framing, Framing::Length(2)) && keep);

        // Their date is kept, and no second one written.
        let verbatim = VerbatimLines::of(
            b"date: Mon, 07 Dec 2026 22:46:53 GMT\r\ncontent-length: 0\r\n",
            0,
            true,
        );
        let mut out = Vec::new();
        let (parts, ()) = resp(200, &[]).into_parts();
        let (framing, _) = encode_head(&parts, Some(0), Some(&verbatim), &mut out)
            .unwrap_or_else(|_| panic!("encodable"));
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\ndate: Mon, 07 Dec 2026 22:46:53 GMT\r\ncontent-length: 0\r\n\r\n"
        );
        assert!(matches!(framing, Framing::Length(0)));
    }

    #[test]
    fn response_heads_follow_hypers_framing_rules() {
        // A known size becomes the length; none becomes chunked.
        assert_eq!(
            head(resp(200, &[("x", "1")]), Some(2)),
            Ok((
                "HTTP/1.1 200 OK\r\nx: 1\r\ncontent-length: 2\r\n\r\n".into(),
                false,
                true
            ))
        );
        assert_eq!(
            head(resp(200, &[]), None),
            Ok((
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".into(),
                true,
                true
            ))
        );
        assert_eq!(
            head(resp(404, &[]), Some(0)),
            Ok((
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into(),
                false,
                true
            ))
        );
        // A length the handler set is kept for a streamed body; two that differ refuse it.
        assert_eq!(
            head(resp(200, &[("content-length", "7")]), None),
            Ok((
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n".into(),
                false,
                true
            ))
        );
        assert!(head(
            resp(200, &[("content-length", "7"), ("content-length", "8")]),
            None
        )
        .is_err());
        assert!(head(resp(200, &[("content-length", "x")]), None).is_err());
        assert!(head(
            resp(
                200,
                &[("transfer-encoding", "chunked"), ("content-length", "8")]
            ),
            None
        )
        .is_err());
        // Transfer codings end in chunked; 204 and 304 carry no framing of their own.
        assert_eq!(
            head(resp(200, &[("transfer-encoding", "gzip")]), None),
            Ok((
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n".into(),
                true,
                true
            ))
        );
        assert_eq!(
            head(resp(204, &[]), None),
            Ok(("HTTP/1.1 204 No Content\r\n\r\n".into(), false, true))
        );
        assert_eq!(
            head(resp(304, &[("content-length", "9")]), Some(0)),
            Ok(("HTTP/1.1 304 Not Modified\r\n\r\n".into(), false, true))
        );
        // Connection values join on one line; close ends the connection.
        assert_eq!(
            head(
                resp(200, &[("connection", "x-a"), ("connection", "close")]),
                Some(0)
            ),
            Ok((
                "HTTP/1.1 200 OK\r\nconnection: x-a, close\r\ncontent-length: 0\r\n\r\n".into(),
                false,
                false
            ))
        );
        // A custom reason is kept, an unknown status gets hyper's placeholder, a 1xx
        // answer becomes a 500.
        let mut custom = resp(200, &[]);
        custom
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(b"Fine"));
        assert_eq!(
            head(custom, Some(0)),
            Ok((
                "HTTP/1.1 200 Fine\r\ncontent-length: 0\r\n\r\n".into(),
                false,
                true
            ))
        );
        assert_eq!(
            head(resp(599, &[]), Some(0)),
            Ok((
                "HTTP/1.1 599 <none>\r\ncontent-length: 0\r\n\r\n".into(),
                false,
                true
            ))
        );
        assert_eq!(
            head(resp(103, &[("link", "x")]), None),
            Ok((
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".into(),
                false,
                false
            ))
        );
    }

    #[test]
    fn only_named_and_allowed_trailers_are_written() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("x-other", HeaderValue::from_static("1"));
        trailers.insert("content-type", HeaderValue::from_static("text/plain"));
        let allowed = [
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("content-type"),
        ];
        let mut out = Vec::new();
        encode_trailers(&trailers, &allowed, &mut out);
        assert_eq!(out, b"grpc-status: 0\r\n");
    }

    #[test]
    fn numbers_are_written_in_decimal_and_upper_case_hex() {
        for (n, radix, text) in [
            (0, 10, "0"),
            (20_000, 10, "20000"),
            (u64::MAX, 10, "18446744073709551615"),
            (0, 16, "0"),
            (20_000, 16, "4E20"),
            (u64::MAX, 16, "FFFFFFFFFFFFFFFF"),
        ] {
            let mut out = Vec::new();
            push_number(&mut out, n, radix);
            assert_eq!(out, text.as_bytes());
        }
    }

    #[test]
    fn the_date_is_an_http_date() {
        let mut out = Vec::new();
        write_date(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        let value = text
            .strip_prefix("date: ")
            .unwrap()
            .strip_suffix("\r\n")
            .unwrap();
        assert!(httpdate::parse_http_date(value).is_ok(), "{value}");
    }
}
