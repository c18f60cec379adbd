//! Active health probes: one task per backend, which connects every
//! interval, holds the check's dialogue (check.rs) and feeds the result to
//! the backend's rise/fall state.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::check;
use crate::config::{HealthCheck, HealthConfig, ProxyVersion};
use crate::conn::proxy_protocol;
use crate::io::describe_io;
use crate::upstream::{log_transition, Backend, Service};

/// A random number, without a dependency: every `RandomState` is freshly keyed.
fn random_u64() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// `d` scaled by a random factor in [1 - frac, 1 + frac).
fn jittered(d: Duration, frac: f64) -> Duration {
    let unit = (random_u64() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    d.mul_f64(1.0 - frac + 2.0 * frac * unit)
}

/// Spawns the probe task of one backend. It runs until `kill` is cancelled
/// (shutdown) or the backend is retired (removed by a reload or DNS change),
/// and reads the listener's current health settings before every probe.
pub fn spawn_probe(service: Arc<Service>, backend: Arc<Backend>, kill: CancellationToken) {
    tokio::spawn(async move {
        let retired = backend.retired().clone();
        let prober = Prober { service, backend };
        tokio::select! {
            _ = prober.run() => {}
            _ = kill.cancelled() => {}
            _ = retired.cancelled() => {}
        }
    });
}

/// The probe loop of one backend.
struct Prober {
    /// The listener, for its name and current health settings.
    service: Arc<Service>,
    /// The backend probed.
    backend: Arc<Backend>,
}

impl Prober {
    async fn run(self) {
        let first = self.service.snapshot().config.health.interval;
        // Spread the first probes over one interval so backends are not probed in lock-step.
        tokio::time::sleep(first.mul_f64((random_u64() % 1000) as f64 / 1000.0)).await;
        loop {
            let config = self.service.snapshot().config.health.clone();
            if config.check != HealthCheck::None {
                let proxy = config.send_proxy.then(|| self.backend.send_proxy()).flatten();
                let result = probe(self.backend.addr, &config, proxy).await;
                let ok = result.is_ok();
                let reason = match &result {
                    Ok(what) => what.clone(),
                    Err(why) => why.clone(),
                };
                debug!(listener = %self.service.name, backend = %self.backend.addr, ok, %reason, "health probe");
                self.backend.record_probe(ok, &reason);
                if let Some(t) = self.backend.health.observe(ok) {
                    log_transition(&self.service.name, &self.backend, t, &reason);
                }
            }
            tokio::time::sleep(jittered(config.interval, 0.1)).await;
        }
    }
}

/// Runs one probe; Ok holds a short description, Err the reason it failed.
pub async fn probe(
    addr: SocketAddr,
    config: &HealthConfig,
    send_proxy: Option<ProxyVersion>,
) -> Result<String, String> {
    match tokio::time::timeout(config.timeout, probe_inner(addr, config, send_proxy)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timeout after {}", humantime::format_duration(config.timeout))),
    }
}

async fn probe_inner(
    addr: SocketAddr,
    config: &HealthConfig,
    send_proxy: Option<ProxyVersion>,
) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| describe_io(&e))?;
    if let Some(version) = send_proxy {
        // The probe's own addresses, as HAProxy's check-send-proxy does.
        let local = stream.local_addr().map_err(|e| describe_io(&e))?;
        let header = proxy_protocol::encode(version, local, addr);
        stream.write_all(&header).await.map_err(|e| describe_io(&e))?;
    }
    let host = addr.to_string();
    check::converse(&mut stream, &config.check, &host, config.sni.as_deref(), config.timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(2), 0.1);
            assert!(d >= Duration::from_millis(1800) && d < Duration::from_millis(2200), "{d:?}");
        }
    }
}
