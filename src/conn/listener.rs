//! Binding listen sockets with socket2, and the accept loop.

use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rustix::net::SocketFlags;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::conn::proxy;
use crate::conn::workers::{Seat, WorkerSet};
use crate::io::is_resource_exhaustion;
use crate::upstream::Service;

/// Pause after an accept error caused by resource exhaustion.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Quiet time after which a new exhaustion error starts a new burst (and a new warning).
const BURST_GAP: Duration = Duration::from_secs(1);

/// Binds `addr` with SO_REUSEADDR and a real backlog. IPv6 sockets are
/// IPv6-only, so `0.0.0.0:P` and `[::]:P` can both be given.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, backlog, false)?)
}

/// Binds `n` sockets to `addr` with SO_REUSEPORT, one per worker thread: the
/// kernel spreads new connections over them, and each worker accepts its
/// own (serving it, or handing it to a less busy worker: `workers`). With
/// port 0 the first socket picks the port and the others join it.
pub fn bind_group(
    addr: SocketAddr,
    backlog: u32,
    n: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind_std(addr, backlog, true)?;
    let actual = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..n.max(1) {
        group.push(bind_std(actual, backlog, true)?);
    }
    Ok(group)
}

fn bind_std(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Linux copies both into every accepted socket: two setsockopt calls per
    // listener instead of two per connection.
    socket.set_nodelay(true)?;
    socket.set_keepalive(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Accepts one connection, non-blocking and close-on-exec in one `accept4`,
/// without registering it with any epoll: [`place`](WorkerSet::place) decides
/// first which worker serves it, and that worker registers it.
fn accept_raw(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (fd, peer) =
        rustix::net::acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let stream = std::net::TcpStream::from(fd);
    // A TCP listener's peers have IPv4 or IPv6 addresses; the kernel leaves
    // the address out only for a peer already gone.
    let peer = peer.and_then(|a| SocketAddr::try_from(a).ok()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::ConnectionAborted, "the client left before accept")
    })?;
    Ok((stream, peer))
}

/// Registers an accepted connection with this worker's epoll.
fn register(svc: &Service, stream: std::net::TcpStream, peer: SocketAddr) -> Option<TcpStream> {
    match TcpStream::from_std(stream) {
        Ok(s) => Some(s),
        Err(e) => {
            // The socket is closed; the client sees a reset.
            crate::stats::ACCEPT_ERRORS.fetch_add(1, Ordering::Relaxed);
            debug!(listener = %svc.name, client = %peer, error = %e, "cannot register an accepted connection");
            None
        }
    }
}

/// Gives a connection this worker accepted to the worker of `seat`, before
/// a byte of it is read; that worker registers it with its own epoll.
fn hand_off(
    tracker: &TaskTracker,
    svc: &Arc<Service>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    seat: Seat,
) {
    crate::stats::WORKER_HANDOFFS.fetch_add(1, Ordering::Relaxed);
    let handle = seat.slot().handle().clone();
    let kill = seat.slot().kill().clone();
    let svc = Arc::clone(svc);
    let name = Arc::clone(&svc.name);
    // The socket is registered on the runtime that polls this task, so the
    // connection's future is built inside it (boxed: see spawn_connection).
    let task = AssertUnwindSafe(async move {
        if let Some(stream) = register(&svc, stream, peer) {
            Box::pin(proxy::serve(svc, stream, peer, kill)).await;
        }
    })
    .catch_unwind()
    .map(release(name, peer, permit, seat));
    tracker.spawn_on(task, &handle);
}

/// What a connection task does last, however it ended: reports a panic (a
/// bug), then gives back its connection slot and its seat on the worker.
fn release(
    listener: Arc<str>,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    seat: Seat,
) -> impl FnOnce(std::thread::Result<()>) {
    move |result| {
        if let Err(panic) = result {
            report_panic(&listener, peer, &*panic);
        }
        drop((permit, seat));
    }
}

/// Logs and counts a panic caught in a connection task.
fn report_panic(listener: &str, peer: SocketAddr, panic: &(dyn std::any::Any + Send)) {
    crate::stats::CONNECTION_PANICS.fetch_add(1, Ordering::Relaxed);
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    error!(listener, client = %peer, panic = %what, "connection task panicked (a bug); connection closed");
}

/// Starts the task of a connection this worker accepted: here, or on the
/// worker it is handed to.
fn spawn_connection(
    ctx: &AcceptContext,
    svc: &Arc<Service>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let seat = ctx.workers.place(ctx.worker);
    if seat.worker() != ctx.worker {
        return hand_off(&ctx.tracker, svc, stream, peer, permit, seat);
    }
    let Some(stream) = register(svc, stream, peer) else { return };
    let kill = seat.slot().kill().clone();
    // Boxed: the connection's future is about 2 KiB, and each wrapper
    // below, the task tracker and the task cell would otherwise copy all of
    // it (docs/benchmarks.md, sixteenth session). No async block around
    // it: that would be one more copy.
    let name = Arc::clone(&svc.name);
    let task = AssertUnwindSafe(Box::pin(proxy::serve(Arc::clone(svc), stream, peer, kill)))
        .catch_unwind()
        .map(release(name, peer, permit, seat));
    ctx.tracker.spawn(task);
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
    /// Every worker: where a connection is served, and the token that
    /// closes it at the drain deadline.
    pub workers: Arc<WorkerSet>,
    /// The worker this loop runs on.
    pub worker: usize,
}

/// Accepts until `ctx.stop` is cancelled, then drops (closes) the listener.
/// The socket is registered with the runtime this runs on; each connection
/// it accepts is registered with the worker that serves it, once (tokio's
/// own accept would register it here first, which a connection handed to
/// another worker would then have to undo).
pub async fn accept_loop(listener: std::net::TcpListener, svc: Arc<Service>, ctx: AcceptContext) {
    let listener = match crate::sys::readiness(listener) {
        Ok(l) => l,
        Err(e) => {
            error!(listener = %svc.name, error = %e, "cannot register a listen socket");
            return;
        }
    };
    let local = listener.get_ref().local_addr().ok();
    // Exhaustion errors in the current burst; a burst ends once accepts have
    // succeeded for BURST_GAP after the last error.
    let mut failures: u64 = 0;
    let mut last_failure = tokio::time::Instant::now();
    // One waiter on the token for the loop's life: one made for each accept
    // would join and leave the token's list (two locks) every time.
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            r = listener.async_io(tokio::io::Interest::READABLE, accept_raw) => r,
            () = &mut stopped => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                // At the limit, wait here holding this one connection: the
                // loop accepts nothing more, so further clients stay in the
                // kernel backlog. (Taking the slot before accepting would let
                // a worker whose socket has no client sit on a free slot while
                // another worker's client waits.)
                let permit = match Arc::clone(&ctx.limit).try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        crate::stats::CONNECTIONS_LIMITED.fetch_add(1, Ordering::Relaxed);
                        tokio::select! {
                            p = Arc::clone(&ctx.limit).acquire_owned() => match p {
                                Ok(p) => p,
                                Err(_) => return,
                            },
                            () = &mut stopped => return,
                        }
                    }
                };
                if failures > 0 && last_failure.elapsed() >= BURST_GAP {
                    info!(listener = %svc.name, failed = failures, "accepting again");
                    failures = 0;
                }
                debug!(listener = %svc.name, client = %peer, "accepted");
                spawn_connection(&ctx, &svc, stream, peer, permit);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                crate::stats::ACCEPT_ERRORS.fetch_add(1, Ordering::Relaxed);
                if failures == 0 {
                    warn!(listener = %svc.name, addr = ?local, error = %e, "accept failed: out of resources, backing off");
                }
                failures += 1;
                last_failure = tokio::time::Instant::now();
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = &mut stopped => return,
                }
            }
            Err(e) => {
                crate::stats::ACCEPT_ERRORS.fetch_add(1, Ordering::Relaxed);
                // Per-connection failures (e.g. ECONNABORTED) never stop the listener.
                debug!(listener = %svc.name, error = %e, "accept failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    /// Runs `task` as the accept loop runs a connection's task: panics are
    /// caught, reported by [`release`], and its slot and seat given back.
    async fn contain(task: impl std::future::Future<Output = ()>) -> bool {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let limit = Arc::new(Semaphore::new(1));
        let permit = Arc::clone(&limit).try_acquire_owned().unwrap();
        let kill = CancellationToken::new();
        let workers =
            crate::conn::workers::Workers::start(1, crate::config::WorkerBalance::Hash, &kill)
                .unwrap();
        let seat = workers.set.place(0);
        let result = AssertUnwindSafe(task).catch_unwind().await;
        let panicked = result.is_err();
        release("t".into(), peer, permit, seat)(result);
        assert_eq!(limit.available_permits(), 1, "the connection slot is given back");
        assert_eq!(workers.set.active(), vec![0], "the worker seat is given back");
        panicked
    }

    #[tokio::test]
    async fn a_panicking_connection_task_is_contained_and_counted() {
        let before = crate::stats::CONNECTION_PANICS.load(Ordering::Relaxed);
        let panicked = contain(async { panic!("bug in a connection") }).await;
        assert!(panicked);
        assert!(!contain(async {}).await);
        assert_eq!(crate::stats::CONNECTION_PANICS.load(Ordering::Relaxed), before + 1);
    }

    #[test]
    fn raw_accepts_are_non_blocking_and_name_the_client() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let listener = bind_std(addr.parse().unwrap(), 16, false).unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let accepted = (0..200).find_map(|_| match accept_raw(&listener) {
                Ok(got) => Some(got),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    None
                }
                Err(e) => panic!("{addr}: accept failed: {e}"),
            });
            let (stream, peer) = accepted.expect("the client was never accepted");
            assert_eq!(peer, client.local_addr().unwrap(), "{addr}: wrong client address");
            // A blocking socket would stall the whole worker on its first read.
            let s = SockRef::from(&stream);
            assert!(s.nonblocking().unwrap(), "{addr}: accepted socket is blocking");
            assert!(s.nodelay().unwrap(), "{addr}: TCP_NODELAY not inherited");
        }
    }

    #[test]
    fn accepted_clients_inherit_nodelay_and_keepalive_from_the_listener() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let group = bind_group(addr.parse().unwrap(), 16, 2).unwrap();
            let addr = group[0].local_addr().unwrap();
            let _client = std::net::TcpStream::connect(addr).unwrap();
            // SO_REUSEPORT spreads clients over the group: poll every socket.
            let accepted = (0..200)
                .find_map(|_| {
                    let got = group.iter().find_map(|l| l.accept().ok());
                    if got.is_none() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    got
                })
                .expect("the client was never accepted")
                .0;
            let s = SockRef::from(&accepted);
            assert!(s.nodelay().unwrap(), "{addr}: TCP_NODELAY not inherited");
            assert!(s.keepalive().unwrap(), "{addr}: SO_KEEPALIVE not inherited");
        }
    }
}
