//! Slow and hostile clients, access control: each costs bounded time and
//! never disturbs other clients.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU16;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tcplb::config::{parse_cidr, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

/// An HTTP backend answering 200 "ok".
async fn http_ok() -> SocketAddr {
    http_backend(Arc::new(AtomicU16::new(200)), Default::default(), "ok").await
}

async fn get(addr: SocketAddr) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("answer").unwrap();
    (started.elapsed(), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_floods_and_slowloris_do_not_disturb_others() {
    for protocol in [Protocol::Http, Protocol::Auto] {
        let backend = http_ok().await;
        let mut l = listener(&[backend]);
        l.protocol = protocol;
        l.idle_timeout = Some(Duration::from_secs(2));
        let lb = start_one(l).await;
        // 300 clients that send nothing, 50 that trickle a head a byte at a time.
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(lb.addr).await.unwrap());
        }
        let mut loris = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let addr = lb.addr;
            loris.spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let _ = s.write_all(b"GET / HTTP/1.1\r\n").await;
                for _ in 0..20 {
                    if s.write_all(b"X").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..5 {
            let (took, out) = get(lb.addr).await;
            assert!(out.ends_with(b"ok"), "{protocol:?}: {}", String::from_utf8_lossy(&out));
            assert!(took < Duration::from_secs(1), "{protocol:?}: a normal client waited {took:?}");
        }
        // The silent ones are closed by the idle timeout, not held forever.
        let started = Instant::now();
        for mut s in idle.drain(..).take(20) {
            let mut b = Vec::new();
            let _ =
                tokio::time::timeout(T, s.read_to_end(&mut b)).await.expect("idle client closed");
        }
        assert!(started.elapsed() < Duration::from_secs(4));
        loris.abort_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flood_with_no_backend_is_closed_after_the_peek_timeout() {
    for protocol in [Protocol::Http, Protocol::Auto] {
        let mut l = listener(&[dead_addr().await]);
        l.protocol = protocol;
        l.peek_timeout = Duration::from_millis(300);
        let lb = start_one(l).await;
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(TcpStream::connect(lb.addr).await.unwrap());
        }
        let started = Instant::now();
        for mut s in idle {
            let mut b = Vec::new();
            let _ = tokio::time::timeout(T, s.read_to_end(&mut b)).await.expect("closed");
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{protocol:?}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_heads_never_reach_a_backend_twice_or_panic() {
    let backend = http_ok().await;
    let lb = start_one(listener(&[backend])).await;
    // Garbage is forwarded as is (layer 4); the backend decides.
    for junk in [vec![0u8; 10_000], vec![0xffu8; 70_000], b"\r\n\r\n\r\n".to_vec()] {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        let mut b = Vec::new();
        let _ = tokio::time::timeout(T, s.read_to_end(&mut b)).await.expect("closed");
    }
    let (_, out) = get(lb.addr).await;
    assert!(out.ends_with(b"ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_clients_are_closed_before_any_backend_is_contacted() {
    let (a, _) = tag_backend("A").await;
    // Only 10/8 may connect: 127.0.0.1 is refused.
    let mut l = listener(&[a]);
    l.allow = vec![parse_cidr("10.0.0.0/8").unwrap()];
    let lb = start_one(l).await;
    for _ in 0..3 {
        assert_eq!(read_all_from(lb.addr).await, b"");
    }
    assert_eq!(lb.backends[0].total(), 0);
    let svc = lb.handle.service("test").unwrap();
    assert_eq!(svc.stats.denied.load(std::sync::atomic::Ordering::Relaxed), 3);

    // Deny wins over allow.
    let mut l = listener(&[a]);
    l.allow = vec![parse_cidr("127.0.0.0/8").unwrap()];
    l.deny = vec![parse_cidr("127.0.0.1").unwrap()];
    let lb = start_one(l).await;
    assert_eq!(read_all_from(lb.addr).await, b"");
    assert_eq!(lb.backends[0].total(), 0);

    // Allowed.
    let mut l = listener(&[a]);
    l.allow = vec![parse_cidr("127.0.0.1/32").unwrap()];
    let lb = start_one(l).await;
    assert_eq!(read_all_from(lb.addr).await, b"A");
}
