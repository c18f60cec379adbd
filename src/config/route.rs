//! Routes: a listener's clients split by the server name of their TLS
//! ClientHello or the Host of their plaintext HTTP/1 request, each route
//! with its own upstreams, strategy and health settings. A route runs as a
//! service of its own (named `listener/route`) without sockets, so reload,
//! DNS, probes, metrics, the status page and the admin drain treat it as
//! they treat a listener.

use std::borrow::Cow;

use super::{HealthConfig, ListenerConfig, StrategyKind, Upstream};

/// One route of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Its name, unique within the listener.
    pub name: String,
    /// TLS server names it takes: exact (`api.example.com`) or one-label
    /// wildcards (`*.example.com`), lower-case.
    pub sni: Vec<String>,
    /// Plaintext HTTP/1 Host names it takes, the same way.
    pub http_host: Vec<String>,
    /// Its backends.
    pub upstreams: Vec<Upstream>,
    /// How its backends are chosen.
    pub strategy: StrategyKind,
    /// Its active health checks.
    pub health: HealthConfig,
}

impl RouteConfig {
    /// A route to `upstreams` for the names in `sni`, with `listener`'s
    /// strategy and health settings.
    pub fn new(
        name: &str,
        sni: Vec<String>,
        upstreams: Vec<Upstream>,
        listener: &ListenerConfig,
    ) -> Self {
        RouteConfig {
            name: name.into(),
            sni,
            http_host: Vec::new(),
            upstreams,
            strategy: listener.strategy,
            health: listener.health.clone(),
        }
    }
}

/// Which of `routes` takes a TLS client naming `sni`: the first route with
/// the exact name, else the first with the one wildcard that covers it (as
/// nginx's `map` with `hostnames` prefers exact names).
pub fn by_sni(routes: &[RouteConfig], sni: &str) -> Option<usize> {
    best(routes, |r| &r.sni, sni)
}

/// Which of `routes` takes a plaintext HTTP request for `host` (a port,
/// if any, already removed).
pub fn by_host(routes: &[RouteConfig], host: &str) -> Option<usize> {
    best(routes, |r| &r.http_host, host)
}

fn best(
    routes: &[RouteConfig],
    names: impl Fn(&RouteConfig) -> &Vec<String>,
    name: &str,
) -> Option<usize> {
    let name = name.trim_end_matches('.');
    // Names come lowercase almost always: a copy only for those that do not.
    let name: Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    };
    if let Some(i) = routes.iter().position(|r| names(r).iter().any(|n| *n == name)) {
        return Some(i);
    }
    // A wildcard covers exactly one label: *.example.com takes
    // a.example.com, neither example.com nor a.b.example.com.
    let (_, parent) = name.split_once('.')?;
    routes.iter().position(|r| {
        names(r).iter().any(|p| p.strip_prefix("*.").is_some_and(|suffix| suffix == parent))
    })
}

/// A route name pattern as the user wrote it: a DNS name, or `*.` and one.
pub fn parse_pattern(s: &str) -> Result<String, String> {
    let (wild, name) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let name = super::parse_server_name(name).map_err(|_| {
        format!(
            "bad name '{s}': expected a DNS name (api.example.com) or a wildcard (*.example.com)"
        )
    })?;
    Ok(if wild { format!("*.{name}") } else { name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, sni: &[&str]) -> RouteConfig {
        let l = ListenerConfig::new("l", vec![], vec![]);
        RouteConfig::new(name, sni.iter().map(|s| s.to_string()).collect(), vec![], &l)
    }

    #[test]
    fn exact_names_win_over_wildcards_and_wildcards_cover_one_label() {
        let routes = [
            route("wild", &["*.example.com"]),
            route("api", &["api.example.com"]),
            route("deep", &["*.a.example.com"]),
        ];
        assert_eq!(by_sni(&routes, "api.example.com"), Some(1));
        assert_eq!(by_sni(&routes, "API.Example.COM."), Some(1));
        assert_eq!(by_sni(&routes, "www.example.com"), Some(0));
        assert_eq!(by_sni(&routes, "x.a.example.com"), Some(2));
        assert_eq!(by_sni(&routes, "example.com"), None);
        assert_eq!(by_sni(&routes, "x.y.b.example.com"), None);
        assert_eq!(by_sni(&routes, ""), None);
    }

    #[test]
    fn patterns_are_checked() {
        assert_eq!(parse_pattern("*.Example.com").unwrap(), "*.example.com");
        assert_eq!(parse_pattern("api.example.com.").unwrap(), "api.example.com");
        assert!(parse_pattern("a.*.com").unwrap_err().contains("'a.*.com'"));
        assert!(parse_pattern("*").is_err());
        assert!(parse_pattern("bad name").is_err());
    }
}
