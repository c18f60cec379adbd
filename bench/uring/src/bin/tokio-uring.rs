//! The data path on tokio-uring: a current-thread tokio runtime whose
//! io_uring is flushed when the runtime parks and reaped through epoll.

use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::rc::Rc;

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};
use uring_proto::{bind, run, BUF};

fn main() {
    run(|listeners| {
        tokio_uring::start(async move {
            let mut accepting = Vec::new();
            for l in listeners {
                let socket = TcpListener::from_std(bind(l.listen)?);
                accepting.push(tokio_uring::spawn(accept(socket, l.upstreams)));
            }
            for task in accepting {
                let _ = task.await;
            }
            Ok(())
        })
    })
}

async fn accept(listener: TcpListener, upstreams: Vec<SocketAddr>) {
    for next in (0..upstreams.len()).cycle() {
        if let Ok((client, _)) = listener.accept().await {
            tokio_uring::spawn(serve(client, upstreams[next]));
        }
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr) {
    let Ok(backend) = TcpStream::connect(upstream).await else { return };
    // tokio-uring's stream has no set_nodelay; its descriptor does.
    // SAFETY: `backend` owns the descriptor and outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(backend.as_raw_fd()) };
    let _ = socket2::SockRef::from(&fd.as_fd()).set_nodelay(true);
    let (client, backend) = (Rc::new(client), Rc::new(backend));
    let ended = Rc::new(std::cell::Cell::new(0u8));
    tokio::join!(
        copy(Rc::clone(&client), Rc::clone(&backend), Rc::clone(&ended)),
        copy(backend, client, ended)
    );
}

/// `from` → `to` until EOF; then shuts down `to` for writing unless the
/// other direction has ended too (then dropping both sockets closes them).
async fn copy(from: Rc<TcpStream>, to: Rc<TcpStream>, ended: Rc<std::cell::Cell<u8>>) {
    let mut buf = vec![0u8; BUF];
    loop {
        let (read, b) = from.read(buf).await;
        buf = b;
        match read {
            Ok(0) => break,
            Ok(n) => {
                let (written, b) = to.write_all(buf.slice(..n)).await;
                buf = b.into_inner();
                if written.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    ended.set(ended.get() + 1);
    if ended.get() == 1 {
        let _ = to.shutdown(Shutdown::Write);
    }
}
