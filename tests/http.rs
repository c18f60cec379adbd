//! HTTP awareness: synthesized 502/504 responses, plain closes for non-HTTP
//! clients, `--protocol tcp` silence, and replay of idempotent requests after
//! an early close.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tcplb::config::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

const EXPECTED_502: &str = "HTTP/1.1 502 Bad Gateway\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 52\r\n\
Cache-Control: no-store\r\n\
Connection: close\r\n\
\r\n\
502 Bad Gateway: no backend accepted the connection\n";

/// Sends `request`, then reads until the connection closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("response timed out")?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_dead_http_client_gets_the_exact_502() {
    let lb = start_one(listener(&[dead_addr().await, dead_addr().await])).await;
    let got = exchange(lb.addr, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), EXPECTED_502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_dead_head_request_gets_no_body() {
    let lb = start_one(listener(&[dead_addr().await])).await;
    let got = exchange(lb.addr, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 502 Bad Gateway\r\n") && text.ends_with("\r\n\r\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_dead_binary_client_gets_a_plain_close() {
    let lb = start_one(listener(&[dead_addr().await])).await;
    let got = exchange(lb.addr, b"*1\r\n$4\r\nPING\r\n").await;
    assert!(
        got.map(|b| b.is_empty()).unwrap_or(true),
        "no byte may be written to a non-HTTP client"
    );
    let got = exchange(lb.addr, &[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01]).await;
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_after_the_peek_timeout() {
    let mut l = listener(&[dead_addr().await]);
    l.peek_timeout = Duration::from_millis(200);
    let lb = start_one(l).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut out = Vec::new();
    let r =
        tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("closed after peek timeout");
    assert!(r.map(|_| out.is_empty()).unwrap_or(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_never_writes_a_byte() {
    let mut l = listener(&[dead_addr().await]);
    l.protocol = Protocol::Tcp;
    let lb = start_one(l).await;
    let got = exchange(lb.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_backend_gives_504() {
    // A listener that never accepts, with its accept queue filled: further
    // SYNs are dropped and connects hang until tcplb's connect timeout.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    sock.listen(0).unwrap();
    let hole: SocketAddr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&hole.into());
        fillers.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut l = listener(&[hole]);
    l.connect_timeout = Duration::from_millis(300);
    let lb = start_one(l).await;
    let got = exchange(lb.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"), "{text}");
    assert!(text.contains("Content-Length: ") && text.contains("Connection: close\r\n"));
    drop(sock);
}

/// A backend that accepts and closes at once; counts its connections.
async fn slammer(count: Arc<AtomicUsize>) -> SocketAddr {
    let (addr, _) = serve(move |s| {
        count.fetch_add(1, Ordering::Relaxed);
        drop(s);
        async {}
    })
    .await;
    addr
}

/// An HTTP backend answering "two"; records the request heads it saw.
async fn answering(seen: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    http_backend(Arc::new(AtomicU16::new(200)), seen, "two").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_replayed_after_an_early_close_and_post_is_not() {
    let slams = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let first = slammer(Arc::clone(&slams)).await;
    let second = answering(Arc::clone(&seen)).await;
    let lb = start_one(listener(&[first, second])).await;

    // Round-robin starts at the slammer: the GET must be served by the second.
    let got = exchange(lb.addr, b"GET /page HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert!(got.ends_with(b"two"), "{}", String::from_utf8_lossy(&got));
    assert_eq!(slams.load(Ordering::Relaxed), 1);
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert!(seen.lock().unwrap()[0].starts_with("GET /page HTTP/1.1"));

    // Next connection goes to the second backend directly; the one after
    // starts at the slammer again: a POST there must not be replayed.
    exchange(lb.addr, b"GET /direct HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
    let got =
        exchange(lb.addr, b"POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi").await;
    let got = got.unwrap_or_default();
    assert_eq!(slams.load(Ordering::Relaxed), 2);
    assert_eq!(seen.lock().unwrap().len(), 2, "POST must never reach a second backend");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
}

/// The replayed request reaches the next backend once, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_arrives_once_and_whole() {
    let slams = Arc::new(AtomicUsize::new(0));
    let first = slammer(Arc::clone(&slams)).await;
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&received);
    let (second, _) = serve(move |mut s| {
        let log = Arc::clone(&log);
        async move {
            // Everything the proxy sends within 300 ms: a request sent
            // twice, or cut short, would show.
            let (mut all, mut buf) = (Vec::new(), [0u8; 4096]);
            let until = tokio::time::Instant::now() + Duration::from_millis(300);
            while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
            }
            log.lock().unwrap().push(all);
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\ntwo";
            let _ = s.write_all(answer).await;
        }
    })
    .await;
    let lb = start_one(listener(&[first, second])).await;
    // Round-robin starts at the slammer.
    let request = b"GET /page HTTP/1.1\r\nHost: a\r\n\r\n";
    let got = exchange(lb.addr, request).await.unwrap();
    assert!(got.ends_with(b"two"), "{}", String::from_utf8_lossy(&got));
    assert_eq!(slams.load(Ordering::Relaxed), 1);
    assert_eq!(received.lock().unwrap().as_slice(), [request.to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_replayed_once_the_backend_answered() {
    // Answers one byte, then resets: the client must see exactly that.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (half, _) = serve(|mut s| async move {
        let mut b = [0u8; 512];
        let _ = s.read(&mut b).await;
        let _ = s.write_all(b"H").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    })
    .await;
    let other = answering(Arc::clone(&seen)).await;
    let lb = start_one(listener(&[half, other])).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("closed");
    assert_eq!(out, b"H");
    assert!(seen.lock().unwrap().is_empty(), "must not replay after a byte came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_greeting_has_no_added_delay_in_auto_mode() {
    let (addr, _) = serve(|mut s| async move {
        let _ = s.write_all(b"* OK IMAP ready\r\n").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    })
    .await;
    let mut l = listener(&[addr]);
    l.protocol = Protocol::Auto;
    let lb = start_one(l).await;
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"* OK IMAP ready\r\n");
    // Well under the 1 s peek timeout: nothing waited for the client.
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_and_oversized_heads_cost_a_bounded_wait() {
    let mut l = listener(&[dead_addr().await]);
    l.peek_timeout = Duration::from_millis(300);
    let lb = start_one(l).await;
    // A head bigger than the peek window with no request line: plain close.
    let mut big = vec![b'A'; 10_000];
    big.extend_from_slice(b"\r\n\r\n");
    let got = exchange(lb.addr, &big).await;
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
    // A trickling client: closed after the peek timeout, not held forever.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GE").await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("closed");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_reaches_a_non_http_client_as_a_reset() {
    let reset = |s: &TcpStream| {
        let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    };
    // Resets before its client says anything (a server-first protocol),
    // once tcplb's connect is surely established...
    let (early, _) = serve(move |s| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reset(&s);
    })
    .await;
    // ... or once it has read the client's first bytes (Redis, say).
    let (late, _) = serve(move |mut s| async move {
        let mut b = [0u8; 64];
        let _ = s.read(&mut b).await;
        reset(&s);
    })
    .await;
    for (backend, says) in [(early, &b""[..]), (late, &b"*1\r\n$4\r\nPING\r\n"[..])] {
        let lb = start_one(listener(&[backend])).await;
        for _ in 0..3 {
            let mut c = TcpStream::connect(lb.addr).await.unwrap();
            c.write_all(says).await.unwrap();
            let mut out = Vec::new();
            let read = tokio::time::timeout(T, c.read_to_end(&mut out)).await.expect("not closed");
            assert_eq!(
                read.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionReset),
                "a backend reset must reach the client as a reset, not a clean end ({out:?}, after {says:?})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_answers_silence_with_408_and_a_partial_request_with_the_failure() {
    let mut l = listener(&[dead_addr().await]);
    l.protocol = Protocol::Http;
    l.peek_timeout = Duration::from_millis(200);
    let lb = start_one(l).await;
    for (says, expected) in [
        (&b""[..], "HTTP/1.1 408 Request Timeout\r\n"),
        (b"GET /slow HT", "HTTP/1.1 502 Bad Gateway\r\n"),
    ] {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(says).await.unwrap();
        let mut out = Vec::new();
        let _ =
            tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("answered and closed");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with(expected), "after {says:?}: {text:?}");
    }
}
