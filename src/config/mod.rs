//! Validated configuration and the parsers of user-supplied values.
//!
//! Everything a user types (listen addresses, upstream specs, durations, health
//! check specs) is parsed here into typed values with one-line errors that name
//! the bad value. Defaults live here and nowhere else.

pub mod file;
pub mod route;
mod shape;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use std::str::FromStr;
use std::time::Duration;

/// Default connect timeout to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default number of distinct backends one client connection may try.
pub const DEFAULT_CONNECT_ATTEMPTS: usize = 3;
/// Default inactivity timeout of a proxied connection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default inactivity timeout once one side has finished sending.
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time to let established connections finish after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default global limit of concurrent client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Listen backlog handed to listen(2).
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Default wait for a client's first bytes on the failure path.
pub const DEFAULT_PEEK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default interval between re-resolutions of upstream host names.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);
/// Default time between two probes of one backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default limit on one probe.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive good probes that bring a backend up.
pub const DEFAULT_RISE: u32 = 2;
/// Default consecutive failures that take a backend down.
pub const DEFAULT_FALL: u32 = 3;
/// Default active probe: a TCP connect.
pub const DEFAULT_HEALTH_CHECK: HealthCheck = HealthCheck::Connect;
/// The longest an outlier ejection lasts (Envoy's default).
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// The share of a pool ejected at most (Envoy's default; one at least).
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Default protocol mode.
pub const DEFAULT_PROTOCOL: Protocol = Protocol::Auto;
/// Default selection strategy.
pub const DEFAULT_STRATEGY: StrategyKind = StrategyKind::RoundRobin;
/// Default splice(2) mode.
pub const DEFAULT_SPLICE: SpliceMode = SpliceMode::Auto;
/// Whether connections are access-logged by default.
pub const DEFAULT_ACCESS_LOG: bool = true;
/// Longest wait for a client's PROXY header.
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// The whole process configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Services, each with its own addresses and upstreams.
    pub listeners: Vec<ListenerConfig>,
    /// How long established connections may run after shutdown begins.
    pub drain_timeout: Duration,
    /// Global limit of concurrent client connections across all listeners.
    pub max_connections: usize,
    /// The admin HTTP endpoint, when enabled.
    pub admin: Option<AdminConfig>,
    /// Data-plane worker threads (None: one per CPU core).
    pub threads: Option<usize>,
    /// How new connections are spread over the worker threads.
    pub worker_balance: WorkerBalance,
}

impl Config {
    /// How many data-plane workers to run.
    pub fn workers(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }

    /// Every service to run: each listener, followed by one per route of it
    /// (named `listener/route`, without sockets).
    pub fn services(&self) -> Vec<ListenerConfig> {
        let mut out = Vec::with_capacity(self.listeners.len());
        for l in &self.listeners {
            out.push(l.clone());
            out.extend(l.routes.iter().map(|r| l.route_service(r)));
        }
        out
    }

    /// A configuration with one listener and every global default.
    pub fn single(listener: ListenerConfig) -> Self {
        Config { listeners: vec![listener], ..Config::default() }
    }
}

/// What the command line sets over a configuration file: applied to the
/// file at start and again at every reload, so that a SIGHUP never drops a
/// flag the process was started with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--worker-balance`.
    pub worker_balance: Option<WorkerBalance>,
}

impl Overrides {
    /// Sets in `config` what the command line gave.
    pub fn apply(&self, config: &mut Config) {
        if self.threads.is_some() {
            config.threads = self.threads;
        }
        if let Some(b) = self.worker_balance {
            config.worker_balance = b;
        }
    }
}

impl Default for Config {
    /// No listener, every global default.
    fn default() -> Self {
        Config {
            listeners: Vec::new(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            admin: None,
            threads: None,
            worker_balance: WorkerBalance::Fewest,
        }
    }
}

/// The admin endpoint's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where it listens (loopback in every example).
    pub listen: SocketAddr,
    /// File holding the bearer token for mutating endpoints.
    pub token_file: Option<PathBuf>,
}

/// One service: where clients arrive and where they are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Name used in logs.
    pub name: String,
    /// Addresses to accept clients on.
    pub listen: Vec<SocketAddr>,
    /// Upstreams as the user wrote them; resolved to backends at bind time.
    pub upstreams: Vec<Upstream>,
    /// Limit on each backend connect attempt.
    pub connect_timeout: Duration,
    /// How many distinct backends one client connection may try.
    pub connect_attempts: usize,
    /// Close a connection with no bytes either way for this long (None: never).
    pub idle_timeout: Option<Duration>,
    /// Inactivity limit once one side has sent FIN and the other has not (None: idle timeout only).
    pub half_close_timeout: Option<Duration>,
    /// Whether to speak HTTP when no backend can be reached.
    pub protocol: Protocol,
    /// How long to wait for a client's first bytes before deciding it is not HTTP.
    pub peek_timeout: Duration,
    /// With `accept_proxy`, how long a client may take to send its whole
    /// PROXY header.
    pub proxy_header_timeout: Duration,
    /// Active health checking.
    pub health: HealthConfig,
    /// listen(2) backlog.
    pub backlog: u32,
    /// How backends are chosen.
    pub strategy: StrategyKind,
    /// PROXY header to send to backends whose upstream does not say otherwise.
    pub send_proxy: Option<ProxyVersion>,
    /// Expect a PROXY header (v1 or v2) from the client.
    pub accept_proxy: bool,
    /// Re-resolve upstream host names this often (None: never).
    pub dns_refresh: Option<Duration>,
    /// Write one access-log event (info, target `tcplb::access`) per connection.
    pub access_log: bool,
    /// Zero-copy forwarding with splice(2).
    pub splice: SpliceMode,
    /// When not empty, only clients in these networks are served.
    pub allow: Vec<IpNet>,
    /// Clients in these networks are closed right after accept (wins over allow).
    pub deny: Vec<IpNet>,
    /// With `accept_proxy`, the peers trusted to send a PROXY header (empty:
    /// any peer). A connection from any other peer is closed unread: the
    /// header names the client that allow/deny judge, so whoever may send
    /// one chooses the address they check.
    pub accept_proxy_from: Vec<IpNet>,
    /// Clients routed by TLS server name or HTTP Host to pools of their
    /// own; `upstreams` is then the default pool, and may be empty.
    pub routes: Vec<route::RouteConfig>,
    /// Connections this listener holds at most (None: only the global limit).
    pub max_connections: Option<usize>,
    /// Connections one client address holds at most.
    pub max_connections_per_client: Option<u32>,
    /// New connections one client address may open (a token bucket).
    pub connection_rate_per_client: Option<Rate>,
    /// A backend that comes up (health rise, or added by a reload or DNS)
    /// ramps from a tenth of its share to all of it over this window
    /// (zero: at once). Not for maglev, whose point is that clients stay put.
    pub slow_start: Duration,
}

impl ListenerConfig {
    /// The service that runs `route` of this listener: its settings, with
    /// the route's upstreams, strategy and health, and no socket.
    pub fn route_service(&self, route: &route::RouteConfig) -> ListenerConfig {
        let mut health = route.health.clone();
        // A `tls` probe names the route's first exact server name, unless
        // told otherwise: backends behind SNI routing often refuse others.
        if health.sni.is_none() {
            health.sni = route.sni.iter().find(|n| !n.starts_with("*.")).cloned();
        }
        ListenerConfig {
            name: format!("{}/{}", self.name, route.name),
            listen: Vec::new(),
            upstreams: route.upstreams.clone(),
            strategy: route.strategy,
            health,
            routes: Vec::new(),
            ..self.clone()
        }
    }

    /// The share limits its connections are admitted under.
    pub fn client_limits(&self) -> ClientLimits {
        ClientLimits {
            listener: self.max_connections,
            per_client: self.max_connections_per_client,
            rate: self.connection_rate_per_client,
        }
    }

    /// Whether a client at `ip` may be served.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = as_ipv4(ip);
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Whether the peer at `ip` may send a PROXY header.
    pub fn trusts_proxy_header_from(&self, ip: IpAddr) -> bool {
        let ip = as_ipv4(ip);
        self.accept_proxy_from.is_empty() || self.accept_proxy_from.iter().any(|n| n.contains(&ip))
    }

    /// The rules that span several settings; the message names the setting
    /// to add or change.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.contains('/') {
            return Err(format!(
                "listener name '{}' must not hold '/': it separates a listener from its routes",
                self.name
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            if self.routes[..i].iter().any(|o| o.name == r.name) {
                return Err(format!("listener '{}': duplicate route '{}'", self.name, r.name));
            }
            if r.upstreams.is_empty() {
                return Err(format!(
                    "listener '{}': route '{}' has no upstreams",
                    self.name, r.name
                ));
            }
        }
        if self.accept_proxy
            && self.accept_proxy_from.is_empty()
            && !(self.allow.is_empty() && self.deny.is_empty())
        {
            return Err(format!(
                "listener '{}': allow/deny with accept_proxy needs accept_proxy_from \
                 (--accept-proxy-from CIDR): the peers trusted to send PROXY headers; \
                 without it any client could claim an allowed address",
                self.name
            ));
        }
        Ok(())
    }

    /// The inactivity limits of its connections.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts { idle: self.idle_timeout, half_close: self.half_close_timeout }
    }

    /// A listener with every default, for the given addresses and upstreams.
    pub fn new(name: impl Into<String>, listen: Vec<SocketAddr>, upstreams: Vec<Upstream>) -> Self {
        ListenerConfig {
            name: name.into(),
            listen,
            upstreams,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            connect_attempts: DEFAULT_CONNECT_ATTEMPTS,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            half_close_timeout: Some(DEFAULT_HALF_CLOSE_TIMEOUT),
            protocol: DEFAULT_PROTOCOL,
            peek_timeout: DEFAULT_PEEK_TIMEOUT,
            proxy_header_timeout: DEFAULT_PROXY_HEADER_TIMEOUT,
            health: HealthConfig::default(),
            backlog: DEFAULT_BACKLOG,
            strategy: DEFAULT_STRATEGY,
            send_proxy: None,
            accept_proxy: false,
            dns_refresh: Some(DEFAULT_DNS_REFRESH),
            access_log: DEFAULT_ACCESS_LOG,
            splice: DEFAULT_SPLICE,
            allow: Vec::new(),
            deny: Vec::new(),
            accept_proxy_from: Vec::new(),
            routes: Vec::new(),
            max_connections: None,
            max_connections_per_client: None,
            connection_rate_per_client: None,
            slow_start: Duration::ZERO,
        }
    }
}

/// Timeouts that bound a spliced connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Close after this long with no bytes either way (None: never).
    pub idle: Option<Duration>,
    /// Once one direction has ended, close after this long with no bytes (None: idle only).
    pub half_close: Option<Duration>,
}

impl Timeouts {
    /// The inactivity limit once one side has finished sending.
    pub fn after_half_close(&self) -> Option<Duration> {
        match (self.idle, self.half_close) {
            (Some(i), Some(h)) => Some(i.min(h)),
            (i, h) => i.or(h),
        }
    }
}

/// An IPv4-mapped (`::ffff:10.1.1.1`) or IPv4-compatible (`::10.1.1.1`)
/// IPv6 address as the IPv4 address it carries, so that IPv4 rules match it;
/// any other address as it is. `::` and `::1` stay IPv6.
pub fn as_ipv4(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if v6.segments()[..6] == [0; 6] && !v6.is_unspecified() && !v6.is_loopback() => {
                v6.to_ipv4().map_or(ip, IpAddr::V4)
            }
            None => ip,
        },
        v4 => v4,
    }
}

/// A server name as TLS carries it (`api.example.com`), lower-cased; a
/// trailing dot is dropped.
pub fn parse_server_name(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("bad server name '{s}': expected a DNS name such as api.example.com"));
    }
    Ok(name)
}

/// Bytes written as hex (`2a310d0a`, spaces and colons allowed between).
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !matches!(b, b' ' | b':' | b'\t')).collect();
    if digits.len() % 2 != 0 {
        return Err(format!("'{s}' has an odd number of hex digits"));
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("'{s}' is not hex: '{}'", String::from_utf8_lossy(pair)))
        })
        .collect()
}

/// Parses a network (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("'{s}' is not a network: expected e.g. 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7"))
}

/// What tcplb may say on its own when it cannot forward a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Answer HTTP clients with 502/503/504, close anything else.
    Auto,
    /// Pure layer 4: never peek, never write a byte of its own.
    Tcp,
    /// Like auto; the service is known to be HTTP.
    Http,
}

/// The share limits of one listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClientLimits {
    /// Connections the listener holds at most.
    pub listener: Option<usize>,
    /// Connections one client address holds at most.
    pub per_client: Option<u32>,
    /// New connections per client address.
    pub rate: Option<Rate>,
}

impl ClientLimits {
    /// Whether any limit is set (otherwise nothing is counted).
    pub fn any(&self) -> bool {
        self.listener.is_some() || self.per_client.is_some() || self.rate.is_some()
    }
}

/// A rate of new connections, `20/s`, `600/m`, `5/10s`: that many per
/// window, as a token bucket that holds one window's worth (the burst).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Connections per window, and the bucket's size.
    pub count: u32,
    /// The window.
    pub per: Duration,
}

impl Rate {
    /// Tokens added per second.
    pub fn per_second(self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }

    /// The bucket's size.
    pub fn burst(self) -> f64 {
        f64::from(self.count.max(1))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("bad rate '{s}': expected COUNT/WINDOW such as 20/s, 600/m or 5/10s");
        let (count, window) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match window.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => parse_duration(other).map_err(|_| bad())?,
        };
        if count == 0 || per.is_zero() {
            return Err(format!(
                "bad rate '{s}': both the count and the window must be more than 0"
            ));
        }
        Ok(Rate { count, per })
    }
}

/// Active health-check settings of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// What a probe does.
    pub check: HealthCheck,
    /// Time between probes of one backend.
    pub interval: Duration,
    /// Limit on one probe.
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Probes start with the backend's PROXY header (HAProxy's check-send-proxy).
    pub send_proxy: bool,
    /// The server name a `tls` probe's ClientHello carries (HAProxy's
    /// check-sni); none when not given.
    pub sni: Option<String>,
    /// Outlier ejection: a backend that real connections take down stays
    /// out this long, doubled for each ejection in a row (None: off).
    pub ejection_time: Option<Duration>,
    /// The longest an ejection lasts.
    pub max_ejection_time: Duration,
    /// At most this share of a pool is ejected at once (at least one backend).
    pub max_ejection_percent: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            check: DEFAULT_HEALTH_CHECK,
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            send_proxy: false,
            sni: None,
            ejection_time: None,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

/// How a listener chooses backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// Smooth weighted round-robin (nginx's order).
    RoundRobin,
    /// Fewest active connections relative to weight.
    LeastConnections,
    /// The lighter of two random backends.
    RandomTwo,
    /// Maglev consistent hashing of the client IP.
    Maglev,
}

impl StrategyKind {
    /// The name used on the command line and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::RoundRobin => "round-robin",
            StrategyKind::LeastConnections => "least-connections",
            StrategyKind::RandomTwo => "random-two",
            StrategyKind::Maglev => "maglev",
        }
    }
}

/// When to forward with splice(2) through a pipe instead of copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpliceMode {
    /// Copy; switch a direction to splice when its first message waits whole
    /// and is 64 KiB or more, once a 64 KiB read leaves 64 KiB more waiting,
    /// or when 1 MiB moves in 64 reads or fewer (bulk), and back to copying
    /// after 64 reads that moved less (small messages).
    Auto,
    /// Splice every direction from its first byte.
    On,
    /// Always copy through user space.
    Off,
}

/// How new connections are spread over the worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerBalance {
    /// A worker that serves more connections than the least busy one, by
    /// more than an eighth, hands the one it just accepted over to it.
    Fewest,
    /// Each connection stays on the worker whose SO_REUSEPORT socket the
    /// kernel's hash chose.
    Hash,
}

/// PROXY protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The human-readable text header.
    V1,
    /// The binary header.
    V2,
}

/// The kind of active probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// No active probing; only passive failures change state.
    None,
    /// A TCP connect that succeeds within the timeout.
    Connect,
    /// `GET path HTTP/1.1`; a 2xx or 3xx status is healthy.
    Http {
        /// Host header value; the backend address when not given.
        host: Option<String>,
        /// Request target, starting with '/'.
        path: String,
    },
    /// `PING`; `+PONG` is healthy, and so is `-NOAUTH` (a Redis that wants
    /// a password is up; the probe has none to give).
    Redis,
    /// A PostgreSQL SSLRequest; `S` or `N` is healthy.
    Postgres,
    /// MySQL's initial handshake packet, protocol version 10.
    Mysql,
    /// An SMTP `220` greeting, answered with `QUIT`.
    Smtp,
    /// A ClientHello; a ServerHello (or HelloRetryRequest) is healthy.
    Tls,
    /// Bytes sent (possibly none) and bytes that must appear in the answer.
    Expect {
        /// Written once connected; empty for a server that speaks first.
        send: Vec<u8>,
        /// Looked for in the first 4 KiB of the answer.
        expect: Vec<u8>,
    },
}

impl fmt::Display for HealthCheck {
    /// As the user writes it: `none`, `tcp`, `http:/PATH`, `http://HOST/PATH`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::None => f.write_str("none"),
            HealthCheck::Connect => f.write_str("tcp"),
            HealthCheck::Http { host: Some(host), path } => write!(f, "http://{host}{path}"),
            HealthCheck::Http { host: None, path } => write!(f, "http:{path}"),
            HealthCheck::Redis => f.write_str("redis"),
            HealthCheck::Postgres => f.write_str("postgres"),
            HealthCheck::Mysql => f.write_str("mysql"),
            HealthCheck::Smtp => f.write_str("smtp"),
            HealthCheck::Tls => f.write_str("tls"),
            HealthCheck::Expect { .. } => f.write_str("send/expect"),
        }
    }
}

/// A duration as the user writes it (`500ms`, `3s`, `1h30m`): read by
/// [`parse_duration`], shown by humantime, so a default is written once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(HumanDuration)
    }
}

impl FromStr for HealthCheck {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => return Ok(HealthCheck::None),
            "tcp" | "connect" => return Ok(HealthCheck::Connect),
            "redis" => return Ok(HealthCheck::Redis),
            "postgres" | "postgresql" | "pgsql" => return Ok(HealthCheck::Postgres),
            "mysql" => return Ok(HealthCheck::Mysql),
            "smtp" => return Ok(HealthCheck::Smtp),
            "tls" | "ssl" => return Ok(HealthCheck::Tls),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if host.is_empty() || !host.bytes().all(is_host_byte) {
                return Err(format!("bad host '{host}' in health check '{s}'"));
            }
            check_path(path, s)?;
            return Ok(HealthCheck::Http { host: Some(host.to_string()), path: path.to_string() });
        }
        if let Some(path) = s.strip_prefix("http:") {
            let path = if path.is_empty() { "/" } else { path };
            check_path(path, s)?;
            return Ok(HealthCheck::Http { host: None, path: path.to_string() });
        }
        Err(format!(
            "unknown health check '{s}': expected none, tcp, http:/PATH, http://HOST/PATH, \
             redis, postgres, mysql, smtp or tls"
        ))
    }
}

fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
}

fn check_path(path: &str, spec: &str) -> Result<(), String> {
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "bad path '{path}' in health check '{spec}': must start with '/' and hold no spaces"
        ));
    }
    Ok(())
}

/// An upstream as written by the user: a host (name or IP), a port, and options.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// Host name, IPv4 address or IPv6 address (without brackets).
    pub host: String,
    /// TCP port, 1-65535.
    pub port: u16,
    /// Relative share of new connections (≥ 1).
    pub weight: u32,
    /// Only used when no primary backend is up.
    pub backup: bool,
    /// Connection cap for each address of this upstream (None: unlimited).
    pub max_connections: Option<usize>,
    /// PROXY header to send (overrides the listener's).
    pub send_proxy: Option<ProxyVersion>,
}

impl Upstream {
    /// An upstream with default options.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Upstream {
            host: host.into(),
            port,
            weight: 1,
            backup: false,
            max_connections: None,
            send_proxy: None,
        }
    }

    /// Whether `host` is an IP literal (never re-resolved).
    pub fn is_ip(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_ok()
    }

    /// `HOST:PORT` without options.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Parses the options after the first comma: `weight=N`, `backup`,
    /// `max-connections=N`, `send-proxy=v1|v2`.
    fn apply_option(&mut self, opt: &str, spec: &str) -> Result<(), String> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (opt.trim(), None),
        };
        match (key, value) {
            ("backup", None) => self.backup = true,
            ("weight", Some(v)) => match v.parse::<u32>() {
                Ok(w) if (1..=1000).contains(&w) => self.weight = w,
                _ => return Err(format!("weight '{v}' in '{spec}' must be a whole number from 1 to 1000")),
            },
            ("max-connections" | "max_connections", Some(v)) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => self.max_connections = Some(n),
                _ => return Err(format!("max-connections '{v}' in '{spec}' must be at least 1")),
            },
            ("send-proxy" | "send_proxy", Some(v)) => {
                self.send_proxy = Some(parse_proxy_version(v).map_err(|e| format!("{e} in '{spec}'"))?)
            }
            _ => {
                return Err(format!(
                    "unknown option '{opt}' in '{spec}': expected weight=N, backup, max-connections=N or send-proxy=v1|v2"
                ))
            }
        }
        Ok(())
    }
}

/// Parses `v1` or `v2`.
pub fn parse_proxy_version(s: &str) -> Result<ProxyVersion, String> {
    match s {
        "v1" | "1" => Ok(ProxyVersion::V1),
        "v2" | "2" => Ok(ProxyVersion::V2),
        _ => Err(format!("PROXY version '{s}' must be v1 or v2")),
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Upstream {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut parts = spec.split(',');
        let s = parts.next().unwrap_or_default().trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("'{s}' has '[' without ']': expected [IPV6]:PORT"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("'{s}' has no port: expected [IPV6]:PORT"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("'{host}' in '{s}' is not an IPv6 address"));
            }
            (host, port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("'{s}' has no port: expected HOST:PORT"))?;
            if host.contains(':') {
                return Err(format!("'{s}' is ambiguous: write an IPv6 upstream as [ADDR]:PORT"));
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(format!("'{s}' has no host: expected HOST:PORT"));
        }
        if !host.bytes().all(is_host_byte) {
            return Err(format!("'{s}' has an invalid host name '{host}'"));
        }
        let port = parse_port(port).map_err(|e| format!("'{s}': {e}"))?;
        let mut up = Upstream::new(host, port);
        for opt in parts {
            up.apply_option(opt, spec)?;
        }
        Ok(up)
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port '{p}' is not a number"));
    }
    match p.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(format!("port {p} is out of range (1-65535)")),
    }
}

/// Parses a listen address: `IP:PORT`, `[IPV6]:PORT`, or `:PORT` for every
/// IPv4 address (as nginx's and HAProxy's `:PORT`); port 0 picks a free one.
/// Host names are [`parse_listen_all`]'s.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.strip_prefix(':').map(str::parse::<u16>) {
        Some(Ok(port)) => Ok(SocketAddr::from(([0, 0, 0, 0], port))),
        _ => Err(format!(
            "'{s}' is not an address: expected IP:PORT such as 0.0.0.0:80, [::]:80, :80 or localhost:80"
        )),
    }
}

/// Every address one `listen` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddrs(pub Vec<SocketAddr>);

/// Like [`parse_listen`], and `HOST:PORT` too (`localhost:8080`): every
/// address the name resolves to, as nginx binds them.
pub fn parse_listen_all(s: &str) -> Result<ListenAddrs, String> {
    let bad = parse_listen(s).map(|a| ListenAddrs(vec![a]));
    let Err(e) = bad else { return bad };
    let Some((host, port)) = s.rsplit_once(':') else { return Err(e) };
    let valid = !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    let Ok(port) = port.parse::<u16>() else { return Err(e) };
    if !valid {
        return Err(e);
    }
    let mut addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|r| format!("listen address '{s}': cannot resolve {host}: {r}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("listen address '{s}': {host} resolves to no address"));
    }
    Ok(ListenAddrs(addrs))
}

/// Longest duration accepted anywhere: deadlines are computed as now + d.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses a duration such as `3s`, `500ms`, `1h30m`; `0` is zero; at most 10 years.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration ({e}): expected e.g. 500ms, 3s, 1h"))?;
    if d > MAX_DURATION {
        return Err(format!("'{s}' is too long: at most 10 years"));
    }
    Ok(d)
}

/// Parses a count that must be at least one.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err(format!("'{s}' must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

/// Parses a rise/fall threshold (1 or more).
pub fn parse_threshold(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err(format!("'{s}' must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn upstream_forms() {
        let u: Upstream = "a.example:3031".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("a.example", 3031));
        let u: Upstream = "[::1]:80".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 80));
        assert_eq!(u.to_string(), "[::1]:80");
        assert!("a:0".parse::<Upstream>().unwrap_err().contains("out of range"));
        assert!("a:99999".parse::<Upstream>().unwrap_err().contains("99999"));
        assert!("a".parse::<Upstream>().unwrap_err().contains("no port"));
        assert!("::1:80".parse::<Upstream>().unwrap_err().contains("[ADDR]:PORT"));
        assert!(":80".parse::<Upstream>().unwrap_err().contains("no host"));
        assert!("a b:80".parse::<Upstream>().unwrap_err().contains("invalid host"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("soon").unwrap_err().contains("'soon'"));
        assert!(parse_duration("100000000h").unwrap_err().contains("too long"));
    }

    #[test]
    fn health_checks() {
        assert_eq!("none".parse::<HealthCheck>().unwrap(), HealthCheck::None);
        assert_eq!(
            "http:/healthz".parse::<HealthCheck>().unwrap(),
            HealthCheck::Http { host: None, path: "/healthz".into() }
        );
        assert_eq!(
            "http://svc.local/ready".parse::<HealthCheck>().unwrap(),
            HealthCheck::Http { host: Some("svc.local".into()), path: "/ready".into() }
        );
        assert!("http:healthz".parse::<HealthCheck>().is_err());
        assert!("ping".parse::<HealthCheck>().unwrap_err().contains("'ping'"));
    }

    #[test]
    fn allow_and_deny() {
        let mut l = ListenerConfig::new("t", vec![], vec![]);
        assert!(l.admits("192.0.2.1".parse().unwrap()), "no rules: everyone");
        l.allow = vec![parse_cidr("10.0.0.0/8").unwrap(), parse_cidr("::1").unwrap()];
        l.deny = vec![parse_cidr("10.9.0.0/16").unwrap()];
        assert!(l.admits("10.1.2.3".parse().unwrap()));
        assert!(!l.admits("10.9.2.3".parse().unwrap()), "deny wins");
        assert!(l.admits("::ffff:10.1.2.3".parse().unwrap()), "IPv4-mapped IPv6 is its IPv4");
        // A deny rule alone: neither IPv6 spelling of a denied IPv4 gets past it.
        let mut d = ListenerConfig::new("d", vec![], vec![]);
        d.deny = vec![parse_cidr("10.0.0.0/8").unwrap()];
        for spelling in ["10.1.1.1", "::ffff:10.1.1.1", "::10.1.1.1"] {
            assert!(!d.admits(spelling.parse().unwrap()), "{spelling} got past deny 10.0.0.0/8");
        }
        assert!(d.admits("::1".parse().unwrap()) && d.admits("2001:db8::1".parse().unwrap()));
        assert!(!l.admits("192.0.2.1".parse().unwrap()), "not allowed");
        assert!(l.admits("::1".parse().unwrap()));
        assert!(l.admits("::ffff:10.1.1.1".parse().unwrap()), "v4-mapped is v4");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(parse_cidr("10.0.0.0/33").unwrap_err().contains("10.0.0.0/33"));
        assert!(parse_cidr("nope").is_err());
    }

    proptest! {
        #[test]
        fn cidr_parser_never_panics(s in ".{0,48}") {
            let _ = parse_cidr(&s);
        }

        #[test]
        fn cidr_contains_its_address(a in any::<[u8; 4]>(), len in 0u8..=32) {
            let net = parse_cidr(&format!("{}/{len}", std::net::Ipv4Addr::from(a))).unwrap();
            prop_assert!(net.contains(&IpAddr::from(a)));
        }

        #[test]
        fn upstream_parser_never_panics(s in ".{0,64}") {
            let _ = s.parse::<Upstream>();
            let _ = parse_listen(&s);
            let _ = parse_duration(&s);
            let _ = s.parse::<HealthCheck>();
        }

        #[test]
        fn upstream_round_trips(host in "[a-z][a-z0-9.-]{0,20}", port in 1u16..) {
            let u: Upstream = format!("{host}:{port}").parse().unwrap();
            prop_assert_eq!(u.to_string(), format!("{host}:{port}"));
        }
    }
}
