//! PROXY protocol through real sockets: what backends receive with
//! send-proxy, and accept-proxy decoding feeding onward send-proxy.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tcplb::config::ProxyVersion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

/// A backend recording everything each connection sends.
async fn recorder(log: Arc<Mutex<Vec<Vec<u8>>>>) -> SocketAddr {
    serve(move |mut s| {
        let log = Arc::clone(&log);
        async move {
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all).await;
            log.lock().unwrap().push(all);
            let _ = s.shutdown().await;
        }
    })
    .await
    .0
}

async fn send(addr: SocketAddr, bytes: &[u8]) -> SocketAddr {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
    me
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_v1_and_v2_precede_the_clients_bytes() {
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let log = Arc::new(Mutex::new(Vec::new()));
        let backend = recorder(Arc::clone(&log)).await;
        let mut l = listener(&[backend]);
        l.send_proxy = Some(version);
        let lb = start_one(l).await;
        let me = send(lb.addr, b"payload").await;
        assert!(eventually(T, || !log.lock().unwrap().is_empty()).await);
        let got = log.lock().unwrap()[0].clone();
        let want_header = tcplb::proxy_protocol::encode(version, me, lb.addr);
        if version == ProxyVersion::V1 {
            let line =
                format!("PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n", me.port(), lb.addr.port());
            assert_eq!(want_header, line.as_bytes());
        }
        assert_eq!(got, [want_header, b"payload".to_vec()].concat(), "{version:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_proxy_decodes_and_passes_the_real_client_on() {
    // client → front (send-proxy v2) → back (accept-proxy, send-proxy v1) → recorder
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = recorder(Arc::clone(&log)).await;
    let mut back = listener(&[backend]);
    back.accept_proxy = true;
    back.send_proxy = Some(ProxyVersion::V1);
    let back = start_one(back).await;
    let mut front = listener(&[back.addr]);
    front.send_proxy = Some(ProxyVersion::V2);
    let front = start_one(front).await;

    let me = send(front.addr, b"hello").await;
    assert!(eventually(T, || !log.lock().unwrap().is_empty()).await);
    let got = log.lock().unwrap()[0].clone();
    let line =
        format!("PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nhello", me.port(), front.addr.port());
    assert_eq!(String::from_utf8_lossy(&got), line, "the original client and destination");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_proxy_header_closes_without_contacting_a_backend() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = recorder(Arc::clone(&log)).await;
    let mut l = listener(&[backend]);
    l.accept_proxy = true;
    let lb = start_one(l).await;
    for bad in
        [&b"GET / HTTP/1.1\r\n\r\n"[..], b"PROXY TCP4 1.2.3.4 nope 1 2\r\n", b"PROXY TCP9 x\r\n"]
    {
        send(lb.addr, bad).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(log.lock().unwrap().is_empty(), "no backend may be contacted");
    assert_eq!(lb.backends[0].total(), 0);
    // A good header still works afterwards.
    let header = tcplb::proxy_protocol::encode(
        ProxyVersion::V1,
        "203.0.113.7:4000".parse().unwrap(),
        "198.51.100.1:443".parse().unwrap(),
    );
    send(lb.addr, &[header, b"ok".to_vec()].concat()).await;
    assert!(eventually(T, || log.lock().unwrap().len() == 1).await);
    assert_eq!(log.lock().unwrap()[0], b"ok");
}

/// A v2 header with a TLV (PP2_TYPE_AUTHORITY) after the addresses.
fn v2_with_tlv(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = tcplb::proxy_protocol::encode(ProxyVersion::V2, src, dst);
    let tlv = [0x02, 0x00, 0x04, b'a', b'.', b'i', b'o'];
    let len = u16::from_be_bytes([h[14], h[15]]) + tlv.len() as u16;
    h[14..16].copy_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&tlv);
    h
}

/// allow/deny judge the client a header names: with a header, whoever sends
/// it chooses that address, so only trusted peers may send one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_cannot_walk_past_allow_and_deny() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = recorder(Arc::clone(&log)).await;
    let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
    let headers = |src: &str| {
        let src: SocketAddr = src.parse().unwrap();
        [
            tcplb::proxy_protocol::encode(ProxyVersion::V1, src, dst),
            tcplb::proxy_protocol::encode(ProxyVersion::V2, src, dst),
            v2_with_tlv(src, dst),
        ]
    };

    // allow/deny with accept_proxy but no trust list: any client could claim
    // an allowed address, so it is refused, naming the setting to add.
    let mut open = listener(&[backend]);
    open.accept_proxy = true;
    open.deny = vec![tcplb::config::parse_cidr("127.0.0.1").unwrap()];
    let err = tcplb::Server::bind(tcplb::Config::single(open.clone())).await.unwrap_err();
    assert!(err.to_string().contains("accept_proxy_from"), "{err}");
    assert!(err.is_usage());

    // The peer (127.0.0.1) is denied and not trusted: whatever its header
    // claims, it is closed before any backend is contacted.
    open.accept_proxy_from = vec![tcplb::config::parse_cidr("127.0.0.2").unwrap()];
    let lb = start(with_admin(open)).await;
    for h in headers("192.168.1.1:5000") {
        send(lb.addr, &[h, b"x".to_vec()].concat()).await;
    }
    // A trusted peer's header is judged instead: 10.1.1.1 is allowed,
    // 192.168.1.1 (and 10.1.1.1 written as IPv4-compatible IPv6) is not.
    let mut trusted = listener(&[backend]);
    trusted.accept_proxy = true;
    trusted.allow = vec![tcplb::config::parse_cidr("10.0.0.0/8").unwrap()];
    trusted.deny = vec![tcplb::config::parse_cidr("10.9.0.0/16").unwrap()];
    trusted.accept_proxy_from = vec![tcplb::config::parse_cidr("127.0.0.0/8").unwrap()];
    let lb2 = start_one(trusted).await;
    for h in headers("192.168.1.1:5000").into_iter().chain(headers("[::10.9.1.1]:5000")) {
        send(lb2.addr, &[h, b"x".to_vec()].concat()).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(log.lock().unwrap().is_empty(), "a denied client reached the backend");
    let m = scrape(lb.admin.unwrap()).await;
    assert_eq!(get(&m, "tcplb_denied_connections_total", &[("listener", "test")]), 3.0);

    for h in headers("10.1.1.1:5000") {
        send(lb2.addr, &[h, b"ok".to_vec()].concat()).await;
    }
    assert!(eventually(T, || log.lock().unwrap().len() == 3).await, "allowed clients served");
    assert!(log.lock().unwrap().iter().all(|got| got == b"ok"));
}

/// On a listener with routes, the bytes read to choose the route go to the
/// backend after its PROXY header, never with the connect before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_clients_first_bytes_follow_the_proxy_header() {
    use tcplb::config::route::RouteConfig;
    use tcplb::config::Upstream;
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let log = Arc::new(Mutex::new(Vec::new()));
        let backend = recorder(Arc::clone(&log)).await;
        let mut l = listener(&[]);
        l.send_proxy = Some(version);
        let ups = vec![Upstream::new(backend.ip().to_string(), backend.port())];
        let mut route = RouteConfig::new("www", Vec::new(), ups, &l);
        route.http_host = vec!["www.example.com".into()];
        l.routes = vec![route];
        let lb = start_one(l).await;
        let request = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
        let me = send(lb.addr, request).await;
        assert!(eventually(T, || !log.lock().unwrap().is_empty()).await, "{version:?}");
        let got = log.lock().unwrap()[0].clone();
        let header = tcplb::proxy_protocol::encode(version, me, lb.addr);
        assert_eq!(got, [header, request.to_vec()].concat(), "{version:?}");
    }
}
