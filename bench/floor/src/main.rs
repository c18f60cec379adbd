//! A relay with nothing but what every TCP proxy on tokio does: one
//! current-thread runtime per worker with its own SO_REUSEPORT listener,
//! a connect to the next backend (round robin), then
//! `tokio::io::copy_bidirectional` (which passes each FIN on). No routing,
//! timeouts, logs, metrics, health or hand-offs between workers.
//!
//!   floor LISTEN BACKEND[,BACKEND...] [WORKERS]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

fn main() {
    if let Err(e) = run() {
        eprintln!("floor: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, backends, rest @ ..] = args.as_slice() else {
        return Err("usage: floor LISTEN BACKEND[,BACKEND...] [WORKERS]".into());
    };
    let listen: SocketAddr = listen.parse().map_err(|_| format!("not an address: {listen}"))?;
    let backends = backends
        .split(',')
        .map(|b| b.parse().map_err(|_| format!("not an address: {b}")))
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let workers = match rest.first() {
        Some(w) => w.parse().map_err(|_| format!("not a number of workers: {w}"))?,
        None => 2,
    };
    let backends = Arc::new(backends);
    let next = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for _ in 0..workers {
        let listener = reuseport_listener(listen).map_err(|e| format!("{listen}: {e}"))?;
        let (backends, next) = (Arc::clone(&backends), Arc::clone(&next));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        threads.push(std::thread::spawn(move || rt.block_on(serve(listener, backends, next))));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    // Copied by Linux to every accepted socket.
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

async fn serve(
    listener: std::net::TcpListener,
    backends: Arc<Vec<SocketAddr>>,
    next: Arc<AtomicUsize>,
) {
    let Ok(listener) = TcpListener::from_std(listener) else { return };
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(backend).await else { return };
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}
