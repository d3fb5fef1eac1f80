//! Reading the queue-proxies' `:9090` stats as Knative's autoscaler does, for platforms
//! whose built-in autoscaler must see traffic that reaches pods without the activator.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use thaw_shared::proto::Stat;

/// A pooled client for scraping; cheap to clone.
#[derive(Clone)]
pub struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Scraper {
    fn default() -> Self {
        Self::new()
    }
}

impl Scraper {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// One queue-proxy's `Stat`, or `None` if it does not answer within a second.
    pub async fn stat(&self, addr: SocketAddr) -> Option<Stat> {
        let req = http::Request::get(format!("http://{addr}/metrics"))
            .header(http::header::ACCEPT, "application/protobuf")
            .body(Empty::new())
            .ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(1), self.client.request(req))
            .await
            .ok()?
            .ok()?;
        // Knative reads at most 336 bytes of a Stat.
        let body = Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Stat::decode(body).ok()
    }

    /// The concurrency pods see from anything but an activator, summed over `addrs`
    /// (scraped at once): activator traffic is counted by the activators themselves, and
    /// must not count twice.
    pub async fn direct_concurrency(&self, addrs: impl IntoIterator<Item = SocketAddr>) -> f64 {
        let stats = futures_util::future::join_all(addrs.into_iter().map(|a| self.stat(a))).await;
        stats
            .into_iter()
            .flatten()
            .map(|s| {
                (s.average_concurrent_requests - s.average_proxied_concurrent_requests).max(0.0)
            })
            .sum()
    }
}
