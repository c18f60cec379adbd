//! The crate's one `unsafe` call, kept here with its safety argument.

use std::io;
use std::net::TcpListener;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Registers a listen socket for readiness only, so that the accept loop
/// can accept with its own `accept4` and leave each connection unregistered
/// until the worker that serves it is chosen.
#[allow(unsafe_code)]
pub fn readiness(listener: TcpListener) -> io::Result<AsyncFd<TcpListener>> {
    // SAFETY: the AsyncFd owns the listener, so its descriptor stays open and
    // refers to the same socket for as long as it is registered (AsyncFd
    // deregisters it before dropping the listener).
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }.map_err(Into::into)
}
