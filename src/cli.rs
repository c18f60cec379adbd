//! The command line. Doc comments here are the `--help` text; parsing of
//! values lives in [`crate::config`], and turning flags into a [`Config`] is
//! [`Cli::into_config`], a plain field-by-field mapping.
// The doc comments below are written for `--help`, where `[,backup]` and
// `[::]:80` are literal text, not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{
    self, route::RouteConfig, AdminConfig, Config, HealthCheck, HealthConfig, HumanDuration,
    ListenerConfig, Overrides, Protocol, ProxyVersion, SpliceMode, StrategyKind, Upstream,
    WorkerBalance,
};

const EXAMPLES: &str = "\
Examples:
  # Spread clients on port 80 over two backends, round-robin
  tcplb --listen 0.0.0.0:80 --upstream a:3031 --upstream b:3032

  # IPv4 and IPv6, HTTP health checks, JSON logs
  tcplb --listen 0.0.0.0:443 --listen [::]:443 --upstream web-1:8443 \\
        --upstream web-2:8443 --health-check http:/healthz --log-format json

  # Pure layer 4 (never writes a byte of its own), Redis
  tcplb --listen 127.0.0.1:6380 --protocol tcp --upstream 10.0.0.5:6379

Exit codes: 0 after a clean shutdown, 1 on a runtime error (address in use,
permission denied), 2 on a usage error (bad flag value, unresolvable upstream).
Signals: SIGTERM/SIGINT drain and exit; a second SIGINT exits at once.";

/// A small, fast layer-4 TCP load balancer.
///
/// Accepts TCP clients on each --listen address and splices each one to an
/// upstream chosen round-robin among the healthy ones, retrying the next
/// upstream when a connect fails.
#[derive(Debug, Parser)]
#[command(
    name = "tcplb",
    version,
    after_help = EXAMPLES,
    max_term_width = 100,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Not running the balancer: completions or the man page.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Read listeners and settings from this TOML file (SIGHUP reloads it);
    /// excludes the listener flags below.
    #[arg(long, env = "TCPLB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration (file or flags), print every problem, and exit
    /// (0 when valid, 2 when not) without starting.
    #[arg(long)]
    pub check: bool,

    /// Address to accept clients on: IP:PORT, [IPV6]:PORT, :PORT (every IPv4
    /// address) or HOST:PORT (every address the name resolves to). Repeatable.
    #[arg(long, env = "TCPLB_LISTEN", value_delimiter = ',', conflicts_with = "config", value_name = "ADDR", required_unless_present = "config", value_parser = config::parse_listen_all)]
    pub listen: Vec<config::ListenAddrs>,

    /// Backend as HOST:PORT[,weight=N][,backup][,max-connections=N][,send-proxy=v1|v2].
    /// Repeatable. A host name becomes one backend per address it resolves to.
    #[arg(
        long,
        env = "TCPLB_UPSTREAM",
        value_delimiter = ' ',
        conflicts_with = "config",
        value_name = "HOST:PORT",
        required_unless_present_any = ["config", "route"]
    )]
    pub upstream: Vec<Upstream>,

    /// Route TLS clients whose server name (SNI) is NAME, an exact name or a
    /// one-label wildcard (*.example.com), to these upstreams instead of the
    /// --upstream ones (the default pool; without it, unmatched clients are
    /// closed). Repeatable.
    #[arg(
        long,
        env = "TCPLB_ROUTE",
        value_delimiter = ' ',
        conflicts_with = "config",
        value_name = "NAME=UPSTREAM[,UPSTREAM...]"
    )]
    pub route: Vec<RouteFlag>,

    /// Limit on each connect to a backend.
    #[arg(long, env = "TCPLB_CONNECT_TIMEOUT", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_CONNECT_TIMEOUT))]
    pub connect_timeout: HumanDuration,

    /// How many distinct backends one client connection may try before giving up.
    #[arg(long, env = "TCPLB_CONNECT_ATTEMPTS", conflicts_with = "config", value_name = "N", default_value_t = config::DEFAULT_CONNECT_ATTEMPTS, value_parser = config::parse_positive)]
    pub connect_attempts: usize,

    /// Close a connection with no bytes either way for this long (0 disables).
    #[arg(long, env = "TCPLB_IDLE_TIMEOUT", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_IDLE_TIMEOUT))]
    pub idle_timeout: HumanDuration,

    /// Close a half-closed connection (one side sent FIN) idle for this long (0: idle timeout only).
    #[arg(long, env = "TCPLB_HALF_CLOSE_TIMEOUT", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_HALF_CLOSE_TIMEOUT))]
    pub half_close_timeout: HumanDuration,

    /// After SIGTERM/SIGINT, how long established connections may run before they are closed.
    #[arg(long, env = "TCPLB_DRAIN_TIMEOUT", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_DRAIN_TIMEOUT))]
    pub drain_timeout: HumanDuration,

    /// Limit of concurrent client connections; at the limit new clients wait in the kernel backlog.
    #[arg(long, env = "TCPLB_MAX_CONNECTIONS", conflicts_with = "config", value_name = "N", default_value_t = config::DEFAULT_MAX_CONNECTIONS, value_parser = config::parse_positive)]
    pub max_connections: usize,

    /// Connections one client address may hold at once; more are closed at once (the PROXY header's address with --accept-proxy).
    #[arg(long, env = "TCPLB_MAX_CONNECTIONS_PER_CLIENT", conflicts_with = "config", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: Option<u32>,

    /// New connections one client address may open: COUNT/WINDOW (20/s, 600/m), a token bucket holding one window's worth.
    #[arg(
        long,
        env = "TCPLB_CONNECTION_RATE_PER_CLIENT",
        conflicts_with = "config",
        value_name = "RATE"
    )]
    pub connection_rate_per_client: Option<config::Rate>,

    /// What tcplb may say when no backend can be reached: auto answers HTTP
    /// clients with 502/503/504 and closes others; tcp never writes a byte.
    #[arg(long, env = "TCPLB_PROTOCOL", conflicts_with = "config", value_enum, default_value_t = config::DEFAULT_PROTOCOL)]
    pub protocol: Protocol,

    /// On the failure path, how long to wait for a silent client's first bytes.
    #[arg(long, env = "TCPLB_PEEK_TIMEOUT", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_PEEK_TIMEOUT))]
    pub peek_timeout: HumanDuration,

    /// With --accept-proxy, how long a client may take to send its whole PROXY header.
    #[arg(long, env = "TCPLB_PROXY_HEADER_TIMEOUT", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_PROXY_HEADER_TIMEOUT))]
    pub proxy_header_timeout: HumanDuration,

    /// Active probe: tcp (connect, and no close at once), http:/PATH, http://HOST/PATH, redis, postgres, mysql, smtp, tls, or none.
    #[arg(long, env = "TCPLB_HEALTH_CHECK", conflicts_with = "config", value_name = "CHECK", default_value_t = config::DEFAULT_HEALTH_CHECK)]
    pub health_check: HealthCheck,

    /// Time between two probes of one backend.
    #[arg(long, env = "TCPLB_HEALTH_INTERVAL", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_HEALTH_INTERVAL))]
    pub health_interval: HumanDuration,

    /// Limit on one probe.
    #[arg(long, env = "TCPLB_HEALTH_TIMEOUT", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_HEALTH_TIMEOUT))]
    pub health_timeout: HumanDuration,

    /// Consecutive successful probes that bring a down backend up.
    #[arg(long, env = "TCPLB_RISE", conflicts_with = "config", value_name = "N", default_value_t = config::DEFAULT_RISE, value_parser = config::parse_threshold)]
    pub rise: u32,

    /// Consecutive failures (probes or real connects) that take an up backend down.
    #[arg(long, env = "TCPLB_FALL", conflicts_with = "config", value_name = "N", default_value_t = config::DEFAULT_FALL, value_parser = config::parse_threshold)]
    pub fall: u32,

    /// Health probes start with the backend's PROXY header (HAProxy's check-send-proxy).
    #[arg(long, env = "TCPLB_HEALTH_SEND_PROXY", conflicts_with = "config")]
    pub health_send_proxy: bool,

    /// How backends are chosen.
    #[arg(long, env = "TCPLB_STRATEGY", conflicts_with = "config", value_enum, default_value_t = config::DEFAULT_STRATEGY)]
    pub strategy: StrategyKind,

    /// Send a PROXY protocol header (v1 or v2) to every backend before the
    /// client's bytes; `send-proxy=` on an upstream overrides it.
    #[arg(long, env = "TCPLB_SEND_PROXY", conflicts_with = "config", value_name = "VERSION", value_parser = config::parse_proxy_version)]
    pub send_proxy: Option<ProxyVersion>,

    /// Expect a PROXY protocol header (v1 or v2) from every client (a load
    /// balancer in front); connections without a valid one are closed.
    #[arg(long, env = "TCPLB_ACCEPT_PROXY", conflicts_with = "config")]
    pub accept_proxy: bool,

    /// Re-resolve upstream host names this often (0 disables).
    #[arg(long, env = "TCPLB_DNS_REFRESH", conflicts_with = "config", value_name = "DURATION", default_value_t = HumanDuration(config::DEFAULT_DNS_REFRESH))]
    pub dns_refresh: HumanDuration,

    /// Forward with splice(2) through a 1 MiB pipe (zero copy): auto
    /// switches a direction to it when its first message waits whole and is
    /// 64 KiB or more, once a 64 KiB read leaves 64 KiB more waiting, or
    /// when 1 MiB moves in 64 reads or fewer (bulk), and back to copying
    /// after 64 reads that moved less (small messages); on from the first
    /// byte; off always copies through user space.
    #[arg(long, env = "TCPLB_SPLICE", conflicts_with = "config", value_enum, default_value_t = config::DEFAULT_SPLICE)]
    pub splice: SpliceMode,

    /// Serve only clients in this network (CIDR or address). Repeatable.
    #[arg(long, env = "TCPLB_ALLOW", value_delimiter = ',', conflicts_with = "config", value_name = "CIDR", value_parser = config::parse_cidr)]
    pub allow: Vec<ipnet::IpNet>,

    /// Close clients in this network right after accept (wins over --allow). Repeatable.
    #[arg(long, env = "TCPLB_DENY", value_delimiter = ',', conflicts_with = "config", value_name = "CIDR", value_parser = config::parse_cidr)]
    pub deny: Vec<ipnet::IpNet>,

    /// With --accept-proxy, only peers in this network may send a PROXY
    /// header; others are closed unread. Repeatable. Required with
    /// --allow/--deny, which then judge the client the header names.
    #[arg(long, env = "TCPLB_ACCEPT_PROXY_FROM", value_delimiter = ',', conflicts_with = "config", value_name = "CIDR", value_parser = config::parse_cidr, requires = "accept_proxy")]
    pub accept_proxy_from: Vec<ipnet::IpNet>,

    /// Serve the admin endpoint (metrics, /readyz, /status, drain/enable) here;
    /// keep it on loopback.
    #[arg(long, env = "TCPLB_ADMIN", conflicts_with = "config", value_name = "ADDR", value_parser = config::parse_listen)]
    pub admin: Option<SocketAddr>,

    /// File holding the bearer token that admin POSTs must present; required
    /// for them when --admin is not on loopback.
    #[arg(
        long,
        env = "TCPLB_ADMIN_TOKEN_FILE",
        conflicts_with = "config",
        value_name = "FILE",
        requires = "admin"
    )]
    pub admin_token_file: Option<PathBuf>,

    /// One access-log event per finished connection (info, target tcplb::access).
    #[arg(long, env = "TCPLB_ACCESS_LOG", conflicts_with = "config", value_enum, default_value_t = Switch::from(config::DEFAULT_ACCESS_LOG))]
    pub access_log: Switch,

    /// Data-plane worker threads, each with its own SO_REUSEPORT socket per
    /// listen address (default: one per CPU core).
    #[arg(long, env = "TCPLB_THREADS", value_name = "N", value_parser = config::parse_positive)]
    pub threads: Option<usize>,

    /// How new connections are spread over the worker threads [default: fewest]
    #[arg(long, env = "TCPLB_WORKER_BALANCE", value_enum, value_name = "MODE")]
    pub worker_balance: Option<WorkerBalance>,

    /// Log format.
    #[arg(long, env = "TCPLB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    /// When not given, RUST_LOG is used, then "info".
    #[arg(long, env = "TCPLB_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl From<bool> for Switch {
    fn from(on: bool) -> Self {
        if on {
            Switch::On
        } else {
            Switch::Off
        }
    }
}

/// Subcommands that do not run the balancer.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Manpage,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Cli {
    /// The configuration: the file given with `--config`, or the flags as
    /// one listener. Errors are one line per problem.
    pub fn into_config(self) -> Result<Config, String> {
        let overrides = self.overrides();
        let mut config = match &self.config {
            Some(path) => config::file::load(path).map_err(|p| p.to_string())?,
            None => self.flags_config()?,
        };
        overrides.apply(&mut config);
        Ok(config)
    }

    /// The flags that apply over a `--config` file too (at every reload).
    pub fn overrides(&self) -> Overrides {
        Overrides { threads: self.threads, worker_balance: self.worker_balance }
    }

    /// Maps the flags onto a one-listener [`Config`].
    fn flags_config(self) -> Result<Config, String> {
        if self.health_interval.0.is_zero() {
            return Err("--health-interval must be more than 0".into());
        }
        if self.health_timeout.0.is_zero() {
            return Err("--health-timeout must be more than 0".into());
        }
        if self.connect_timeout.0.is_zero() {
            return Err("--connect-timeout must be more than 0".into());
        }
        let mut listen: Vec<SocketAddr> = Vec::new();
        for a in self.listen.into_iter().flat_map(|l| l.0) {
            if listen.contains(&a) && a.port() != 0 {
                return Err(format!("--listen {a} is given twice"));
            }
            listen.push(a);
        }
        let mut listener = ListenerConfig::new("default", listen, self.upstream);
        listener.connect_timeout = self.connect_timeout.0;
        listener.connect_attempts = self.connect_attempts;
        listener.idle_timeout = (!self.idle_timeout.0.is_zero()).then_some(self.idle_timeout.0);
        listener.half_close_timeout =
            (!self.half_close_timeout.0.is_zero()).then_some(self.half_close_timeout.0);
        listener.protocol = self.protocol;
        listener.peek_timeout = self.peek_timeout.0;
        if self.proxy_header_timeout.0.is_zero() {
            return Err("--proxy-header-timeout must be more than 0".into());
        }
        listener.proxy_header_timeout = self.proxy_header_timeout.0;
        listener.health = HealthConfig {
            check: self.health_check,
            interval: self.health_interval.0,
            timeout: self.health_timeout.0,
            rise: self.rise,
            fall: self.fall,
            send_proxy: self.health_send_proxy,
            ..HealthConfig::default()
        };
        listener.strategy = self.strategy;
        listener.send_proxy = self.send_proxy;
        listener.accept_proxy = self.accept_proxy;
        listener.dns_refresh = (!self.dns_refresh.0.is_zero()).then_some(self.dns_refresh.0);
        listener.access_log = self.access_log == Switch::On;
        listener.splice = self.splice;
        listener.allow = self.allow;
        listener.deny = self.deny;
        listener.accept_proxy_from = self.accept_proxy_from;
        listener.max_connections_per_client = self.max_connections_per_client;
        listener.connection_rate_per_client = self.connection_rate_per_client;
        for r in self.route {
            if listener.routes.iter().any(|other| other.name == r.name) {
                return Err(format!("--route {} is given twice", r.name));
            }
            let route = RouteConfig::new(&r.name, vec![r.name.clone()], r.upstreams, &listener);
            listener.routes.push(route);
        }
        listener.validate()?;
        let mut config = Config::single(listener);
        config.drain_timeout = self.drain_timeout.0;
        config.max_connections = self.max_connections;
        config.admin =
            self.admin.map(|listen| AdminConfig { listen, token_file: self.admin_token_file });
        Ok(config)
    }
}

/// One `--route NAME=UPSTREAM[,UPSTREAM...]`.
#[derive(Debug, Clone)]
pub struct RouteFlag {
    /// The server name or wildcard, also the route's name.
    name: String,
    /// Where its clients go.
    upstreams: Vec<Upstream>,
}

impl std::str::FromStr for RouteFlag {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, list) = s
            .split_once('=')
            .ok_or_else(|| format!("route '{s}' must be NAME=UPSTREAM[,UPSTREAM...]"))?;
        let name = config::route::parse_pattern(name)?;
        let upstreams = list
            .split(',')
            .map(|u| u.parse::<Upstream>().map_err(|e| format!("route '{s}': {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RouteFlag { name, upstreams })
    }
}
