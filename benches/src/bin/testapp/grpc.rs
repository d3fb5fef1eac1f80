//! A hand-rolled `grpc.health.v1.Health/Check`, enough for probes and for
//! tests that a proxy carries gRPC (HTTP/2, trailers) intact.
//!
//! The messages are tiny, so they are declared by hand with prost's derive
//! instead of generating them from the .proto with protoc.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use prost::Message;

use crate::body::AppBody;
use crate::counters::App;

/// Every method of the health service starts with this.
pub const SERVICE_PREFIX: &str = "/grpc.health.v1.Health/";
const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// The service name a client asks about to get NOT_SERVING.
const NOT_SERVING_SERVICE: &str = "notserving";

/// A health check request is a short service name; anything far bigger is
/// not a health check.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// gRPC length-prefixed message header: compressed flag + u32 length.
const FRAME_HEADER_LEN: usize = 5;

const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, Message)]
struct HealthCheckResponse {
    #[prost(enumeration = "ServingStatus", tag = "1")]
    status: i32,
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
enum ServingStatus {
    Unknown = 0,
    Serving = 1,
    NotServing = 2,
}

/// gRPC status codes this module answers with.
#[derive(Clone, Copy)]
enum Code {
    Ok = 0,
    InvalidArgument = 3,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
}

/// Answers any request under [`SERVICE_PREFIX`].
pub async fn health(app: &App, req: Request<Incoming>) -> Response<AppBody> {
    if req.uri().path() != CHECK_PATH {
        return trailers_only(Code::Unimplemented, "only Check is implemented");
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => {
            return trailers_only(Code::ResourceExhausted, "request too large")
        }
        Err(_) => return trailers_only(Code::Internal, "reading the request failed"),
    };
    let request = match decode_frame(&body).map(HealthCheckRequest::decode) {
        Ok(Ok(request)) => request,
        Ok(Err(_)) => return trailers_only(Code::InvalidArgument, "bad HealthCheckRequest"),
        Err(message) => return trailers_only(Code::InvalidArgument, message),
    };
    let status = if !app.is_ready() || request.service == NOT_SERVING_SERVICE {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    };
    let message = encode_frame(&HealthCheckResponse {
        status: status as i32,
    });

    let mut trailers = HeaderMap::new();
    trailers.insert(GRPC_STATUS, HeaderValue::from(Code::Ok as u32));
    let mut response = Response::new(AppBody::with_trailers(message, trailers));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_GRPC);
    response
}

/// Returns the single uncompressed message in a unary request body.
fn decode_frame(body: &[u8]) -> Result<&[u8], &'static str> {
    let (header, message) = body
        .split_first_chunk::<FRAME_HEADER_LEN>()
        .ok_or("request shorter than a gRPC frame header")?;
    if header[0] != 0 {
        return Err("compressed messages are not supported");
    }
    let declared = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if usize::try_from(declared).ok() != Some(message.len()) {
        return Err("gRPC frame length does not match the body");
    }
    Ok(message)
}

fn encode_frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + len);
    buf.put_u8(0);
    // Health responses are a few bytes; they cannot overflow u32.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // `encode_raw` cannot fail: BytesMut grows as needed.
    message.encode_raw(&mut buf);
    buf.freeze()
}

/// An error answered the gRPC way: HTTP 200 whose headers carry the status
/// and no body, which gRPC clients read as trailers.
fn trailers_only(code: Code, message: &'static str) -> Response<AppBody> {
    let mut response = Response::new(AppBody::empty());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, APPLICATION_GRPC);
    headers.insert(GRPC_STATUS, HeaderValue::from(code as u32));
    // Messages here are plain ASCII, so they need no percent-encoding.
    headers.insert(GRPC_MESSAGE, HeaderValue::from_static(message));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frame = encode_frame(&HealthCheckRequest {
            service: "svc".to_owned(),
        });
        assert_eq!(&frame[..], b"\0\0\0\0\x05\x0a\x03svc");
        let message = decode_frame(&frame).unwrap_or_default();
        assert_eq!(
            HealthCheckRequest::decode(message).map(|r| r.service).ok(),
            Some("svc".to_owned())
        );
    }

    #[test]
    fn serving_status_wire_format() {
        let frame = encode_frame(&HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        });
        assert_eq!(&frame[..], b"\0\0\0\0\x02\x08\x01");
        // proto3 leaves default values off the wire.
        let frame = encode_frame(&HealthCheckResponse {
            status: ServingStatus::Unknown as i32,
        });
        assert_eq!(&frame[..], b"\0\0\0\0\0");
    }

    #[test]
    fn bad_frames_are_rejected() {
        assert!(decode_frame(b"\0\0\0").is_err());
        assert!(decode_frame(b"\x01\0\0\0\0").is_err());
        assert!(decode_frame(b"\0\0\0\0\x02\x08").is_err());
        assert_eq!(decode_frame(b"\0\0\0\0\0"), Ok(&b""[..]));
    }
}
