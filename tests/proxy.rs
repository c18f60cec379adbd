//! The core path over real loopback sockets: selection, retry, splicing,
//! half-close, timeouts, limits and drain.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tcplb::config::{Config, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_two_and_three_backends() {
    let (a, _) = tag_backend("A").await;
    let (b, _) = tag_backend("B").await;
    let (c, _) = tag_backend("C").await;

    let lb2 = start_one(listener(&[a, b])).await;
    let mut seen = String::new();
    for _ in 0..4 {
        seen.push_str(&String::from_utf8(read_all_from(lb2.addr).await).unwrap());
    }
    assert_eq!(seen, "ABAB");

    let lb3 = start_one(listener(&[a, b, c])).await;
    let mut seen = String::new();
    for _ in 0..7 {
        seen.push_str(&String::from_utf8(read_all_from(lb3.addr).await).unwrap());
    }
    assert_eq!(seen, "ABCABCA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_echo_is_byte_identical_with_client_half_close() {
    let (echo, _) = echo_backend().await;
    let lb = start_one(listener(&[echo])).await;
    let data = random_bytes(8 << 20, 7);
    let want = digest(&data);
    let got = tokio::time::timeout(Duration::from_secs(30), echo_through(lb.addr, data))
        .await
        .expect("echo timed out");
    assert_eq!(digest(&got), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_keeps_the_other_direction_flowing() {
    // The backend says goodbye and sends FIN first, then still reads
    // everything the client sends and reports how much arrived.
    let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel();
    let (addr, _) = serve(move |mut s| {
        let tx = count_tx.clone();
        async move {
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            let _ = tx.send(digest(&got));
        }
    })
    .await;
    let lb = start_one(listener(&[addr])).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(greeting, b"bye");
    let data = random_bytes(1 << 20, 3);
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(T, count_rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, digest(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_greeting_arrives_without_client_bytes() {
    let (addr, _) = serve(|mut s| async move {
        let _ = s.write_all(b"220 smtp.test ESMTP ready\r\n").await;
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
    })
    .await;
    let lb = start_one(listener(&[addr])).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("greeting must arrive without the client sending")
        .unwrap();
    assert_eq!(&buf[..n], b"220 smtp.test ESMTP ready\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_is_skipped_without_client_error() {
    let dead = dead_addr().await;
    let (live, _) = tag_backend("L").await;
    let lb = start_one(listener(&[dead, live])).await;
    for _ in 0..6 {
        assert_eq!(read_all_from(lb.addr).await, b"L");
    }
    assert!(lb.backends[0].connect_failures() >= 1);
    assert_eq!(lb.backends[1].total(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_upstreams_dead_closes_the_client_promptly() {
    let mut l = listener(&[dead_addr().await, dead_addr().await]);
    l.protocol = Protocol::Tcp;
    let lb = start_one(l).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .expect("client must be closed promptly");
    // A clean close or a reset are both a close; no byte may be written.
    if r.is_ok() {
        assert!(buf.is_empty(), "tcp mode wrote {buf:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_connections_echo_intact() {
    let (e1, _) = echo_backend().await;
    let (e2, _) = echo_backend().await;
    let lb = start_one(listener(&[e1, e2])).await;
    let mut tasks = Vec::new();
    for i in 0..500u64 {
        let addr = lb.addr;
        tasks.push(tokio::spawn(async move {
            let data = random_bytes(64 << 10, i);
            let want = digest(&data);
            let got = echo_through(addr, data).await;
            assert_eq!(digest(&got), want, "connection {i}");
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all).await.expect("500 echoes timed out");
    assert_eq!(lb.backends[0].total() + lb.backends[1].total(), 500);
    assert_eq!(lb.backends[0].total(), 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_on_both_sides() {
    let Ok(probe) = tokio::net::TcpListener::bind("[::1]:0").await else {
        eprintln!("SKIPPED: ::1 is not available on this machine");
        return;
    };
    drop(probe);
    let (echo, _) = serve_on("[::1]:0".parse().unwrap(), |mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let lb = start_one(listener_on("[::1]:0".parse().unwrap(), &[echo])).await;
    assert!(lb.addr.is_ipv6());
    let got = echo_through(lb.addr, b"over v6".to_vec()).await;
    assert_eq!(got, b"over v6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let (echo, _) = echo_backend().await;
    let mut l = listener(&[echo]);
    l.idle_timeout = Some(Duration::from_millis(300));
    let lb = start_one(l).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    // Activity keeps it open past the timeout.
    let mut last = std::time::Instant::now();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        last = std::time::Instant::now();
    }
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, s.read_to_end(&mut rest)).await.expect("idle close");
    assert!(r.is_ok() && rest.is_empty(), "{r:?} {rest:?}");
    let waited = last.elapsed();
    assert!(waited >= Duration::from_millis(250), "closed too early: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_connection_times_out() {
    // A backend that never answers nor closes after the client's FIN.
    let (addr, _) = serve(|mut s| async move {
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let mut l = listener(&[addr]);
    l.half_close_timeout = Some(Duration::from_millis(300));
    let lb = start_one(l).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "half-closed connection must be closed by the half-close timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_closes_only_its_client() {
    // Backend 1 resets on "boom"; backend 2 echoes.
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let (bad, _) = serve(move |s| {
        let _ = accepted_tx.send(());
        async move {
            let mut s = s;
            let mut b = [0u8; 4];
            let _ = s.read_exact(&mut b).await;
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    })
    .await;
    let (good, _) = echo_backend().await;
    let lb = start_one(listener(&[bad, good])).await;
    let mut victim = TcpStream::connect(lb.addr).await.unwrap();
    // Round-robin sends the first connection to the bad backend.
    tokio::time::timeout(T, accepted.recv()).await.expect("bad backend accepted");
    let mut bystander = TcpStream::connect(lb.addr).await.unwrap();
    victim.write_all(b"boom").await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(T, victim.read_to_end(&mut buf)).await.expect("victim closed");
    assert!(r.is_err() || buf.is_empty(), "victim must see a reset or a close");
    bystander.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    bystander.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_just_before_a_client_reset_reach_the_backend() {
    // The client writes, then resets at once: tcplb sees the bytes and the
    // reset together. It must pass the bytes on before it resets the backend.
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    let (addr, _) = serve(move |mut s| {
        let _ = accepted_tx.send(());
        let got_tx = got_tx.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            // Read until EOF or the reset that follows the bytes.
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
            let _ = got_tx.send(got);
        }
    })
    .await;
    let lb = start_one(listener(&[addr])).await;
    for round in 0..20 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        tokio::time::timeout(T, accepted.recv()).await.expect("backend accepted");
        let words = format!("last words {round}");
        s.write_all(words.as_bytes()).await.unwrap();
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
        let got = tokio::time::timeout(T, got_rx.recv()).await.expect("backend done").unwrap();
        assert_eq!(String::from_utf8_lossy(&got), words, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_new_clients_wait_then_proceed() {
    let (echo, _) = echo_backend().await;
    let mut config = Config::single(listener(&[echo]));
    config.max_connections = 2;
    let lb = start(config).await;
    let mut first = TcpStream::connect(lb.addr).await.unwrap();
    let mut second = TcpStream::connect(lb.addr).await.unwrap();
    for s in [&mut first, &mut second] {
        s.write_all(b"1").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
    }
    // The third connect completes in the kernel backlog but is not served yet.
    let mut third = TcpStream::connect(lb.addr).await.unwrap();
    third.write_all(b"3").await.unwrap();
    let mut b = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut b)).await;
    assert!(waited.is_err(), "third connection must wait while at the limit");
    drop(first);
    tokio::time::timeout(T, third.read_exact(&mut b))
        .await
        .expect("served after a slot frees")
        .unwrap();
    assert_eq!(&b, b"3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_connects_and_lets_established_finish() {
    let (echo, _) = echo_backend().await;
    let mut config = Config::single(listener(&[echo]));
    config.drain_timeout = Duration::from_secs(20);
    let mut lb = start(config).await;
    let mut s = established(lb.addr).await;
    let mut b = [0u8; 1];

    lb.shutdown();
    let refused = async {
        loop {
            if TcpStream::connect(lb.addr).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(T, refused).await.expect("listener must close on shutdown");

    // The established connection still works.
    s.write_all(b"b").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b");
    assert!(!lb.task.is_finished());

    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    drop(s);
    tokio::time::timeout(T, &mut lb.task).await.expect("exits after the last connection").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_what_remains() {
    let (echo, _) = echo_backend().await;
    let mut config = Config::single(listener(&[echo]));
    config.drain_timeout = Duration::from_millis(200);
    let mut lb = start(config).await;
    let mut s = established(lb.addr).await;
    lb.shutdown();
    tokio::time::timeout(T, &mut lb.task).await.expect("exits at the drain deadline").unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, s.read_to_end(&mut rest)).await.expect("client closed");
    assert!(r.is_err() || rest.is_empty());
}

/// The drain deadline closes connections in every phase that waits: one
/// being routed (its client silent, the peek timeout far off) and one in
/// the first exchange (its request sent, the backend silent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_closes_connections_waiting_in_any_phase() {
    use tcplb::config::route::RouteConfig;
    use tcplb::config::Upstream;
    let (silent, _) = serve(|mut s: TcpStream| async move {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let mut l = listener(&[silent]);
    l.peek_timeout = Duration::from_secs(60);
    let upstreams = vec![Upstream::new("127.0.0.1", silent.port())];
    l.routes = vec![RouteConfig::new("r", vec!["example.com".into()], upstreams, &l)];
    let mut config = Config::single(l);
    config.drain_timeout = Duration::from_millis(300);
    let mut lb = start(config).await;
    let mut routing = TcpStream::connect(lb.addr).await.unwrap();
    let mut waiting = TcpStream::connect(lb.addr).await.unwrap();
    waiting.write_all(b"GET / HTTP/1.1\r\nHost: other\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lb.shutdown();
    tokio::time::timeout(T, &mut lb.task).await.expect("exits at the drain deadline").unwrap();
    for (what, s) in [("being routed", &mut routing), ("in the first exchange", &mut waiting)] {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
        let r = r.unwrap_or_else(|_| panic!("{what}: still open after the drain deadline"));
        assert!(r.is_err() || rest.is_empty(), "{what}: {rest:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_listen_addresses_share_the_backends() {
    let (a, _) = tag_backend("A").await;
    let mut l = listener(&[a]);
    l.listen = vec!["127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()];
    let lb = start_one(l).await;
    assert_eq!(lb.addrs.len(), 2);
    for addr in &lb.addrs {
        assert_eq!(read_all_from(*addr).await, b"A");
    }
    let _: Vec<SocketAddr> = lb.addrs.clone();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_splice_mode_moves_bytes_identically_with_half_close() {
    use tcplb::config::SpliceMode;
    let (echo, _) = echo_backend().await;
    for mode in [SpliceMode::On, SpliceMode::Auto, SpliceMode::Off] {
        let mut l = listener(&[echo]);
        l.splice = mode;
        l.protocol = Protocol::Tcp;
        let lb = start_one(l).await;
        // Bulk (auto switches to splice at once, or after 1 MiB) and small.
        for (len, seed) in [(8 << 20, 11u64), (1000, 12)] {
            let data = random_bytes(len, seed);
            let want = digest(&data);
            let got = tokio::time::timeout(Duration::from_secs(30), echo_through(lb.addr, data))
                .await
                .expect("echo timed out");
            assert_eq!(digest(&got), want, "{mode:?} {len}");
        }
        // Counters see spliced bytes too.
        let b = &lb.backends[0];
        assert!(
            eventually(T, || b.bytes() == ((8 << 20) + 1000, (8 << 20) + 1000)).await,
            "{mode:?}: {:?}",
            b.bytes()
        );
    }
}

/// A server that speaks first with a large message: with `splice = "auto"`
/// a first message already waiting in full is spliced from its first byte,
/// later ones are copied until they turn out to be bulk. Every size around
/// the 64 KiB switch arrives whole and in order, and so does what the client
/// sends afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_first_messages_arrive_whole_in_auto_mode() {
    use tcplb::config::SpliceMode;
    const SIZES: [usize; 4] = [65_535, 65_536, 65_537 + 1800, 3_000_017];
    let (backend, _) = serve(|mut s| async move {
        let mut n = [0u8; 1];
        if s.read_exact(&mut n).await.is_err() {
            return;
        }
        let data = random_bytes(SIZES[n[0] as usize], n[0] as u64);
        // Then echo whatever the client sends, until it is done.
        let _ = s.write_all(&data).await;
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await;
    let mut l = listener(&[backend]);
    l.splice = SpliceMode::Auto;
    l.protocol = Protocol::Tcp;
    let lb = start_one(l).await;
    for (i, &len) in SIZES.iter().enumerate() {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(&[i as u8]).await.unwrap();
        let mut got = vec![0u8; len];
        tokio::time::timeout(T, s.read_exact(&mut got)).await.expect("timed out").unwrap();
        assert_eq!(digest(&got), digest(&random_bytes(len, i as u64)), "{len} bytes");
        let tail = random_bytes(100_000, 99);
        let back = tokio::time::timeout(T, echo_over(s, tail.clone())).await.expect("timed out");
        assert_eq!(digest(&back), digest(&tail), "after {len}");
    }
}

/// Pipes go back to a per-worker pool when a spliced direction ends; bytes of
/// one connection must never reach another through a reused pipe. Waves of
/// concurrent spliced connections, each with its own data, every length
/// different, each checked byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_splice_pipes_never_mix_connections() {
    use tcplb::config::SpliceMode;
    let (echo, _) = echo_backend().await;
    let mut l = listener(&[echo]);
    l.splice = SpliceMode::On;
    l.protocol = Protocol::Tcp;
    let lb = start_one(l).await;
    for wave in 0..4u64 {
        let mut tasks = Vec::new();
        for i in 0..12u64 {
            let seed = wave * 100 + i;
            // From one byte to a few hundred KiB: short ends, partial pipes.
            let len = [1, 700, 65_537, 300_001][(i % 4) as usize] + (seed as usize * 13);
            let data = random_bytes(len, seed);
            let want = digest(&data);
            let addr = lb.addr;
            tasks
                .push(tokio::spawn(async move { (digest(&echo_through(addr, data).await), want) }));
        }
        for t in tasks {
            let (got, want) = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("echo timed out")
                .unwrap();
            assert_eq!(got, want, "wave {wave}");
        }
    }
}

/// A server given a port number binds it itself, later: until then no
/// socket of a test running in parallel may be able to take it.
#[test]
fn a_port_for_a_server_cannot_be_given_to_another_socket_first() {
    let (low, high) = common::ephemeral_range();
    let port = free_port();
    assert!(
        !(low..=high).contains(&port),
        "port {port} is in the kernel's ephemeral range {low}-{high}: a server of a test running in parallel (bound to port 0), or an outgoing connection, could take it before the server meant for it binds"
    );
    assert_ne!(free_port(), port, "two calls gave the same port");
}

/// The suite runs tests in parallel, each binding ports of its own: the
/// address a test uses for a dead backend must stay refused for the whole
/// run, or another test's server takes the port and the dead backend
/// answers (an echo through it came back as that server's 103 bytes).
#[tokio::test]
async fn a_dead_backend_address_cannot_be_taken_by_another_server() {
    let dead = dead_addr().await;
    assert!(
        tokio::net::TcpListener::bind(dead).await.is_err(),
        "another server could listen on the dead backend's address {dead}"
    );
    let refused = TcpStream::connect(dead).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}
