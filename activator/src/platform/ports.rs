//! Loopback ports for the local platform's pods, chosen so that no two pods ever share one.
//!
//! The old way, binding port 0 to learn a free port, closing it and telling the child to
//! bind that number, loses races: in between, another pod's process could bind it (its
//! queue-proxy then failed with `Address already in use`), and an app that had not bound
//! its `PORT` yet could find another pod's listener on it. The queue-proxy's TCP readiness
//! probe then passed against that stranger, and requests went to another pod (`404 not
//! found` from its admin port, `502` from its serving port), possibly another revision's.
//!
//! So:
//! - A queue-proxy's five ports are bound here ([`PodListeners`]) and held for the pod's
//!   whole life; the queue-proxy inherits the sockets (`THAW_LISTEN_FDS`) rather than
//!   binding numbers, and a restarted queue-proxy gets the same sockets again.
//! - An app binds `PORT` itself, so its port cannot be held. It is taken from outside the
//!   kernel's ephemeral range ([`AppPort`]): the kernel never hands it to anyone binding
//!   port 0 or connecting out, on this machine, from any process. Every app port this
//!   process handed out is remembered until its pod is gone, so two pods never get the
//!   same one, and it is checked free (on every address) when handed out.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// App ports are not taken below this, to stay clear of the well-known ports developers'
/// own services use (8000, 8080, 9090, …).
const APP_PORT_FLOOR: u16 = 20_000;
/// Linux's default ephemeral range, for when `/proc` cannot be read.
const DEFAULT_EPHEMERAL: (u16, u16) = (32_768, 60_999);
/// Random candidates tried before giving up.
const ATTEMPTS: usize = 256;
/// A queue-proxy's listeners accept this many connections before the kernel refuses more
/// (tokio's default; std's is 128).
const BACKLOG: i32 = 1024;

/// Every app port handed out and not yet released, in this process.
static APP_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

fn app_ports() -> MutexGuard<'static, BTreeSet<u16>> {
    APP_PORTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An app's `PORT`, reserved for the pod until dropped.
#[derive(Debug)]
pub struct AppPort(u16);

impl AppPort {
    /// A port outside the ephemeral range that no pod of ours has and that is free now.
    pub fn reserve() -> io::Result<AppPort> {
        let (low, high) = ephemeral_range();
        let below = APP_PORT_FLOOR..low.max(APP_PORT_FLOOR);
        let above = high.saturating_add(1).max(APP_PORT_FLOOR)..=u16::MAX;
        let below_n = below.len();
        let above_n = if high == u16::MAX {
            0
        } else {
            above.clone().count()
        };
        if below_n + above_n == 0 {
            // The ephemeral range covers everything above the floor: fall back to what the
            // kernel hands out, still never twice to our own pods.
            return Self::from_kernel();
        }
        for _ in 0..ATTEMPTS {
            let i = fastrand::usize(..below_n + above_n);
            let port = if i < below_n {
                below.start + i as u16
            } else {
                above.start() + (i - below_n) as u16
            };
            if let Some(reserved) = Self::claim(port) {
                return Ok(reserved);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("no free port for an app outside the ephemeral range after {ATTEMPTS} tries"),
        ))
    }

    /// Ports from the kernel (`bind` to port 0), skipping ours.
    fn from_kernel() -> io::Result<AppPort> {
        for _ in 0..ATTEMPTS {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            if let Some(reserved) = Self::claim(port) {
                return Ok(reserved);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free port for an app",
        ))
    }

    /// Takes `port` if no pod of ours has it and nothing listens on it, on any address
    /// (an app may bind 0.0.0.0).
    fn claim(port: u16) -> Option<AppPort> {
        let mut ours = app_ports();
        if ours.contains(&port) {
            return None;
        }
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).ok()?;
        ours.insert(port);
        Some(AppPort(port))
    }

    pub fn port(&self) -> u16 {
        self.0
    }

    #[cfg(test)]
    fn is_reserved(port: u16) -> bool {
        app_ports().contains(&port)
    }
}

impl Drop for AppPort {
    fn drop(&mut self) {
        app_ports().remove(&self.0);
    }
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            match (parts.next().flatten(), parts.next().flatten()) {
                (Some(low), Some(high)) if low <= high => Some((low, high)),
                _ => None,
            }
        })
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// A queue-proxy's listening sockets, bound on loopback for the pod's whole life.
#[derive(Debug)]
pub struct PodListeners {
    pub serving: TcpListener,
    pub tls: TcpListener,
    pub admin: TcpListener,
    pub metrics: TcpListener,
    pub user_metrics: TcpListener,
}

impl PodListeners {
    pub fn bind() -> io::Result<PodListeners> {
        Ok(PodListeners {
            serving: listener()?,
            tls: listener()?,
            admin: listener()?,
            metrics: listener()?,
            user_metrics: listener()?,
        })
    }

    pub fn port(listener: &TcpListener) -> io::Result<u16> {
        Ok(listener.local_addr()?.port())
    }

    pub fn addr(listener: &TcpListener) -> io::Result<SocketAddr> {
        listener.local_addr()
    }
}

/// A listening socket on a loopback port the kernel picks. If it picks the port of an
/// app that has not bound yet (possible only when app ports come from the kernel too),
/// that one is kept open while another is picked, and then released.
fn listener() -> io::Result<TcpListener> {
    let mut passed_over = Vec::new();
    for _ in 0..ATTEMPTS {
        let socket = listen_on_any_loopback_port()?;
        let port = socket.local_addr()?.port();
        if !app_ports().contains(&port) {
            return Ok(socket);
        }
        passed_over.push(socket);
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free loopback port for a queue-proxy",
    ))
}

/// Binds 127.0.0.1:0 and listens with [`BACKLOG`]. Built with nix rather than std, whose
/// listeners have a fixed backlog of 128, too few for a burst of parked requests.
fn listen_on_any_loopback_port() -> io::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0))?;
    listen(&fd, Backlog::new(BACKLOG)?)?;
    Ok(TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_ports_are_outside_the_ephemeral_range_and_never_handed_out_twice() {
        let (low, high) = ephemeral_range();
        let ports: Vec<AppPort> = (0..200).map(|_| AppPort::reserve().unwrap()).collect();
        let mut seen = BTreeSet::new();
        for p in &ports {
            assert!(p.port() >= APP_PORT_FLOOR, "{}", p.port());
            assert!(
                !(low..=high).contains(&p.port()),
                "{} in {low}-{high}",
                p.port()
            );
            assert!(seen.insert(p.port()), "{} twice", p.port());
        }
        let first = ports[0].port();
        drop(ports);
        assert!(!AppPort::is_reserved(first), "released with its pod");
    }

    #[test]
    fn a_queue_proxy_listener_never_takes_an_app_port() {
        let listeners = PodListeners::bind().unwrap();
        for l in [
            &listeners.serving,
            &listeners.tls,
            &listeners.admin,
            &listeners.metrics,
            &listeners.user_metrics,
        ] {
            let port = PodListeners::port(l).unwrap();
            assert!(!AppPort::is_reserved(port));
            // It listens: a connection is accepted into its backlog.
            std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        }
    }
}
