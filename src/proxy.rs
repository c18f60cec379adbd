//! The per-connection task: pick candidates, connect with retry across
//! distinct backends, then splice; on total failure, answer HTTP clients.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{Backend, Candidates, Pool};
use crate::config::{HealthCheck, ListenerConfig, Protocol};
use crate::duplex::{self, Timeouts};
use crate::health::{describe_io, log_transition};
use crate::http::{self, Sniff, Status};
use crate::replay::{self, First, Held};

/// One listener's shared state, read by every connection it accepts.
#[derive(Debug)]
pub struct Service {
    /// Listener name for logs.
    pub name: Arc<str>,
    /// Its settings.
    pub config: ListenerConfig,
    /// Its backends and strategy.
    pub pool: Pool,
    /// Whether the last selection found no backend up (panic mode), so that
    /// entering and leaving it is logged once, not per connection.
    panic: AtomicBool,
}

impl Service {
    /// A service over `pool` with `config`.
    pub fn new(config: ListenerConfig, pool: Pool) -> Self {
        Service { name: config.name.as_str().into(), config, pool, panic: AtomicBool::new(false) }
    }

    fn note_panic(&self, panic: bool) {
        if self.panic.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                warn!(listener = %self.name, "no backend is up: panic mode, trying all backends");
            } else {
                info!(listener = %self.name, "a backend is up again: leaving panic mode");
            }
        }
    }
}

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

/// Serves one client connection to its end.
pub async fn serve(
    svc: Arc<Service>,
    client: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let mut candidates = svc.pool.candidates(peer, svc.config.connect_attempts);
    svc.note_panic(candidates.is_panic());
    let connected = tokio::select! {
        r = connect(&svc, &mut candidates, peer) => r,
        _ = cancel.cancelled() => return,
    };
    let (mut backend, mut upstream) = match connected {
        Ok(pair) => pair,
        Err(status) => return fail(&svc, &client, peer, status, &cancel).await,
    };
    let mut active = backend.track();
    let (mut sent, mut received) = (0, 0);

    let timeouts =
        Timeouts { idle: svc.config.idle_timeout, half_close: svc.config.half_close_timeout };
    if svc.config.protocol != Protocol::Tcp {
        let mut held = Held::new();
        loop {
            let fx = replay::first_exchange(&client, &upstream, &mut held, timeouts, &cancel).await;
            sent += fx.sent;
            received += fx.received;
            match fx.result {
                First::Answered => break,
                First::ClosedEarly(error) => {
                    let reason = error
                        .as_ref()
                        .map_or_else(|| "closed before answering".into(), describe_io);
                    debug!(listener = %svc.name, client = %peer, backend = %backend.addr, %reason, "backend closed early");
                    if let Some(t) = backend.health.observe(false) {
                        log_transition(&svc.name, &backend, t, &reason);
                    }
                    // The backend may have closed before the client said anything:
                    // read enough of the request to judge it.
                    let extra =
                        held.complete_from(&client, Instant::now() + svc.config.peek_timeout).await;
                    if !held.is_http() {
                        // Not ours to judge: forward what was read, splice on, and
                        // the end of stream propagates.
                        let _ = duplex::write_all(&upstream, &extra).await;
                        break;
                    }
                    if !held.replayable() {
                        let _ = http::respond(&client, Status::BadGateway, false).await;
                        return;
                    }
                    let next = tokio::select! {
                        r = connect(&svc, &mut candidates, peer) => r,
                        _ = cancel.cancelled() => return,
                    };
                    match next {
                        Ok((b, s)) => {
                            debug!(listener = %svc.name, client = %peer, backend = %b.addr, bytes = held.bytes().len(), "replaying request");
                            if duplex::write_all(&s, held.bytes()).await.is_err() {
                                continue;
                            }
                            if held.client_done {
                                let _ =
                                    socket2::SockRef::from(&s).shutdown(std::net::Shutdown::Write);
                            }
                            (backend, upstream) = (b, s);
                            active = backend.track();
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
                    duplex::reset_on_close(&upstream);
                    return;
                }
                First::IdleTimeout | First::Shutdown => return,
            }
        }
    }

    let outcome = duplex::splice(&client, &upstream, timeouts, &cancel).await;
    drop(active);
    debug!(
        listener = %svc.name,
        client = %peer,
        backend = %backend.addr,
        sent = sent + outcome.sent,
        received = received + outcome.received,
        duration_ms = started.elapsed().as_millis() as u64,
        end = outcome.end.as_str(),
        error = outcome.error.as_ref().map(tracing::field::display),
        "connection closed"
    );
}

/// Tries the next candidates until one accepts; on failure returns the
/// status an HTTP client should see.
async fn connect(
    svc: &Service,
    candidates: &mut Candidates<'_>,
    peer: SocketAddr,
) -> Result<(Arc<Backend>, TcpStream), Status> {
    let mut status = Status::ServiceUnavailable;
    let timeout = svc.config.connect_timeout;
    for backend in candidates {
        match connect_one(backend.addr, timeout).await {
            Ok(stream) => {
                if let Some(t) = backend.health.observe(true).filter(|_| passive_rise(svc)) {
                    log_transition(&svc.name, backend, t, "connect succeeded");
                }
                return Ok((Arc::clone(backend), stream));
            }
            Err(e) => {
                let reason = e.describe(timeout);
                warn!(listener = %svc.name, client = %peer, backend = %backend.addr, %reason, "backend connect failed");
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

/// Real successes bring a backend up only when no active probe will.
fn passive_rise(svc: &Service) -> bool {
    svc.config.health.check == HealthCheck::None
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
    client: &TcpStream,
    peer: SocketAddr,
    status: Status,
    cancel: &CancellationToken,
) {
    debug!(listener = %svc.name, client = %peer, status = status.code(), "no backend reachable");
    if svc.config.protocol == Protocol::Tcp {
        return;
    }
    let deadline = Instant::now() + svc.config.peek_timeout;
    let answer = async {
        // In http mode the service is known to speak HTTP: only bytes that
        // are certainly something else get a plain close.
        let head = match http::sniff_client(client, &[], deadline).await {
            Sniff::Http { head } => head,
            Sniff::NeedMore if svc.config.protocol == Protocol::Http => false,
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
