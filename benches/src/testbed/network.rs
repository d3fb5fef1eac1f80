//! Pod networking: each pod gets a network namespace of its own, joined to the testbed's
//! bridge by a veth pair, with one address from the node's pod CIDR. So every pod has
//! all ports to itself (Knative's fixed 8012, 8022, 9090, 9091), exactly as in a cluster.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("no free address left in {0}")]
    Exhausted(String),
    #[error("`ip {args}` failed: {message}")]
    Ip { args: String, message: String },
}

/// The node's side of pod networking.
#[derive(Debug)]
pub struct Network {
    bridge: String,
    netns_prefix: String,
    gateway: Ipv4Addr,
    /// The first three octets of the /24.
    base: [u8; 3],
    ipam: Mutex<Ipam>,
}

/// Next-fit over .2–.254, so that an address just freed is not handed out again at
/// once (an EndpointSlice reader would see a dead pod's IP come back as a new pod).
#[derive(Debug, Default)]
struct Ipam {
    used: BTreeSet<u8>,
    last: u8,
}

/// A pod's attachment.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub ip: Ipv4Addr,
    pub netns_name: String,
    host_veth: String,
}

impl PodNetwork {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns_name)
    }
}

impl Network {
    /// `gateway` is the bridge's address; pods share its /24.
    pub fn new(bridge: &str, netns_prefix: &str, gateway: Ipv4Addr) -> Self {
        let [a, b, c, _] = gateway.octets();
        Self {
            bridge: bridge.to_owned(),
            netns_prefix: netns_prefix.to_owned(),
            gateway,
            base: [a, b, c],
            ipam: Mutex::new(Ipam {
                used: BTreeSet::new(),
                last: 1,
            }),
        }
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    fn allocate(&self) -> Result<u8, NetworkError> {
        let mut ipam = self.ipam.lock().unwrap_or_else(PoisonError::into_inner);
        let gateway_octet = self.gateway.octets()[3];
        for step in 1..=253u16 {
            let candidate = ((u16::from(ipam.last) + 251 + step) % 253 + 2) as u8;
            if candidate != gateway_octet && !ipam.used.contains(&candidate) {
                ipam.used.insert(candidate);
                ipam.last = candidate;
                return Ok(candidate);
            }
        }
        let [a, b, c] = self.base;
        Err(NetworkError::Exhausted(format!("{a}.{b}.{c}.0/24")))
    }

    fn release(&self, octet: u8) {
        let mut ipam = self.ipam.lock().unwrap_or_else(PoisonError::into_inner);
        ipam.used.remove(&octet);
    }

    /// Makes the pod's namespace, veth pair and address. On failure nothing is left.
    pub async fn attach(&self) -> Result<PodNetwork, NetworkError> {
        let octet = self.allocate()?;
        let [a, b, c] = self.base;
        let ip = Ipv4Addr::new(a, b, c, octet);
        let net = PodNetwork {
            ip,
            netns_name: format!("{}{octet}", self.netns_prefix),
            host_veth: format!("{}h{octet}", self.bridge),
        };
        if let Err(e) = self.create(&net, octet).await {
            self.remove(&net).await;
            self.release(octet);
            return Err(e);
        }
        Ok(net)
    }

    async fn create(&self, net: &PodNetwork, octet: u8) -> Result<(), NetworkError> {
        let ns = net.netns_name.as_str();
        let peer = format!("{}c{octet}", self.bridge);
        let address = format!("{}/24", net.ip);
        let gateway = self.gateway.to_string();
        ip(&["netns", "add", ns]).await?;
        ip(&[
            "link",
            "add",
            &net.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])
        .await?;
        ip(&["link", "set", &peer, "netns", ns]).await?;
        ip(&["link", "set", &net.host_veth, "master", &self.bridge, "up"]).await?;
        ip(&["-n", ns, "link", "set", &peer, "name", "eth0"]).await?;
        ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"]).await?;
        ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        ip(&["-n", ns, "route", "add", "default", "via", &gateway]).await?;
        Ok(())
    }

    /// Removes the namespace (its end of the veth pair goes with it) and frees the address.
    pub async fn detach(&self, net: &PodNetwork) {
        self.remove(net).await;
        self.release(net.ip.octets()[3]);
    }

    async fn remove(&self, net: &PodNetwork) {
        if let Err(e) = ip(&["netns", "delete", &net.netns_name]).await {
            tracing::debug!(error = %e, "netns already gone");
        }
        // Only there when creation failed before the peer moved into the namespace.
        let _ = ip(&["link", "delete", &net.host_veth]).await;
    }
}

async fn ip(args: &[&str]) -> Result<(), NetworkError> {
    let output = Command::new("ip")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| NetworkError::Ip {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Ip {
            args: args.join(" "),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_next_fit_and_skip_the_gateway() {
        let net = Network::new("br", "ns-", Ipv4Addr::new(10, 244, 7, 1));
        assert_eq!(net.allocate().unwrap(), 2);
        assert_eq!(net.allocate().unwrap(), 3);
        net.release(2);
        // Not reused at once.
        assert_eq!(net.allocate().unwrap(), 4);
        let mut seen = 2;
        while net.allocate().is_ok() {
            seen += 1;
        }
        // .2–.254 is 253 addresses; all are in use now.
        assert_eq!(seen, 253);
        assert!(matches!(net.allocate(), Err(NetworkError::Exhausted(_))));
        net.release(100);
        assert_eq!(net.allocate().unwrap(), 100);
    }
}
