//! Request routing and the plain HTTP routes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::body::{AppBody, Paced};
use crate::counters::{Admission, App};
use crate::{grpc, websocket};

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");
const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");

/// Upper bound for millisecond parameters: long enough for any test, and
/// far from the overflow that deadlines near `u64::MAX` would cause.
const MAX_MS: u64 = 24 * 60 * 60 * 1000;
/// `/stream` allocates each chunk, so its size is bounded.
const MAX_CHUNK_SIZE: usize = 16 * 1024 * 1024;

/// Returned by the service to make hyper drop the connection with no
/// response, which is what `/close` is for.
#[derive(Debug)]
pub struct DropConnection;

impl fmt::Display for DropConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for DropConnection {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Hello,
    Echo,
    Headers,
    Delay,
    Status,
    Bytes,
    Stream,
    Sse,
    WebSocket,
    Reset,
    Close,
    Hang,
    HangBody,
    Crash,
    Healthz,
    Ready,
    Stats,
    StatsReset,
    GrpcHealth,
    NotFound,
}

impl Route {
    fn of(path: &str) -> Self {
        match path {
            "/" | "/hello" => Route::Hello,
            "/echo" => Route::Echo,
            "/headers" => Route::Headers,
            "/delay" => Route::Delay,
            "/status" => Route::Status,
            "/bytes" => Route::Bytes,
            "/stream" => Route::Stream,
            "/sse" => Route::Sse,
            "/ws" => Route::WebSocket,
            "/reset" => Route::Reset,
            "/close" => Route::Close,
            "/hang" => Route::Hang,
            "/hang-body" => Route::HangBody,
            "/crash" => Route::Crash,
            "/healthz" => Route::Healthz,
            "/ready" => Route::Ready,
            "/stats" => Route::Stats,
            "/stats/reset" => Route::StatsReset,
            p if p.starts_with(grpc::SERVICE_PREFIX) => Route::GrpcHealth,
            _ => Route::NotFound,
        }
    }
}

/// The hyper service: every request on every connection comes through here.
pub async fn handle(
    app: &'static App,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, DropConnection> {
    // Probes and the test harness's own bookkeeping must not disturb the
    // concurrency measurement they are there to read.
    let route = Route::of(req.uri().path());
    match route {
        Route::Stats => return Ok(json(app.counters.to_json())),
        Route::StatsReset => {
            app.counters.reset();
            return Ok(text(StatusCode::OK, "ok"));
        }
        Route::Healthz => return Ok(healthz(app, &req)),
        Route::Ready => return Ok(ready(app, &req)),
        Route::GrpcHealth => return Ok(grpc::health(app, req).await),
        _ => {}
    }

    let in_flight = match app.counters.enter() {
        Admission::Admitted(in_flight) => in_flight,
        Admission::Exceeded(in_flight) => {
            let mut response = text(StatusCode::INTERNAL_SERVER_ERROR, "concurrency exceeded");
            response.body_mut().hold(in_flight);
            return Ok(response);
        }
    };
    if route == Route::WebSocket {
        // The request is over once the 101 goes out; the guard drops here.
        return Ok(websocket::upgrade(req));
    }
    // The guard lives across the await below, so /delay and /hang stay in
    // flight while they wait, and a dropped /hang releases it.
    let mut response = serve(route, req).await?;
    response.body_mut().hold(in_flight);
    Ok(response)
}

async fn serve(route: Route, req: Request<Incoming>) -> Result<Response<AppBody>, DropConnection> {
    let query = req.uri().query();
    let response = match route {
        Route::Hello => text(StatusCode::OK, "hello world\n"),
        Route::Echo => echo(req),
        Route::Headers => headers(&req),
        Route::Delay => match param_or(query, "ms", 0u64, MAX_MS) {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, "ok")
            }
            Err(bad) => bad.into_response(),
        },
        Route::Status => status(query).unwrap_or_else(BadParam::into_response),
        Route::Bytes => bytes(query).unwrap_or_else(BadParam::into_response),
        Route::Stream => stream(query).unwrap_or_else(BadParam::into_response),
        Route::Sse => sse(query).unwrap_or_else(BadParam::into_response),
        Route::Reset => plain_ok(AppBody::fail_after(Bytes::from_static(b"partial"))),
        Route::Close => return Err(DropConnection),
        Route::Hang => std::future::pending().await,
        Route::HangBody => plain_ok(AppBody::hang_after(Bytes::from_static(b"started\n"))),
        // Exit at once, without unwinding or flushing, like a real crash.
        Route::Crash => std::process::exit(3),
        Route::NotFound => text(StatusCode::NOT_FOUND, "not found"),
        // Answered in `handle` without counting.
        Route::WebSocket
        | Route::Healthz
        | Route::Ready
        | Route::Stats
        | Route::StatsReset
        | Route::GrpcHealth => text(StatusCode::INTERNAL_SERVER_ERROR, "misrouted"),
    };
    Ok(response)
}

/// A response with a fixed body.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AppBody> {
    let mut response = Response::new(AppBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    response
}

fn plain_ok(body: AppBody) -> Response<AppBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    response
}

fn json(body: impl Into<Bytes>) -> Response<AppBody> {
    let mut response = Response::new(AppBody::full(body));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_JSON);
    response
}

fn echo(req: Request<Incoming>) -> Response<AppBody> {
    let content_type = req.headers().get(CONTENT_TYPE).cloned();
    let mut response = Response::new(AppBody::echo(req.into_body()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, content_type.unwrap_or(OCTET_STREAM));
    response
}

fn headers(req: &Request<Incoming>) -> Response<AppBody> {
    let mut headers = Map::new();
    for name in req.headers().keys() {
        let values = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        headers.insert(name.as_str().to_owned(), Value::Array(values));
    }
    // HTTP/2 carries the host as the :authority pseudo-header; report it as
    // `host` so checks need not care which protocol the proxy spoke.
    if !headers.contains_key("host") {
        if let Some(authority) = req.uri().authority() {
            headers.insert(
                "host".to_owned(),
                Value::Array(vec![Value::String(authority.as_str().to_owned())]),
            );
        }
    }
    let mut document = Map::new();
    document.insert("method".to_owned(), req.method().as_str().into());
    document.insert("uri".to_owned(), req.uri().to_string().into());
    // Debug is the canonical "HTTP/1.1" / "HTTP/2.0" spelling.
    document.insert("version".to_owned(), format!("{:?}", req.version()).into());
    document.insert("headers".to_owned(), Value::Object(headers));
    match serde_json::to_vec(&Value::Object(document)) {
        Ok(body) => json(body),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode headers",
        ),
    }
}

fn status(query: Option<&str>) -> Result<Response<AppBody>, BadParam> {
    let code = param(query, "code").and_then(|raw| raw.parse::<u16>().ok());
    // hyper cannot send an informational status as the final response.
    match code.filter(|&c| c >= 200).map(StatusCode::from_u16) {
        Some(Ok(status)) => Ok(text(status, format!("status {}", status.as_u16()))),
        _ => Err(BadParam::new("code", "a status code 200-999")),
    }
}

fn bytes(query: Option<&str>) -> Result<Response<AppBody>, BadParam> {
    let n = param_or(query, "n", 0u64, u64::MAX)?;
    let mut response = Response::new(AppBody::repeat(n));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, OCTET_STREAM);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    Ok(response)
}

fn stream(query: Option<&str>) -> Result<Response<AppBody>, BadParam> {
    let chunks = param_or(query, "chunks", 5u64, u64::MAX)?;
    let interval_ms = param_or(query, "interval_ms", 0u64, MAX_MS)?;
    let size = param_or(query, "size", 16usize, MAX_CHUNK_SIZE)?;
    if size == 0 {
        // An empty chunk would end a chunked HTTP/1.1 body early.
        return Err(BadParam::new("size", "at least 1"));
    }
    let body = Paced::new(
        chunks,
        Duration::from_millis(interval_ms),
        size,
        stream_chunk,
    );
    Ok(plain_ok(AppBody::paced(body)))
}

/// `chunk <i>` padded with dots to `size - 1` bytes, then a newline; cut
/// short when `size` is too small for the label.
fn stream_chunk(index: u64, size: usize) -> Bytes {
    let mut chunk = format!("chunk {index}").into_bytes();
    chunk.resize(size - 1, b'.');
    chunk.push(b'\n');
    Bytes::from(chunk)
}

fn sse(query: Option<&str>) -> Result<Response<AppBody>, BadParam> {
    let events = param_or(query, "events", 5u64, u64::MAX)?;
    let interval_ms = param_or(query, "interval_ms", 0u64, MAX_MS)?;
    let body = Paced::new(events, Duration::from_millis(interval_ms), 0, |index, _| {
        Bytes::from(format!("data: event {index}\n\n"))
    });
    let mut response = Response::new(AppBody::paced(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, EVENT_STREAM);
    headers.insert(CACHE_CONTROL, NO_CACHE);
    Ok(response)
}

/// Answers a queue-proxy's probe (`K-Network-Probe: queue`) as a queue-proxy would, with
/// body `queue`, so the activator can use the app as a pod directly: the bench's
/// "activator alone" row.
fn healthz(app: &App, req: &Request<Incoming>) -> Response<AppBody> {
    let queue_probe = req
        .headers()
        .get("k-network-probe")
        .is_some_and(|v| v.as_bytes() == b"queue");
    if app.is_ready() {
        text(StatusCode::OK, if queue_probe { "queue" } else { "ok" })
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

fn ready(app: &App, req: &Request<Incoming>) -> Response<AppBody> {
    match param(req.uri().query(), "state") {
        Some("on") => app.set_ready(true),
        Some("off") => app.set_ready(false),
        _ => return BadParam::new("state", "on or off").into_response(),
    }
    text(StatusCode::OK, "ok")
}

/// The value of the first `name=value` pair in `query`. Values are not
/// percent-decoded: every parameter here is a number or a plain word.
fn param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// A numeric parameter no greater than `max`, or `default` when absent.
fn param_or<T>(query: Option<&str>, name: &'static str, default: T, max: T) -> Result<T, BadParam>
where
    T: FromStr + PartialOrd + fmt::Display,
{
    match param(query, name) {
        None => Ok(default),
        Some(raw) => match raw.parse::<T>() {
            Ok(value) if value <= max => Ok(value),
            _ => Err(BadParam::new(name, format!("an integer 0-{max}"))),
        },
    }
}

/// A query parameter that could not be used; answered with a 400.
#[derive(Debug)]
struct BadParam {
    name: &'static str,
    expected: std::borrow::Cow<'static, str>,
}

impl BadParam {
    fn new(name: &'static str, expected: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self {
            name,
            expected: expected.into(),
        }
    }

    fn into_response(self) -> Response<AppBody> {
        text(
            StatusCode::BAD_REQUEST,
            format!(
                "bad query parameter {}: expected {}",
                self.name, self.expected
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::of("/"), Route::Hello);
        assert_eq!(Route::of("/stats/reset"), Route::StatsReset);
        assert_eq!(Route::of("/grpc.health.v1.Health/Check"), Route::GrpcHealth);
        assert_eq!(Route::of("/grpc.health.v1.Health/Watch"), Route::GrpcHealth);
        assert_eq!(Route::of("/hello/"), Route::NotFound);
    }

    #[test]
    fn query_params() {
        assert_eq!(param(Some("a=1&ms=20&ms=30"), "ms"), Some("20"));
        assert_eq!(param(Some("flag&x=1"), "flag"), Some(""));
        assert_eq!(param(Some("msx=1"), "ms"), None);
        assert_eq!(param(None, "ms"), None);
        assert_eq!(param_or(Some("ms=7"), "ms", 0u64, MAX_MS).ok(), Some(7));
        assert_eq!(param_or(None, "ms", 3u64, MAX_MS).ok(), Some(3));
        assert!(param_or(Some("ms=-1"), "ms", 0u64, MAX_MS).is_err());
        assert!(param_or(Some("ms=99999999999"), "ms", 0u64, MAX_MS).is_err());
    }

    #[test]
    fn stream_chunks_have_the_requested_size() {
        assert_eq!(&stream_chunk(3, 16)[..], b"chunk 3........\n");
        assert_eq!(&stream_chunk(12, 4)[..], b"chu\n");
        assert_eq!(&stream_chunk(0, 1)[..], b"\n");
    }
}
