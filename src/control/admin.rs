//! The admin HTTP endpoint (hyper): metrics, liveness and readiness, status,
//! and draining backends for rolling deploys.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the status page (HTML, self-contained) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when every listener has a backend up; 503 while draining |
//! | `GET /status` | JSON: listeners and backends |
//! | `POST /backends/drain?listener=L&backend=ADDR` | take a backend out of rotation |
//! | `POST /backends/enable?listener=L&backend=ADDR` | put it back |
//!
//! POSTs need `Authorization: Bearer TOKEN` whenever a token file is
//! configured (on loopback too), and are refused outright when the endpoint
//! is bound off loopback without one. GET routes answer HEAD as well.
//!
//! The endpoint cannot be used to starve the process: each connection serves
//! one request (`Connection: close`), must send its request head within
//! [`HEADER_TIMEOUT`] and is closed after [`CONNECTION_TIMEOUT`] whatever it
//! does; at most [`MAX_CONNECTIONS`] are open at once, and one more is closed
//! as soon as it is accepted; accept errors back off like the data plane's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::HealthCheck;
use crate::control::handle::Handle;
use crate::control::metrics;
use crate::io::is_resource_exhaustion;
use crate::upstream::Backend;

/// Most admin connections open at once; a scraper, a probe and an operator
/// need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open at all, its response included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error caused by resource exhaustion.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the admin endpoint serves from.
pub struct Admin {
    /// The running server.
    handle: Handle,
    /// Metrics registry (tcplb's collector).
    registry: Registry,
    /// Bearer token for POSTs, if configured.
    token: Option<String>,
    /// Bound off loopback: POSTs need the token.
    exposed: bool,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("exposed", &self.exposed).finish_non_exhaustive()
    }
}

impl Admin {
    /// An admin endpoint for `handle`, bound at `addr`.
    pub fn new(
        handle: Handle,
        registry: Registry,
        token: Option<String>,
        addr: SocketAddr,
    ) -> Self {
        let exposed = !addr.ip().is_loopback();
        if exposed {
            warn!(%addr, "admin endpoint is bound off loopback: keep it off untrusted networks");
            if token.is_none() {
                warn!("no admin token file: mutating admin endpoints are disabled");
            }
        }
        Admin { handle, registry, token, exposed }
    }

    /// Answers one request (pure routing, no I/O): status, content type,
    /// body. `accept` is the request's Accept header: `/metrics` answers in
    /// OpenMetrics when it asks for that, else in Prometheus's classic text
    /// format (0.0.4), as exporters negotiate.
    pub fn route(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        authorization: Option<&str>,
        accept: Option<&str>,
    ) -> (StatusCode, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        const JSON: &str = "application/json";
        const HTML: &str = "text/html; charset=utf-8";
        // HEAD is GET without the body (hyper leaves the body out).
        let method = if *method == Method::HEAD { &Method::GET } else { method };
        match (method, path) {
            (&Method::GET, "/metrics") => {
                let text = metrics::encode(&self.registry);
                if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
                    (StatusCode::OK, metrics::OPENMETRICS, text)
                } else {
                    (StatusCode::OK, metrics::CLASSIC, metrics::to_classic(&text))
                }
            }
            (&Method::GET, "/") => (StatusCode::OK, HTML, STATUS_PAGE.into()),
            (&Method::GET, "/healthz") => (StatusCode::OK, TEXT, "ok\n".into()),
            (&Method::GET, "/readyz") => {
                let (ready, why) = self.readiness();
                let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (code, TEXT, format!("{why}\n"))
            }
            (&Method::GET, "/status") => (StatusCode::OK, JSON, self.status().to_string()),
            (&Method::POST, "/backends/drain") | (&Method::POST, "/backends/enable") => {
                if let Err((code, why)) = self.authorize(authorization) {
                    return (code, TEXT, format!("{why}\n"));
                }
                let drain = path.ends_with("drain");
                match self.set_draining(query, drain) {
                    Ok(body) => (StatusCode::OK, JSON, body.to_string()),
                    Err((code, why)) => (code, TEXT, format!("{why}\n")),
                }
            }
            (
                _,
                "/" | "/metrics" | "/healthz" | "/readyz" | "/status" | "/backends/drain"
                | "/backends/enable",
            ) => (StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n".into()),
            _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }

    fn readiness(&self) -> (bool, String) {
        if self.handle.is_draining() {
            return (false, "draining".into());
        }
        for s in self.handle.services().iter() {
            // With active checks, a backend counts once a probe has passed:
            // backends start up (so traffic flows at once), and before the
            // first round of checks that says nothing about them.
            let checked = s.snapshot().config.health.check != HealthCheck::None;
            let backends = s.backends();
            let serving = |b: &&Arc<Backend>| b.health.is_up() && !b.is_draining();
            let proven = |b: &&Arc<Backend>| !checked || b.last_probe().is_some_and(|p| p.ok);
            if backends.iter().filter(serving).any(|b| proven(&b)) {
                continue;
            }
            if checked && backends.iter().all(|b| b.last_probe().is_none()) {
                return (
                    false,
                    format!("listener '{}': waiting for the first health checks", s.name),
                );
            }
            return (false, format!("listener '{}' has no backend up", s.name));
        }
        (true, "ready".into())
    }

    fn authorize(&self, authorization: Option<&str>) -> Result<(), (StatusCode, String)> {
        match &self.token {
            Some(token) => {
                // The scheme is case-insensitive (RFC 7235).
                let given = authorization
                    .and_then(|h| h.trim_start().split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map_or("", |(_, token)| token);
                if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
                    Ok(())
                } else {
                    Err((
                        StatusCode::UNAUTHORIZED,
                        "a valid 'Authorization: Bearer TOKEN' is required".into(),
                    ))
                }
            }
            None if self.exposed => Err((
                StatusCode::FORBIDDEN,
                "mutating endpoints are disabled off loopback without --admin-token-file".into(),
            )),
            None => Ok(()),
        }
    }

    fn set_draining(
        &self,
        query: Option<&str>,
        drain: bool,
    ) -> Result<serde_json::Value, (StatusCode, String)> {
        let params: Vec<(String, String)> =
            form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned().collect();
        let get = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let (Some(listener), Some(backend)) = (get("listener"), get("backend")) else {
            return Err((StatusCode::BAD_REQUEST, "need ?listener=NAME&backend=ADDR".into()));
        };
        let addr: SocketAddr = backend.parse().map_err(|_| {
            (StatusCode::BAD_REQUEST, format!("backend '{backend}' is not an IP:PORT address"))
        })?;
        let svc = self
            .handle
            .service(listener)
            .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no listener '{listener}'")))?;
        let b = svc.backend(addr).ok_or_else(|| {
            (StatusCode::NOT_FOUND, format!("no backend {addr} in listener '{listener}'"))
        })?;
        b.set_draining(drain);
        info!(listener, backend = %addr, draining = drain, "admin: backend {}", if drain { "drained" } else { "enabled" });
        Ok(
            json!({ "listener": listener, "backend": addr.to_string(), "state": state(&b), "active": b.active() }),
        )
    }

    fn status(&self) -> serde_json::Value {
        let listeners: Vec<_> = self
            .handle
            .services()
            .iter()
            .map(|s| {
                let snap = s.snapshot();
                json!({
                    "name": &*s.name,
                    "listen": s.bound().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "strategy": snap.config.strategy.as_str(),
                    "protocol": format!("{:?}", snap.config.protocol).to_lowercase(),
                    "backends": snap.pool.backends().iter().chain(&s.removed()).map(|b| backend_json(b)).collect::<Vec<_>>(),
                })
            })
            .collect();
        // What the status page may offer: drain and enable buttons, and
        // whether they need the token.
        let posts = match (&self.token, self.exposed) {
            (Some(_), _) => "token",
            (None, true) => "disabled",
            (None, false) => "open",
        };
        json!({
            "draining": self.handle.is_draining(),
            "admin": { "posts": posts },
            "listeners": listeners,
        })
    }
}

fn state(b: &Backend) -> &'static str {
    if b.is_removed() {
        "removed"
    } else if b.is_draining() {
        "draining"
    } else if b.health.is_up() {
        "up"
    } else {
        "down"
    }
}

fn backend_json(b: &Backend) -> serde_json::Value {
    let (sent, received) = b.bytes();
    let s = b.settings();
    let last_check = b.last_probe().map(|p| {
        json!({
            "ok": p.ok,
            "detail": p.detail,
            "at_unix_ms": unix_ms(p.at),
        })
    });
    json!({
        "address": b.addr.to_string(),
        "upstream": &*b.upstream,
        "state": state(b),
        "weight": s.weight,
        "backup": s.backup,
        "max_connections": (s.max_connections > 0).then_some(s.max_connections),
        "active": b.active(),
        "total": b.total(),
        "connect_failures": b.connect_failures(),
        "bytes_sent": sent,
        "bytes_received": received,
        "last_check": last_check,
        "transitions": b.transitions().iter().map(|t| json!({
            "state": if t.up { "up" } else { "down" },
            "reason": t.reason,
            "at_unix_ms": unix_ms(t.at),
        })).collect::<Vec<_>>(),
    })
}

fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The status page: one self-contained HTML page (inline style and script,
/// nothing fetched but /status), so it works offline.
const STATUS_PAGE: &str = include_str!("status.html");

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the admin endpoint on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    if is_resource_exhaustion(&e) {
                        warn!(error = %e, "admin accept failed: out of resources, backing off");
                    } else {
                        debug!(error = %e, "admin accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        // Full: closed at once, so a flood holds no descriptor for long.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "admin connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let admin = Arc::clone(&admin);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(answer(&admin, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => match r {
                    Ok(Err(e)) => debug!(%peer, error = %e, "admin connection failed"),
                    Err(_) => debug!(%peer, "admin connection closed: too slow"),
                    Ok(Ok(())) => {}
                },
                _ = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

fn answer(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let (auth, accept) = (header(hyper::header::AUTHORIZATION), header(hyper::header::ACCEPT));
    let (code, content_type, body) =
        admin.route(req.method(), req.uri().path(), req.uri().query(), auth, accept);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    resp
}
