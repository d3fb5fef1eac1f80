//! An app written byte by byte, for tests that need responses a well-behaved server
//! library never sends: 151 header lines, `Content-Length` beside `Transfer-Encoding`,
//! chunked trailers, `103 Early Hints`. It also keeps every request head it receives, so a
//! test can see exactly what the proxy forwarded.
//!
//! Routes, by path:
//! - `/many-headers`: `200` with 151 `x-h-N` headers and body `ok`;
//! - `/cl-te`: `200` with `Content-Length: 5` *and* chunked `hello world`;
//! - `/trailers`: chunked `hello`, then the trailer `x-checksum: abc123`, announced by
//!   `Trailer`;
//! - `/early-hints`: `103` with a `Link`, then `200 ok`;
//! - `/slurp`: reads the request body until the connection ends, never answers;
//! - `/big-head`: a `200` whose head is over 64 KiB;
//! - anything else: `200 ok`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The raw app, serving on loopback until dropped.
pub struct RawApp {
    pub addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl RawApp {
    pub async fn start() -> RawApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(connection(stream, Arc::clone(&seen)));
            }
        });
        RawApp { addr, heads, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request head received so far, oldest first.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// The last head received for `path`.
    pub fn last_head(&self, path: &str) -> Option<String> {
        let prefix = format!(" {path} ");
        self.heads()
            .into_iter()
            .rev()
            .find(|h| h.lines().next().is_some_and(|l| l.contains(&prefix)))
    }
}

impl Drop for RawApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves requests on one connection, keep-alive, until the peer closes.
async fn connection(mut stream: TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut stream, &mut buf).await else {
            return;
        };
        let path = head
            .split(' ')
            .nth(1)
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_owned();
        let length = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok());
        heads.lock().unwrap().push(head);
        if path == "/slurp" {
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        // Bodies on other routes are short and length-delimited in these tests.
        if let Some(n) = length {
            while buf.len() < n {
                let mut more = [0u8; 4096];
                match stream.read(&mut more).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&more[..k]),
                }
            }
            buf.drain(..n);
        }
        let response = respond(&path);
        if stream.write_all(&response).await.is_err() {
            return;
        }
    }
}

fn respond(path: &str) -> Vec<u8> {
    match path {
        "/many-headers" => {
            let mut r = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
            for i in 0..151 {
                r.push_str(&format!("x-h-{i}: v{i}\r\n"));
            }
            r.push_str("\r\nok");
            r.into_bytes()
        }
        "/cl-te" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n\
b\r\nhello world\r\n0\r\n\r\n"
            .to_vec(),
        "/trailers" => {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
5\r\nhello\r\n0\r\nx-checksum: abc123\r\n\r\n"
                .to_vec()
        }
        "/cased" => {
            b"HTTP/1.1 200 OK\r\nX-Cased-Name: Value\r\nContent-Length: 2\r\n\r\nok".to_vec()
        }
        "/early-hints" => b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            .to_vec(),
        "/big-head" => {
            let mut r = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
            r.push_str(&format!("x-big: {}\r\n", "a".repeat(70 * 1024)));
            r.push_str("\r\nok");
            r.into_bytes()
        }
        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
    }
}

/// Reads one request head (up to the blank line), leaving any bytes after it in `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        let mut more = [0u8; 4096];
        match stream.read(&mut more).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&more[..n]),
        }
    }
}

/// The first value of header `name` (lowercase) in a head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Sends `request` on a fresh connection and reads until the peer closes (or 10 s pass),
/// for exchanges a client library would refuse to make or would hide.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut out),
    )
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `request` (which ends with `Connection: close`) as it is, and again without that line
/// and followed on its connection by a `GET /` that closes it. hyper's server answers the
/// first; the plain-request path (`shared/src/downstream_h1.rs`) answers the second, then
/// hands the connection to hyper for the `GET /`. Each check runs on both.
pub async fn exchange_both(addr: SocketAddr, host: &str, request: &str) -> [String; 2] {
    assert!(request.contains("Connection: close\r\n"), "{request}");
    let plain = format!(
        "{}GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        request.replacen("Connection: close\r\n", "", 1)
    );
    [
        exchange(addr, request.as_bytes()).await,
        exchange(addr, plain.as_bytes()).await,
    ]
}

/// The start of a response, for assertion messages about responses that may be huge.
pub fn short(text: &str) -> &str {
    let end = text.char_indices().nth(400).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

/// The status code of the first response in `text`.
pub fn status_of(text: &str) -> Option<u16> {
    text.split(' ').nth(1)?.parse().ok()
}

/// The checks of RFC 9110/9112 framing every Thaw front (the queue-proxy, the activator
/// before it) must pass. `front` is where a client connects; `host` routes a request to
/// the raw app behind it.
pub mod checks {
    use super::*;

    /// Two `Host` headers, none on HTTP/1.1, or a malformed one: `400`, the connection
    /// closed, and nothing reaches the app. HTTP/1.0 may omit `Host`.
    pub async fn host_rules(front: SocketAddr, host: &str, app: &RawApp) {
        let before = app.heads().len();
        for (what, req) in [
            (
                "two Host headers",
                format!("GET /h HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\n\r\n"),
            ),
            (
                "the same Host twice",
                format!("GET /h HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n"),
            ),
            ("no Host", "GET /h HTTP/1.1\r\n\r\n".to_owned()),
            (
                "user info in Host",
                "GET /h HTTP/1.1\r\nHost: user@evil.example\r\n\r\n".to_owned(),
            ),
            (
                "a port that is not a number",
                format!("GET /h HTTP/1.1\r\nHost: {host}:http\r\n\r\n"),
            ),
        ] {
            let resp = exchange(front, req.as_bytes()).await;
            assert_eq!(status_of(&resp), Some(400), "{what}: {resp}");
            assert!(
                resp.to_ascii_lowercase().contains("connection: close"),
                "{what}: {resp}"
            );
        }
        assert_eq!(
            app.heads().len(),
            before,
            "a refused request reached the app"
        );
    }

    /// An absolute-form target names the host (RFC 9112 §3.2.2), whatever `Host` says;
    /// the app gets an origin-form request line, from the same fixed upstream.
    pub async fn absolute_form(front: SocketAddr, host: &str, app: &RawApp) {
        let req = format!(
            "GET http://{host}/abs?q=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"
        );
        for resp in exchange_both(front, host, &req).await {
            assert_eq!(status_of(&resp), Some(200), "{resp}");
            let head = app.last_head("/abs?q=1").expect("the app got the request");
            assert!(head.starts_with("GET /abs?q=1 HTTP/1.1"), "{head}");
            assert_eq!(header(&head, "host"), Some(host), "{head}");
        }
    }

    /// Header limits are by size (64 KiB), not by count.
    pub async fn header_limits(front: SocketAddr, host: &str, app: &RawApp) {
        // 101 passes, as on Go (hyper's default refuses it); so does a head near the line
        // cap (`serve::MAX_HEADERS`, 256), even after the activator's three lines.
        for count in [101, 250] {
            let mut req = format!("GET /many-in HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
            for i in 0..count {
                req.push_str(&format!("x-in-{i}: {i}\r\n"));
            }
            req.push_str("\r\n");
            let resp = exchange(front, req.as_bytes()).await;
            assert_eq!(status_of(&resp), Some(200), "{count} headers: {resp}");
            let head = app.last_head("/many-in").unwrap();
            assert_eq!(
                header(&head, &format!("x-in-{}", count - 1)),
                Some(&*(count - 1).to_string())
            );
        }
        let mut req = format!("GET /many-in HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for i in 0..255 {
            req.push_str(&format!("x-in-{i}: {i}\r\n"));
        }
        req.push_str("\r\n");
        let resp = exchange(front, req.as_bytes()).await;
        assert_eq!(status_of(&resp), Some(431), "257 lines: {}", short(&resp));
        let req = format!(
            "GET /too-big HTTP/1.1\r\nHost: {host}\r\nx-big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let resp = exchange(front, req.as_bytes()).await;
        assert_eq!(status_of(&resp), Some(431), "{}", short(&resp));
        // The app's response heads get the same size limit, not a count.
        let req =
            format!("GET /many-headers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        for resp in exchange_both(front, host, &req).await {
            assert_eq!(status_of(&resp), Some(200), "{resp}");
            assert!(resp.contains("x-h-150: v150"), "{resp}");
        }
        let req = format!("GET /big-head HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        for resp in exchange_both(front, host, &req).await {
            assert_eq!(status_of(&resp), Some(502), "{}", short(&resp));
        }
    }

    /// A response with `Content-Length` beside `Transfer-Encoding` reaches the client
    /// whole, without the stale length.
    pub async fn stale_content_length(front: SocketAddr, host: &str) {
        let req = format!("GET /cl-te HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        for resp in exchange_both(front, host, &req).await {
            assert_eq!(status_of(&resp), Some(200), "{resp}");
            let (head, body) = resp.split_once("\r\n\r\n").unwrap();
            assert!(
                header(head, "content-length").is_none_or(|v| v == "11"),
                "{head}"
            );
            assert!(body.contains("hello world"), "{resp}");
        }
    }

    /// Chunked trailers pass through to a client that asked for them (`TE: trailers`).
    pub async fn trailers(front: SocketAddr, host: &str) {
        let req = format!(
            "GET /trailers HTTP/1.1\r\nHost: {host}\r\nTE: trailers\r\nConnection: close\r\n\r\n"
        );
        for resp in exchange_both(front, host, &req).await {
            assert_eq!(status_of(&resp), Some(200), "{resp}");
            let (head, body) = resp.split_once("\r\n\r\n").unwrap();
            assert_eq!(header(head, "trailer"), Some("x-checksum"), "{head}");
            assert!(body.contains("hello"), "{resp}");
            assert!(
                body.contains("x-checksum: abc123"),
                "the trailer was lost: {resp:?}"
            );
        }
    }

    /// `103 Early Hints` from the app reaches an HTTP/1.1 client before the `200`.
    pub async fn early_hints(front: SocketAddr, host: &str) {
        let req = format!("GET /early-hints HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        for resp in exchange_both(front, host, &req).await {
            assert_eq!(status_of(&resp), Some(103), "{resp}");
            let (hints, rest) = resp.split_once("\r\n\r\n").unwrap();
            assert!(
                hints
                    .to_ascii_lowercase()
                    .contains("link: </style.css>; rel=preload"),
                "{hints}"
            );
            assert_eq!(status_of(rest), Some(200), "{resp}");
            assert!(rest.ends_with("ok"), "{resp}");
        }
    }

    /// An answer's header lines reach the client whichever path writes its head: on the
    /// plain path as the app sent them (its spelling of names kept, lines copied whole),
    /// through hyper's map otherwise (names in lower case). Either way with one `Date`.
    pub async fn answer_lines(front: SocketAddr, host: &str) {
        let req = format!("GET /cased HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let [by_hyper, plain] = exchange_both(front, host, &req).await;
        for resp in [&by_hyper, &plain] {
            assert_eq!(status_of(resp), Some(200), "{resp}");
            let (head, rest) = resp.split_once("\r\n\r\n").unwrap();
            assert!(rest.starts_with("ok"), "{resp}");
            let head = head.to_ascii_lowercase();
            assert!(head.contains("\r\nx-cased-name: value\r\n"), "{resp}");
            assert!(head.contains("\r\ncontent-length: 2\r\n"), "{resp}");
            assert_eq!(head.matches("\r\ndate: ").count(), 1, "{resp}");
        }
        assert!(plain.contains("\r\nX-Cased-Name: Value\r\n"), "{plain}");
        assert!(
            by_hyper.contains("\r\nx-cased-name: Value\r\n"),
            "{by_hyper}"
        );
    }

    /// A malformed chunked request body is the client's fault: `400`.
    pub async fn malformed_chunked_body(front: SocketAddr, host: &str) {
        let req = format!(
            "POST /slurp HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
        );
        let resp = exchange(front, req.as_bytes()).await;
        assert_eq!(status_of(&resp), Some(400), "{resp}");
        assert!(resp.contains("malformed request body"), "{resp}");
    }
}
