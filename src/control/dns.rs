//! DNS refresh: each listener re-resolves its upstream host names every
//! `dns_refresh` (Kubernetes headless Services, DNS round-robin names), and
//! the control loop applies a changed answer like a reload of that
//! listener's backends. A failed lookup keeps the last good addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Upstream;
use crate::control::discovery::{self, Resolved};
use crate::control::handle::Control;
use crate::control::reload::assemble;
use crate::control::server::{Running, RunningListener};
use crate::logbuf::List;
use crate::upstream::{Backend, Pool, Service, Snapshot};

/// Last good addresses of each upstream name, from a backend list.
pub(super) fn previous_addrs(backends: &[Arc<Backend>]) -> HashMap<String, Vec<SocketAddr>> {
    let mut map: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    for b in backends {
        map.entry(b.upstream.to_string()).or_default().push(b.addr);
    }
    map
}

impl Running {
    /// Re-resolves the listener's host names every `dns_refresh`, reporting
    /// results to the control loop, which applies them.
    pub(super) fn spawn_dns(&self, running: &RunningListener) {
        let service = Arc::clone(&running.service);
        let stop = running.stop.clone();
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
    pub(super) fn apply_dns(
        &mut self,
        service: &Arc<Service>,
        upstreams: &[Upstream],
        resolved: &[Resolved],
    ) {
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
            added = ?List(assembled.added.iter().map(|b| b.addr).collect()),
            removed = ?List(assembled.removed.iter().map(|b| b.addr).collect()),
            "DNS change: backends updated"
        );
        let pool = Pool::new(assembled.backends, snap.config.strategy);
        service.replace(Snapshot::new(snap.config.clone(), pool));
        self.commit_backends(service, &assembled.added, &assembled.removed);
    }
}
