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
use thaw_shared::limits::MAX_REPORTED_CONCURRENCY;
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
        stats.into_iter().flatten().map(|s| direct_figure(&s)).sum()
    }
}

/// One pod's concurrency from anything but an activator, in `0..=MAX_REPORTED_CONCURRENCY`:
/// a NaN counts as 0 and a huge figure as the bound, so that the sum over pods stays
/// finite (an infinite load reads as no traffic to the autoscaler).
fn direct_figure(s: &Stat) -> f64 {
    let figure = s.average_concurrent_requests - s.average_proxied_concurrent_requests;
    if figure.is_nan() {
        0.0
    } else {
        figure.clamp(0.0, MAX_REPORTED_CONCURRENCY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_figures_are_bounded_so_their_sum_is_finite() {
        let stat = |avg: f64, proxied: f64| Stat {
            average_concurrent_requests: avg,
            average_proxied_concurrent_requests: proxied,
            ..Stat::default()
        };
        assert_eq!(direct_figure(&stat(3.0, 1.0)), 2.0);
        assert_eq!(direct_figure(&stat(1.0, 3.0)), 0.0);
        assert_eq!(direct_figure(&stat(f64::NAN, 0.0)), 0.0);
        assert_eq!(direct_figure(&stat(f64::INFINITY, f64::INFINITY)), 0.0);
        assert_eq!(
            direct_figure(&stat(f64::INFINITY, 0.0)),
            MAX_REPORTED_CONCURRENCY
        );
        let sum: f64 = [stat(1.7e308, 0.0), stat(1.7e308, 0.0)]
            .iter()
            .map(direct_figure)
            .sum();
        assert!(sum.is_finite());
    }
}
