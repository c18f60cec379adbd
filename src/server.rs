//! Resolving, binding and running: the testable entry point.
//!
//! [`Server::bind`] resolves every upstream and binds every listen address
//! (port 0 works, and [`Server::local_addrs`] reads the real ports back);
//! [`Server::run`] accepts until the shutdown future resolves, then drains.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{Backend, Pool};
use crate::balance::RoundRobin;
use crate::config::{Config, ListenerConfig, Upstream};
use crate::health;
use crate::listener::{self, AcceptContext};
use crate::proxy::Service;

/// What can stop tcplb from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The system resolver could not resolve an upstream host.
    #[error("cannot resolve upstream '{upstream}': {source}")]
    Resolve {
        /// The upstream as written.
        upstream: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// An upstream resolved to nothing.
    #[error("upstream '{upstream}' resolved to no address")]
    NoAddress {
        /// The upstream as written.
        upstream: String,
    },
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {}", describe_bind(.source))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
}

impl Error {
    /// Whether the error is the user's input (exit 2) rather than the environment (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Resolve { .. } | Error::NoAddress { .. })
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

/// A bound, ready-to-run load balancer.
#[derive(Debug)]
pub struct Server {
    /// The configuration it was built from.
    config: Config,
    /// Each listener's service and its bound sockets.
    services: Vec<(Arc<Service>, Vec<TcpListener>)>,
}

impl Server {
    /// Resolves upstreams and binds every listen address.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let mut services = Vec::with_capacity(config.listeners.len());
        for lc in &config.listeners {
            let backends = resolve_backends(lc).await?;
            let pool = Pool::new(backends, Box::new(RoundRobin::new()));
            let mut sockets = Vec::with_capacity(lc.listen.len());
            for &addr in &lc.listen {
                let l = listener::bind(addr, lc.backlog)
                    .map_err(|source| Error::Bind { addr, source })?;
                sockets.push(l);
            }
            services.push((Arc::new(Service::new(lc.clone(), pool)), sockets));
        }
        Ok(Server { config, services })
    }

    /// The bound addresses, in the order given (real ports when 0 was asked).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.services
            .iter()
            .flat_map(|(_, ls)| ls.iter().filter_map(|l| l.local_addr().ok()))
            .collect()
    }

    /// The backends of each listener, for inspection.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.services.iter().flat_map(|(s, _)| s.pool.backends().iter().cloned()).collect()
    }

    /// Accepts until `shutdown` resolves, then closes the listeners, lets
    /// connections finish for up to the drain timeout, closes the rest and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit =
            Arc::new(Semaphore::new(self.config.max_connections.min(Semaphore::MAX_PERMITS)));
        let accepting = TaskTracker::new();

        for (svc, sockets) in self.services {
            info!(
                listener = %svc.name,
                listen = ?sockets.iter().filter_map(|l| l.local_addr().ok()).collect::<Vec<_>>(),
                backends = ?svc.pool.backends().iter().map(|b| b.addr).collect::<Vec<_>>(),
                "tcplb listening"
            );
            health::spawn_probes(
                Arc::clone(&svc.name),
                svc.pool.backends(),
                &svc.config.health,
                &kill,
            );
            for socket in sockets {
                let ctx = AcceptContext {
                    limit: Arc::clone(&limit),
                    tracker: tracker.clone(),
                    stop: stop.clone(),
                    kill: kill.clone(),
                };
                accepting.spawn(listener::accept_loop(socket, Arc::clone(&svc), ctx));
            }
        }
        accepting.close();

        shutdown.await;
        stop.cancel();
        // Listeners are closed once their loops return: new connects are refused.
        accepting.wait().await;
        tracker.close();
        let open = tracker.len();
        if open > 0 {
            info!(connections = open, drain_timeout = %humantime::format_duration(self.config.drain_timeout), "draining");
        }
        if tokio::time::timeout(self.config.drain_timeout, tracker.wait()).await.is_err() {
            warn!(connections = tracker.len(), "drain timeout: closing remaining connections");
        }
        kill.cancel();
        tracker.wait().await;
        info!("tcplb stopped");
    }
}

/// Every address each upstream resolves to becomes one backend (duplicates once).
async fn resolve_backends(lc: &ListenerConfig) -> Result<Vec<Arc<Backend>>, Error> {
    let mut seen = HashSet::new();
    let mut backends = Vec::new();
    for up in &lc.upstreams {
        for addr in resolve(up).await? {
            if seen.insert(addr) {
                let name: Arc<str> = up.to_string().into();
                backends.push(Arc::new(Backend::new(addr, name, lc.health.rise, lc.health.fall)));
            } else {
                warn!(listener = %lc.name, upstream = %up, %addr, "duplicate backend address ignored");
            }
        }
    }
    Ok(backends)
}

/// Resolves one upstream with the system resolver.
pub async fn resolve(up: &Upstream) -> Result<Vec<SocketAddr>, Error> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((up.host.as_str(), up.port))
        .await
        .map_err(|source| Error::Resolve { upstream: up.to_string(), source })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::NoAddress { upstream: up.to_string() });
    }
    Ok(addrs)
}
