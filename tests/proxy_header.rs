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
