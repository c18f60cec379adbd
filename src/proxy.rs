//! The per-connection task: read a PROXY header when the listener expects
//! one, pick candidates, connect with retry across distinct backends (sending
//! a PROXY header when the backend wants one), watch the first exchange for
//! an early close, then splice; on total failure, answer HTTP clients.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backend::{ActiveGuard, Backend, Candidates};
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
    /// No answer within the connect timeout.
    Timeout,
    /// The socket call failed (refused, unreachable, reset).
    Io(io::Error),
}

impl ConnectError {
    fn describe(&self, timeout: Duration) -> String {
        match self {
            ConnectError::Timeout => {
                format!("timeout after {}", humantime::format_duration(timeout))
            }
            ConnectError::Io(e) => describe_io(e),
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

/// Serves one client connection to its end.
pub async fn serve(
    svc: Arc<Service>,
    client: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let snap = svc.snapshot();
    let cfg = &snap.config;
    let local = client.local_addr().unwrap_or(peer);
    let mut ends = Endpoints { client: peer, destination: local };
    if cfg.accept_proxy {
        let header = tokio::select! {
            h = proxy_protocol::read_header(&client, Instant::now() + PROXY_HEADER_TIMEOUT) => h,
            _ = cancel.cancelled() => return,
        };
        match header {
            Ok(h) => {
                ends.client = h.source.unwrap_or(peer);
                ends.destination = h.destination.unwrap_or(local);
            }
            Err(e) => {
                warn!(listener = %svc.name, client = %peer, error = %e, "closing connection: bad PROXY header");
                return;
            }
        }
    }

    let mut candidates = snap.pool.candidates(ends.client, cfg.connect_attempts);
    svc.note_panic(candidates.is_panic());
    let connected = tokio::select! {
        r = connect(&svc, &snap, &mut candidates, ends) => r,
        _ = cancel.cancelled() => return,
    };
    let mut up = match connected {
        Ok(up) => up,
        Err(status) => return fail(&svc, &snap, &client, ends.client, status, &cancel).await,
    };
    let (mut sent, mut received) = (0, 0);

    let timeouts = Timeouts { idle: cfg.idle_timeout, half_close: cfg.half_close_timeout };
    if cfg.protocol != Protocol::Tcp {
        let mut held = Held::new();
        loop {
            let fx =
                replay::first_exchange(&client, &up.stream, &mut held, timeouts, &cancel).await;
            sent += fx.sent;
            received += fx.received;
            match fx.result {
                First::Answered => break,
                First::ClosedEarly(error) => {
                    let reason = error
                        .as_ref()
                        .map_or_else(|| "closed before answering".into(), describe_io);
                    debug!(listener = %svc.name, client = %ends.client, backend = %up.backend.addr, %reason, "backend closed early");
                    if let Some(t) = up.backend.health.observe(false) {
                        log_transition(&svc.name, &up.backend, t, &reason);
                    }
                    // The backend may have closed before the client said anything:
                    // read enough of the request to judge it.
                    let extra =
                        held.complete_from(&client, Instant::now() + cfg.peek_timeout).await;
                    if !held.is_http() {
                        // Not ours to judge: forward what was read, splice on, and
                        // the end of stream propagates.
                        let _ = duplex::write_all(&up.stream, &extra).await;
                        break;
                    }
                    if !held.replayable() {
                        let _ = http::respond(&client, Status::BadGateway, false).await;
                        return;
                    }
                    let next = tokio::select! {
                        r = connect(&svc, &snap, &mut candidates, ends) => r,
                        _ = cancel.cancelled() => return,
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
                            let _ = http::respond(&client, status, false).await;
                            return;
                        }
                    }
                }
                First::BackendError(_) => {
                    duplex::reset_on_close(&client);
                    return;
                }
                First::ClientError(_) => {
                    duplex::reset_on_close(&up.stream);
                    return;
                }
                First::IdleTimeout | First::Shutdown => return,
            }
        }
    }

    let outcome = duplex::splice(&client, &up.stream, timeouts, &cancel).await;
    debug!(
        listener = %svc.name,
        client = %ends.client,
        backend = %up.backend.addr,
        sent = sent + outcome.sent,
        received = received + outcome.received,
        duration_ms = started.elapsed().as_millis() as u64,
        end = outcome.end.as_str(),
        error = outcome.error.as_ref().map(tracing::field::display),
        "connection closed"
    );
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
                let passive_rise = snap.config.health.check == HealthCheck::None;
                if let Some(t) = backend.health.observe(true).filter(|_| passive_rise) {
                    log_transition(&svc.name, backend, t, "connect succeeded");
                }
                return Ok(Upstream { backend: Arc::clone(backend), stream, _slot: slot });
            }
            Err(e) => {
                let reason = e.describe(timeout);
                warn!(listener = %svc.name, client = %ends.client, backend = %backend.addr, %reason, "backend connect failed");
                backend.record_connect_failure();
                if let Some(t) = backend.health.observe(false) {
                    log_transition(&svc.name, backend, t, &reason);
                }
                status = match e {
                    ConnectError::Timeout => Status::GatewayTimeout,
                    ConnectError::Io(_) => Status::BadGateway,
                };
            }
        }
    }
    Err(status)
}

async fn connect_one(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(ConnectError::Io)?;
    socket.set_nodelay(true).map_err(ConnectError::Io)?;
    socket.set_keepalive(true).map_err(ConnectError::Io)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// No backend could be reached: answer an HTTP client, close anything else.
async fn fail(
    svc: &Service,
    snap: &Snapshot,
    client: &TcpStream,
    peer: SocketAddr,
    status: Status,
    cancel: &CancellationToken,
) {
    debug!(listener = %svc.name, client = %peer, status = status.code(), "no backend reachable");
    let protocol = snap.config.protocol;
    if protocol == Protocol::Tcp {
        return;
    }
    let deadline = Instant::now() + snap.config.peek_timeout;
    let answer = async {
        // In http mode the service is known to speak HTTP: only bytes that
        // are certainly something else get a plain close.
        let head = match http::sniff_client(client, &[], deadline).await {
            Sniff::Http { head } => head,
            Sniff::NeedMore if protocol == Protocol::Http => false,
            _ => return,
        };
        if let Err(e) = http::respond(client, status, head).await {
            debug!(listener = %svc.name, client = %peer, error = %e, "could not send HTTP error");
        }
    };
    tokio::select! {
        _ = answer => {}
        _ = cancel.cancelled() => {}
    }
}
