//! Reload: a new configuration is prepared without touching the running
//! state (resolve every upstream, bind new addresses), then committed in one
//! step by the control loop (swap snapshots, start and stop sockets and
//! probes), so a reload that fails leaves everything as it was. Backends with
//! an unchanged address keep their health and counters.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::{Config, ListenerConfig, Upstream};
use crate::control::discovery::{self, Resolved};
use crate::control::dns::previous_addrs;
use crate::control::server::{bind, wire_routes, Running, RunningListener, Sockets};
use crate::control::{probe, Error};
use crate::upstream::{Backend, Pool, Service, Settings, Snapshot};

/// The backends for a listener after resolution, and how they differ from before.
pub(super) struct Assembled {
    /// The new backend list.
    pub(super) backends: Vec<Arc<Backend>>,
    /// Backends that did not exist before.
    pub(super) added: Vec<Arc<Backend>>,
    /// Old backends that are gone.
    pub(super) removed: Vec<Arc<Backend>>,
}

/// Settings of the backends of `up` in listener `cfg`.
fn settings_for(cfg: &ListenerConfig, up: &Upstream) -> Settings {
    Settings {
        weight: up.weight,
        backup: up.backup,
        max_connections: up.max_connections.unwrap_or(0),
        send_proxy: up.send_proxy.or(cfg.send_proxy),
        slow_start: cfg.slow_start,
    }
}

/// Builds the backend list for `resolved`, reusing old backends with the
/// same address (so they keep their health state and counters).
pub(super) fn assemble(
    cfg: &ListenerConfig,
    resolved: &[Resolved],
    old: &[Arc<Backend>],
) -> Assembled {
    let by_addr: HashMap<SocketAddr, &Arc<Backend>> = old.iter().map(|b| (b.addr, b)).collect();
    let mut seen = HashSet::new();
    let mut backends = Vec::new();
    let mut added = Vec::new();
    for r in resolved {
        let settings = settings_for(cfg, &r.upstream);
        for &addr in &r.addrs {
            if !seen.insert(addr) {
                warn!(listener = %cfg.name, upstream = %r.upstream, %addr, "duplicate backend address ignored");
                continue;
            }
            let b = match by_addr.get(&addr) {
                Some(b) => {
                    b.apply(settings);
                    b.health.set_thresholds(cfg.health.rise, cfg.health.fall);
                    Arc::clone(b)
                }
                None => {
                    let name: Arc<str> = r.upstream.authority().into();
                    let b = Arc::new(Backend::with_settings(
                        addr,
                        name,
                        cfg.health.rise,
                        cfg.health.fall,
                        settings,
                    ));
                    // Not at start: only a backend that joins a running pool ramps.
                    if !old.is_empty() {
                        b.start_ramp();
                    }
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

/// A listener prepared by a reload, not yet running.
struct Prepared {
    /// Its new configuration.
    config: ListenerConfig,
    /// Its backends.
    assembled: Assembled,
    /// Newly bound sockets (addresses it did not have).
    new_sockets: Sockets,
    /// Index in `Running::listeners` when it already runs.
    existing: Option<usize>,
}

impl Running {
    pub(super) fn commit_backends(
        &self,
        service: &Arc<Service>,
        added: &[Arc<Backend>],
        removed: &[Arc<Backend>],
    ) {
        service.retire(removed);
        for b in added {
            probe::spawn_probe(Arc::clone(service), Arc::clone(b), self.kill.clone());
        }
    }

    /// Applies `config`: prepare everything (resolve, bind) without touching
    /// the running state, then commit. Returns a summary line.
    pub(super) async fn reload(&mut self, config: Config) -> Result<String, Error> {
        let prepared = self.prepare(&config).await?;
        Ok(self.commit(&config, prepared))
    }

    /// Resolves and binds what `config` needs; on error nothing has changed.
    async fn prepare(&self, config: &Config) -> Result<Vec<Prepared>, Error> {
        let mut prepared = Vec::new();
        for cfg in &config.listeners {
            cfg.validate().map_err(Error::Config)?;
        }
        for cfg in &config.services() {
            let existing = self.listeners.iter().position(|l| *l.service.name == *cfg.name);
            let old_backends =
                existing.map(|i| self.listeners[i].service.backends()).unwrap_or_default();
            let (resolved, kept) = discovery::resolve_all(
                &*self.resolver,
                &cfg.upstreams,
                &previous_addrs(&old_backends),
            )
            .await
            .map_err(|f| Error::Resolve(f.to_string()))?;
            for failure in kept {
                warn!(listener = %cfg.name, "{failure}; keeping the last good addresses");
            }
            let assembled = assemble(cfg, &resolved, &old_backends);
            let mut new_sockets = Vec::new();
            for &addr in &cfg.listen {
                let have =
                    existing.is_some_and(|i| self.listeners[i].sockets.iter().any(|b| b.is(addr)));
                if !have {
                    new_sockets.push((addr, bind(addr, cfg, self.workers.set.count())?));
                }
            }
            prepared.push(Prepared { config: cfg.clone(), assembled, new_sockets, existing });
        }
        Ok(prepared)
    }

    /// Swaps in what `prepare` made: new snapshots, sockets and probes,
    /// closing what the configuration no longer names. Cannot fail.
    fn commit(&mut self, config: &Config, prepared: Vec<Prepared>) -> String {
        let (mut l_added, mut l_changed, mut b_added, mut b_removed) = (0, 0, 0, 0);
        let mut kept: Vec<RunningListener> = Vec::with_capacity(prepared.len());
        let mut old: Vec<Option<RunningListener>> = self.listeners.drain(..).map(Some).collect();
        for p in prepared {
            b_added += p.assembled.added.len();
            b_removed += p.assembled.removed.len();
            match p.existing.and_then(|i| old[i].take()) {
                Some(mut running) => {
                    l_changed += self.update_listener(&mut running, p) as usize;
                    kept.push(running);
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
        for running in old.into_iter().flatten() {
            l_removed += 1;
            running.stop.cancel();
            for b in running.service.backends() {
                b.retire();
            }
            info!(listener = %running.service.name, "listener removed: its socket is closed, its connections run to their end");
        }
        self.listeners = kept;
        let services: Vec<Arc<Service>> =
            self.listeners.iter().map(|l| Arc::clone(&l.service)).collect();
        wire_routes(&services);
        self.view.services.store(Arc::new(services));
        self.resize_limit(config.max_connections.min(Semaphore::MAX_PERMITS));
        self.drain_timeout = config.drain_timeout;
        self.workers.set.set_balance(config.worker_balance);
        format!(
            "reload applied: listeners +{l_added} -{l_removed} ~{l_changed}, backends +{b_added} -{b_removed}"
        )
    }

    /// Commits a prepared listener that already runs: its new snapshot,
    /// backends and sockets. Returns whether anything about it changed.
    fn update_listener(&self, running: &mut RunningListener, p: Prepared) -> bool {
        let snap = running.service.snapshot();
        let changed = snap.config != p.config
            || !p.assembled.added.is_empty()
            || !p.assembled.removed.is_empty();
        let pool = Pool::new(p.assembled.backends, p.config.strategy);
        running.service.replace(Snapshot::new(p.config.clone(), pool));
        self.commit_backends(&running.service, &p.assembled.added, &p.assembled.removed);
        // Close sockets whose address is gone; start the new ones.
        running.sockets.retain(|b| {
            let keep = p.config.listen.iter().any(|&a| b.is(a));
            if !keep {
                b.stop.cancel();
            }
            keep
        });
        running.service.set_bound(running.sockets.iter().map(|b| b.local).collect());
        for (addr, socket) in p.new_sockets {
            self.start_socket(running, addr, socket);
        }
        changed
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
}
