//! tcplb: a small, fast layer-4 TCP load balancer.
//!
//! A connection travels one way through the crate: a [`listener`] accepts it
//! (bounded by the global connection limit), the [`proxy`] task asks the
//! listener's [`backend::Pool`] for candidates in the order chosen by a
//! [`balance`] strategy, connects with retry across distinct backends, and then
//! hands both sockets to [`duplex`], which copies bytes both ways with correct
//! half-close and idle timeouts. When no backend can be reached, [`http`] peeks
//! at the client's first bytes and, for an HTTP request, answers 502/503/504.
//! [`health`] probes run beside the path and only flip per-backend atomics
//! that selection reads; [`shutdown`] turns signals into a drain.
//!
//! The data plane is thread-per-core: each worker thread runs a
//! current-thread runtime with its own SO_REUSEPORT socket per listen
//! address, and a connection lives on the worker that accepted it. The
//! control plane (reload, DNS refresh, probes, admin) runs on the caller's
//! runtime and only swaps shared snapshots that connections read lock-free.
//!
//! Module map:
//! - [`admin`]: the admin HTTP endpoint (hyper): metrics, readiness, status, drain.
//! - [`cli`]: the command line (clap derive); no logic.
//! - [`config`]: validated configuration, defaults, parsers of user input.
//! - [`server`]: binds everything and runs it until shutdown ([`Server`]);
//!   the control loop that applies reloads and DNS changes.
//! - [`service`]: one listener's live state, swapped whole on change.
//! - [`discovery`]: resolving upstreams (injectable resolver), DNS refresh.
//! - [`listener`]: socket2 binding and the accept loop with back-off.
//! - [`backend`]: `Backend` (address, atomics for state and counters) and `Pool`.
//! - [`balance`]: selection strategies behind one small trait.
//! - [`health`]: rise/fall tracking, active probes, passive failures.
//! - [`proxy`]: the per-connection task: connect with retry, then splice.
//! - [`duplex`]: the bidirectional byte pump (copy, or splice(2) on request).
//! - [`http`]: the HTTP peek and synthesized responses.
//! - [`replay`]: the first exchange, held so an idempotent request can be replayed.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 encoding and decoding.
//! - [`metrics`]: Prometheus metrics read from the live atomics at scrape time.
//! - [`shutdown`]: process signals.
//! - `sys`: the one `unsafe` call, with its safety argument.
//! - [`workers`]: the data-plane threads.
#![deny(unsafe_code)]
// Bad input and network errors are returned, never unwrapped (tests may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod backend;
pub mod balance;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod duplex;
pub mod health;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod replay;
pub mod server;
pub mod service;
pub mod shutdown;
mod sys;
pub mod workers;

pub use config::Config;
pub use server::{Error, Handle, Server};
