//! Backends and the pool a listener selects from.
//!
//! A [`Backend`] is one resolved address. Everything the hot path reads or
//! bumps on it is an atomic: whether it is up, how many connections it holds,
//! counters for logs. A [`Pool`] is the fixed list of one listener's backends
//! plus its selection strategy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::balance::Strategy;
use crate::health::Health;

/// One backend address and its live state.
#[derive(Debug)]
pub struct Backend {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The upstream as the user wrote it (e.g. `app:3031`), for logs.
    pub upstream: Arc<str>,
    /// Up/down state and the rise/fall counters that move it.
    pub health: Health,
    /// Client connections currently proxied to this backend.
    active: AtomicUsize,
    /// Client connections ever established to this backend.
    total: AtomicU64,
    /// Connect attempts to this backend that failed.
    connect_failures: AtomicU64,
}

impl Backend {
    /// A backend that starts up, so traffic flows at once.
    pub fn new(addr: SocketAddr, upstream: Arc<str>, rise: u32, fall: u32) -> Self {
        Backend {
            addr,
            upstream,
            health: Health::new(rise, fall),
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
        }
    }

    /// Whether selection may send new clients here.
    pub fn is_available(&self) -> bool {
        self.health.is_up()
    }

    /// Connections currently proxied here.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections ever established here.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Connect attempts here that failed.
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    pub(crate) fn record_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection as active until the guard drops.
    pub(crate) fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(self))
    }
}

/// Decrements a backend's active count when the connection ends.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One listener's backends and the strategy that orders them.
#[derive(Debug)]
pub struct Pool {
    /// All backends, in the order the upstreams were given.
    backends: Vec<Arc<Backend>>,
    /// Picks the first backend to try for each client.
    strategy: Box<dyn Strategy>,
}

impl Pool {
    /// A pool over `backends` using `strategy`.
    pub fn new(backends: Vec<Arc<Backend>>, strategy: Box<dyn Strategy>) -> Self {
        Pool { backends, strategy }
    }

    /// Every backend, up or down.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The backends to try for `client`, best first, at most `attempts` of them.
    ///
    /// The strategy picks the first among available backends; the rest follow
    /// in ring order, skipping unavailable ones. When no backend is available
    /// the pool is in panic mode: every backend is a candidate, so a wrong
    /// health check cannot turn into a full outage.
    pub fn candidates(&self, client: SocketAddr, attempts: usize) -> Candidates<'_> {
        let n = self.backends.len();
        match self.strategy.pick(&self.backends, client) {
            Some(first) => {
                Candidates { pool: self, first, step: 0, left: attempts.min(n), panic: false }
            }
            None => {
                let first = self.strategy.pick_any(n, client);
                Candidates { pool: self, first, step: 0, left: attempts.min(n), panic: n > 0 }
            }
        }
    }
}

/// Backends to try for one client, in order; see [`Pool::candidates`].
#[derive(Debug)]
pub struct Candidates<'a> {
    /// The pool walked.
    pool: &'a Pool,
    /// Index of the strategy's choice.
    first: usize,
    /// How far around the ring from `first` the walk is.
    step: usize,
    /// How many more candidates may be yielded.
    left: usize,
    /// No backend was available: yield down ones too.
    panic: bool,
}

impl Candidates<'_> {
    /// True when every backend was down and candidates include down ones.
    pub fn is_panic(&self) -> bool {
        self.panic
    }
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Arc<Backend>;

    fn next(&mut self) -> Option<Self::Item> {
        let n = self.pool.backends.len();
        while self.left > 0 && self.step < n {
            let b = &self.pool.backends[(self.first + self.step) % n];
            self.step += 1;
            if self.panic || self.step == 1 || b.is_available() {
                self.left -= 1;
                return Some(b);
            }
        }
        None
    }
}
