//! The TOML configuration file: several listeners, shared defaults, the admin
//! endpoint. Every problem is reported with the file name, line and column;
//! unknown keys are errors, never silently ignored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{
    parse_cidr, parse_duration, parse_listen, parse_listen_all, parse_proxy_version,
    route::{self, RouteConfig},
    AdminConfig, Config, HealthCheck, HealthConfig, ListenerConfig, Protocol, SpliceMode,
    StrategyKind, Upstream, WorkerBalance,
};

/// Every problem found in a file, each as `FILE:LINE:COL: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.join("\n"))
    }
}

impl std::error::Error for Problems {}

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<Config, Problems> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Problems(vec![format!("{}: cannot read: {e}", path.display())]))?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates `text`; `origin` names it in messages.
pub fn parse(text: &str, origin: &str) -> Result<Config, Problems> {
    let mut v = Validator { text, origin, problems: Vec::new() };
    // Every unknown key and wrong type first, all at once; the typed parse
    // below would stop at the first of them.
    super::shape::check(text, &mut |span, msg| v.error(span, msg));
    if !v.problems.is_empty() {
        return Err(Problems(v.in_line_order()));
    }
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            v.error(span, e.message().trim());
            return Err(Problems(v.problems));
        }
    };
    let config = v.file(raw);
    if v.problems.is_empty() {
        Ok(config)
    } else {
        Err(Problems(v.in_line_order()))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    drain_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
    worker_balance: Option<Spanned<String>>,
    defaults: Option<Spanned<RawListener>>,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
    token_file: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<Spanned<String>>,
    listen: Option<Spanned<Value>>,
    upstreams: Option<Spanned<Vec<Spanned<Value>>>>,
    protocol: Option<Spanned<String>>,
    strategy: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    connect_attempts: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<String>>,
    half_close_timeout: Option<Spanned<String>>,
    peek_timeout: Option<Spanned<String>>,
    proxy_header_timeout: Option<Spanned<String>>,
    dns_refresh: Option<Spanned<String>>,
    send_proxy: Option<Spanned<String>>,
    accept_proxy: Option<bool>,
    access_log: Option<bool>,
    splice: Option<Spanned<String>>,
    allow: Option<Vec<Spanned<String>>>,
    deny: Option<Vec<Spanned<String>>>,
    accept_proxy_from: Option<Vec<Spanned<String>>>,
    backlog: Option<Spanned<i64>>,
    health: Option<Spanned<RawHealth>>,
    route: Option<Vec<Spanned<RawRoute>>>,
    max_connections: Option<Spanned<i64>>,
    max_connections_per_client: Option<Spanned<i64>>,
    connection_rate_per_client: Option<Spanned<String>>,
    slow_start: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<Spanned<String>>,
    sni: Option<Vec<Spanned<String>>>,
    http_host: Option<Vec<Spanned<String>>>,
    upstreams: Option<Spanned<Vec<Spanned<Value>>>>,
    strategy: Option<Spanned<String>>,
    health: Option<Spanned<RawHealth>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    send_proxy: Option<bool>,
    send: Option<Spanned<String>>,
    send_hex: Option<Spanned<String>>,
    expect: Option<Spanned<String>>,
    expect_hex: Option<Spanned<String>>,
    sni: Option<Spanned<String>>,
    ejection_time: Option<Spanned<String>>,
    max_ejection_time: Option<Spanned<String>>,
    max_ejection_percent: Option<Spanned<i64>>,
}

/// Collects problems while turning raw values into a [`Config`].
struct Validator<'a> {
    /// The file's text, to turn byte offsets into lines and columns.
    text: &'a str,
    /// The file name.
    origin: &'a str,
    /// What is wrong so far.
    problems: Vec<String>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, msg: impl std::fmt::Display) {
        let at = span.start.min(self.text.len());
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.problems.push(format!("{}:{line}:{col}: {msg}", self.origin));
    }

    /// The problems sorted by line and column (each starts `FILE:LINE:COL:`).
    fn in_line_order(self) -> Vec<String> {
        let origin_len = self.origin.len() + 1;
        let position = |p: &String| -> (usize, usize) {
            let mut at = p.get(origin_len..).unwrap_or("").split(':');
            let mut next = || at.next().and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
            (next(), next())
        };
        let mut problems = self.problems;
        problems.sort_by_key(position);
        problems
    }

    fn duration(&mut self, s: &Spanned<String>, key: &str) -> Option<Duration> {
        match parse_duration(s.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(s.span(), format!("{key}: {e}"));
                None
            }
        }
    }

    /// A duration where 0 means "off".
    fn optional_duration(&mut self, s: &Spanned<String>, key: &str) -> Option<Option<Duration>> {
        self.duration(s, key).map(|d| (!d.is_zero()).then_some(d))
    }

    fn positive_duration(&mut self, s: &Spanned<String>, key: &str) -> Option<Duration> {
        let d = self.duration(s, key)?;
        if d.is_zero() {
            self.error(s.span(), format!("{key} must be more than 0"));
            return None;
        }
        Some(d)
    }

    /// One of the names of `T` (a clap value enum), or an error listing them.
    fn choice<T: clap::ValueEnum>(&mut self, s: &Spanned<String>, key: &str) -> Option<T> {
        if let Ok(v) = T::from_str(s.get_ref(), false) {
            return Some(v);
        }
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| Some(v.to_possible_value()?.get_name().to_string()))
            .collect();
        let choices = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.error(s.span(), format!("{key} '{}' must be {choices}", s.get_ref()));
        None
    }

    fn count(&mut self, n: &Spanned<i64>, key: &str, min: i64, max: i64) -> Option<i64> {
        let v = *n.get_ref();
        if v < min || v > max {
            self.error(
                n.span(),
                format!("{key} must be a whole number from {min} to {max}, not {v}"),
            );
            return None;
        }
        Some(v)
    }

    fn file(&mut self, raw: RawFile) -> Config {
        let mut config = Config::default();
        if let Some(d) = &raw.drain_timeout {
            config.drain_timeout =
                self.duration(d, "drain_timeout").unwrap_or(config.drain_timeout);
        }
        if let Some(n) = &raw.max_connections {
            config.max_connections =
                self.count(n, "max_connections", 1, 10_000_000).unwrap_or(1) as usize;
        }
        if let Some(n) = &raw.threads {
            config.threads = self.count(n, "threads", 1, 1024).map(|n| n as usize);
        }
        if let Some(b) = &raw.worker_balance {
            config.worker_balance =
                self.choice::<WorkerBalance>(b, "worker_balance").unwrap_or(config.worker_balance);
        }
        if let Some(a) = &raw.admin {
            let a = a.get_ref();
            match parse_listen(a.listen.get_ref()) {
                Ok(listen) => {
                    let token_file = a.token_file.as_ref().map(|t| PathBuf::from(t.get_ref()));
                    config.admin = Some(AdminConfig { listen, token_file });
                }
                Err(e) => self.error(a.listen.span(), format!("admin listen: {e}")),
            }
        }
        let mut defaults = ListenerConfig::new("", Vec::new(), Vec::new());
        if let Some(d) = &raw.defaults {
            for (field, present) in [
                ("name", d.get_ref().name.is_some()),
                ("listen", d.get_ref().listen.is_some()),
                ("upstreams", d.get_ref().upstreams.is_some()),
                ("route", d.get_ref().route.is_some()),
            ] {
                if present {
                    self.error(
                        d.span(),
                        format!("[defaults] cannot set '{field}': it belongs in a [[listener]]"),
                    );
                }
            }
            self.settings(d.get_ref(), &mut defaults);
        }
        if raw.listener.is_empty() {
            self.error(0..0, "no [[listener]] table: at least one listener is needed");
        }
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
        for l in &raw.listener {
            let mut listener = defaults.clone();
            let r = l.get_ref();
            match &r.name {
                Some(n) if n.get_ref().trim().is_empty() => {
                    self.error(n.span(), "name must not be empty")
                }
                Some(n) => {
                    if names.insert(n.get_ref().clone(), ()).is_some() {
                        self.error(n.span(), format!("duplicate listener name '{}'", n.get_ref()));
                    }
                    listener.name = n.get_ref().clone();
                }
                None => self.error(l.span(), "listener has no 'name'"),
            }
            match &r.listen {
                Some(v) => listener.listen = self.listen(v),
                None => self.error(
                    l.span(),
                    format!("listener '{}' has no 'listen' address", listener.name),
                ),
            }
            for a in &listener.listen {
                if a.port() != 0 {
                    if let Some(other) = addrs.insert(*a, listener.name.clone()) {
                        let span = r.listen.as_ref().map_or(l.span(), |v| v.span());
                        self.error(span, format!("address {a} is used by listener '{other}' too"));
                    }
                }
            }
            match &r.upstreams {
                Some(list) if list.get_ref().is_empty() => self
                    .error(list.span(), format!("listener '{}' has no upstreams", listener.name)),
                Some(list) => {
                    listener.upstreams =
                        list.get_ref().iter().filter_map(|u| self.upstream(u)).collect()
                }
                None if r.route.as_ref().is_some_and(|r| !r.is_empty()) => {}
                None => self.error(
                    l.span(),
                    format!("listener '{}' has no 'upstreams' (and no routes)", listener.name),
                ),
            }
            self.settings(r, &mut listener);
            for route in r.route.iter().flatten() {
                if let Some(route) = self.route(route, &listener) {
                    listener.routes.push(route);
                }
            }
            if let Err(e) = listener.validate() {
                self.error(l.span(), e);
            }
            config.listeners.push(listener);
        }
        config
    }

    fn listen(&mut self, v: &Spanned<Value>) -> Vec<SocketAddr> {
        let items: Vec<&Value> = match v.get_ref() {
            Value::String(_) => vec![v.get_ref()],
            Value::Array(a) => a.iter().collect(),
            other => {
                self.error(
                    v.span(),
                    format!(
                        "listen must be an address or a list of addresses, not {}",
                        other.type_str()
                    ),
                );
                return Vec::new();
            }
        };
        if items.is_empty() {
            self.error(v.span(), "listen must hold at least one address");
        }
        let mut out = Vec::new();
        for item in items {
            match item.as_str().map(parse_listen_all) {
                Some(Ok(a)) => out.extend(a.0),
                Some(Err(e)) => self.error(v.span(), format!("listen: {e}")),
                None => {
                    self.error(v.span(), "listen addresses must be strings like \"0.0.0.0:80\"")
                }
            }
        }
        out
    }

    fn upstream(&mut self, v: &Spanned<Value>) -> Option<Upstream> {
        match v.get_ref() {
            Value::String(s) => match s.parse::<Upstream>() {
                Ok(u) => Some(u),
                Err(e) => {
                    self.error(v.span(), format!("upstream {e}"));
                    None
                }
            },
            Value::Table(t) => {
                let mut spec = match t.get("address").and_then(Value::as_str) {
                    Some(a) if a.contains(',') => {
                        self.error(
                            v.span(),
                            format!("upstream table address '{a}' must be HOST:PORT alone: options have keys of their own (weight = 2, backup = true)"),
                        );
                        return None;
                    }
                    Some(a) => a.to_string(),
                    None => {
                        self.error(v.span(), "upstream table needs 'address = \"HOST:PORT\"'");
                        return None;
                    }
                };
                for (key, value) in t {
                    match (key.as_str(), value) {
                        ("address", _) => {}
                        ("weight", Value::Integer(n)) => spec.push_str(&format!(",weight={n}")),
                        ("max_connections", Value::Integer(n)) => {
                            spec.push_str(&format!(",max-connections={n}"))
                        }
                        ("backup", Value::Boolean(true)) => spec.push_str(",backup"),
                        ("backup", Value::Boolean(false)) => {}
                        ("send_proxy", Value::String(s)) => {
                            spec.push_str(&format!(",send-proxy={s}"))
                        }
                        ("weight" | "max_connections" | "backup" | "send_proxy", other) => {
                            self.error(
                                v.span(),
                                format!(
                                    "upstream key '{key}' has the wrong type ({})",
                                    other.type_str()
                                ),
                            );
                            return None;
                        }
                        _ => {
                            self.error(v.span(), format!("unknown upstream key '{key}': expected address, weight, backup, max_connections or send_proxy"));
                            return None;
                        }
                    }
                }
                match spec.parse::<Upstream>() {
                    Ok(u) => Some(u),
                    Err(e) => {
                        self.error(v.span(), format!("upstream {e}"));
                        None
                    }
                }
            }
            other => {
                self.error(
                    v.span(),
                    format!(
                        "an upstream is a \"HOST:PORT\" string or a table, not {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// Applies the settings `r` holds onto `listener` (listener or defaults).
    fn settings(&mut self, r: &RawListener, listener: &mut ListenerConfig) {
        if let Some(p) = &r.protocol {
            match p.get_ref().as_str() {
                "auto" => listener.protocol = Protocol::Auto,
                "tcp" => listener.protocol = Protocol::Tcp,
                "http" => listener.protocol = Protocol::Http,
                other => {
                    self.error(p.span(), format!("protocol '{other}' must be auto, tcp or http"))
                }
            }
        }
        if let Some(s) = &r.strategy {
            listener.strategy =
                self.choice::<StrategyKind>(s, "strategy").unwrap_or(listener.strategy);
        }
        if let Some(d) = &r.connect_timeout {
            if let Some(d) = self.positive_duration(d, "connect_timeout") {
                listener.connect_timeout = d;
            }
        }
        if let Some(n) = &r.connect_attempts {
            if let Some(n) = self.count(n, "connect_attempts", 1, 100) {
                listener.connect_attempts = n as usize;
            }
        }
        if let Some(d) = &r.idle_timeout {
            if let Some(d) = self.optional_duration(d, "idle_timeout") {
                listener.idle_timeout = d;
            }
        }
        if let Some(d) = &r.half_close_timeout {
            if let Some(d) = self.optional_duration(d, "half_close_timeout") {
                listener.half_close_timeout = d;
            }
        }
        if let Some(d) = &r.peek_timeout {
            if let Some(d) = self.duration(d, "peek_timeout") {
                listener.peek_timeout = d;
            }
        }
        if let Some(spanned) = &r.proxy_header_timeout {
            match self.duration(spanned, "proxy_header_timeout") {
                Some(d) if d.is_zero() => {
                    self.error(spanned.span(), "proxy_header_timeout must be more than 0")
                }
                Some(d) => listener.proxy_header_timeout = d,
                None => {}
            }
        }
        if let Some(d) = &r.dns_refresh {
            if let Some(d) = self.optional_duration(d, "dns_refresh") {
                listener.dns_refresh = d;
            }
        }
        if let Some(v) = &r.send_proxy {
            match parse_proxy_version(v.get_ref()) {
                Ok(v) => listener.send_proxy = Some(v),
                Err(e) => self.error(v.span(), e),
            }
        }
        if let Some(a) = r.accept_proxy {
            listener.accept_proxy = a;
        }
        if let Some(a) = r.access_log {
            listener.access_log = a;
        }
        if let Some(m) = &r.splice {
            listener.splice = self.choice::<SpliceMode>(m, "splice").unwrap_or(listener.splice);
        }
        for (list, out) in [
            (&r.allow, &mut listener.allow),
            (&r.deny, &mut listener.deny),
            (&r.accept_proxy_from, &mut listener.accept_proxy_from),
        ] {
            if let Some(list) = list {
                out.clear();
                for net in list {
                    match parse_cidr(net.get_ref()) {
                        Ok(n) => out.push(n),
                        Err(e) => self.error(net.span(), e),
                    }
                }
            }
        }
        if let Some(n) = &r.backlog {
            if let Some(n) = self.count(n, "backlog", 1, 65535) {
                listener.backlog = n as u32;
            }
        }
        if let Some(h) = &r.health {
            self.health(h.get_ref(), &mut listener.health);
        }
        if let Some(n) = &r.max_connections {
            listener.max_connections =
                self.count(n, "max_connections", 1, 10_000_000).map(|n| n as usize);
        }
        if let Some(n) = &r.max_connections_per_client {
            listener.max_connections_per_client =
                self.count(n, "max_connections_per_client", 1, 1_000_000).map(|n| n as u32);
        }
        if let Some(d) = &r.slow_start {
            listener.slow_start = self.duration(d, "slow_start").unwrap_or(listener.slow_start);
        }
        if let Some(rate) = &r.connection_rate_per_client {
            match rate.get_ref().parse::<crate::config::Rate>() {
                Ok(rate) => listener.connection_rate_per_client = Some(rate),
                Err(e) => self.error(rate.span(), format!("connection_rate_per_client: {e}")),
            }
        }
    }

    /// A `[listener.health]` table (or a route's) over `health`.
    fn health(&mut self, h: &RawHealth, health: &mut HealthConfig) {
        if let Some(c) = &h.check {
            match c.get_ref().parse::<HealthCheck>() {
                Ok(c) => health.check = c,
                Err(e) => self.error(c.span(), format!("health check: {e}")),
            }
        }
        if let Some(d) = &h.interval {
            if let Some(d) = self.positive_duration(d, "health interval") {
                health.interval = d;
            }
        }
        if let Some(d) = &h.timeout {
            if let Some(d) = self.positive_duration(d, "health timeout") {
                health.timeout = d;
            }
        }
        if let Some(n) = &h.rise {
            if let Some(n) = self.count(n, "rise", 1, 1000) {
                health.rise = n as u32;
            }
        }
        if let Some(n) = &h.fall {
            if let Some(n) = self.count(n, "fall", 1, 1000) {
                health.fall = n as u32;
            }
        }
        if let Some(b) = h.send_proxy {
            health.send_proxy = b;
        }
        if let Some(name) = &h.sni {
            match crate::config::parse_server_name(name.get_ref()) {
                Ok(n) => health.sni = Some(n),
                Err(e) => self.error(name.span(), format!("health sni: {e}")),
            }
        }
        self.send_expect(h, health);
        if let Some(d) = &h.ejection_time {
            health.ejection_time = self.optional_duration(d, "ejection_time").flatten();
        }
        if let Some(d) = &h.max_ejection_time {
            if let Some(d) = self.positive_duration(d, "max_ejection_time") {
                health.max_ejection_time = d;
            }
        }
        if let Some(n) = &h.max_ejection_percent {
            if let Some(n) = self.count(n, "max_ejection_percent", 1, 100) {
                health.max_ejection_percent = n as u32;
            }
        }
    }

    /// One `[[listener.route]]`: its names, and its upstreams, strategy and
    /// health over the listener's.
    fn route(&mut self, raw: &Spanned<RawRoute>, listener: &ListenerConfig) -> Option<RouteConfig> {
        let (span, r) = (raw.span(), raw.get_ref());
        let name = match &r.name {
            Some(n) if n.get_ref().trim().is_empty() || n.get_ref().contains('/') => {
                self.error(n.span(), "route name must not be empty nor hold '/'");
                return None;
            }
            Some(n) => n.get_ref().clone(),
            None => {
                self.error(
                    span.clone(),
                    format!("a route of listener '{}' has no 'name'", listener.name),
                );
                return None;
            }
        };
        if listener.routes.iter().any(|other| other.name == name) {
            self.error(
                span.clone(),
                format!("duplicate route name '{name}' in listener '{}'", listener.name),
            );
        }
        let mut patterns = |list: &Option<Vec<Spanned<String>>>| -> Vec<String> {
            let mut out = Vec::new();
            for p in list.iter().flatten() {
                match route::parse_pattern(p.get_ref()) {
                    Ok(p) => out.push(p),
                    Err(e) => self.error(p.span(), format!("route '{name}': {e}")),
                }
            }
            out
        };
        let sni = patterns(&r.sni);
        let http_host = patterns(&r.http_host);
        if sni.is_empty() && http_host.is_empty() {
            self.error(
                span.clone(),
                format!("route '{name}' has no 'sni' nor 'http_host' names to match"),
            );
        }
        let upstreams = match &r.upstreams {
            Some(list) if !list.get_ref().is_empty() => {
                list.get_ref().iter().filter_map(|u| self.upstream(u)).collect()
            }
            _ => {
                self.error(span.clone(), format!("route '{name}' has no 'upstreams'"));
                return None;
            }
        };
        let mut route = RouteConfig::new(&name, sni, upstreams, listener);
        route.http_host = http_host;
        if let Some(s) = &r.strategy {
            route.strategy = self.choice::<StrategyKind>(s, "strategy").unwrap_or(route.strategy);
        }
        if let Some(h) = &r.health {
            self.health(h.get_ref(), &mut route.health);
        }
        Some(route)
    }

    /// `send`/`send_hex` and `expect`/`expect_hex`: a dialogue of the
    /// user's own, which takes the place of a `tcp` check.
    fn send_expect(&mut self, h: &RawHealth, health: &mut HealthConfig) {
        let send = self.bytes(&h.send, &h.send_hex, "send");
        let expect = self.bytes(&h.expect, &h.expect_hex, "expect");
        match (send, expect) {
            (None, None) => {}
            (Some((span, _)), None) => self.error(
                span,
                "health send needs an expect (or expect_hex) to check the answer against",
            ),
            (_, Some((span, expect))) if expect.is_empty() => {
                self.error(span, "health expect is empty: it would match any answer")
            }
            (_, Some((span, _)))
                if !matches!(health.check, HealthCheck::Connect | HealthCheck::Expect { .. }) =>
            {
                self.error(
                    span,
                    format!(
                        "health send/expect replace the check, but check = \"{}\" is set too",
                        health.check
                    ),
                )
            }
            (send, Some((_, expect))) => {
                let send = send.map(|(_, b)| b).unwrap_or_default();
                health.check = HealthCheck::Expect { send, expect };
            }
        }
    }

    /// The bytes of `text` or of `hex` (one of the two), with the span of
    /// the one given.
    fn bytes(
        &mut self,
        text: &Option<Spanned<String>>,
        hex: &Option<Spanned<String>>,
        what: &str,
    ) -> Option<(Range<usize>, Vec<u8>)> {
        match (text, hex) {
            (Some(t), Some(_)) => {
                self.error(
                    t.span(),
                    format!("health {what} and {what}_hex are both set; keep one"),
                );
                None
            }
            (Some(t), None) => Some((t.span(), t.get_ref().as_bytes().to_vec())),
            (None, Some(h)) => match crate::config::parse_hex(h.get_ref()) {
                Ok(b) => Some((h.span(), b)),
                Err(e) => {
                    self.error(h.span(), format!("health {what}_hex: {e}"));
                    None
                }
            },
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse(text, "t.toml").unwrap_err().0
    }

    #[test]
    fn a_full_file() {
        let c = parse(
            r#"
drain_timeout = "10s"
max_connections = 500

[defaults]
connect_timeout = "500ms"
strategy = "least-connections"
[defaults.health]
check = "http:/healthz"
rise = 3

[admin]
listen = "127.0.0.1:9901"

[[listener]]
name = "web"
listen = ["127.0.0.1:8080", "[::1]:8080"]
upstreams = ["a:80,weight=3", { address = "b:80", backup = true, max_connections = 10 }]

[[listener]]
name = "redis"
listen = "127.0.0.1:6380"
protocol = "tcp"
strategy = "maglev"
send_proxy = "v2"
upstreams = ["10.0.0.1:6379"]
[listener.health]
check = "tcp"
"#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.max_connections, 500);
        assert_eq!(c.admin.as_ref().unwrap().listen.port(), 9901);
        let web = &c.listeners[0];
        assert_eq!(web.listen.len(), 2);
        assert_eq!(web.strategy, StrategyKind::LeastConnections);
        assert_eq!(web.connect_timeout, Duration::from_millis(500));
        assert_eq!(web.health.rise, 3);
        assert_eq!(web.upstreams[0].weight, 3);
        assert!(web.upstreams[1].backup);
        assert_eq!(web.upstreams[1].max_connections, Some(10));
        let redis = &c.listeners[1];
        assert_eq!(redis.protocol, Protocol::Tcp);
        assert_eq!(redis.strategy, StrategyKind::Maglev);
        assert_eq!(redis.health.check, HealthCheck::Connect);
        assert_eq!(redis.health.rise, 3, "defaults apply under a listener's own table");
    }

    #[test]
    fn worker_balance_is_fewest_unless_set_and_names_a_bad_value() {
        let one = "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstreams = [\"b:1\"]\n";
        assert_eq!(parse(one, "t.toml").unwrap().worker_balance, WorkerBalance::Fewest);
        let hash = format!("worker_balance = \"hash\"\n{one}");
        assert_eq!(parse(&hash, "t.toml").unwrap().worker_balance, WorkerBalance::Hash);
        let p = problems(&format!("worker_balance = \"even\"\n{one}"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("t.toml:1:"), "{p:?}");
        assert!(p[0].ends_with("worker_balance 'even' must be fewest or hash"), "{p:?}");
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let p = problems("[[listener]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("t.toml:"), "{p:?}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let p = problems("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstreams = [\"b:1\"]\ntimeout = \"1s\"\n");
        assert!(p[0].starts_with("t.toml:5:1:") && p[0].contains("timeout"), "{p:?}");
    }

    #[test]
    fn semantic_errors_are_all_reported_with_positions() {
        let p = problems(
            r#"[[listener]]
name = "a"
listen = "127.0.0.1:1"
upstreams = []

[[listener]]
name = "a"
listen = "127.0.0.1:1"
upstreams = ["b:1,weight=0"]
[listener.health]
rise = 0
"#,
        );
        let all = p.join("\n");
        assert!(all.contains("t.toml:4:13: listener 'a' has no upstreams"), "{all}");
        assert!(all.contains("t.toml:7:8: duplicate listener name 'a'"), "{all}");
        assert!(
            all.contains("t.toml:8:10: address 127.0.0.1:1 is used by listener 'a' too"),
            "{all}"
        );
        assert!(all.contains("t.toml:9:14: upstream weight '0'"), "{all}");
        assert!(all.contains("t.toml:11:8: rise must be"), "{all}");
        assert_eq!(p.len(), 5, "{all}");
    }

    #[test]
    fn missing_pieces() {
        let all = problems("[[listener]]\nlisten = \"nope\"\n").join("\n");
        assert!(all.contains("has no 'name'"), "{all}");
        assert!(all.contains("'nope' is not an address"), "{all}");
        assert!(all.contains("has no 'upstreams'"), "{all}");
        assert!(problems("").join("").contains("no [[listener]]"));
    }
}
