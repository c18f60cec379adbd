//! Helpers for integration tests: tcplb in-process on port 0, and small real
//! backends on loopback.
#![allow(dead_code)]

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

use tcplb::config::{AdminConfig, Config, HealthCheck, ListenerConfig, Upstream};
use tcplb::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running tcplb.
pub struct Lb {
    /// The first listen address.
    pub addr: SocketAddr,
    /// Every listen address.
    pub addrs: Vec<SocketAddr>,
    /// The backends, for inspecting health and counters.
    pub backends: Vec<std::sync::Arc<tcplb::Backend>>,
    /// To reload and inspect the running server.
    pub handle: tcplb::Handle,
    /// The admin endpoint, when configured.
    pub admin: Option<SocketAddr>,
    /// Send to start a graceful shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// Finishes when the server has drained.
    pub task: JoinHandle<()>,
}

impl Lb {
    /// Starts the drain; `task` finishes when it is done.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener on 127.0.0.1:0 to `upstreams`, with active probes off so
/// tests see only what they cause.
pub fn listener(upstreams: &[SocketAddr]) -> ListenerConfig {
    listener_on("127.0.0.1:0".parse().unwrap(), upstreams)
}

/// Like [`listener`] on a given address.
pub fn listener_on(addr: SocketAddr, upstreams: &[SocketAddr]) -> ListenerConfig {
    let ups = upstreams.iter().map(|a| Upstream::new(a.ip().to_string(), a.port())).collect();
    let mut l = ListenerConfig::new("test", vec![addr], ups);
    l.health.check = HealthCheck::None;
    l.connect_timeout = Duration::from_secs(2);
    l
}

/// Starts tcplb with `config`.
pub async fn start(config: Config) -> Lb {
    start_server(Server::bind(config).await.expect("bind tcplb"))
}

/// Starts tcplb with `config` and a given resolver.
pub async fn start_with(config: Config, resolver: std::sync::Arc<dyn tcplb::Resolve>) -> Lb {
    start_server(Server::bind_with(config, resolver).await.expect("bind tcplb"))
}

fn start_server(server: Server) -> Lb {
    let addrs = server.local_addrs();
    let backends = server.backends();
    let handle = server.handle();
    let admin = server.admin_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Lb { addr: addrs[0], addrs, backends, handle, admin, stop: Some(tx), task }
}

/// Starts tcplb with one listener and defaults.
pub async fn start_one(l: ListenerConfig) -> Lb {
    start(Config::single(l)).await
}

/// A backend that echoes every byte and half-closes when the client does.
pub async fn echo_backend() -> (SocketAddr, JoinHandle<()>) {
    serve(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A backend that writes `tag` and closes.
pub async fn tag_backend(tag: &'static str) -> (SocketAddr, JoinHandle<()>) {
    serve(move |mut s| async move {
        let _ = s.write_all(tag.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// Runs `handler` for every connection on a fresh 127.0.0.1 port.
pub async fn serve<F, Fut>(handler: F) -> (SocketAddr, JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    serve_on("127.0.0.1:0".parse().unwrap(), handler).await
}

/// Runs `handler` for every connection on `addr`.
pub async fn serve_on<F, Fut>(addr: SocketAddr, handler: F) -> (SocketAddr, JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind(addr).await.expect("bind backend");
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(handler(s));
        }
    });
    (addr, task)
}

/// An address on which nothing listens (connects are refused) for the rest
/// of the test process. Its port stays bound, without listening and without
/// SO_REUSEADDR, so that no server of a test running in parallel can be
/// given it; a port merely freed again could be, and the dead backend would
/// then answer.
pub async fn dead_addr() -> SocketAddr {
    static RESERVED: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    RESERVED.lock().unwrap().push(s);
    addr
}

/// Connects to `addr` and reads until EOF.
pub async fn read_all_from(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect to tcplb");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("read timed out")
        .expect("read failed");
    out
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A hash of `data`, to compare large buffers.
pub fn digest(data: &[u8]) -> (usize, u64) {
    let mut h = DefaultHasher::new();
    h.write(data);
    (data.len(), h.finish())
}

/// Sends `data` through `addr`, half-closes, and returns everything read back.
pub async fn echo_through(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    echo_over(TcpStream::connect(addr).await.expect("connect to tcplb"), data).await
}

/// Sends `data` on an open connection, half-closes, and returns everything
/// read back until EOF.
pub async fn echo_over(s: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.expect("read back");
    writer.await.unwrap();
    out
}

/// Waits until `cond` holds, polling every 10 ms, up to `limit`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect to admin");
    let req = format!("{method} {target} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{headers}Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("admin answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A child process that is killed and reaped when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with stderr piped; returns it with a channel of its stderr lines.
pub fn spawn_logged(cmd: &mut std::process::Command) -> (Proc, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Proc(cmd.stderr(std::process::Stdio::piped()).spawn().expect("spawn"));
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Reads an HTTP request head (up to the blank line, at most 8 KiB); None
/// when the peer closes or errs first.
pub async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => len += n,
        }
        if len == buf.len() {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// A plain-threads echo backend (for tests that drive the binary without a
/// runtime): echoes every byte and half-closes when the client does.
pub fn thread_echo_server() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = l.local_addr().expect("echo address");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Connects to `addr` and completes one echoed byte, so the connection is
/// known to be proxied end to end.
pub async fn established(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect to tcplb");
    s.write_all(b"a").await.expect("write");
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("echo timed out")
        .expect("echo");
    assert_eq!(&b, b"a");
    s
}

/// Scraped samples: (metric name, sorted labels) → value.
pub type Samples = HashMap<(String, Vec<(String, String)>), f64>;

/// `l` alone, with the admin endpoint on 127.0.0.1:0.
pub fn with_admin(l: ListenerConfig) -> Config {
    let mut c = Config::single(l);
    c.admin = Some(AdminConfig { listen: "127.0.0.1:0".parse().unwrap(), token_file: None });
    c
}

/// Scrapes /metrics: (name, sorted labels) → value.
pub async fn scrape(admin: SocketAddr) -> Samples {
    let (code, body) = http_request(admin, "GET", "/metrics", "").await;
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let mut out = HashMap::new();
    for s in scrape.samples {
        let mut labels: Vec<(String, String)> =
            s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.sort();
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert((s.metric, labels), v);
    }
    out
}

/// The sample with this name and these labels, if scraped.
pub fn sample(m: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut l: Vec<(String, String)> =
        labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    l.sort();
    m.get(&(name.to_string(), l)).copied()
}

/// The sample with this name and these labels; panics naming what was scraped.
pub fn get(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(m, name, labels).unwrap_or_else(|| {
        panic!("no {name} {labels:?} in {:?}", m.keys().filter(|k| k.0 == name).collect::<Vec<_>>())
    })
}

/// The tcplb binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_tcplb");

/// Waits up to 10 s for a line of `rx` that contains `needle`; returns it.
pub fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

/// Waits for a spawned tcplb's start line (text logs) and returns the
/// first address it listens on, as written there.
pub fn wait_listening(rx: &std::sync::mpsc::Receiver<String>) -> String {
    let line = wait_line(rx, "listen=[");
    let rest = line.split("listen=[").nth(1).unwrap_or_default();
    rest.split([']', ',']).next().unwrap_or_default().to_string()
}

/// An HTTP backend: answers every request head with the status in
/// `status` (read per request, so a test can change it) and `body`, and
/// records each head it saw in `seen`.
pub async fn http_backend(
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    body: &'static str,
) -> SocketAddr {
    let (addr, _) = serve(move |mut s| {
        let status = std::sync::Arc::clone(&status);
        let seen = std::sync::Arc::clone(&seen);
        async move {
            let Some(head) = read_head(&mut s).await else { return };
            seen.lock().unwrap().push(head);
            let code = status.load(std::sync::atomic::Ordering::Relaxed);
            let reason = if code == 200 { "OK" } else { "X" };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    })
    .await;
    addr
}

/// Writes `data` over `s` while reading as much back (an echo backend
/// behind it), and checks it came back whole and in order; 20 s at most.
pub async fn echo_on(s: &mut TcpStream, data: &[u8]) {
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; data.len()];
    let both = async { tokio::join!(w.write_all(data), r.read_exact(&mut back)) };
    let (wrote, read) =
        tokio::time::timeout(Duration::from_secs(20), both).await.expect("echo timed out");
    wrote.expect("write");
    read.expect("read back");
    assert_eq!(digest(&back), digest(data), "bytes lost or reordered");
}

/// Pipe descriptors this process holds.
pub fn pipe_fds() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
        })
        .count()
}

/// One blocking exchange: connects to `addr`, sends `bytes`, half-closes and
/// reads to the end (10 s at most): what an echo behind tcplb sends back.
pub fn exchange_std(addr: impl std::net::ToSocketAddrs, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(bytes)?;
    c.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    c.read_to_end(&mut back)?;
    Ok(back)
}

/// Whether `bin --version` runs.
pub fn have(bin: &str) -> bool {
    use std::process::{Command, Stdio};
    Command::new(bin).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// A free loopback port for a server that takes a number (redis-server,
/// postgres, tcplb started as a process). It lies outside the kernel's
/// ephemeral range, so between this call and the server's own bind no
/// socket of a test running in parallel can be given it: those bind port 0
/// or connect out, and get ephemeral ports. A port freed by binding port 0
/// could be, and the server meant for it would then fail to start, or its
/// test would reach another test's server. A counter keeps this process's
/// calls apart; a port something else holds is passed over.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = ephemeral_range();
    let (low, high) = (u32::from(low), u32::from(high));
    // The wider gap, below the range (not the privileged ports) or above it.
    let (first, last) =
        if low.saturating_sub(1024) >= 65535 - high { (1024, low - 1) } else { (high + 1, 65535) };
    assert!(first <= last, "the ephemeral range {low}-{high} leaves no port for a test server");
    let span = last - first + 1;
    // Test binaries run one after another; each starts at its own place.
    let start = std::process::id() % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(first + (start + n) % span).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {first}-{last}");
}

/// The kernel's ephemeral port range: where it picks the port of a socket
/// bound to port 0 and of an outgoing connection.
pub fn ephemeral_range() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let mut ends = text.split_whitespace().map(|v| v.parse::<u16>().unwrap());
    (ends.next().unwrap(), ends.next().unwrap())
}

/// A redis-server on a free loopback port, without persistence, with
/// `extra` arguments (`--requirepass x`).
pub fn start_redis(extra: &[&str]) -> (Proc, SocketAddr) {
    use std::process::{Command, Stdio};
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), addr)
}

/// Whether `openssl` runs.
pub fn have_openssl() -> bool {
    use std::process::{Command, Stdio};
    Command::new("openssl").arg("version").stdout(Stdio::null()).status().is_ok()
}

/// A fresh directory under the temporary directory (`tcplb-WHAT-...`),
/// removed with everything in it when the value is dropped, so that test
/// runs do not pile up in /tmp.
pub fn tempdir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("tcplb-{what}-")).tempdir().unwrap()
}

/// A self-signed EC certificate for `name` in `dir`: NAME.pem and NAME.key.
pub fn make_cert(dir: &std::path::Path, name: &str) {
    use std::process::{Command, Stdio};
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-days", "1", "-subj", &format!("/CN={name}")])
        .args(["-keyout", &format!("{name}.key"), "-out", &format!("{name}.pem")])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl req failed");
}

/// `openssl s_server` with the certificate of `name` (from [`make_cert`])
/// on a free loopback port, with `extra` flags.
pub fn s_server(dir: &std::path::Path, name: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    use std::process::{Command, Stdio};
    let port = free_port();
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-cert",
            &format!("{name}.pem"),
            "-key",
            &format!("{name}.key"),
        ])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_accepting(addr, "openssl s_server");
    (Proc(child), addr)
}

/// Waits (up to 20 s) until something accepts on `addr`.
pub fn wait_accepting(addr: SocketAddr, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}
