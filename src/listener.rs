//! Binding listen sockets with socket2, and the accept loop.

use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::proxy;
use crate::service::Service;

/// Pause after an accept error caused by resource exhaustion.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds `addr` with SO_REUSEADDR and a real backlog. IPv6 sockets are
/// IPv6-only, so `0.0.0.0:P` and `[::]:P` can both be given.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}

/// Errors after which accepting again at once would fail again: back off.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

/// Runs one connection's task; a panic in it (a bug) is logged and counted,
/// and costs that connection only, never the process. Returns whether it panicked.
pub async fn contain_panic(
    listener: &str,
    peer: SocketAddr,
    task: impl std::future::Future<Output = ()>,
) -> bool {
    match AssertUnwindSafe(task).catch_unwind().await {
        Ok(()) => false,
        Err(panic) => {
            report_panic(listener, peer, &*panic);
            true
        }
    }
}

/// Logs and counts a panic caught in a connection task.
fn report_panic(listener: &str, peer: SocketAddr, panic: &(dyn std::any::Any + Send)) {
    crate::metrics::CONNECTION_PANICS.fetch_add(1, Ordering::Relaxed);
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    error!(listener, client = %peer, panic = %what, "connection task panicked (a bug); connection closed");
}

/// What an accept loop needs besides its socket.
#[derive(Clone)]
pub struct AcceptContext {
    /// Global connection limit: one permit per live client connection.
    pub limit: Arc<Semaphore>,
    /// Connection tasks, waited on during drain.
    pub tracker: TaskTracker,
    /// Cancelled when shutdown begins: stop accepting.
    pub stop: CancellationToken,
    /// Cancelled when the drain deadline passes: close connections.
    pub kill: CancellationToken,
}

/// Accepts until `ctx.stop` is cancelled, then drops (closes) the listener.
pub async fn accept_loop(listener: TcpListener, svc: Arc<Service>, ctx: AcceptContext) {
    let local = listener.local_addr().ok();
    let mut failures: u64 = 0;
    loop {
        // At the limit, wait here: further clients stay in the kernel backlog.
        let permit = tokio::select! {
            p = Arc::clone(&ctx.limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = ctx.stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = ctx.stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                if failures > 0 {
                    info!(listener = %svc.name, failed = failures, "accepting again");
                    failures = 0;
                }
                let _ = stream.set_nodelay(true);
                let _ = SockRef::from(&stream).set_keepalive(true);
                debug!(listener = %svc.name, client = %peer, "accepted");
                let svc = Arc::clone(&svc);
                let kill = ctx.kill.clone();
                // No async block around the task: it would store the
                // connection's future twice.
                let name = Arc::clone(&svc.name);
                let task = AssertUnwindSafe(proxy::serve(svc, stream, peer, kill))
                    .catch_unwind()
                    .map(move |result| {
                        if let Err(panic) = result {
                            report_panic(&name, peer, &*panic);
                        }
                        drop(permit);
                    });
                ctx.tracker.spawn(task);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                crate::metrics::ACCEPT_ERRORS.fetch_add(1, Ordering::Relaxed);
                if failures == 0 {
                    warn!(listener = %svc.name, addr = ?local, error = %e, "accept failed: out of resources, backing off");
                }
                failures += 1;
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    _ = ctx.stop.cancelled() => return,
                }
            }
            Err(e) => {
                crate::metrics::ACCEPT_ERRORS.fetch_add(1, Ordering::Relaxed);
                // Per-connection failures (e.g. ECONNABORTED) never stop the listener.
                debug!(listener = %svc.name, error = %e, "accept failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_connection_task_is_contained_and_counted() {
        let before = crate::metrics::CONNECTION_PANICS.load(Ordering::Relaxed);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let panicked = contain_panic("t", peer, async { panic!("bug in a connection") }).await;
        assert!(panicked);
        assert!(!contain_panic("t", peer, async {}).await);
        assert_eq!(crate::metrics::CONNECTION_PANICS.load(Ordering::Relaxed), before + 1);
    }
}
