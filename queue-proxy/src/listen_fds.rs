//! Listening sockets inherited from the process that started the queue-proxy, as systemd's
//! socket activation hands them over (`LISTEN_FDS`), but named: `THAW_LISTEN_FDS` is a
//! list of `listener=fd` pairs, e.g. `serving=7,admin=8`. The local platform uses it so
//! that a pod's ports are bound once, by the activator, and held for the pod's whole life:
//! choosing a free port by binding port 0 and closing it again, then asking the child to
//! bind that number, lets another pod take the port in between (`Address already in
//! use`), or worse, lets a pod's app port be taken by another pod's listener, which then
//! answers for it.
//!
//! Taking ownership of an inherited descriptor by its number (`FromRawFd`) is `unsafe`,
//! which the workspace forbids. The safe route used here: `dup2` the descriptor onto
//! standard input (nix's `dup2` is safe: it takes plain numbers), clone standard input
//! into an `OwnedFd` (`try_clone_to_owned`, a `F_DUPFD_CLOEXEC`), close the inherited
//! number, and finally point standard input back at `/dev/null`. The queue-proxy never
//! reads standard input, and this runs once at start, before any other thread exists.

use std::fs::File;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::socket::{getsockopt, sockopt};

/// The variable naming the inherited listeners.
pub const THAW_LISTEN_FDS: &str = "THAW_LISTEN_FDS";

/// The listeners a queue-proxy opens, by the names `THAW_LISTEN_FDS` and its `listening`
/// log lines use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Listener {
    Serving,
    Tls,
    Admin,
    Metrics,
    UserMetrics,
}

impl Listener {
    pub const ALL: [Listener; 5] = [
        Listener::Serving,
        Listener::Tls,
        Listener::Admin,
        Listener::Metrics,
        Listener::UserMetrics,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Listener::Serving => "serving",
            Listener::Tls => "tls",
            Listener::Admin => "admin",
            Listener::Metrics => "metrics",
            Listener::UserMetrics => "user-metrics",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// Renders `THAW_LISTEN_FDS`.
pub fn format(fds: &[(Listener, RawFd)]) -> String {
    fds.iter()
        .map(|(l, fd)| format!("{}={fd}", l.name()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `THAW_LISTEN_FDS`: known names, each once, descriptors above standard error.
pub fn parse(value: &str) -> Result<Vec<(Listener, RawFd)>, String> {
    let mut out: Vec<(Listener, RawFd)> = Vec::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, fd) = pair
            .split_once('=')
            .ok_or_else(|| format!("expected listener=fd pairs, got {pair:?}"))?;
        let listener = Listener::from_name(name.trim()).ok_or_else(|| {
            format!("unknown listener {name:?} (serving, tls, admin, metrics or user-metrics)")
        })?;
        let fd: RawFd =
            fd.trim().parse().ok().filter(|fd| *fd > 2).ok_or_else(|| {
                format!("{name}: expected a descriptor number above 2, got {fd:?}")
            })?;
        if out.iter().any(|(l, f)| *l == listener || *f == fd) {
            return Err(format!("{pair:?} repeats a listener or a descriptor"));
        }
        out.push((listener, fd));
    }
    Ok(out)
}

/// An inherited descriptor could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("{THAW_LISTEN_FDS}: {listener} descriptor {fd}: {source}")]
    Descriptor {
        listener: &'static str,
        fd: RawFd,
        source: io::Error,
    },
    #[error("{THAW_LISTEN_FDS}: {listener} descriptor {fd} is not a listening socket")]
    NotListening { listener: &'static str, fd: RawFd },
    #[error("{THAW_LISTEN_FDS}: cannot restore standard input: {0}")]
    Stdin(io::Error),
}

/// Takes ownership of each inherited listener (see the module doc for how, safely), and
/// checks that it is a listening socket. Standard input is `/dev/null` afterwards.
pub fn adopt(fds: &[(Listener, RawFd)]) -> Result<Vec<(Listener, TcpListener)>, AdoptError> {
    if fds.is_empty() {
        return Ok(Vec::new());
    }
    let adopted = fds
        .iter()
        .map(|&(listener, fd)| adopt_one(listener, fd).map(|l| (listener, l)))
        .collect::<Result<Vec<_>, _>>();
    // Whatever happened, standard input must not stay a socket.
    let devnull = File::open("/dev/null").map_err(AdoptError::Stdin)?;
    nix::unistd::dup2(devnull.as_raw_fd(), 0).map_err(|e| AdoptError::Stdin(io::Error::from(e)))?;
    adopted
}

fn adopt_one(listener: Listener, fd: RawFd) -> Result<TcpListener, AdoptError> {
    let failed = |source: io::Error| AdoptError::Descriptor {
        listener: listener.name(),
        fd,
        source,
    };
    nix::unistd::dup2(fd, 0).map_err(|e| failed(e.into()))?;
    let owned = io::stdin().as_fd().try_clone_to_owned().map_err(failed)?;
    // The number the parent chose is not ours to keep open (and it lacks close-on-exec).
    nix::unistd::close(fd).map_err(|e| failed(e.into()))?;
    // A socket that is not listening would make every accept fail, forever.
    let listening = getsockopt(&owned, sockopt::AcceptConn).map_err(|e| failed(e.into()))?;
    if !listening {
        return Err(AdoptError::NotListening {
            listener: listener.name(),
            fd,
        });
    }
    let listener = TcpListener::from(owned);
    listener.set_nonblocking(true).map_err(failed)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_round_trips_and_rejects_nonsense() {
        let fds = [(Listener::Serving, 7), (Listener::UserMetrics, 11)];
        assert_eq!(format(&fds), "serving=7,user-metrics=11");
        assert_eq!(parse("serving=7,user-metrics=11"), Ok(fds.to_vec()));
        assert_eq!(parse(" serving = 7 , "), Ok(vec![(Listener::Serving, 7)]));
        assert_eq!(parse(""), Ok(vec![]));
        for bad in [
            "serving",
            "serving=x",
            "serving=2",
            "serving=-1",
            "stats=5",
            "serving=5,serving=6",
            "serving=5,admin=5",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
