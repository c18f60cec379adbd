//! What a listener picks from: backends, their health state, the pool and
//! its strategies, and the listener's live snapshot. State only: no tasks,
//! no sockets. The connection path reads it lock-free; control tasks change
//! it (probes feed [`Health`], reloads and DNS swap a [`Service`]'s snapshot).

pub mod backend;
pub mod balance;
pub mod clients;
pub mod health;
pub mod pool;
pub mod service;

pub use backend::{ActiveGuard, Backend, ConnectFailure, Settings};
pub use health::log_transition;
pub use pool::{Candidates, Pool};
pub use service::{Service, Snapshot};
