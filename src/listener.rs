//! Binding listen sockets with socket2, and the accept loop.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

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
fn is_resource_exhaustion(e: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
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
                ctx.tracker.spawn(async move {
                    proxy::serve(svc, stream, peer, kill).await;
                    drop(permit);
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
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
                // Per-connection failures (e.g. ECONNABORTED) never stop the listener.
                debug!(listener = %svc.name, error = %e, "accept failed");
            }
        }
    }
}
