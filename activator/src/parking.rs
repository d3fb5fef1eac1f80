//! Requests parked before hyper.
//!
//! A request for a revision with no free pod may wait for seconds (a cold start), with
//! thousands of others beside it. Inside hyper, each would hold a connection's read buffer
//! (8 KiB), its task and its request future: about 26 KiB. So the first request of a
//! plain HTTP/1 connection is read and parsed here, before hyper gets the connection.
//! When its revision must wait, the request waits with its socket and the bytes read from
//! it, in the throttler's queue like any other request: FIFO with the rest, under the same
//! count and byte bounds, and for at most the revision's timeouts. A client that leaves
//! while waiting is seen at once (its socket reads end of file) and leaves the queue.
//!
//! Once the wait is over (a pod slot, or a refusal, or a timeout), the connection goes to
//! hyper with what was read, and the handler of its first request finds the outcome
//! ([`Admission`], through `Connection::take_admission`) instead of waiting again.
//!
//! Everything else goes to hyper at once, untouched: a head that does not parse or is too
//! large (hyper answers it), probes, HTTP/2, unknown hosts, a revision with a free slot,
//! and every request while tracing is on (a request's span must cover its wait).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use thaw_shared::serve::{BeforeHyper, Handoff, MAX_HEADER_BYTES};
use thaw_shared::stats::InFlight;
use thaw_shared::timeout::TimedOut;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::revision::Revision;
use crate::server::{State, CHUNKED_BODY_COST};
use crate::throttler::{PodPermit, ThrottleError};

/// Header lines parsed here; a request with more goes to hyper, which takes up to
/// `serve::MAX_HEADERS`.
const MAX_PARSED_HEADERS: usize = 64;

/// The most read from the socket in one call.
const READ_CHUNK: usize = 4096;

/// What a parked request may read past its head and counted body: the socket must be
/// read to see its client leave (end of file comes after any bytes sent before it), and a
/// client may pipeline its next request.
const READ_AHEAD: usize = 1024;

/// Parks the first request of each plain HTTP/1 connection whose revision must wait.
pub struct Parking {
    state: Arc<State>,
    read_header_timeout: Duration,
}

impl Parking {
    pub fn new(state: Arc<State>, read_header_timeout: Duration) -> Self {
        Self {
            state,
            read_header_timeout,
        }
    }
}

/// What the handler of a request parked here is told.
pub struct Admission {
    pub revision: Arc<Revision>,
    /// When the request arrived; its timeouts and cold-start wait count from here.
    pub started: Instant,
    /// The request counted as demand for the autoscaler since it arrived.
    pub in_flight: InFlight,
    /// No pod was ready when it arrived.
    pub cold: bool,
    /// The wait's outcome: a pod slot, the throttler's refusal, or a timeout.
    pub outcome: Result<Result<PodPermit, ThrottleError>, TimedOut>,
}

impl BeforeHyper for Parking {
    async fn run(&self, stream: TcpStream, _peer: SocketAddr) -> Option<Handoff> {
        let deadline = Instant::now() + self.read_header_timeout;
        let mut read = BytesMut::new();
        let parked = loop {
            // A client that sends no whole head in time is closed, as hyper would.
            match tokio::time::timeout_at(deadline, read_more(&stream, &mut read, MAX_HEADER_BYTES))
                .await
            {
                Err(_) | Ok(Read::Closed) => return None,
                // Too large to be a head: hyper reads on and answers `431`.
                Ok(Read::Full) => return Some(handoff(stream, read, None)),
                Ok(Read::More) => {}
            }
            match inspect(&read, &self.state) {
                Inspect::Partial => continue,
                Inspect::Hyper => return Some(handoff(stream, read, None)),
                Inspect::Park(parked) => break parked,
            }
        };
        let Parked {
            revision,
            head_len,
            body_cost,
        } = parked;
        let state = &self.state;
        let cold = revision.throttler.ready_pods() == 0;
        if cold {
            state.platform.need_capacity(&revision.spec.id);
        }
        let started = Instant::now();
        let in_flight = state.stats.arrive(&revision.spec.id, &revision.load);
        // What was read, in an allocation of its own size: the read buffer grew by
        // doubling. The socket is read on only to see the client leave, up to what the
        // byte budget counts for this request's body and a little more.
        let mut held = BytesMut::from(&read[..]);
        drop(read);
        let cap = held.len().max(head_len + body_cost) + READ_AHEAD;
        let wait = revision
            .spec
            .timeouts
            .before_first_byte(started, revision.throttler.acquire(body_cost as u64));
        let outcome = tokio::select! {
            outcome = wait => outcome,
            () = client_leaves(&stream, &mut held, cap) => return None,
        };
        let admission = Admission {
            revision,
            started,
            in_flight,
            cold,
            outcome,
        };
        Some(handoff(stream, held, Some(Box::new(admission))))
    }
}

fn handoff(
    stream: TcpStream,
    read: BytesMut,
    admission: Option<Box<dyn std::any::Any + Send>>,
) -> Handoff {
    Handoff {
        stream,
        read: read.freeze(),
        admission,
    }
}

/// What one read from the client gave.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Bytes (or a spurious wake-up): read on.
    More,
    /// `cap` bytes are held; nothing more is read.
    Full,
    /// End of file or an error: the client is gone.
    Closed,
}

/// Waits until the client sends something, then reads it into `buf`, up to `cap` bytes
/// in all.
async fn read_more(stream: &TcpStream, buf: &mut BytesMut, cap: usize) -> Read {
    if buf.len() >= cap {
        return Read::Full;
    }
    if stream.readable().await.is_err() {
        return Read::Closed;
    }
    read_now(stream, buf, cap)
}

fn read_now(stream: &TcpStream, buf: &mut BytesMut, cap: usize) -> Read {
    let room = cap.saturating_sub(buf.len()).min(READ_CHUNK);
    if room == 0 {
        return Read::Full;
    }
    let mut chunk = [0u8; READ_CHUNK];
    match stream.try_read(&mut chunk[..room]) {
        Ok(0) => Read::Closed,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Read::More
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read::More,
        Err(_) => Read::Closed,
    }
}

/// Resolves when the client of a parked request goes away. Bytes it sends meanwhile (its
/// body, a pipelined request) are kept, up to `cap`; past that the socket is left alone.
async fn client_leaves(stream: &TcpStream, buf: &mut BytesMut, cap: usize) {
    loop {
        match read_more(stream, buf, cap).await {
            Read::Closed => return,
            Read::More => {}
            Read::Full => return std::future::pending().await,
        }
    }
}

/// A request that must wait for its revision.
struct Parked {
    revision: Arc<Revision>,
    head_len: usize,
    /// What it counts against the waiting requests' byte budget, as in the server.
    body_cost: usize,
}

/// What to do with the bytes read so far.
enum Inspect {
    /// Not a whole head yet.
    Partial,
    /// Hyper's to serve, now.
    Hyper,
    Park(Parked),
}

/// Parses the head in `buf` and decides whether its request waits here.
fn inspect(buf: &[u8], state: &State) -> Inspect {
    if state.tracing {
        return Inspect::Hyper;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_PARSED_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Inspect::Partial,
        // Malformed, HTTP/2's preface, or more header lines than parsed here.
        Err(_) => return Inspect::Hyper,
    };
    // HTTP/1.1 in origin form only; anything rarer is hyper's and the handler's.
    if req.version != Some(1) || !req.path.is_some_and(|p| p.starts_with('/')) {
        return Inspect::Hyper;
    }
    let mut names = Names::default();
    for h in req.headers.iter() {
        if !names.note(h.name, h.value) {
            return Inspect::Hyper;
        }
    }
    // Exactly one Host, and no framing a smuggler could play with: the handler refuses
    // the rest, so they gain nothing from waiting first.
    if names.hosts != 1 || (names.chunked && names.content_length.is_some()) {
        return Inspect::Hyper;
    }
    let Some(revision) = state.registry.identify_by(
        names.revision,
        names.namespace,
        names.host,
        &state.cluster_domain,
    ) else {
        return Inspect::Hyper;
    };
    if !revision.throttler.would_wait() {
        return Inspect::Hyper;
    }
    let body_cost = match names.content_length {
        _ if names.chunked => CHUNKED_BODY_COST,
        Some(n) => n.min(CHUNKED_BODY_COST),
        None => 0,
    };
    Inspect::Park(Parked {
        revision,
        head_len,
        // At most CHUNKED_BODY_COST (64 KiB), so it fits.
        body_cost: usize::try_from(body_cost).unwrap_or(usize::MAX),
    })
}

/// The headers that decide where a request goes, and whether it may wait here.
#[derive(Default)]
struct Names<'a> {
    host: Option<&'a str>,
    hosts: usize,
    revision: Option<&'a str>,
    namespace: Option<&'a str>,
    content_length: Option<u64>,
    chunked: bool,
}

impl<'a> Names<'a> {
    /// Notes one header line; false when the request is not one to park here.
    fn note(&mut self, name: &str, value: &'a [u8]) -> bool {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("host") {
            self.hosts += 1;
            self.host = visible(value);
        } else if is("k-network-probe") || is("k-kubelet-probe") {
            // Probes are answered at once, by the handler.
            return false;
        } else if is("user-agent") {
            if value.starts_with(thaw_shared::headers::KUBE_PROBE_UA_PREFIX.as_bytes()) {
                return false;
            }
        } else if is("knative-serving-revision") {
            self.revision = self.revision.or(visible(value).filter(|v| !v.is_empty()));
        } else if is("knative-serving-namespace") {
            self.namespace = self.namespace.or(visible(value).filter(|v| !v.is_empty()));
        } else if is("content-length") {
            let parsed = visible(value).and_then(|v| v.trim().parse::<u64>().ok());
            match (self.content_length, parsed) {
                (None, Some(n)) => self.content_length = Some(n),
                // Repeated or unreadable: hyper decides what that means.
                _ => return false,
            }
        } else if is("transfer-encoding") {
            self.chunked = true;
        }
        true
    }
}

/// A header value as text, if it is visible ASCII (what `HeaderValue::to_str` accepts).
fn visible(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(lines: &[(&str, &str)]) -> Option<Names<'static>> {
        let mut n = Names::default();
        for (name, value) in lines {
            let value: &'static str = Box::leak(value.to_string().into_boxed_str());
            if !n.note(name, value.as_bytes()) {
                return None;
            }
        }
        Some(n)
    }

    #[test]
    fn probes_and_doubtful_framing_are_not_parked() {
        assert!(names(&[("K-Network-Probe", "queue")]).is_none());
        assert!(names(&[("k-kubelet-probe", "1")]).is_none());
        assert!(names(&[("User-Agent", "kube-probe/1.37")]).is_none());
        assert!(names(&[("Content-Length", "3"), ("content-length", "3")]).is_none());
        assert!(names(&[("Content-Length", "x")]).is_none());
        assert!(names(&[("User-Agent", "curl/8")]).is_some());
    }

    #[test]
    fn routing_headers_are_read_as_the_registry_reads_them() {
        let n = names(&[
            ("Host", "hello.default.example.com"),
            ("Knative-Serving-Revision", "hello-00001"),
            ("knative-serving-revision", "other"),
            ("Knative-Serving-Namespace", ""),
            ("Transfer-Encoding", "chunked"),
        ])
        .unwrap();
        assert_eq!(n.host, Some("hello.default.example.com"));
        assert_eq!(n.hosts, 1);
        assert_eq!(
            n.revision,
            Some("hello-00001"),
            "the first one, as HeaderMap::get"
        );
        assert_eq!(n.namespace, None, "empty counts as absent");
        assert!(n.chunked);
        assert_eq!(visible(b"caf\xc3\xa9"), None);
    }
}
