//! Turning upstreams into backend addresses: the resolver (injectable, so
//! tests control what names resolve to) and the periodic re-resolution that
//! makes Kubernetes headless Services and DNS round-robin names work.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use crate::config::Upstream;

/// Resolves a host name to addresses.
pub trait Resolve: Send + Sync + 'static {
    /// Every address `host:port` resolves to.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system resolver (getaddrinfo, through tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// One upstream and the addresses it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The upstream as configured.
    pub upstream: Upstream,
    /// Its addresses, in resolver order.
    pub addrs: Vec<SocketAddr>,
}

/// Why an upstream has no addresses.
#[derive(Debug)]
pub struct ResolveFailure {
    /// The upstream, as written.
    pub upstream: String,
    /// The resolver's error; None when it answered with no address.
    pub error: Option<io::Error>,
}

impl std::fmt::Display for ResolveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            Some(e) => write!(f, "cannot resolve upstream '{}': {e}", self.upstream),
            None => write!(f, "upstream '{}' resolved to no address", self.upstream),
        }
    }
}

/// Resolves every upstream. IP literals are used as they are. When a name
/// fails and `previous` holds its last good addresses, those are kept (and
/// the failure is returned beside them, to be logged); otherwise the failure
/// is fatal for this resolution.
pub async fn resolve_all(
    resolver: &dyn Resolve,
    upstreams: &[Upstream],
    previous: &HashMap<String, Vec<SocketAddr>>,
) -> Result<(Vec<Resolved>, Vec<ResolveFailure>), ResolveFailure> {
    let mut out = Vec::with_capacity(upstreams.len());
    let mut kept = Vec::new();
    for up in upstreams {
        let addrs = if let Ok(ip) = up.host.parse::<std::net::IpAddr>() {
            vec![SocketAddr::new(ip, up.port)]
        } else {
            let failure = match resolver.resolve(&up.host, up.port).await {
                Ok(a) if !a.is_empty() => {
                    out.push(Resolved { upstream: up.clone(), addrs: a });
                    continue;
                }
                Ok(_) => ResolveFailure { upstream: up.authority(), error: None },
                Err(e) => ResolveFailure { upstream: up.authority(), error: Some(e) },
            };
            match previous.get(&up.authority()) {
                Some(last) if !last.is_empty() => {
                    kept.push(failure);
                    last.clone()
                }
                _ => return Err(failure),
            }
        };
        out.push(Resolved { upstream: up.clone(), addrs });
    }
    Ok((out, kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A resolver answering from a table.
    struct Table(Mutex<HashMap<String, Vec<SocketAddr>>>);

    impl Resolve for Table {
        fn resolve<'a>(
            &'a self,
            host: &'a str,
            _port: u16,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
            let r = self.0.lock().unwrap().get(host).cloned();
            Box::pin(async move { r.ok_or_else(|| io::Error::other("NXDOMAIN")) })
        }
    }

    #[tokio::test]
    async fn names_resolve_and_failures_keep_the_last_good_set() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let table = Table(Mutex::new(HashMap::from([("svc".to_string(), vec![a])])));
        let ups = vec![Upstream::new("svc", 80), Upstream::new("127.0.0.1", 81)];
        let (r, kept) = resolve_all(&table, &ups, &HashMap::new()).await.unwrap();
        assert_eq!(r[0].addrs, vec![a]);
        assert_eq!(r[1].addrs, vec!["127.0.0.1:81".parse().unwrap()]);
        assert!(kept.is_empty());

        table.0.lock().unwrap().clear();
        assert!(resolve_all(&table, &ups, &HashMap::new()).await.is_err());
        let previous = HashMap::from([("svc:80".to_string(), vec![a])]);
        let (r, kept) = resolve_all(&table, &ups, &previous).await.unwrap();
        assert_eq!(r[0].addrs, vec![a]);
        assert_eq!(kept.len(), 1);
        assert!(kept[0].to_string().contains("svc:80"));
    }
}
