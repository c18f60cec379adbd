//! One connection's path, one file per phase, in the order it travels:
//! [`listener`] accepts it and [`workers`] places it on a data-plane thread;
//! [`proxy`] carries it through admit (the [`proxy_protocol`] header,
//! allow/deny), [`connect`] (candidates and retry), the first exchange
//! ([`replay`], and [`http`] answers when no backend can be reached), and
//! the byte pump ([`duplex`], with splice(2) [`pipe`]s); each phase also
//! waits on the connection's one deadline and drain token ([`watch`]). It reads the
//! [`upstream`](crate::upstream) state and never changes what a control task owns.

pub mod access;
pub mod connect;
pub mod duplex;
pub mod http;
pub mod listener;
pub mod pipe;
pub mod proxy;
pub mod proxy_protocol;
pub mod replay;
pub mod route;
pub mod tls;
pub mod watch;
pub mod workers;
