//! OTLP/gRPC on the wire, without a gRPC stack: one unary call is an HTTP/2 POST of a
//! length-prefixed protobuf message, answered with a `grpc-status` (in the trailers, or
//! in the headers of a trailers-only answer). The exporter's OTLP/HTTP request already
//! holds the `ExportTraceServiceRequest` protobuf, so the export client frames it, and
//! turns the gRPC outcome back into the HTTP answer the exporter understands.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, TE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};

/// A message bigger than gRPC's 4-byte length can say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an export of {0} bytes does not fit one gRPC message")]
pub(super) struct TooLarge(usize);

/// The gRPC call for the exporter's OTLP/HTTP request: the same URI (the export method's,
/// chosen at start), the protobuf body in a gRPC frame, gRPC's headers. Other headers
/// (`OTEL_EXPORTER_OTLP_HEADERS`) go along as the call's metadata.
pub(super) fn request(req: Request<Bytes>) -> Result<Request<Bytes>, TooLarge> {
    let (mut parts, body) = req.into_parts();
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    // gRPC requires it: it says the client reads trailers, where the status is.
    parts
        .headers
        .insert(TE, HeaderValue::from_static("trailers"));
    // The body is never compressed (the exporter is built without compression), and gRPC
    // would name it in grpc-encoding anyway.
    parts.headers.remove(CONTENT_ENCODING);
    parts.version = http::Version::HTTP_2;
    Ok(Request::from_parts(parts, frame(&body)?))
}

/// gRPC's length-prefixed message: compressed flag 0, the length as 4 bytes big-endian,
/// the message.
pub(super) fn frame(message: &[u8]) -> Result<Bytes, TooLarge> {
    let len = u32::try_from(message.len()).map_err(|_| TooLarge(message.len()))?;
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(len);
    out.extend_from_slice(message);
    Ok(out.freeze())
}

/// The first message of a response body, if it holds a whole uncompressed one.
fn unframe(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    if flag != 0 {
        return None;
    }
    rest.get(4..4 + len)
}

/// A call that did not end with status OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Failure {
    /// The `grpc-status`; `None` when the answer had none (a proxy's error page, an
    /// HTTP/1 server).
    pub code: Option<u32>,
    /// The HTTP status of the answer.
    pub http: StatusCode,
    /// The `grpc-message`, percent-decoded.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => {
                write!(
                    f,
                    "collector answered grpc-status {code} ({})",
                    code_name(code)
                )?;
                if !self.message.is_empty() {
                    write!(f, ": {}", self.message)?;
                }
                Ok(())
            }
            None => write!(
                f,
                "collector answered HTTP {} without a grpc-status",
                self.http
            ),
        }
    }
}

impl Failure {
    /// The HTTP status that makes the exporter retry exactly when OTLP/gRPC says to:
    /// 503 for the retryable codes (CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE,
    /// UNAVAILABLE, DATA_LOSS), 500 for the others (RESOURCE_EXHAUSTED too: OTLP retries
    /// it only with a RetryInfo, which is not read here). Without a grpc-status, the HTTP
    /// error itself (gRPC maps 429/502/503/504 to UNAVAILABLE, as OTLP/HTTP retries them).
    pub fn for_exporter(&self) -> StatusCode {
        match self.code {
            Some(1 | 4 | 10 | 11 | 14 | 15) => StatusCode::SERVICE_UNAVAILABLE,
            Some(_) => StatusCode::INTERNAL_SERVER_ERROR,
            None if self.http.is_client_error() || self.http.is_server_error() => self.http,
            None => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The answer the exporter gets for this failure.
    pub fn response(&self) -> Response<Bytes> {
        let mut resp = Response::new(Bytes::new());
        *resp.status_mut() = self.for_exporter();
        resp
    }
}

/// The outcome of a call from its answer: the response message on status OK, else why
/// not. The status is in the trailers, or in the headers of a trailers-only answer.
pub(super) fn outcome(
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
    body: &Bytes,
) -> Result<Bytes, Failure> {
    let found = trailers
        .filter(|t| t.contains_key("grpc-status"))
        .or_else(|| Some(headers).filter(|h| h.contains_key("grpc-status")));
    let Some(meta) = found else {
        return Err(Failure {
            code: None,
            http: status,
            message: String::new(),
        });
    };
    // An unreadable status is UNKNOWN (2), as gRPC's clients read it.
    let code = meta
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(2);
    if code == 0 {
        // The exporter reads a partial success from the message; none is fine too.
        return Ok(unframe(body).map_or_else(Bytes::new, |m| body.slice_ref(m)));
    }
    let message = meta
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    Err(Failure {
        code: Some(code),
        http: status,
        message,
    })
}

/// gRPC's status code names, for the log.
fn code_name(code: u32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "unknown code",
    }
}

/// `grpc-message` is percent-encoded UTF-8; a bad escape stays as it was.
fn percent_decode(raw: &[u8]) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = match (raw[i], raw.get(i + 1), raw.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)),
            _ => None,
        };
        match escaped {
            Some((h, l)) => {
                // Two hex digits make a byte.
                out.push(((h << 4) | l) as u8);
                i += 3;
            }
            None => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn a_message_is_framed_with_flag_and_big_endian_length() {
        assert_eq!(&frame(b"").unwrap()[..], [0, 0, 0, 0, 0]);
        assert_eq!(
            &frame(b"abc").unwrap()[..],
            [0, 0, 0, 0, 3, b'a', b'b', b'c']
        );
        let big = vec![7u8; 0x0001_0203];
        let framed = frame(&big).unwrap();
        assert_eq!(&framed[..5], [0, 0, 1, 2, 3]);
        assert_eq!(framed.len(), 5 + big.len());
        assert_eq!(unframe(&framed), Some(&big[..]));
        // Short, cut or compressed bodies hold no message to read.
        assert_eq!(unframe(&[0, 0, 0]), None);
        assert_eq!(unframe(&[0, 0, 0, 0, 4, 1, 2]), None);
        assert_eq!(unframe(&[1, 0, 0, 0, 1, 9]), None);
    }

    #[test]
    fn the_request_is_a_grpc_call_carrying_the_same_protobuf() {
        let req = Request::builder()
            .method("POST")
            .uri("http://c:4317/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            .header(CONTENT_TYPE, "application/x-protobuf")
            .header("x-tenant", "a")
            .body(Bytes::from_static(b"\x0a\x02hi"))
            .unwrap();
        let call = request(req).unwrap();
        assert_eq!(call.method(), http::Method::POST);
        assert_eq!(call.version(), http::Version::HTTP_2);
        assert_eq!(
            call.uri().path(),
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert_eq!(call.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(call.headers()[TE], "trailers");
        assert_eq!(call.headers()["x-tenant"], "a");
        assert_eq!(&call.body()[..], b"\x00\x00\x00\x00\x04\x0a\x02hi");
    }

    #[test]
    fn status_ok_in_the_trailers_gives_the_response_message() {
        let body = frame(b"\x0a\x00").unwrap();
        let ok = outcome(
            StatusCode::OK,
            &headers(&[("content-type", "application/grpc")]),
            Some(&headers(&[("grpc-status", "0")])),
            &body,
        );
        assert_eq!(ok.unwrap(), Bytes::from_static(b"\x0a\x00"));
        // An OK without a message is still OK.
        let ok = outcome(
            StatusCode::OK,
            &HeaderMap::new(),
            Some(&headers(&[("grpc-status", "0")])),
            &Bytes::new(),
        );
        assert_eq!(ok.unwrap(), Bytes::new());
    }

    #[test]
    fn an_error_status_is_a_failure_in_trailers_or_trailers_only() {
        // Trailers-only: the status is in the headers, and there is no body.
        let failure = outcome(
            StatusCode::OK,
            &headers(&[
                ("grpc-status", "14"),
                ("grpc-message", "the%20collector%20is%20busy%3A%20%E2%9C%8B"),
            ]),
            None,
            &Bytes::new(),
        )
        .unwrap_err();
        assert_eq!(failure.code, Some(14));
        assert_eq!(
            failure.to_string(),
            "collector answered grpc-status 14 (UNAVAILABLE): the collector is busy: ✋"
        );
        assert_eq!(failure.for_exporter(), StatusCode::SERVICE_UNAVAILABLE);
        // In the trailers, which win over the headers.
        let failure = outcome(
            StatusCode::OK,
            &headers(&[("grpc-status", "0")]),
            Some(&headers(&[("grpc-status", "3"), ("grpc-message", "bad")])),
            &Bytes::new(),
        )
        .unwrap_err();
        assert_eq!(
            failure.to_string(),
            "collector answered grpc-status 3 (INVALID_ARGUMENT): bad"
        );
        assert_eq!(failure.for_exporter(), StatusCode::INTERNAL_SERVER_ERROR);
        // RESOURCE_EXHAUSTED without RetryInfo is not retried, as OTLP says.
        let exhausted = Failure {
            code: Some(8),
            http: StatusCode::OK,
            message: String::new(),
        };
        assert_eq!(exhausted.for_exporter(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            exhausted.to_string(),
            "collector answered grpc-status 8 (RESOURCE_EXHAUSTED)"
        );
        // An unreadable status is UNKNOWN.
        let unknown = outcome(
            StatusCode::OK,
            &headers(&[("grpc-status", "fine")]),
            None,
            &Bytes::new(),
        )
        .unwrap_err();
        assert_eq!(unknown.code, Some(2));
    }

    #[test]
    fn an_answer_without_grpc_status_fails_with_its_http_status() {
        let failure = outcome(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            None,
            &Bytes::new(),
        )
        .unwrap_err();
        assert_eq!(
            failure.to_string(),
            "collector answered HTTP 502 Bad Gateway without a grpc-status"
        );
        // Retried as a gRPC client retries UNAVAILABLE.
        assert_eq!(failure.response().status(), StatusCode::BAD_GATEWAY);
        let failure = outcome(StatusCode::OK, &HeaderMap::new(), None, &Bytes::new()).unwrap_err();
        assert_eq!(failure.for_exporter(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode(b"a%20b"), "a b");
        assert_eq!(percent_decode(b"100%"), "100%");
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
        assert_eq!(percent_decode(b"%E2%9C%8B"), "✋");
    }
}
