//! Binding and running: the testable entry point and the control loop.
//!
//! [`Server::bind`] resolves every upstream and binds every listen address
//! (port 0 works, and [`Server::local_addrs`] reads the real ports back).
//! [`Server::run`] accepts until the shutdown future resolves, then drains.
//! While it runs, one control loop is the only writer of listener state: a
//! [`Handle::reload`] or a DNS refresh is prepared without touching anything
//! (resolve, bind new sockets), then committed by swapping snapshots
//! (`reload`, `dns`), so a failed reload leaves the old configuration
//! running unchanged.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{Config, ListenerConfig};
use crate::conn::listener::{self, AcceptContext};
use crate::conn::workers::Workers;
use crate::control::discovery::{self, Resolve, SystemResolver};
use crate::control::handle::{Control, Handle, ServerView};
use crate::control::reload::assemble;
use crate::control::upgrade::{self, Handover, Inherited};
use crate::control::{admin, metrics, probe, Error};
use crate::logbuf::List;
use crate::stats;
use crate::upstream::{Backend, Pool, Service};

/// Bound sockets of one listener, keyed by their configured address: one
/// SO_REUSEPORT socket per worker for each address.
pub(super) type Sockets = Vec<(SocketAddr, Vec<std::net::TcpListener>)>;

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
    view: Arc<ServerView>,
    /// The admin endpoint's socket and bearer token, when enabled.
    admin: Option<(TcpListener, Option<String>)>,
    /// The process this one took its sockets from: told when all accept.
    predecessor: Option<Inherited>,
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
        Self::bind_all(config, resolver, None).await
    }

    /// Like [`Server::bind`], taking the listening sockets `inherited` from
    /// the process being upgraded where it has them (the others are bound).
    pub async fn bind_inheriting(config: Config, inherited: Inherited) -> Result<Server, Error> {
        Self::bind_all(config, Arc::new(SystemResolver), Some(inherited)).await
    }

    async fn bind_all(
        config: Config,
        resolver: Arc<dyn Resolve>,
        mut inherited: Option<Inherited>,
    ) -> Result<Server, Error> {
        for cfg in &config.listeners {
            cfg.validate().map_err(Error::Config)?;
        }
        let services = config.services();
        let mut listeners = Vec::with_capacity(services.len());
        for cfg in &services {
            let (resolved, _) = discovery::resolve_all(&*resolver, &cfg.upstreams, &HashMap::new())
                .await
                .map_err(|f| Error::Resolve(f.to_string()))?;
            let assembled = assemble(cfg, &resolved, &[]);
            let mut sockets = Vec::with_capacity(cfg.listen.len());
            for &addr in &cfg.listen {
                let group = match inherited.as_mut().and_then(|i| i.take(addr)) {
                    Some(group) => group,
                    None => bind(addr, cfg, config.workers())?,
                };
                sockets.push((addr, group));
            }
            let pool = Pool::new(assembled.backends, cfg.strategy);
            listeners.push((Arc::new(Service::new(cfg.clone(), pool)), sockets));
        }
        let admin = match &config.admin {
            Some(a) => {
                let token = match &a.token_file {
                    Some(path) => Some(read_token(path)?),
                    None => None,
                };
                let taken = inherited.as_mut().and_then(|i| i.take_admin(a.listen));
                let socket = match taken {
                    Some(s) => s
                        .set_nonblocking(true)
                        .and_then(|()| TcpListener::from_std(s))
                        .map_err(|source| Error::Bind { addr: a.listen, source })?,
                    None => listener::bind(a.listen, 128)
                        .map_err(|source| Error::Bind { addr: a.listen, source })?,
                };
                Some((socket, token))
            }
            None => None,
        };
        let services: Vec<Arc<Service>> = listeners.iter().map(|(s, _)| Arc::clone(s)).collect();
        wire_routes(&services);
        let view = Arc::new(ServerView::default());
        view.services.store(Arc::new(services));
        let (control_tx, control_rx) = mpsc::channel(16);
        if let Some(gone) = inherited.as_ref().map(Inherited::unclaimed).filter(|g| !g.is_empty()) {
            warn!(addresses = ?List(gone), "the old process listened on addresses this configuration does not name: closing them");
        }
        let predecessor = inherited;
        Ok(Server { config, resolver, listeners, control_tx, control_rx, view, admin, predecessor })
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
        Handle { control: self.control_tx.clone(), view: Arc::clone(&self.view) }
    }

    /// Accepts until `shutdown` resolves, then closes the listeners, lets
    /// connections finish for up to the drain timeout, closes the rest and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let handle = self.handle();
        stats::record_reload_success();
        let kill = CancellationToken::new();
        let workers = match Workers::start(self.config.workers(), self.config.worker_balance, &kill)
        {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot start worker threads");
                return;
            }
        };
        let Server {
            config,
            resolver,
            listeners,
            control_tx,
            mut control_rx,
            view,
            admin,
            predecessor,
        } = self;
        let mut running = Running {
            resolver,
            view,
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
            admin_socket: None,
            admin_stop: CancellationToken::new(),
            upgrading: false,
            handed_over: false,
        };
        let _ = running.view.workers.set(Arc::clone(&running.workers.set));
        for (svc, sockets) in listeners {
            let started = running.start_listener(svc, sockets);
            running.listeners.push(started);
        }
        if let Some((socket, token)) = admin {
            let addr =
                socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
            info!(%addr, "admin endpoint listening");
            running.admin_socket = socket.as_fd().try_clone_to_owned().ok().map(|fd| (addr, fd));
            let metrics = metrics::registry(Arc::clone(&running.view));
            let admin = Arc::new(admin::Admin::new(handle, metrics, token, addr));
            running.admin_stop = running.kill.child_token();
            tokio::spawn(admin::serve(socket, admin, running.admin_stop.clone()));
        }

        // systemd (Type=notify): ready once every socket is bound and
        // accepting; a no-op without NOTIFY_SOCKET.
        let listening = format!("listening: {} listener(s)", running.listeners.len());
        if let Some(predecessor) = predecessor {
            // Every socket accepts here: the old process may stop. Under
            // systemd this process becomes the service's main process
            // (the unit needs NotifyAccess=all).
            match predecessor.ready() {
                Ok(()) => {
                    info!(pid = std::process::id(), "upgrade: took the listening sockets over")
                }
                Err(e) => {
                    warn!(error = %e, "upgrade: cannot tell the old process; it keeps accepting too")
                }
            }
            let pid = std::process::id();
            notify(&[
                NotifyState::MainPid(pid),
                NotifyState::Ready,
                NotifyState::Status(&listening),
            ]);
        } else {
            notify(&[NotifyState::Ready, NotifyState::Status(&listening)]);
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(cmd) = control_rx.recv() => match cmd {
                    Control::Reload(config, reply) => {
                        let result = running.reload(*config).await;
                        match &result {
                            Ok(summary) => {
                                info!("{summary}");
                                stats::RELOADS_APPLIED.fetch_add(1, Ordering::Relaxed);
                                stats::record_reload_success();
                                notify(&[NotifyState::Status(summary)]);
                            }
                            Err(e) => {
                                warn!(error = %e, "reload failed: keeping the running configuration");
                                stats::RELOADS_FAILED.fetch_add(1, Ordering::Relaxed);
                                notify(&[NotifyState::Status(&format!("reload failed: {e}"))]);
                            }
                        }
                        let _ = reply.send(result);
                    }
                    Control::Resolved { service, upstreams, resolved } => {
                        running.apply_dns(&service, &upstreams, &resolved);
                    }
                    Control::Upgrade(reply) => running.start_upgrade(reply),
                    Control::Upgraded(result, reply) => {
                        if running.finish_upgrade(result, reply) {
                            break;
                        }
                    }
                },
            }
        }
        running.drain().await;
    }
}

impl Server {
    /// What `--check` verifies beyond the configuration's own rules, as
    /// `nginx -t` and `haproxy -c` do, binding nothing: every upstream name
    /// resolves, the admin token file is readable, and no two sockets (the
    /// admin endpoint's included) would claim the same address. Every problem,
    /// one line each.
    pub async fn preflight(config: &Config) -> Vec<String> {
        Self::preflight_with(config, &SystemResolver).await
    }

    /// Like [`Server::preflight`] with a given resolver.
    pub async fn preflight_with(config: &Config, resolver: &dyn Resolve) -> Vec<String> {
        let mut problems = Vec::new();
        let mut claimed: Vec<(SocketAddr, String)> = Vec::new();
        for cfg in &config.listeners {
            if let Err(e) = cfg.validate() {
                problems.push(e);
            }
        }
        for cfg in &config.services() {
            if let Err(f) = discovery::resolve_all(resolver, &cfg.upstreams, &HashMap::new()).await
            {
                problems.push(format!("listener '{}': {f}", cfg.name));
            }
            for &addr in &cfg.listen {
                claimed.push((addr, format!("listener '{}'", cfg.name)));
            }
        }
        if let Some(a) = &config.admin {
            if let Some(path) = &a.token_file {
                if let Err(e) = read_token(path) {
                    problems.push(e.to_string());
                }
            }
            claimed.push((a.listen, "the admin endpoint".into()));
        }
        for (i, (addr, who)) in claimed.iter().enumerate() {
            let clash = claimed[..i].iter().find(|(other, _)| overlaps(*addr, *other));
            if let Some((other, first)) = clash {
                problems.push(format!(
                    "{who} listens on {addr}, which {first} already takes ({other})"
                ));
            }
        }
        problems
    }
}

/// Points every listener with routes at its routes' services (which
/// `Config::services` names `listener/route`).
pub(super) fn wire_routes(services: &[Arc<Service>]) {
    for s in services {
        let snap = s.snapshot();
        if snap.config.routes.is_empty() {
            continue;
        }
        let routes = snap
            .config
            .routes
            .iter()
            .filter_map(|r| {
                let name = format!("{}/{}", s.name, r.name);
                services.iter().find(|c| *c.name == *name).cloned()
            })
            .collect();
        s.set_routes(routes);
    }
}

/// Tells systemd (`Type=notify`) how the service is; nothing happens
/// without NOTIFY_SOCKET, and a failure to tell it changes nothing else.
fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        debug!(error = %e, "cannot notify systemd");
    }
}

/// Whether two sockets would compete for the same address: the same port,
/// and the same IP or a wildcard of the same family (port 0 never clashes).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
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

/// Binds one listen address for `cfg`: one socket per worker.
pub(super) fn bind(
    addr: SocketAddr,
    cfg: &ListenerConfig,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, Error> {
    listener::bind_group(addr, cfg.backlog, workers).map_err(|source| Error::Bind { addr, source })
}

/// The running state, owned by the control loop.
pub(super) struct Running {
    /// Resolves upstream names.
    pub(super) resolver: Arc<dyn Resolve>,
    /// What handles see.
    pub(super) view: Arc<ServerView>,
    /// For DNS tasks to report back.
    pub(super) control: mpsc::Sender<Control>,
    /// Global connection limit.
    pub(super) limit: Arc<Semaphore>,
    /// The limit's current size.
    pub(super) max_connections: usize,
    /// Current drain timeout.
    pub(super) drain_timeout: Duration,
    /// Cancelled when shutdown begins: every accept loop stops.
    pub(super) stop: CancellationToken,
    /// Cancelled at the drain deadline: connections and probes end.
    pub(super) kill: CancellationToken,
    /// Connection tasks.
    pub(super) connections: TaskTracker,
    /// Accept loops.
    pub(super) accepting: TaskTracker,
    /// Running listeners, in configuration order.
    pub(super) listeners: Vec<RunningListener>,
    /// The data-plane threads.
    pub(super) workers: Workers,
    /// A duplicate of the admin endpoint's socket, for an upgrade.
    pub(super) admin_socket: Option<(SocketAddr, OwnedFd)>,
    /// Stops the admin endpoint (at the drain deadline, or at once when an
    /// upgrade handed its socket over).
    pub(super) admin_stop: CancellationToken,
    /// An upgrade is under way.
    pub(super) upgrading: bool,
    /// The sockets went to a new process: drain without telling systemd
    /// (the service goes on, in the new process).
    pub(super) handed_over: bool,
}

/// One running listener.
pub(super) struct RunningListener {
    /// Its shared state.
    pub(super) service: Arc<Service>,
    /// Stops its accept loops and DNS task (child of the global stop).
    pub(super) stop: CancellationToken,
    /// Its sockets, each with its own stop token.
    pub(super) sockets: Vec<BoundSocket>,
}

/// One running listen socket.
pub(super) struct BoundSocket {
    /// The address as configured (port 0 possible).
    pub(super) configured: SocketAddr,
    /// The address actually bound.
    pub(super) local: SocketAddr,
    /// Stops its accept loop, which closes it.
    pub(super) stop: CancellationToken,
    /// Duplicates of its sockets, to hand to a new process on upgrade.
    pub(super) handover: Vec<OwnedFd>,
}

impl BoundSocket {
    /// Whether a configured address `addr` names this socket.
    pub(super) fn is(&self, addr: SocketAddr) -> bool {
        self.configured == addr || self.local == addr
    }
}

impl Running {
    fn accept_context(&self, stop: CancellationToken, worker: usize) -> AcceptContext {
        AcceptContext {
            limit: Arc::clone(&self.limit),
            tracker: self.connections.clone(),
            stop,
            workers: Arc::clone(&self.workers.set),
            worker,
        }
    }

    pub(super) fn start_listener(
        &self,
        service: Arc<Service>,
        sockets: Sockets,
    ) -> RunningListener {
        let snap = service.snapshot();
        info!(
            listener = %service.name,
            listen = ?List(sockets.iter().filter_map(|(_, g)| g.first()?.local_addr().ok()).collect()),
            backends = ?List(snap.pool.backends().iter().map(|b| b.addr).collect()),
            strategy = snap.config.strategy.as_str(),
            "tcplb listening"
        );
        let stop = self.stop.child_token();
        let mut running =
            RunningListener { service: Arc::clone(&service), stop, sockets: Vec::new() };
        for b in snap.pool.backends() {
            probe::spawn_probe(Arc::clone(&service), Arc::clone(b), self.kill.clone());
        }
        for (addr, socket) in sockets {
            self.start_socket(&mut running, addr, socket);
        }
        self.spawn_dns(&running);
        running
    }

    pub(super) fn start_socket(
        &self,
        running: &mut RunningListener,
        addr: SocketAddr,
        group: Vec<std::net::TcpListener>,
    ) {
        let token = running.stop.child_token();
        let local = group.first().and_then(|s| s.local_addr().ok()).unwrap_or(addr);
        let handover = group.iter().filter_map(|s| s.as_fd().try_clone_to_owned().ok()).collect();
        for (i, socket) in group.into_iter().enumerate() {
            let worker = i % self.workers.set.count();
            let ctx = self.accept_context(token.clone(), worker);
            let accept = listener::accept_loop(socket, Arc::clone(&running.service), ctx);
            self.workers.set.slot(worker).handle().spawn(self.accepting.track_future(accept));
        }
        running.sockets.push(BoundSocket { configured: addr, local, stop: token, handover });
        running.service.set_bound(running.sockets.iter().map(|b| b.local).collect());
    }

    /// Starts a new binary and hands it the sockets, without waiting here:
    /// the control loop goes on until it answers ([`Control::Upgraded`]).
    fn start_upgrade(&mut self, reply: oneshot::Sender<Result<u32, Error>>) {
        if self.upgrading {
            let _ = reply.send(Err(Error::Upgrade("an upgrade is already under way".into())));
            return;
        }
        self.upgrading = true;
        let mut handover = Handover::default();
        for listener in &self.listeners {
            for socket in &listener.sockets {
                let fds = socket.handover.iter().filter_map(|f| f.try_clone().ok()).collect();
                handover.groups.push((socket.configured, socket.local, fds));
            }
        }
        handover.admin =
            self.admin_socket.as_ref().and_then(|(addr, fd)| Some((*addr, fd.try_clone().ok()?)));
        info!(
            sockets = handover.groups.iter().map(|g| g.2.len()).sum::<usize>(),
            "upgrade: starting the new binary"
        );
        let control = self.control.clone();
        tokio::spawn(async move {
            let result = upgrade::start_successor(handover).await;
            let _ = control.send(Control::Upgraded(result, reply)).await;
        });
    }

    /// Whether the new process took over (then this one drains).
    fn finish_upgrade(
        &mut self,
        result: Result<u32, String>,
        reply: oneshot::Sender<Result<u32, Error>>,
    ) -> bool {
        self.upgrading = false;
        match result {
            Ok(pid) => {
                info!(new_pid = pid, "upgrade: the new process accepts on every socket; this one stops accepting and drains");
                self.handed_over = true;
                self.admin_stop.cancel();
                let _ = reply.send(Ok(pid));
                true
            }
            Err(e) => {
                warn!(error = %e, "upgrade failed: this process goes on serving");
                let _ = reply.send(Err(Error::Upgrade(e)));
                false
            }
        }
    }

    /// Stops accepting, waits for connections up to the drain timeout, then
    /// closes what remains.
    async fn drain(mut self) {
        if !self.handed_over {
            notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
        }
        // The duplicates kept for an upgrade would hold the sockets open
        // (and queue connections no one accepts) once the accept loops end.
        for listener in &mut self.listeners {
            for socket in &mut listener.sockets {
                socket.handover.clear();
            }
        }
        self.admin_socket = None;
        self.view.draining.store(true, Ordering::Relaxed);
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
