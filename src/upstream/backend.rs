//! A backend: one resolved address and its live state.
//!
//! Everything the hot path reads or bumps on a [`Backend`] is an atomic:
//! whether it is up, draining or full, how many connections it holds,
//! counters. Settings that a reload may change (weight, backup, connection
//! cap, PROXY header) are atomics too, so an unchanged address keeps one
//! `Backend` (and its health and counters) across reloads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::ProxyVersion;
use crate::upstream::health::{log_transition, Health};

/// Per-backend settings, as resolved from the upstream spec and listener defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Relative share of new connections.
    pub weight: u32,
    /// Only used when no primary backend is up.
    pub backup: bool,
    /// Most concurrent connections (0: unlimited).
    pub max_connections: usize,
    /// PROXY header to send before the client's bytes.
    pub send_proxy: Option<ProxyVersion>,
    /// How long a backend that comes up takes to reach its full share.
    pub slow_start: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            weight: 1,
            backup: false,
            max_connections: 0,
            send_proxy: None,
            slow_start: Duration::ZERO,
        }
    }
}

/// The share a backend starts its slow start with.
const RAMP_FLOOR: f64 = 0.1;

/// Milliseconds since the first call, as a ramp's clock (never 0).
fn ramp_clock() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

/// One backend address and its live state.
#[derive(Debug)]
pub struct Backend {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The upstream as the user wrote it (e.g. `app:3031`), for logs.
    pub upstream: Arc<str>,
    /// Up/down state and the rise/fall counters that move it.
    pub health: Health,
    /// Relative share of new connections (≥ 1).
    weight: AtomicU32,
    /// Backup backends take traffic only when no primary is up.
    backup: AtomicBool,
    /// Connection cap (0: unlimited); a full backend is skipped like a down one.
    max_connections: AtomicUsize,
    /// PROXY header version to send: 0 none, 1 v1, 2 v2.
    send_proxy: AtomicU8,
    /// Slow start's window, in milliseconds (0: off).
    slow_start_ms: AtomicU64,
    /// When its current ramp began ([`ramp_clock`]); 0: at full share.
    ramp_since: AtomicU64,
    /// Taken out of rotation (by an operator, or removed by a reload): no new
    /// connections, established ones run to their end.
    draining: AtomicBool,
    /// Cancelled when the backend leaves the configuration: stops its probe.
    retired: CancellationToken,
    /// Client connections currently held (including connects in progress).
    active: AtomicUsize,
    /// Client connections ever established.
    total: AtomicU64,
    /// Connect attempts that failed, by [`ConnectFailure`] reason.
    connect_failures: [AtomicU64; ConnectFailure::ALL.len()],
    /// Bytes from clients to this backend.
    bytes_sent: AtomicU64,
    /// Bytes from this backend to clients.
    bytes_received: AtomicU64,
    /// Active probes: [successes, failures].
    probes: [AtomicU64; 2],
    /// The last probe's result, for the status page (probe path only).
    last_probe: Mutex<Option<ProbeResult>>,
    /// The last few up/down transitions, newest last, for the status page
    /// (taken only when the state changes).
    transitions: Mutex<std::collections::VecDeque<TransitionRecord>>,
}

/// One up/down change of a backend, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRecord {
    /// The new state: true for up.
    pub up: bool,
    /// The result that caused it ("connection refused", "HTTP 503", ...).
    pub reason: String,
    /// When it happened.
    pub at: std::time::SystemTime,
}

/// How many transitions a backend remembers.
const TRANSITIONS_KEPT: usize = 5;

/// Why a connect to a backend failed (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Connection refused.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// Connection reset (or closed before the PROXY header went out).
    Reset,
    /// Anything else (unreachable, no buffers, ...).
    Other,
}

impl ConnectFailure {
    /// Every reason, in index order.
    pub const ALL: [ConnectFailure; 4] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Reset,
        ConnectFailure::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Reset => "reset",
            ConnectFailure::Other => "other",
        }
    }
}

/// One active probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether it passed.
    pub ok: bool,
    /// What happened ("connect succeeded", "HTTP 503", "timeout after 1s").
    pub detail: String,
    /// When it finished.
    pub at: std::time::SystemTime,
}

impl Backend {
    /// A backend that starts up, so traffic flows at once.
    pub fn new(addr: SocketAddr, upstream: Arc<str>, rise: u32, fall: u32) -> Self {
        Self::with_settings(addr, upstream, rise, fall, Settings::default())
    }

    /// A backend with explicit settings.
    pub fn with_settings(
        addr: SocketAddr,
        upstream: Arc<str>,
        rise: u32,
        fall: u32,
        settings: Settings,
    ) -> Self {
        let b = Backend {
            addr,
            upstream,
            health: Health::new(rise, fall),
            weight: AtomicU32::new(1),
            backup: AtomicBool::new(false),
            max_connections: AtomicUsize::new(0),
            send_proxy: AtomicU8::new(0),
            slow_start_ms: AtomicU64::new(0),
            ramp_since: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            retired: CancellationToken::new(),
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            connect_failures: Default::default(),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            probes: Default::default(),
            last_probe: Mutex::new(None),
            transitions: Mutex::new(std::collections::VecDeque::new()),
        };
        b.apply(settings);
        b
    }

    /// Updates the settings in place (reload).
    pub fn apply(&self, s: Settings) {
        self.weight.store(s.weight.max(1), Ordering::Relaxed);
        self.slow_start_ms.store(s.slow_start.as_millis() as u64, Ordering::Relaxed);
        self.backup.store(s.backup, Ordering::Relaxed);
        self.max_connections.store(s.max_connections, Ordering::Relaxed);
        let v = match s.send_proxy {
            None => 0,
            Some(ProxyVersion::V1) => 1,
            Some(ProxyVersion::V2) => 2,
        };
        self.send_proxy.store(v, Ordering::Relaxed);
    }

    /// The current settings.
    pub fn settings(&self) -> Settings {
        Settings {
            weight: self.weight(),
            backup: self.is_backup(),
            max_connections: self.max_connections.load(Ordering::Relaxed),
            send_proxy: self.send_proxy(),
            slow_start: Duration::from_millis(self.slow_start_ms.load(Ordering::Relaxed)),
        }
    }

    /// Relative share of new connections.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Whether this is a backup backend.
    pub fn is_backup(&self) -> bool {
        self.backup.load(Ordering::Relaxed)
    }

    /// PROXY header version to send, if any.
    pub fn send_proxy(&self) -> Option<ProxyVersion> {
        match self.send_proxy.load(Ordering::Relaxed) {
            1 => Some(ProxyVersion::V1),
            2 => Some(ProxyVersion::V2),
            _ => None,
        }
    }

    /// Whether selection may send new clients here: up, not draining, not full.
    /// Starts a slow start (a health rise, or added by a reload or DNS):
    /// from a tenth of its share to all of it over the window.
    pub fn start_ramp(&self) {
        if self.slow_start_ms.load(Ordering::Relaxed) > 0 {
            self.ramp_since.store(ramp_clock(), Ordering::Relaxed);
        }
    }

    /// The share of its weight it takes now: 1 outside a slow start, from
    /// 0.1 to 1 during one. One atomic load when not ramping.
    pub fn ramp(&self) -> f64 {
        let since = self.ramp_since.load(Ordering::Relaxed);
        if since == 0 {
            return 1.0;
        }
        let window = self.slow_start_ms.load(Ordering::Relaxed);
        let elapsed = ramp_clock().saturating_sub(since);
        if window == 0 || elapsed >= window {
            self.ramp_since.store(0, Ordering::Relaxed);
            return 1.0;
        }
        (elapsed as f64 / window as f64).max(RAMP_FLOOR)
    }

    pub fn is_available(&self) -> bool {
        self.health.is_up() && !self.is_draining() && !self.is_full()
    }

    /// Whether the connection cap is reached.
    pub fn is_full(&self) -> bool {
        let max = self.max_connections.load(Ordering::Relaxed);
        max != 0 && self.active() >= max
    }

    /// Whether the backend is out of rotation.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Takes the backend out of rotation (true) or puts it back (false).
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// Marks the backend as removed from the configuration.
    pub fn retire(&self) {
        self.set_draining(true);
        self.retired.cancel();
    }

    /// Whether the backend was removed from the configuration.
    pub fn is_removed(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// Cancelled once the backend is removed from the configuration.
    pub fn retired(&self) -> &CancellationToken {
        &self.retired
    }

    /// Connections currently held.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections ever established here.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Connect attempts here that failed, for every reason.
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Connect attempts here that failed for `reason`.
    pub fn connect_failures_for(&self, reason: ConnectFailure) -> u64 {
        self.connect_failures[reason as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn record_connect_failure(&self, reason: ConnectFailure) {
        self.connect_failures[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Byte counters: client→backend and backend→client, bumped as bytes move.
    pub fn byte_counters(&self) -> (&AtomicU64, &AtomicU64) {
        (&self.bytes_sent, &self.bytes_received)
    }

    /// Bytes (client→backend, backend→client) so far.
    pub fn bytes(&self) -> (u64, u64) {
        // Acquire: the splice path publishes `metrics::SPLICED_BYTES` with these.
        (self.bytes_sent.load(Ordering::Acquire), self.bytes_received.load(Ordering::Acquire))
    }

    /// Active probes (passed, failed) so far.
    pub fn probes(&self) -> (u64, u64) {
        (self.probes[0].load(Ordering::Relaxed), self.probes[1].load(Ordering::Relaxed))
    }

    /// The last probe's result.
    pub fn last_probe(&self) -> Option<ProbeResult> {
        self.last_probe.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last few up/down transitions, oldest first.
    pub fn transitions(&self) -> Vec<TransitionRecord> {
        self.transitions.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    pub(crate) fn record_transition(&self, up: bool, reason: &str) {
        let mut t = self.transitions.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TRANSITIONS_KEPT {
            t.pop_front();
        }
        t.push_back(TransitionRecord {
            up,
            reason: reason.to_string(),
            at: std::time::SystemTime::now(),
        });
    }

    pub(crate) fn record_probe(&self, ok: bool, detail: &str) {
        self.probes[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        *self.last_probe.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(ProbeResult { ok, detail: detail.to_string(), at: std::time::SystemTime::now() });
    }

    /// Counts a failed real connection (a connect, or a backend that hung up
    /// before answering) toward `fall`, and logs the transition it causes.
    pub(crate) fn record_passive_failure(&self, listener: &str, reason: &str) {
        if let Some(t) = self.health.observe(false) {
            log_transition(listener, self, t, reason);
        }
    }

    pub(crate) fn record_connected(&self) {
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// Claims a connection slot, or None when the backend is full. The slot
    /// is held until the guard drops, connect attempt included.
    pub(crate) fn try_claim(self: &Arc<Self>) -> Option<ActiveGuard> {
        let max = self.max_connections.load(Ordering::Relaxed);
        let before = self.active.fetch_add(1, Ordering::Relaxed);
        if max != 0 && before >= max {
            self.active.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ActiveGuard(Arc::clone(self)))
    }
}

/// Releases a backend connection slot when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
