//! The per-connection task: read a PROXY header when the listener expects
//! one, pick candidates, connect with retry across distinct backends (sending
//! a PROXY header when the backend wants one), watch the first exchange for
//! an early close, then splice; on total failure, answer HTTP clients.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{ActiveGuard, Backend, Candidates, ConnectFailure};
use crate::config::{HealthCheck, Protocol, PROXY_HEADER_TIMEOUT};
use crate::duplex::{self, Timeouts};
use crate::health::{describe_io, log_transition};
use crate::http::{self, Sniff, Status};
use crate::proxy_protocol;
use crate::replay::{self, First, Held};
use crate::service::{Service, Snapshot};

/// Why a connect attempt failed.
#[derive(Debug)]
enum ConnectError {
    /// This process is out of descriptors or buffers: not the backend's fault.
    Local(io::Error),
    /// No answer within the connect timeout.
    Timeout,
    /// The socket call failed (refused, unreachable, reset).
    Io(io::Error),
}

impl ConnectError {
    fn reason(&self) -> ConnectFailure {
        match self {
            ConnectError::Timeout => ConnectFailure::Timeout,
            ConnectError::Local(_) => ConnectFailure::Other,
            ConnectError::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ConnectFailure::Reset,
                _ => ConnectFailure::Other,
            },
        }
    }

    fn describe(&self, timeout: Duration) -> String {
        match self {
            ConnectError::Timeout => {
                format!("timeout after {}", humantime::format_duration(timeout))
            }
            ConnectError::Io(e) => describe_io(e),
            ConnectError::Local(e) => format!("local resources exhausted: {e}"),
        }
    }
}

/// Who the connection is from and to, as far as backends should know.
#[derive(Debug, Clone, Copy)]
struct Endpoints {
    /// The client: the peer address, or the source of its PROXY header.
    client: SocketAddr,
    /// What the client connected to.
    destination: SocketAddr,
}

/// A backend connection in use.
struct Upstream {
    /// The backend.
    backend: Arc<Backend>,
    /// The socket.
    stream: TcpStream,
    /// Holds the backend's connection slot.
    _slot: ActiveGuard,
}

/// An address, or `-` when there is none (formatted only if logged).
struct OrDash(Option<SocketAddr>);

impl std::fmt::Display for OrDash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// How a connection ended, for the access log.
struct Finish {
    /// The backend it ended on, if any.
    backend: Option<SocketAddr>,
    /// Client → backend bytes.
    sent: u64,
    /// Backend → client bytes.
    received: u64,
    /// Why it ended.
    end: &'static str,
    /// The socket error, if any.
    error: Option<io::Error>,
}

impl Finish {
    fn early(end: &'static str) -> Self {
        Finish { backend: None, sent: 0, received: 0, end, error: None }
    }
}

/// Serves one client connection to its end, then writes its access-log event.
pub async fn serve(
    svc: Arc<Service>,
    mut client: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let snap = svc.snapshot();
    let destination =
        if snap.needs_destination { client.local_addr().unwrap_or(peer) } else { peer };
    let mut ends = Endpoints { client: peer, destination };
    let finish = run(&svc, &snap, &mut client, &mut ends, started, &cancel).await;
    // Close before logging: the last direction to end leaves its FIN to close().
    drop(client);
    let duration = started.elapsed();
    svc.stats.connection_duration.observe(duration);
    let backend = OrDash(finish.backend);
    let error = finish.error.as_ref().map(tracing::field::display);
    // One event, at info on the access-log target, or at debug when it is off.
    macro_rules! connection_event {
        ($level:ident, $($target:tt)*) => {
            $level!(
                $($target)*
                listener = %svc.name,
                client = %ends.client,
                %backend,
                sent = finish.sent,
                received = finish.received,
                duration_ms = duration.as_millis() as u64,
                end = finish.end,
                error,
                "connection"
            )
        };
    }
    if snap.config.access_log {
        connection_event!(info, target: "tcplb::access",);
    } else {
        connection_event!(debug,);
    }
}

async fn run(
    svc: &Arc<Service>,
    snap: &Snapshot,
    client: &mut TcpStream,
    ends: &mut Endpoints,
    started: Instant,
    cancel: &CancellationToken,
) -> Finish {
    let cfg = &snap.config;
    if cfg.accept_proxy {
        let header = tokio::select! {
            h = proxy_protocol::read_header(client, Instant::now() + PROXY_HEADER_TIMEOUT) => h,
            _ = cancel.cancelled() => return Finish::early("shutdown"),
        };
        match header {
            Ok(h) => {
                ends.client = h.source.unwrap_or(ends.client);
                ends.destination = h.destination.unwrap_or(ends.destination);
            }
            Err(e) => {
                warn!(listener = %svc.name, client = %ends.client, error = %e, "closing connection: bad PROXY header");
                return Finish { error: Some(e), ..Finish::early("bad PROXY header") };
            }
        }
    }
    let ends = *ends;
    if !cfg.admits(ends.client.ip()) {
        svc.stats.denied.fetch_add(1, Ordering::Relaxed);
        debug!(listener = %svc.name, client = %ends.client, "client denied by allow/deny rules");
        return Finish::early("denied");
    }

    let mut candidates = snap.pool.candidates(ends.client, cfg.connect_attempts);
    svc.note_panic(candidates.is_panic());
    let connected = tokio::select! {
        r = connect(svc, snap, &mut candidates, ends) => r,
        _ = cancel.cancelled() => return Finish::early("shutdown"),
    };
    let mut up = match connected {
        Ok(up) => up,
        Err(status) => {
            let answered = fail(svc, snap, client, ends.client, status, cancel).await;
            return Finish::early(if answered { status.end() } else { "no backend" });
        }
    };
    svc.stats.connect_duration.observe(started.elapsed());
    let (mut sent, mut received) = (0, 0);
    let mut client_done = false;

    let timeouts = Timeouts { idle: cfg.idle_timeout, half_close: cfg.half_close_timeout };
    if cfg.protocol != Protocol::Tcp {
        let mut held = Held::new();
        loop {
            let fx =
                replay::first_exchange(client, &mut up.stream, &mut held, timeouts, cancel).await;
            let (bs, br) = up.backend.byte_counters();
            bs.fetch_add(fx.sent, Ordering::Relaxed);
            br.fetch_add(fx.received, Ordering::Relaxed);
            sent += fx.sent;
            received += fx.received;
            let at = Some(up.backend.addr);
            client_done = held.client_done;
            match fx.result {
                First::Answered => {
                    if passive_checks(snap) {
                        up.backend.health.observe_success_streak_reset();
                    }
                    break;
                }
                First::AfterClientEnd(error) => {
                    return Finish { backend: at, sent, received, end: "client closed", error };
                }
                First::ClosedEarly(error) => {
                    let reason = error
                        .as_ref()
                        .map_or_else(|| "closed before answering".into(), describe_io);
                    debug!(listener = %svc.name, client = %ends.client, backend = %up.backend.addr, %reason, "backend closed early");
                    if passive_checks(snap) {
                        if let Some(t) = up.backend.health.observe(false) {
                            log_transition(&svc.name, &up.backend, t, &reason);
                        }
                    }
                    // The backend may have closed before the client said anything:
                    // read enough of the request to judge it.
                    let extra = held.complete_from(client, Instant::now() + cfg.peek_timeout).await;
                    client_done = held.client_done;
                    if !held.is_http() {
                        // Not ours to judge: forward what was read, splice on, and
                        // the end of stream propagates.
                        let _ = duplex::write_all(&up.stream, &extra).await;
                        if client_done {
                            let _ = socket2::SockRef::from(&up.stream)
                                .shutdown(std::net::Shutdown::Write);
                        }
                        break;
                    }
                    if !held.replayable() {
                        respond(svc, client, Status::BadGateway).await;
                        return Finish {
                            backend: at,
                            sent,
                            received,
                            end: "502 after early close",
                            error,
                        };
                    }
                    let next = tokio::select! {
                        r = connect(svc, snap, &mut candidates, ends) => r,
                        _ = cancel.cancelled() => return Finish { backend: at, sent, received, ..Finish::early("shutdown") },
                    };
                    match next {
                        Ok(next) => {
                            debug!(listener = %svc.name, client = %ends.client, backend = %next.backend.addr, bytes = held.bytes().len(), "replaying request");
                            if duplex::write_all(&next.stream, held.bytes()).await.is_err() {
                                continue;
                            }
                            if held.client_done {
                                let _ = socket2::SockRef::from(&next.stream)
                                    .shutdown(std::net::Shutdown::Write);
                            }
                            up = next;
                        }
                        Err(status) => {
                            respond(svc, client, status).await;
                            return Finish {
                                backend: at,
                                sent,
                                received,
                                ..Finish::early(status.end())
                            };
                        }
                    }
                }
                First::BackendError(e) => {
                    duplex::reset_on_close(client);
                    return Finish {
                        backend: at,
                        sent,
                        received,
                        end: "backend error",
                        error: Some(e),
                    };
                }
                First::ClientError(e) => {
                    duplex::reset_on_close(&up.stream);
                    return Finish {
                        backend: at,
                        sent,
                        received,
                        end: "client error",
                        error: Some(e),
                    };
                }
                First::IdleTimeout => {
                    return Finish { backend: at, sent, received, ..Finish::early("idle timeout") }
                }
                First::Shutdown => {
                    return Finish { backend: at, sent, received, ..Finish::early("shutdown") }
                }
            }
        }
    }

    let outcome = duplex::splice(
        client,
        &mut up.stream,
        timeouts,
        cancel,
        up.backend.byte_counters(),
        client_done,
        cfg.splice,
    )
    .await;
    Finish {
        backend: Some(up.backend.addr),
        sent: sent + outcome.sent,
        received: received + outcome.received,
        end: outcome.end.as_str(),
        error: outcome.error,
    }
}

/// When the last local-exhaustion warning was logged (seconds since start).
static LOCAL_EXHAUSTION_WARNED: AtomicU64 = AtomicU64::new(0);

/// True at most once per second per `last`: for warnings a burst would repeat.
fn rate_limit(last: &AtomicU64) -> bool {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let now = EPOCH.get_or_init(std::time::Instant::now).elapsed().as_secs() + 1;
    let prev = last.load(Ordering::Relaxed);
    now > prev && last.compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
}

/// Real traffic feeds health only when active probes run: with `check =
/// none` nothing could ever bring a passively downed backend back up.
fn passive_checks(snap: &Snapshot) -> bool {
    snap.config.health.check != HealthCheck::None
}

/// Sends a synthesized response and counts it.
async fn respond(svc: &Service, client: &TcpStream, status: Status) {
    svc.stats.record_synthesized(status);
    let _ = http::respond(client, status, false).await;
}

/// Tries the next candidates until one accepts (and takes its PROXY header);
/// on failure returns the status an HTTP client should see.
async fn connect(
    svc: &Service,
    snap: &Snapshot,
    candidates: &mut Candidates<'_>,
    ends: Endpoints,
) -> Result<Upstream, Status> {
    let mut status = Status::ServiceUnavailable;
    let timeout = snap.config.connect_timeout;
    for backend in candidates {
        // A backend that filled up since it was picked is skipped like a down one.
        let Some(slot) = backend.try_claim() else { continue };
        let result = match connect_one(backend.addr, timeout).await {
            Ok(stream) => match backend.send_proxy() {
                Some(v) => {
                    let header = proxy_protocol::encode(v, ends.client, ends.destination);
                    match duplex::write_all(&stream, &header).await {
                        Ok(()) => Ok(stream),
                        Err(e) => Err(ConnectError::Io(e)),
                    }
                }
                None => Ok(stream),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(stream) => {
                backend.record_connected();
                // Resets a failure streak (only probes bring a down backend
                // up). Outside `tcp` mode the first answer does, not the
                // connect: a backend that accepts and hangs up is failing.
                if passive_checks(snap) && snap.config.protocol == Protocol::Tcp {
                    backend.health.observe_success_streak_reset();
                }
                return Ok(Upstream { backend: Arc::clone(backend), stream, _slot: slot });
            }
            Err(ConnectError::Local(e)) => {
                // Every other backend would fail the same way; the backend is not to blame.
                if rate_limit(&LOCAL_EXHAUSTION_WARNED) {
                    warn!(listener = %svc.name, client = %ends.client, error = %e, "cannot open a backend connection: out of local resources");
                }
                return Err(Status::ServiceUnavailable);
            }
            Err(e) => {
                let reason = e.describe(timeout);
                warn!(listener = %svc.name, client = %ends.client, backend = %backend.addr, %reason, "backend connect failed");
                backend.record_connect_failure(e.reason());
                if passive_checks(snap) {
                    if let Some(t) = backend.health.observe(false) {
                        log_transition(&svc.name, backend, t, &reason);
                    }
                }
                status = match e {
                    ConnectError::Timeout => Status::GatewayTimeout,
                    _ => Status::BadGateway,
                };
            }
        }
    }
    Err(status)
}

async fn connect_one(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| {
        if crate::listener::is_resource_exhaustion(&e) {
            ConnectError::Local(e)
        } else {
            ConnectError::Io(e)
        }
    })?;
    socket.set_nodelay(true).map_err(ConnectError::Io)?;
    socket.set_keepalive(true).map_err(ConnectError::Io)?;
    // A non-blocking connect returns EINPROGRESS while the handshake runs.
    match socket.connect(&addr.into()) {
        Err(e) if e.raw_os_error() != Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {
            return Err(ConnectError::Io(e))
        }
        _ => {}
    }
    let stream = TcpStream::from_std(socket.into()).map_err(ConnectError::Io)?;
    match tokio::time::timeout(timeout, established(&stream)).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// Waits until a non-blocking connect has finished. A handshake that failed
/// (refused, reset, unreachable) raises EPOLLERR or EPOLLHUP, and only then
/// is the socket's error read: writable without either means established,
/// so a connection costs no `getsockopt(SO_ERROR)`, which tokio's own
/// connect makes every time (HAProxy reads it only on an error event, too).
async fn established(stream: &TcpStream) -> io::Result<()> {
    let ready = stream.ready(Interest::WRITABLE).await?;
    if !ready.is_write_closed() {
        return Ok(());
    }
    Err(stream.take_error()?.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::ConnectionReset, "closed while connecting")
    }))
}

/// No backend could be reached: answer an HTTP client, close anything else.
async fn fail(
    svc: &Service,
    snap: &Snapshot,
    client: &TcpStream,
    peer: SocketAddr,
    status: Status,
    cancel: &CancellationToken,
) -> bool {
    debug!(listener = %svc.name, client = %peer, status = status.code(), "no backend reachable");
    let protocol = snap.config.protocol;
    if protocol == Protocol::Tcp {
        return false;
    }
    let deadline = Instant::now() + snap.config.peek_timeout;
    let answer = async {
        // In http mode the service is known to speak HTTP: only bytes that
        // are certainly something else get a plain close.
        let head = match http::sniff_client(client, &[], deadline).await {
            Sniff::Http { head } => head,
            Sniff::NeedMore if protocol == Protocol::Http => false,
            _ => return false,
        };
        svc.stats.record_synthesized(status);
        if let Err(e) = http::respond(client, status, head).await {
            debug!(listener = %svc.name, client = %peer, error = %e, "could not send HTTP error");
        }
        true
    };
    tokio::select! {
        answered = answer => answered,
        _ = cancel.cancelled() => false,
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;

    #[tokio::test]
    async fn a_connect_ends_established_or_with_the_kernels_reason() {
        for ip in ["127.0.0.1", "[::1]"] {
            let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await.unwrap();
            let open = listener.local_addr().unwrap();
            let mut stream = connect_one(open, Duration::from_secs(3)).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stream, b"ping").await.unwrap();
            let mut got = [0u8; 4];
            tokio::io::AsyncReadExt::read_exact(&mut server, &mut got).await.unwrap();
            assert_eq!(&got, b"ping", "{ip}: the established stream carries bytes");

            drop((listener, server));
            match connect_one(open, Duration::from_secs(3)).await {
                Err(ConnectError::Io(e)) => {
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{ip}: {e}")
                }
                Err(ConnectError::Timeout) => panic!("{ip}: a refused connect timed out"),
                Err(ConnectError::Local(e)) => panic!("{ip}: a refused connect blamed on us: {e}"),
                Ok(_) => panic!("{ip}: connected to a closed port"),
            }
        }
    }
}

#[cfg(test)]
mod size_tests {
    /// An idle connection costs its task's future plus two sockets: keep the
    /// future small (stack arrays or doubled futures here cost every connection).
    #[test]
    fn connection_future_stays_small() {
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let cfg = crate::config::ListenerConfig::new("t", vec![], vec![]);
            let pool = crate::backend::Pool::new(vec![], crate::config::StrategyKind::RoundRobin);
            let svc = std::sync::Arc::new(crate::service::Service::new(cfg, pool));
            let f = super::serve(svc, c, addr, tokio_util::sync::CancellationToken::new());
            let n = size(&f);
            eprintln!("serve future: {n} bytes");
            assert!(n <= 2 * 1024, "the per-connection future grew to {n} bytes");
        });
    }
}
