//! Strategies and upstream options through the proxy, with real connections.

mod common;

use std::time::Duration;

use common::*;
use tcplb::config::{StrategyKind, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

/// A backend that says its tag and then holds the connection open.
async fn holding(tag: &'static str) -> std::net::SocketAddr {
    serve(move |mut s| async move {
        let _ = s.write_all(tag.as_bytes()).await;
        let mut b = [0u8; 16];
        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
    })
    .await
    .0
}

async fn greet(addr: std::net::SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(T, s.read_exact(&mut b)).await.expect("greeting").unwrap();
    (s, String::from_utf8_lossy(&b).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smooth_weighted_round_robin_order_through_the_proxy() {
    let (a, _) = tag_backend("A").await;
    let (b, _) = tag_backend("B").await;
    let (c, _) = tag_backend("C").await;
    let mut l = listener(&[]);
    l.upstreams = vec![
        format!("{a},weight=5").parse().unwrap(),
        format!("{b},weight=1").parse().unwrap(),
        format!("{c},weight=1").parse().unwrap(),
    ];
    let lb = start_one(l).await;
    let mut seen = String::new();
    for _ in 0..7 {
        seen.push_str(&String::from_utf8(read_all_from(lb.addr).await).unwrap());
    }
    assert_eq!(seen, "AABACAA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_follows_held_connections() {
    let a = holding("A").await;
    let b = holding("B").await;
    let mut l = listener(&[a, b]);
    l.strategy = StrategyKind::LeastConnections;
    let lb = start_one(l).await;
    // Hold two connections; they spread one each.
    let (_h1, t1) = greet(lb.addr).await;
    let (_h2, t2) = greet(lb.addr).await;
    assert_ne!(t1, t2);
    // Close the one on A: every new connection now goes to A until it catches up.
    let (h3, t3) = greet(lb.addr).await;
    let (h4, t4) = greet(lb.addr).await;
    assert_ne!(t3, t4, "equal load alternates");
    let on_b = if t3 == "B" { h3 } else { h4 };
    drop(on_b);
    let bk = lb.handle.service("test").unwrap().backend(b).unwrap();
    assert!(eventually(T, || bk.active() == 1).await);
    let (_h5, t5) = greet(lb.addr).await;
    assert_eq!(t5, "B", "B holds fewer connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_used_only_when_primaries_are_down() {
    let (a, _) = tag_backend("A").await;
    let (k, _) = tag_backend("K").await;
    let mut l = listener(&[]);
    l.upstreams =
        vec![Upstream::new("127.0.0.1", a.port()), format!("{k},backup").parse().unwrap()];
    let lb = start_one(l).await;
    for _ in 0..4 {
        assert_eq!(read_all_from(lb.addr).await, b"A");
    }
    lb.backends[0].health.set_up(false);
    for _ in 0..3 {
        assert_eq!(read_all_from(lb.addr).await, b"K");
    }
    lb.backends[0].health.set_up(true);
    assert_eq!(read_all_from(lb.addr).await, b"A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_backend_max_connections_skips_a_full_backend() {
    let a = holding("A").await;
    let b = holding("B").await;
    let mut l = listener(&[]);
    l.upstreams = vec![
        format!("{a},max-connections=1").parse().unwrap(),
        Upstream::new("127.0.0.1", b.port()),
    ];
    let lb = start_one(l).await;
    let (_hold, first) = greet(lb.addr).await;
    assert_eq!(first, "A");
    let mut rest = Vec::new();
    for _ in 0..4 {
        let (h, t) = greet(lb.addr).await;
        assert_eq!(t, "B", "A is full");
        rest.push(h);
    }
    assert_eq!(lb.backends[0].active(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_everywhere_gives_503_to_http_clients() {
    let a = holding("A").await;
    let mut l = listener(&[]);
    l.upstreams = vec![format!("{a},max-connections=1").parse().unwrap()];
    let lb = start_one(l).await;
    let (_hold, _) = greet(lb.addr).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
    assert!(text.contains("Retry-After: 1\r\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_keeps_a_client_on_one_backend() {
    let mut addrs = Vec::new();
    for tag in ["A", "B", "C", "D"] {
        addrs.push(tag_backend(tag).await.0);
    }
    let mut l = listener(&addrs);
    l.strategy = StrategyKind::Maglev;
    let lb = start_one(l).await;
    let first = read_all_from(lb.addr).await;
    for _ in 0..8 {
        assert_eq!(read_all_from(lb.addr).await, first, "same client IP, same backend");
    }
    // Its backend goes down: it moves, and comes back when the backend returns.
    let i = (first[0] - b'A') as usize;
    lb.backends[i].health.set_up(false);
    let moved = read_all_from(lb.addr).await;
    assert_ne!(moved, first);
    lb.backends[i].health.set_up(true);
    assert_eq!(read_all_from(lb.addr).await, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_two_serves_every_connection() {
    let (a, _) = tag_backend("A").await;
    let (b, _) = tag_backend("B").await;
    let mut l = listener(&[a, b]);
    l.strategy = StrategyKind::RandomTwo;
    let lb = start_one(l).await;
    let mut seen = String::new();
    for _ in 0..40 {
        seen.push_str(&String::from_utf8(read_all_from(lb.addr).await).unwrap());
    }
    assert_eq!(seen.len(), 40);
    assert!(seen.contains('A') && seen.contains('B'), "{seen}");
}
