//! Tasks that change shared state: the [`server`] and its control loop,
//! [`reload`] and [`dns`] refresh (both prepared, then committed by the
//! loop), health [`probe`]s, the [`admin`] endpoint and its [`metrics`],
//! and process signals ([`shutdown`]). They swap the snapshots that
//! connections read; nothing here is on a connection's path.

pub mod admin;
pub mod check;
pub mod discovery;
pub mod dns;
pub mod handle;
pub mod metrics;
pub mod probe;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod upgrade;

use std::io;
use std::net::SocketAddr;

pub use handle::Handle;
pub use server::Server;

/// What can stop tcplb from starting or a reload from applying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An upstream host could not be resolved.
    #[error("{0}")]
    Resolve(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {}", describe_bind(.source))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// A file the configuration names is unusable.
    #[error("{0}")]
    Config(String),
    /// The server is no longer running.
    #[error("tcplb is shutting down")]
    Stopped,
    /// A binary upgrade did not happen; the running process goes on.
    #[error("upgrade failed: {0}")]
    Upgrade(String),
}

impl Error {
    /// Whether the error is the user's input (exit 2) rather than the environment (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Resolve(_) | Error::Config(_))
    }
}

fn describe_bind(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            "address already in use (is another process listening there?)".into()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".into()
        }
        io::ErrorKind::AddrNotAvailable => "address not available on this host".into(),
        _ => e.to_string(),
    }
}
