//! One client cannot take everyone's share: connections per client address,
//! new connections per client address and second, and connections per
//! listener, with clients on distinct loopback addresses (127.0.0.x) that
//! must not be affected by each other.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection from `from` (a 127.0.0.x address) to `lb`.
async fn connect_from(from: &str, lb: SocketAddr) -> TcpStream {
    let ip: IpAddr = from.parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip, 0)).unwrap();
    socket.connect(lb).await.unwrap()
}

/// Whether a connection from `from` is served: one byte echoed back.
async fn served(from: &str, lb: SocketAddr) -> Option<TcpStream> {
    let mut s = connect_from(from, lb).await;
    s.write_all(b"x").await.ok()?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
        Ok(Ok(1)) => Some(s),
        Ok(_) => None, // closed (or reset) by tcplb
        Err(_) => panic!("neither served nor closed within 5 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_are_capped_and_others_are_unaffected() {
    let (echo, _e) = echo_backend().await;
    let mut l = listener(&[echo]);
    l.max_connections_per_client = Some(2);
    let lb = start(with_admin(l)).await;

    let a1 = served("127.0.0.2", lb.addr).await.expect("first");
    let _a2 = served("127.0.0.2", lb.addr).await.expect("second");
    assert!(served("127.0.0.2", lb.addr).await.is_none(), "a third from the same client is closed");
    // Other clients are not held back by 127.0.0.2's share.
    let _b = served("127.0.0.3", lb.addr).await.expect("another client");
    let _c = served("127.0.0.4", lb.addr).await.expect("and another");
    // A closed connection gives its slot back.
    drop(a1);
    let mut again = None;
    for _ in 0..50 {
        again = served("127.0.0.2", lb.addr).await;
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the client's slot came back");

    let m = scrape(lb.admin.unwrap()).await;
    let limited = get(
        &m,
        "tcplb_limited_connections_total",
        &[("listener", "test"), ("limit", "client_connections")],
    );
    assert!(limited >= 1.0, "{limited}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_client_follow_a_token_bucket() {
    let (echo, _e) = echo_backend().await;
    let mut l = listener(&[echo]);
    l.connection_rate_per_client = Some("5/s".parse().unwrap());
    let lb = start(with_admin(l)).await;

    let mut served_now = 0;
    for _ in 0..10 {
        served_now += served("127.0.0.5", lb.addr).await.is_some() as usize;
    }
    // A burst of one second's worth, plus what refilled while it ran.
    assert!((5..=7).contains(&served_now), "{served_now} of 10 served");
    assert!(served("127.0.0.6", lb.addr).await.is_some(), "another client has its own bucket");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(served("127.0.0.5", lb.addr).await.is_some(), "the bucket refills");

    let m = scrape(lb.admin.unwrap()).await;
    let limited = get(
        &m,
        "tcplb_limited_connections_total",
        &[("listener", "test"), ("limit", "client_rate")],
    );
    assert!(limited >= 3.0, "{limited}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_holds_at_most_its_own_max_connections() {
    let (echo, _e) = echo_backend().await;
    let mut small = listener(&[echo]);
    small.name = "small".into();
    small.max_connections = Some(3);
    let mut other = listener(&[echo]);
    other.name = "other".into();
    let mut config = tcplb::config::Config::single(small);
    config.listeners.push(other);
    let lb = start(config).await;
    let (small, other) = (lb.addrs[0], lb.addrs[1]);

    let mut held = Vec::new();
    for n in 2..5 {
        held.push(
            served(&format!("127.0.0.{n}"), small).await.expect("within the listener's limit"),
        );
    }
    assert!(served("127.0.0.9", small).await.is_none(), "the fourth is closed");
    assert!(served("127.0.0.9", other).await.is_some(), "the other listener is unaffected");
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(served("127.0.0.9", small).await.is_some(), "a slot came back");
}

#[test]
fn limits_in_a_file_and_their_mistakes() {
    let file = "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:1\"]\n\
                max_connections = 100\nmax_connections_per_client = 4\nconnection_rate_per_client = \"20/s\"\n";
    let c = tcplb::config::file::parse(file, "t.toml").unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.max_connections, Some(100));
    assert_eq!(l.max_connections_per_client, Some(4));
    assert_eq!(l.connection_rate_per_client.unwrap().to_string(), "20/1s");
    let bad = file.replace("\"20/s\"", "\"fast\"");
    let err = tcplb::config::file::parse(&bad, "t.toml").unwrap_err().0.join("\n");
    assert!(err.contains("bad rate 'fast'"), "{err}");
    let bad = file.replace("= 4", "= 0");
    let err = tcplb::config::file::parse(&bad, "t.toml").unwrap_err().0.join("\n");
    assert!(err.contains("max_connections_per_client must be a whole number from 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_flags_of_the_binary() {
    let echo = thread_echo_server();
    let (_child, rx) = spawn_logged(
        std::process::Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--upstream", &echo.to_string()])
            .args(["--max-connections-per-client", "1", "--connection-rate-per-client", "100/s"])
            .args(["--health-check", "none"]),
    );
    let lb: SocketAddr = wait_listening(&rx).parse().unwrap();
    let _held = served("127.0.0.7", lb).await.expect("the first connection");
    assert!(served("127.0.0.7", lb).await.is_none(), "a second from the same client is closed");
    assert!(served("127.0.0.8", lb).await.is_some(), "another client is served");
    let line = wait_line(&rx, "over its share limit");
    assert!(line.contains("client_connections") && line.contains("127.0.0.7"), "{line}");

    let bad = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"])
        .args(["--connection-rate-per-client", "often"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad rate 'often'"));
}
