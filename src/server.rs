//! Resolving, binding and running: the testable entry point, and the control
//! loop that applies reloads and DNS changes.
//!
//! [`Server::bind`] resolves every upstream and binds every listen address
//! (port 0 works, and [`Server::local_addrs`] reads the real ports back).
//! [`Server::run`] accepts until the shutdown future resolves, then drains.
//! While it runs, one control loop is the only writer of listener state: a
//! [`Handle::reload`] or a DNS refresh is prepared without touching anything
//! (resolve, bind new sockets), then committed by swapping snapshots, so a
//! failed reload leaves the old configuration running unchanged.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{Backend, Pool, Settings};
use crate::config::{Config, ListenerConfig, Upstream};
use crate::discovery::{self, Resolve, Resolved, SystemResolver};
use crate::health;
use crate::listener::{self, AcceptContext};
use crate::service::{Service, Snapshot};
use crate::workers::Workers;

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

/// What the admin endpoint, metrics and tests may see of a running server.
#[derive(Debug, Default)]
pub struct Live {
    /// The listeners, in configuration order.
    services: ArcSwap<Vec<Arc<Service>>>,
    /// Set when shutdown begins.
    draining: AtomicBool,
    /// The data-plane workers, once running (for their metrics).
    workers: std::sync::OnceLock<Arc<crate::workers::Share>>,
}

impl crate::metrics::Source for Arc<Live> {
    fn services(&self) -> Arc<Vec<Arc<Service>>> {
        self.services.load_full()
    }

    fn workers(&self) -> Vec<usize> {
        self.workers.get().map(|w| w.active()).unwrap_or_default()
    }
}

/// Requests to the control loop.
enum Control {
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
}

/// A cheap, cloneable handle on a server: reload it, look at it.
#[derive(Clone)]
pub struct Handle {
    /// To the control loop.
    control: mpsc::Sender<Control>,
    /// The live listeners.
    registry: Arc<Live>,
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

    /// The listeners, in configuration order.
    pub fn services(&self) -> Arc<Vec<Arc<Service>>> {
        self.registry.services.load_full()
    }

    /// The listener named `name`.
    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.services().iter().find(|s| &*s.name == name).cloned()
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.registry.draining.load(Ordering::Relaxed)
    }
}

/// Bound sockets of one listener, keyed by their configured address: one
/// SO_REUSEPORT socket per worker for each address.
type Sockets = Vec<(SocketAddr, Vec<std::net::TcpListener>)>;

/// A bound, ready-to-run load balancer.
pub struct Server {
    /// The configuration it was built from.
    config: Config,
    /// Resolves upstream names, at bind time and on refresh.
    resolver: Arc<dyn Resolve>,
    /// Each listener's service and its bound sockets, keyed by configured address.
    listeners: Vec<(Arc<Service>, Sockets)>,
    /// Handle side of the control loop.
    control_tx: mpsc::Sender<Control>,
    /// Control loop side.
    control_rx: mpsc::Receiver<Control>,
    /// Shared view for handles.
    registry: Arc<Live>,
    /// The admin endpoint's socket and bearer token, when enabled.
    admin: Option<(TcpListener, Option<String>)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addrs", &self.local_addrs()).finish_non_exhaustive()
    }
}

impl Server {
    /// Resolves upstreams with the system resolver and binds every listen address.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        Self::bind_with(config, Arc::new(SystemResolver)).await
    }

    /// Like [`Server::bind`] with a given resolver.
    pub async fn bind_with(config: Config, resolver: Arc<dyn Resolve>) -> Result<Server, Error> {
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for lc in &config.listeners {
            let (resolved, _) = discovery::resolve_all(&*resolver, &lc.upstreams, &HashMap::new())
                .await
                .map_err(|f| Error::Resolve(f.to_string()))?;
            let assembled = assemble(lc, &resolved, &[]);
            let mut sockets = Vec::with_capacity(lc.listen.len());
            for &addr in &lc.listen {
                sockets.push((addr, bind(addr, lc, config.workers())?));
            }
            let pool = Pool::new(assembled.backends, lc.strategy);
            listeners.push((Arc::new(Service::new(lc.clone(), pool)), sockets));
        }
        let admin = match &config.admin {
            Some(a) => {
                let token = match &a.token_file {
                    Some(path) => Some(read_token(path)?),
                    None => None,
                };
                let socket = listener::bind(a.listen, 128)
                    .map_err(|source| Error::Bind { addr: a.listen, source })?;
                Some((socket, token))
            }
            None => None,
        };
        let registry = Arc::new(Live::default());
        registry.services.store(Arc::new(listeners.iter().map(|(s, _)| Arc::clone(s)).collect()));
        let (control_tx, control_rx) = mpsc::channel(16);
        Ok(Server { config, resolver, listeners, control_tx, control_rx, registry, admin })
    }

    /// The bound addresses, in the order given (real ports when 0 was asked).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .flat_map(|(_, ls)| ls.iter().filter_map(|(_, g)| g.first()?.local_addr().ok()))
            .collect()
    }

    /// Every backend of every listener, as bound.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.listeners.iter().flat_map(|(s, _)| s.backends()).collect()
    }

    /// The admin endpoint's bound address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// A handle to reload and inspect the server while it runs.
    pub fn handle(&self) -> Handle {
        Handle { control: self.control_tx.clone(), registry: Arc::clone(&self.registry) }
    }

    /// Accepts until `shutdown` resolves, then closes the listeners, lets
    /// connections finish for up to the drain timeout, closes the rest and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let handle = self.handle();
        let kill = CancellationToken::new();
        let workers = match Workers::start(self.config.workers(), self.config.worker_balance, &kill)
        {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot start worker threads");
                return;
            }
        };
        let Server { config, resolver, listeners, control_tx, mut control_rx, registry, admin } =
            self;
        let mut rt = Runtime {
            resolver,
            registry,
            control: control_tx,
            limit: Arc::new(Semaphore::new(config.max_connections.min(Semaphore::MAX_PERMITS))),
            max_connections: config.max_connections.min(Semaphore::MAX_PERMITS),
            drain_timeout: config.drain_timeout,
            stop: CancellationToken::new(),
            kill,
            connections: TaskTracker::new(),
            accepting: TaskTracker::new(),
            listeners: Vec::new(),
            workers,
        };
        let _ = rt.registry.workers.set(Arc::clone(&rt.workers.share));
        for (svc, sockets) in listeners {
            let lr = rt.start_listener(svc, sockets);
            rt.listeners.push(lr);
        }
        if let Some((socket, token)) = admin {
            let addr =
                socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
            info!(%addr, "admin endpoint listening");
            let metrics = crate::metrics::registry(Arc::clone(&rt.registry));
            let admin = Arc::new(crate::admin::Admin::new(handle, metrics, token, addr));
            tokio::spawn(crate::admin::serve(socket, admin, rt.kill.clone()));
        }

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(cmd) = control_rx.recv() => match cmd {
                    Control::Reload(config, reply) => {
                        let result = rt.reload(*config).await;
                        match &result {
                            Ok(summary) => info!("{summary}"),
                            Err(e) => warn!(error = %e, "reload failed: keeping the running configuration"),
                        }
                        let _ = reply.send(result);
                    }
                    Control::Resolved { service, upstreams, resolved } => {
                        rt.apply_dns(&service, &upstreams, &resolved);
                    }
                },
            }
        }
        rt.drain().await;
    }
}

/// Reads the admin bearer token (surrounding white space trimmed).
fn read_token(path: &std::path::Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!("cannot read admin token file {}: {e}", path.display()))
    })?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(Error::Config(format!("admin token file {} is empty", path.display())));
    }
    Ok(token)
}

/// Binds one listen address for `lc`: one socket per worker.
fn bind(
    addr: SocketAddr,
    lc: &ListenerConfig,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, Error> {
    listener::bind_group(addr, lc.backlog, workers).map_err(|source| Error::Bind { addr, source })
}

/// The running state, owned by the control loop.
struct Runtime {
    /// Resolves upstream names.
    resolver: Arc<dyn Resolve>,
    /// What handles see.
    registry: Arc<Live>,
    /// For DNS tasks to report back.
    control: mpsc::Sender<Control>,
    /// Global connection limit.
    limit: Arc<Semaphore>,
    /// The limit's current size.
    max_connections: usize,
    /// Current drain timeout.
    drain_timeout: Duration,
    /// Cancelled when shutdown begins: every accept loop stops.
    stop: CancellationToken,
    /// Cancelled at the drain deadline: connections and probes end.
    kill: CancellationToken,
    /// Connection tasks.
    connections: TaskTracker,
    /// Accept loops.
    accepting: TaskTracker,
    /// Running listeners, in configuration order.
    listeners: Vec<ListenerRuntime>,
    /// The data-plane threads.
    workers: Workers,
}

/// One running listener.
struct ListenerRuntime {
    /// Its shared state.
    service: Arc<Service>,
    /// Stops its accept loops and DNS task (child of the global stop).
    stop: CancellationToken,
    /// Its sockets, each with its own stop token.
    sockets: Vec<BoundSocket>,
}

/// One running listen socket.
struct BoundSocket {
    /// The address as configured (port 0 possible).
    configured: SocketAddr,
    /// The address actually bound.
    local: SocketAddr,
    /// Stops its accept loop, which closes it.
    stop: CancellationToken,
}

impl BoundSocket {
    /// Whether a configured address `addr` names this socket.
    fn is(&self, addr: SocketAddr) -> bool {
        self.configured == addr || self.local == addr
    }
}

/// The backends for a listener after resolution, and how they differ from before.
struct Assembled {
    /// The new backend list.
    backends: Vec<Arc<Backend>>,
    /// Backends that did not exist before.
    added: Vec<Arc<Backend>>,
    /// Old backends that are gone.
    removed: Vec<Arc<Backend>>,
}

/// Settings of the backends of `up` in listener `lc`.
fn settings_for(lc: &ListenerConfig, up: &Upstream) -> Settings {
    Settings {
        weight: up.weight,
        backup: up.backup,
        max_connections: up.max_connections.unwrap_or(0),
        send_proxy: up.send_proxy.or(lc.send_proxy),
    }
}

/// Builds the backend list for `resolved`, reusing old backends with the
/// same address (so they keep their health state and counters).
fn assemble(lc: &ListenerConfig, resolved: &[Resolved], old: &[Arc<Backend>]) -> Assembled {
    let by_addr: HashMap<SocketAddr, &Arc<Backend>> = old.iter().map(|b| (b.addr, b)).collect();
    let mut seen = HashSet::new();
    let mut backends = Vec::new();
    let mut added = Vec::new();
    for r in resolved {
        let settings = settings_for(lc, &r.upstream);
        for &addr in &r.addrs {
            if !seen.insert(addr) {
                warn!(listener = %lc.name, upstream = %r.upstream, %addr, "duplicate backend address ignored");
                continue;
            }
            let b = match by_addr.get(&addr) {
                Some(b) => {
                    b.apply(settings);
                    b.health.set_thresholds(lc.health.rise, lc.health.fall);
                    Arc::clone(b)
                }
                None => {
                    let name: Arc<str> = r.upstream.authority().into();
                    let b = Arc::new(Backend::with_settings(
                        addr,
                        name,
                        lc.health.rise,
                        lc.health.fall,
                        settings,
                    ));
                    added.push(Arc::clone(&b));
                    b
                }
            };
            backends.push(b);
        }
    }
    let removed = old.iter().filter(|b| !seen.contains(&b.addr)).cloned().collect();
    Assembled { backends, added, removed }
}

/// Last good addresses of each upstream name, from a backend list.
fn previous_addrs(backends: &[Arc<Backend>]) -> HashMap<String, Vec<SocketAddr>> {
    let mut map: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    for b in backends {
        map.entry(b.upstream.to_string()).or_default().push(b.addr);
    }
    map
}

/// A listener prepared by a reload, not yet running.
struct Prepared {
    /// Its new configuration.
    config: ListenerConfig,
    /// Its backends.
    assembled: Assembled,
    /// Newly bound sockets (addresses it did not have).
    new_sockets: Sockets,
    /// Index in `Runtime::listeners` when it already runs.
    existing: Option<usize>,
}

impl Runtime {
    fn accept_context(&self, stop: CancellationToken, worker: usize) -> AcceptContext {
        AcceptContext {
            limit: Arc::clone(&self.limit),
            tracker: self.connections.clone(),
            stop,
            workers: Arc::clone(&self.workers.share),
            worker,
        }
    }

    fn start_listener(&self, service: Arc<Service>, sockets: Sockets) -> ListenerRuntime {
        let snap = service.snapshot();
        info!(
            listener = %service.name,
            listen = ?sockets.iter().filter_map(|(_, g)| g.first()?.local_addr().ok()).collect::<Vec<_>>(),
            backends = ?snap.pool.backends().iter().map(|b| b.addr).collect::<Vec<_>>(),
            strategy = snap.config.strategy.as_str(),
            "tcplb listening"
        );
        let stop = self.stop.child_token();
        let mut lr = ListenerRuntime { service: Arc::clone(&service), stop, sockets: Vec::new() };
        for b in snap.pool.backends() {
            health::spawn_probe(Arc::clone(&service), Arc::clone(b), self.kill.clone());
        }
        for (addr, socket) in sockets {
            self.start_socket(&mut lr, addr, socket);
        }
        self.spawn_dns(&lr);
        lr
    }

    fn start_socket(
        &self,
        lr: &mut ListenerRuntime,
        addr: SocketAddr,
        group: Vec<std::net::TcpListener>,
    ) {
        let token = lr.stop.child_token();
        let local = group.first().and_then(|s| s.local_addr().ok()).unwrap_or(addr);
        for (i, socket) in group.into_iter().enumerate() {
            let worker = i % self.workers.share.count();
            let ctx = self.accept_context(token.clone(), worker);
            let accept = listener::accept_loop(socket, Arc::clone(&lr.service), ctx);
            self.workers.share.slot(worker).handle().spawn(self.accepting.track_future(accept));
        }
        lr.sockets.push(BoundSocket { configured: addr, local, stop: token });
        lr.service.set_bound(lr.sockets.iter().map(|b| b.local).collect());
    }

    /// Re-resolves the listener's host names every `dns_refresh`, reporting
    /// results to the control loop, which applies them.
    fn spawn_dns(&self, lr: &ListenerRuntime) {
        let service = Arc::clone(&lr.service);
        let stop = lr.stop.clone();
        let resolver = Arc::clone(&self.resolver);
        let control = self.control.clone();
        tokio::spawn(async move {
            loop {
                let snap = service.snapshot();
                let every = match snap.config.dns_refresh {
                    Some(d) if snap.config.upstreams.iter().any(|u| !u.is_ip()) => d,
                    // Nothing to refresh now; look again later (a reload may change it).
                    _ => Duration::from_secs(5),
                };
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
                let snap = service.snapshot();
                if snap.config.dns_refresh.is_none()
                    || snap.config.upstreams.iter().all(|u| u.is_ip())
                {
                    continue;
                }
                let previous = previous_addrs(snap.pool.backends());
                let upstreams = snap.config.upstreams.clone();
                match discovery::resolve_all(&*resolver, &upstreams, &previous).await {
                    Ok((resolved, kept)) => {
                        for failure in kept {
                            warn!(listener = %service.name, "{failure}; keeping the last good addresses");
                        }
                        let msg = Control::Resolved {
                            service: Arc::clone(&service),
                            upstreams,
                            resolved,
                        };
                        if control.send(msg).await.is_err() {
                            return;
                        }
                    }
                    Err(failure) => warn!(listener = %service.name, "{failure}"),
                }
            }
        });
    }

    /// Applies a DNS refresh if it is still current.
    fn apply_dns(&mut self, service: &Arc<Service>, upstreams: &[Upstream], resolved: &[Resolved]) {
        if !self.listeners.iter().any(|l| Arc::ptr_eq(&l.service, service)) {
            return;
        }
        let snap = service.snapshot();
        if snap.config.upstreams != upstreams {
            return;
        }
        let assembled = assemble(&snap.config, resolved, snap.pool.backends());
        if assembled.added.is_empty() && assembled.removed.is_empty() {
            return;
        }
        info!(
            listener = %service.name,
            added = ?assembled.added.iter().map(|b| b.addr).collect::<Vec<_>>(),
            removed = ?assembled.removed.iter().map(|b| b.addr).collect::<Vec<_>>(),
            "DNS change: backends updated"
        );
        let pool = Pool::new(assembled.backends, snap.config.strategy);
        service.replace(Snapshot::new(snap.config.clone(), pool));
        self.commit_backends(service, &assembled.added, &assembled.removed);
    }

    fn commit_backends(
        &self,
        service: &Arc<Service>,
        added: &[Arc<Backend>],
        removed: &[Arc<Backend>],
    ) {
        for b in removed {
            b.retire();
        }
        for b in added {
            health::spawn_probe(Arc::clone(service), Arc::clone(b), self.kill.clone());
        }
    }

    /// Applies `config`: prepare everything (resolve, bind) without touching
    /// the running state, then commit. Returns a summary line.
    async fn reload(&mut self, config: Config) -> Result<String, Error> {
        // Prepare.
        let mut prepared = Vec::with_capacity(config.listeners.len());
        for lc in &config.listeners {
            let existing = self.listeners.iter().position(|l| *l.service.name == *lc.name);
            let old_backends =
                existing.map(|i| self.listeners[i].service.backends()).unwrap_or_default();
            let (resolved, kept) = discovery::resolve_all(
                &*self.resolver,
                &lc.upstreams,
                &previous_addrs(&old_backends),
            )
            .await
            .map_err(|f| Error::Resolve(f.to_string()))?;
            for failure in kept {
                warn!(listener = %lc.name, "{failure}; keeping the last good addresses");
            }
            let assembled = assemble(lc, &resolved, &old_backends);
            let mut new_sockets = Vec::new();
            for &addr in &lc.listen {
                let have =
                    existing.is_some_and(|i| self.listeners[i].sockets.iter().any(|b| b.is(addr)));
                if !have {
                    new_sockets.push((addr, bind(addr, lc, self.workers.share.count())?));
                }
            }
            prepared.push(Prepared { config: lc.clone(), assembled, new_sockets, existing });
        }

        // Commit.
        let (mut l_added, mut l_changed, mut b_added, mut b_removed) = (0, 0, 0, 0);
        let mut kept: Vec<ListenerRuntime> = Vec::with_capacity(prepared.len());
        let mut old: Vec<Option<ListenerRuntime>> = self.listeners.drain(..).map(Some).collect();
        for p in prepared {
            b_added += p.assembled.added.len();
            b_removed += p.assembled.removed.len();
            match p.existing.and_then(|i| old[i].take()) {
                Some(mut lr) => {
                    let snap = lr.service.snapshot();
                    let changed = snap.config != p.config
                        || !p.assembled.added.is_empty()
                        || !p.assembled.removed.is_empty();
                    l_changed += changed as usize;
                    let pool = Pool::new(p.assembled.backends, p.config.strategy);
                    lr.service.replace(Snapshot::new(p.config.clone(), pool));
                    self.commit_backends(&lr.service, &p.assembled.added, &p.assembled.removed);
                    // Close sockets whose address is gone; start the new ones.
                    lr.sockets.retain(|b| {
                        let keep = p.config.listen.iter().any(|&a| b.is(a));
                        if !keep {
                            b.stop.cancel();
                        }
                        keep
                    });
                    lr.service.set_bound(lr.sockets.iter().map(|b| b.local).collect());
                    for (addr, socket) in p.new_sockets {
                        self.start_socket(&mut lr, addr, socket);
                    }
                    kept.push(lr);
                }
                None => {
                    l_added += 1;
                    let pool = Pool::new(p.assembled.backends, p.config.strategy);
                    let service = Arc::new(Service::new(p.config, pool));
                    kept.push(self.start_listener(service, p.new_sockets));
                }
            }
        }
        let mut l_removed = 0;
        for lr in old.into_iter().flatten() {
            l_removed += 1;
            lr.stop.cancel();
            for b in lr.service.backends() {
                b.retire();
            }
            info!(listener = %lr.service.name, "listener removed: its socket is closed, its connections run to their end");
        }
        self.listeners = kept;
        self.registry
            .services
            .store(Arc::new(self.listeners.iter().map(|l| Arc::clone(&l.service)).collect()));
        self.resize_limit(config.max_connections.min(Semaphore::MAX_PERMITS));
        self.drain_timeout = config.drain_timeout;
        self.workers.share.set_balance(config.worker_balance);
        Ok(format!(
            "reload applied: listeners +{l_added} -{l_removed} ~{l_changed}, backends +{b_added} -{b_removed}"
        ))
    }

    fn resize_limit(&mut self, new: usize) {
        let old = self.max_connections;
        if new > old {
            self.limit.add_permits(new - old);
        } else if new < old {
            let limit = Arc::clone(&self.limit);
            let stop = self.kill.clone();
            let shrink = (old - new) as u32;
            // Take the permits as connections end, and never give them back.
            tokio::spawn(async move {
                tokio::select! {
                    p = limit.acquire_many_owned(shrink) => if let Ok(p) = p { p.forget() },
                    _ = stop.cancelled() => {}
                }
            });
        }
        self.max_connections = new;
    }

    /// Stops accepting, waits for connections up to the drain timeout, then
    /// closes what remains.
    async fn drain(self) {
        self.registry.draining.store(true, Ordering::Relaxed);
        self.stop.cancel();
        // Listeners are closed once their loops return: new connects are refused.
        self.accepting.close();
        self.accepting.wait().await;
        self.connections.close();
        let open = self.connections.len();
        if open > 0 {
            info!(connections = open, drain_timeout = %humantime::format_duration(self.drain_timeout), "draining");
        }
        if tokio::time::timeout(self.drain_timeout, self.connections.wait()).await.is_err() {
            warn!(
                connections = self.connections.len(),
                "drain timeout: closing remaining connections"
            );
        }
        self.kill.cancel();
        self.connections.wait().await;
        info!("tcplb stopped");
    }
}
