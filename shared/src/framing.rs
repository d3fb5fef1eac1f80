//! Where a request says it is going, and how large its head is, checked before anything
//! else reads it.
//!
//! hyper parses the message, but leaves the `Host` rules of RFC 9110 §7.2 and RFC 9112
//! §3.2 to the application. A proxy that skips them forwards requests whose
//! target is ambiguous: two `Host` headers that an app and a cache may read differently, or
//! an absolute-form target naming one host and a `Host` header naming another. Go's
//! net/http (and so Knative's Go proxies) refuses those with `400`; so does Thaw, with Go's
//! texts.

use http::header::{CONNECTION, HOST};
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Version};

use crate::body::{text, ResponseBody};
use crate::serve::MAX_HEADER_BYTES;

/// Why a request is refused. Each is answered with `400` and this text, but a head too
/// large with `431`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Go's text for its `431`.
    #[error("431 Request Header Fields Too Large")]
    HeadTooLarge,
    #[error("too many Host headers")]
    DuplicateHost,
    #[error("missing required Host header")]
    MissingHost,
    #[error("malformed Host header")]
    MalformedHost,
}

/// Checks the request's `Host` and, for an absolute-form target, makes `Host` name the
/// target's authority, as RFC 9112 §3.2.2 says a server must. Only headers change: where
/// a request is sent stays the proxy's choice.
///
/// An HTTP/1 head over [`MAX_HEADER_BYTES`] is refused too. hyper refuses one only while
/// it is still incomplete in its read buffer; a head that arrives whole in a large read
/// gets past it.
pub fn check_target<B>(req: &mut Request<B>) -> Result<(), FramingError> {
    if req.version() != Version::HTTP_2 && head_len_at_least(req) > MAX_HEADER_BYTES {
        return Err(FramingError::HeadTooLarge);
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(FramingError::DuplicateHost);
    }
    match (host, req.version()) {
        (Some(host), _) if !valid_host(host) => return Err(FramingError::MalformedHost),
        // RFC 9112 §3.2: a server must refuse an HTTP/1.1 request without `Host`.
        (None, Version::HTTP_11) => return Err(FramingError::MissingHost),
        _ => {}
    }
    if req.version() == Version::HTTP_2 {
        // A `Host` beside `:authority` is the host the request is routed by and the one
        // the app is sent as `:authority` (the proxy sets it, as Go's proxy sends
        // `req.Host`), so nothing downstream sees two hosts.
        return Ok(());
    }
    let authority = req.uri().authority();
    if req.uri().scheme().is_some() {
        // Absolute form (`GET http://a.example/ HTTP/1.1`): the target's authority is the
        // host, whatever `Host` says.
        if let Some(value) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            req.headers_mut().insert(HOST, value);
        }
    }
    Ok(())
}

/// The fewest bytes the request's HTTP/1 head can have taken on the wire: its target, and
/// each header line without spaces around the value. What it took is at most a few
/// bytes more per line (spaces, a `\r` before each `\n`).
fn head_len_at_least<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let lines: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 2)
        .sum();
    // "GET " + target + " HTTP/1.1\n" ... "\n"
    req.method().as_str().len() + target + lines + 12
}

/// A `Host` is empty (allowed when the target has no authority) or a bare `host[:port]`:
/// no user info, a numeric port, nothing an authority parser would not accept.
fn valid_host(host: &HeaderValue) -> bool {
    let bytes = host.as_bytes();
    bytes.is_empty() || plain_host(bytes) || parsed_host(bytes)
}

/// Whether an authority parser takes `bytes` as a bare `host[:port]`.
fn parsed_host(bytes: &[u8]) -> bool {
    if bytes.contains(&b'@') {
        return false;
    }
    let Ok(authority) = Authority::try_from(bytes) else {
        return false;
    };
    // The parser accepts any text after the last `:`; only a port number is a port.
    authority.as_str().len() == authority.host().len() || authority.port_u16().is_some()
}

/// A host name or IPv4 address of letters, digits, `.`, `-` and `_`, then perhaps `:` and
/// a port of one to five digits no larger than 65535: what nearly every `Host` is, and a
/// subset of what [`valid_host`]'s parse accepts. That parse copies the value into an
/// `Authority` first (callgrind: 1 100 instructions per request, 4 % of the
/// queue-proxy's); this says yes without it, and leaves anything else to the parse.
fn plain_host(bytes: &[u8]) -> bool {
    let (name, port) = match bytes.iter().position(|&b| b == b':') {
        Some(colon) => (&bytes[..colon], Some(&bytes[colon + 1..])),
        None => (bytes, None),
    };
    let name_ok = !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    let port_ok = port.is_none_or(|p| {
        (1..=5).contains(&p.len())
            && p.iter().all(u8::is_ascii_digit)
            && p.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= u32::from(u16::MAX)
    });
    name_ok && port_ok
}

/// The `400` for a refused target. The connection closes after it: once a client has sent
/// an ambiguous request, what follows on that connection cannot be trusted either.
pub fn refuse<G>(err: FramingError) -> Response<ResponseBody<G>> {
    let status = match err {
        FramingError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut resp = text(status, err.to_string());
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn one_valid_host_passes() {
        for host in ["a.example", "a.example:8080", "10.0.0.1:80", "[::1]:80", ""] {
            let mut r = req(Version::HTTP_11, "/", &[host]);
            assert_eq!(check_target(&mut r), Ok(()), "{host}");
            assert_eq!(r.headers()[HOST], host);
        }
    }

    #[test]
    fn duplicate_missing_and_malformed_hosts_are_refused() {
        let mut r = req(Version::HTTP_11, "/", &["a", "b"]);
        assert_eq!(check_target(&mut r), Err(FramingError::DuplicateHost));
        let mut r = req(Version::HTTP_11, "/", &["a", "a"]);
        assert_eq!(check_target(&mut r), Err(FramingError::DuplicateHost));
        let mut r = req(Version::HTTP_11, "/", &[]);
        assert_eq!(check_target(&mut r), Err(FramingError::MissingHost));
        for bad in ["user@a.example", "a b", "a/b", "a.example:port", "a?b"] {
            let mut r = req(Version::HTTP_11, "/", &[bad]);
            assert_eq!(
                check_target(&mut r),
                Err(FramingError::MalformedHost),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_plain_host_shortcut_says_yes_only_where_the_parse_does() {
        let hosts = [
            "a",
            "a.example",
            "a-b_c.example",
            "10.0.0.1",
            "a:0",
            "a:80",
            "a:65535",
            "a:00080",
            "a:65536",
            "a:99999",
            "a:123456",
            "a:",
            ":80",
            "a::80",
            "a:8a",
            "a b",
            "a/b",
            "a?b",
            "a#b",
            "a%41",
            "[::1]",
            "[::1]:80",
            "a@b",
            "a.example.",
            "-a",
            "_",
        ];
        for host in hosts {
            let plain = plain_host(host.as_bytes());
            let parsed = parsed_host(host.as_bytes());
            assert!(!plain || parsed, "{host:?}: shortcut yes, parse no");
        }
        for yes in ["a.example", "10.0.0.1:8080", "a:65535", "hello.default.svc"] {
            assert!(plain_host(yes.as_bytes()), "{yes}");
        }
        for left_to_the_parse in ["a:65536", "a:", ":80", "[::1]:80", "a%41", "a:123456"] {
            assert!(
                !plain_host(left_to_the_parse.as_bytes()),
                "{left_to_the_parse}"
            );
        }
        let mut r = req(Version::HTTP_11, "/", &["a.example:65536"]);
        assert_eq!(check_target(&mut r), Err(FramingError::MalformedHost));
    }

    #[test]
    fn http_1_0_may_omit_host() {
        let mut r = req(Version::HTTP_10, "/", &[]);
        assert_eq!(check_target(&mut r), Ok(()));
        assert!(r.headers().get(HOST).is_none());
    }

    #[test]
    fn absolute_form_replaces_host_with_the_target_authority() {
        let mut r = req(Version::HTTP_11, "http://b.example:81/p?q", &["a.example"]);
        assert_eq!(check_target(&mut r), Ok(()));
        assert_eq!(r.headers()[HOST], "b.example:81");
        assert_eq!(r.uri().path(), "/p");
    }

    #[test]
    fn h2_hosts_are_checked_like_http_1() {
        let mut r = req(Version::HTTP_2, "http://a.example/", &["b.example"]);
        assert_eq!(check_target(&mut r), Ok(()));
        let mut r = req(Version::HTTP_2, "http://a.example/", &["a", "b"]);
        assert_eq!(check_target(&mut r), Err(FramingError::DuplicateHost));
        // h2 carries no Host at all, normally.
        let mut r = req(Version::HTTP_2, "http://a.example/", &[]);
        assert_eq!(check_target(&mut r), Ok(()));
    }

    #[test]
    fn an_http1_head_over_the_limit_is_refused_with_431() {
        let target = format!("/{}", "p".repeat(1000));
        let mut under = req(Version::HTTP_11, &target, &["a"]);
        let value = "v".repeat(MAX_HEADER_BYTES - 1100);
        under.headers_mut().insert("x-big", value.parse().unwrap());
        assert_eq!(check_target(&mut under), Ok(()));
        let mut over = under.clone();
        let value = "v".repeat(MAX_HEADER_BYTES);
        over.headers_mut().insert("x-big", value.parse().unwrap());
        assert_eq!(check_target(&mut over), Err(FramingError::HeadTooLarge));
        // Many lines count as much as one long one; repeated names count each time.
        let mut lines = req(Version::HTTP_11, "/", &["a"]);
        for _ in 0..100 {
            lines
                .headers_mut()
                .append("x-many", "v".repeat(700).parse().unwrap());
        }
        assert_eq!(check_target(&mut lines), Err(FramingError::HeadTooLarge));
        let resp: Response<ResponseBody<()>> = refuse(FramingError::HeadTooLarge);
        assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // HTTP/2's header list is limited by the h2 server itself.
        let mut h2 = req(Version::HTTP_2, "http://a/", &[]);
        h2.headers_mut().insert("x-big", value.parse().unwrap());
        assert_eq!(check_target(&mut h2), Ok(()));
    }

    #[test]
    fn refusals_close_the_connection() {
        let resp: Response<ResponseBody<()>> = refuse(FramingError::MissingHost);
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()[CONNECTION], "close");
    }
}
