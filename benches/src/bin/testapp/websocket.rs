//! `/ws`: a websocket echo over an HTTP/1.1 Upgrade, so tests can check that
//! proxies pass upgrades through and keep both directions flowing.

use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::body::AppBody;
use crate::routes::text;

const WEBSOCKET: HeaderValue = HeaderValue::from_static("websocket");
const UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");

/// Answers the handshake and, once hyper hands the connection over, echoes
/// on it in a task of its own.
pub fn upgrade(mut req: Request<Incoming>) -> Response<AppBody> {
    if req.version() != Version::HTTP_11 || req.method() != Method::GET {
        return text(
            StatusCode::BAD_REQUEST,
            "websocket needs an HTTP/1.1 GET with Upgrade: websocket",
        );
    }
    let headers = req.headers();
    if !has_token(headers, &UPGRADE, "websocket") || !has_token(headers, &CONNECTION, "upgrade") {
        return text(
            StatusCode::BAD_REQUEST,
            "websocket needs Connection: upgrade and Upgrade: websocket",
        );
    }
    if headers
        .get(SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut response = text(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported websocket version",
        );
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing sec-websocket-key");
    };
    let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not derive the accept key",
        );
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        // An upgrade that never completes means the client went away before
        // reading the 101; there is no one left to tell.
        if let Ok(upgraded) = on_upgrade.await {
            echo(upgraded).await;
        }
    });

    let mut response = Response::new(AppBody::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, WEBSOCKET);
    headers.insert(CONNECTION, UPGRADE_TOKEN);
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    response
}

async fn echo(upgraded: Upgraded) {
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    // Pings and closes are answered by tungstenite itself on the next read;
    // reading on after a close lets it flush the close reply, then the
    // stream ends.
    while let Some(Ok(message)) = ws.next().await {
        if matches!(message, Message::Text(_) | Message::Binary(_))
            && ws.send(message).await.is_err()
        {
            break;
        }
    }
}

/// Whether a comma-separated header lists `token`, ignoring case.
fn has_token(headers: &HeaderMap, name: &http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(has_token(&headers, &CONNECTION, "upgrade"));
        assert!(!has_token(&headers, &CONNECTION, "close"));
        assert!(!has_token(&headers, &UPGRADE, "websocket"));
    }
}
