//! The data path on monoio: a thread-per-core runtime driven by io_uring
//! alone (no epoll).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use uring_proto::{bind, run, Listener, BUF};

fn main() {
    run(|listeners: Vec<Listener>| {
        let mut rt =
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096).build()?;
        rt.block_on(async move {
            let mut accepting = Vec::new();
            for l in listeners {
                let socket = TcpListener::from_std(bind(l.listen)?)?;
                accepting.push(monoio::spawn(accept(socket, l.upstreams)));
            }
            for task in accepting {
                task.await;
            }
            Ok(())
        })
    })
}

async fn accept(listener: TcpListener, upstreams: Vec<SocketAddr>) {
    for next in (0..upstreams.len()).cycle() {
        if let Ok((client, _)) = listener.accept().await {
            monoio::spawn(serve(client, upstreams[next]));
        }
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr) {
    let Ok(backend) = TcpStream::connect_addr(upstream).await else { return };
    let _ = backend.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (backend_r, backend_w) = backend.into_split();
    let ended = Rc::new(Cell::new(0u8));
    monoio::join!(copy(client_r, backend_w, Rc::clone(&ended)), copy(backend_r, client_w, ended));
}

/// `from` → `to` until EOF; then shuts down `to` for writing unless the
/// other direction has ended too (then dropping both sockets closes them).
async fn copy(mut from: impl AsyncReadRent, mut to: impl AsyncWriteRent, ended: Rc<Cell<u8>>) {
    let mut buf = vec![0u8; BUF];
    loop {
        let (read, b) = from.read(buf).await;
        buf = b;
        match read {
            Ok(0) => break,
            // `read` set the vector's length to what it read: all of it goes.
            Ok(_) => {
                let (written, b) = to.write_all(buf).await;
                buf = b;
                if written.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    ended.set(ended.get() + 1);
    if ended.get() == 1 {
        let _ = to.shutdown().await;
    }
}
