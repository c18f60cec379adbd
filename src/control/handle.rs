//! The handle on a running server: reload it, look at it. Requests reach
//! the control loop (`server`) as [`Control`] messages; what handles read is
//! the [`ServerView`] the loop publishes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, Upstream};
use crate::conn::workers::WorkerSet;
use crate::control::discovery::Resolved;
use crate::control::Error;
use crate::upstream::Service;

/// What the admin endpoint, metrics and tests may see of a running server.
#[derive(Debug, Default)]
pub struct ServerView {
    /// The listeners, in configuration order.
    pub(super) services: ArcSwap<Vec<Arc<Service>>>,
    /// Set when shutdown begins.
    pub(super) draining: AtomicBool,
    /// The data-plane workers, once running (for their metrics).
    pub(super) workers: std::sync::OnceLock<Arc<WorkerSet>>,
}

impl crate::control::metrics::Source for Arc<ServerView> {
    fn services(&self) -> Arc<Vec<Arc<Service>>> {
        self.services.load_full()
    }

    fn workers(&self) -> Vec<usize> {
        self.workers.get().map(|w| w.active()).unwrap_or_default()
    }
}

/// Requests to the control loop.
pub(super) enum Control {
    /// Apply a new configuration.
    Reload(Box<Config>, oneshot::Sender<Result<String, Error>>),
    /// A DNS refresh of one listener finished.
    Resolved {
        /// The listener resolved.
        service: Arc<Service>,
        /// The upstream list that was resolved (stale if it changed since).
        upstreams: Vec<Upstream>,
        /// The result.
        resolved: Vec<Resolved>,
    },
    /// Start a new binary and hand it the listening sockets.
    Upgrade(oneshot::Sender<Result<u32, Error>>),
    /// The new binary took over (its pid), or did not.
    Upgraded(Result<u32, String>, oneshot::Sender<Result<u32, Error>>),
}

/// A cheap, cloneable handle on a server: reload it, look at it.
#[derive(Clone)]
pub struct Handle {
    /// To the control loop.
    pub(super) control: mpsc::Sender<Control>,
    /// What the control loop publishes.
    pub(super) view: Arc<ServerView>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Applies `config` in place; on error nothing changed. Returns a one-line summary.
    pub async fn reload(&self, config: Config) -> Result<String, Error> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Reload(Box::new(config), tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Starts the binary anew (argv\[0\], same arguments) and hands it every
    /// listening socket; once it accepts on all of them this process stops
    /// accepting and drains. Returns the new process's pid; on error this
    /// process goes on serving.
    pub async fn upgrade(&self) -> Result<u32, Error> {
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::Upgrade(tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// The listeners, in configuration order.
    pub fn services(&self) -> Arc<Vec<Arc<Service>>> {
        self.view.services.load_full()
    }

    /// The listener named `name`.
    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.services().iter().find(|s| &*s.name == name).cloned()
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.view.draining.load(Ordering::Relaxed)
    }
}
