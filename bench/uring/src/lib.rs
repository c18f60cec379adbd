//! What both io_uring prototypes share: the subset of tcplb's configuration
//! file that `bench/compare.sh` writes (each `[[listener]]`'s `listen` and
//! `upstreams`; every other key is ignored), one SO_REUSEPORT listening
//! socket per worker thread, and the worker threads themselves.
//!
//! Each prototype is the data path only: round-robin over the upstreams, one
//! connect attempt, bytes copied both ways through a 64 KiB buffer per
//! direction, half-close passed on, TCP_NODELAY on both sockets. No health
//! checks, timeouts, metrics or limits: a lower bound on what an io_uring
//! tcplb would cost, to compare with tcplb's full epoll path.

use std::net::SocketAddr;

use serde::Deserialize;

/// Buffer per direction, as tcplb's per-thread scratch buffer.
pub const BUF: usize = 64 * 1024;

/// The configuration file's parts the prototypes use.
#[derive(Deserialize)]
struct File {
    /// One entry per `[[listener]]`.
    listener: Vec<Listener>,
}

/// One listening address and where its connections go.
#[derive(Deserialize, Clone)]
pub struct Listener {
    /// Address to accept on.
    pub listen: SocketAddr,
    /// Backends, in round-robin order.
    pub upstreams: Vec<SocketAddr>,
}

/// Reads `--config FILE` and `--threads N` (default 2) from the command
/// line; tcplb's other flags, which compare.sh passes, are ignored.
pub fn args() -> Result<(Vec<Listener>, usize), String> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
    let path = value("--config").ok_or("usage: --config FILE [--threads N]")?;
    let threads = match value("--threads") {
        Some(n) => n.parse().map_err(|_| format!("--threads: not a number: {n}"))?,
        None => 2,
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let file: File = toml::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    if let Some(l) = file.listener.iter().find(|l| l.upstreams.is_empty()) {
        return Err(format!("{path}: listener {} has no upstreams", l.listen));
    }
    Ok((file.listener, threads))
}

/// A listening socket in `addr`'s SO_REUSEPORT group, with TCP_NODELAY for
/// the accepted sockets to inherit.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Runs `worker` on `threads` threads, each given every listener, and
/// waits for them; the first error ends the process with its message.
pub fn run(worker: fn(Vec<Listener>) -> std::io::Result<()>) {
    let (listeners, threads) = match args() {
        Ok(a) => a,
        Err(e) => exit(&e),
    };
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let listeners = listeners.clone();
            std::thread::spawn(move || worker(listeners))
        })
        .collect();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => exit(&e.to_string()),
            Err(_) => exit("a worker thread panicked"),
        }
    }
}

fn exit(message: &str) -> ! {
    eprintln!("uring-proto: {message}");
    std::process::exit(2)
}
