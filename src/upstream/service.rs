//! One listener's live state: its settings and backend pool, swapped whole by
//! a reload or a DNS change. Every connection loads the snapshot current when
//! it starts and keeps it to its end, so a swap never disturbs it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::config::{HealthCheck, ListenerConfig};
use crate::stats::ListenerStats;
use crate::upstream::clients::ClientTable;
use crate::upstream::health::{log_transition, Ejection};
use crate::upstream::{Backend, Pool};

/// Settings and pool at one point in time.
#[derive(Debug)]
pub struct Snapshot {
    /// The listener's settings.
    pub config: ListenerConfig,
    /// Its backends and strategy.
    pub pool: Pool,
    /// Some connection needs the address the client connected to (a PROXY
    /// header goes out or comes in): only then is getsockname worth a syscall.
    pub needs_destination: bool,
    /// Backend sockets get SO_KEEPALIVE: only when the kernel's probes
    /// could start before the idle timeout closes a silent connection
    /// ([`keepalive_needed`](crate::io::keepalive_needed)).
    pub backend_keepalive: bool,
}

impl Snapshot {
    /// A snapshot of `config` and `pool`, with what connections derive from them.
    pub fn new(config: ListenerConfig, pool: Pool) -> Self {
        let needs_destination = config.accept_proxy
            || config.send_proxy.is_some()
            || config.upstreams.iter().any(|u| u.send_proxy.is_some());
        let backend_keepalive = crate::io::keepalive_needed(config.idle_timeout);
        Snapshot { config, pool, needs_destination, backend_keepalive }
    }

    /// Whether real traffic feeds health. Only when active probes run: with
    /// `check = none` nothing could ever bring a passively downed backend
    /// back up.
    pub fn passive_health(&self) -> bool {
        self.config.health.check != HealthCheck::None
    }

    /// A real connection to `backend` failed: counts toward its fall, and
    /// with outlier ejection on, ejects it for a while when it falls,
    /// unless `max_ejection_percent` of the pool is out already.
    pub fn record_passive_failure(&self, backend: &Backend, listener: &str, reason: &str) {
        let health = &self.config.health;
        let Some(base) = health.ejection_time else {
            return backend.record_passive_failure(listener, reason);
        };
        let ejection = Ejection { base, max: health.max_ejection_time.max(base) };
        let pool = self.pool.backends();
        let allowed = (pool.len() * health.max_ejection_percent as usize / 100).max(1);
        let ejected = pool.iter().filter(|b| b.health.is_ejected()).count();
        if let Some((t, time)) = backend.health.observe_passive_failure(ejection, ejected < allowed)
        {
            let why = format!("{reason}; ejected for {}", humantime::format_duration(time));
            log_transition(listener, backend, t, &why);
        }
    }
}

/// A listener's shared state, read by its accept loops, connections and probes.
#[derive(Debug)]
pub struct Service {
    /// Listener name for logs and metrics.
    pub name: Arc<str>,
    /// The current snapshot; read lock-free, replaced whole.
    current: ArcSwap<Snapshot>,
    /// Whether the last selection found nothing available (panic mode), so
    /// that entering and leaving it is logged once, not per connection.
    panic: AtomicBool,
    /// Counters and histograms that are per listener, not per backend.
    pub stats: ListenerStats,
    /// Its connections in all and per client, for the share limits.
    pub clients: Arc<ClientTable>,
    /// The addresses its sockets are bound to now.
    bound: Mutex<Vec<SocketAddr>>,
    /// Backends a reload or DNS change removed that still held connections
    /// then: shown (state "removed") with their counters until the last of
    /// those connections ends, so an operator can watch them drain.
    removed: Mutex<Vec<Arc<Backend>>>,
    /// The services of its routes, in the order of `config.routes` (empty
    /// for a listener without routes, and for a route).
    routes: ArcSwap<Vec<Arc<Service>>>,
}

impl Service {
    /// A service starting with `config` and `pool`.
    pub fn new(config: ListenerConfig, pool: Pool) -> Self {
        Service {
            name: config.name.as_str().into(),
            current: ArcSwap::from_pointee(Snapshot::new(config, pool)),
            panic: AtomicBool::new(false),
            stats: ListenerStats::default(),
            clients: Arc::default(),
            bound: Mutex::new(Vec::new()),
            removed: Mutex::new(Vec::new()),
            routes: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// The services of its routes, in the order of its `config.routes`.
    pub fn routes(&self) -> Arc<Vec<Arc<Service>>> {
        self.routes.load_full()
    }

    /// Points its routes at `services`; done whenever they are (re)built.
    pub(crate) fn set_routes(&self, services: Vec<Arc<Service>>) {
        self.routes.store(Arc::new(services));
    }

    /// The current settings and pool.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the settings and pool.
    pub(crate) fn replace(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }

    /// Every current backend.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.current.load().pool.backends().to_vec()
    }

    /// Takes `backends` out of the configuration: no new connections, probes
    /// stop; those still serving connections stay visible in
    /// [`removed`](Self::removed) until they end.
    pub(crate) fn retire(&self, backends: &[Arc<Backend>]) {
        let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        for b in backends {
            b.retire();
            if b.active() > 0 {
                removed.push(Arc::clone(b));
            }
        }
    }

    /// Removed backends that still serve connections (but none whose
    /// address is back in the configuration: one series per address).
    pub fn removed(&self) -> Vec<Arc<Backend>> {
        let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        removed.retain(|b| b.active() > 0);
        let current = self.current.load();
        let back = |b: &Arc<Backend>| current.pool.backends().iter().any(|c| c.addr == b.addr);
        removed.iter().filter(|b| !back(b)).cloned().collect()
    }

    /// The current backend with address `addr`.
    pub fn backend(&self, addr: SocketAddr) -> Option<Arc<Backend>> {
        self.current.load().pool.backends().iter().find(|b| b.addr == addr).cloned()
    }

    /// The addresses its sockets are bound to now.
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_bound(&self, addrs: Vec<SocketAddr>) {
        *self.bound.lock().unwrap_or_else(|e| e.into_inner()) = addrs;
    }

    /// Logs entering and leaving panic mode, once each.
    pub(crate) fn note_panic(&self, panic: bool) {
        if self.panic.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                warn!(listener = %self.name, "no backend is up: panic mode, trying all backends");
            } else {
                info!(listener = %self.name, "a backend is up again: leaving panic mode");
            }
        }
    }
}
