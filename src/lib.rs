//! tcplb: a small, fast layer-4 TCP load balancer.
//!
//! A connection travels one way through the crate: a listener accepts it
//! and hands it to the data-plane worker that serves it; the connection is
//! admitted (PROXY header, allow/deny), asks its listener's backend pool for
//! candidates in the order a balance strategy chose, connects with retry
//! across distinct backends, watches the first exchange (replaying an
//! idempotent HTTP request when a backend hangs up before answering, and
//! answering 502/503/504 when no backend can be reached), then pumps bytes
//! both ways with correct half-close and idle timeouts, and ends with one
//! access-log event. Health probes, reload, DNS refresh and the admin
//! endpoint run beside that path and only change shared state it reads.
//!
//! The data plane is thread-per-core: each worker thread runs a
//! current-thread runtime with its own SO_REUSEPORT socket per listen
//! address. A connection is served by the worker that accepted it, unless
//! that worker is busier than another (`worker_balance = "fewest"`): then
//! it is handed over before a byte is read, and stays there to its end. The
//! control plane runs on the caller's runtime and only swaps snapshots that
//! connections read lock-free.
//!
//! The modules form three layers above a floor of leaves, and imports only
//! go down (a test, `tests/layers.rs`, holds the code to it):
//!
//! - `control`: tasks that change shared state: the [`Server`] and its
//!   control loop, reload, DNS refresh, health probes, the admin endpoint
//!   and its [`metrics`], process signals.
//! - `conn`: one connection's path, a file per phase: listener, workers,
//!   proxy (the `Connection` and its phases), connect, PROXY protocol,
//!   replay, http, the byte pump (duplex) and its splice pipes.
//! - `upstream`: what a listener picks from: [`Backend`], its health state,
//!   the [`Pool`] and its balance strategies, the [`Service`] snapshot.
//!   State only, no tasks and no sockets.
//! - leaves: [`config`] (validated configuration, every default), `io`
//!   (socket helpers), `stats` (counters and histograms), `sys` (the one
//!   `unsafe` call). [`cli`] and [`logging`] sit beside the binary: `cli`
//!   reads only `config`, `logging` only `stats`.
// Bad input and network errors are returned, never unwrapped (tests may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod config;
pub(crate) mod conn;
pub(crate) mod control;
pub(crate) mod io;
pub(crate) mod logbuf;
pub mod logging;
pub(crate) mod stats;
mod sys;
pub(crate) mod upstream;

pub use config::Config;
pub use conn::proxy_protocol;
pub use control::admin::Admin;
pub use control::discovery::{Resolve, SystemResolver};
pub use control::shutdown::Signals;
pub use control::upgrade::Inherited;
pub use control::{Error, Handle, Server};
pub use upstream::{Backend, Pool, Service};

/// Prometheus metrics: the registry the admin endpoint serves, and where
/// its collector finds the live listeners.
pub mod metrics {
    pub use crate::control::metrics::{encode, registry, Source};
}

/// The parsers of untrusted client bytes, for fuzzing and property tests.
pub mod parse {
    pub use crate::conn::http::{sniff, Sniff};
    pub use crate::conn::replay::{verdict, Verdict};
    pub use crate::conn::tls::{client_hello, server_answer, Hello};
}
