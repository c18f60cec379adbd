//! Routes over real TLS: `openssl s_server` backends, each with a
//! certificate of its own name, and real TLS clients (Python's ssl module,
//! `openssl s_client -servername`) going through tcplb, which reads the
//! ClientHello without terminating TLS. Which backend a client reached is
//! the name on the certificate it was shown: tcplb forwarded the handshake
//! unchanged. Plaintext HTTP goes by Host to scripted backends.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TLS client: connects to HOST PORT with server name SNI ("" for none),
/// completes the handshake, and prints the certificate's name it was shown
/// (one of NAMES) and the ALPN protocol chosen. With `bytewise`, the
/// ClientHello goes out one byte per TCP segment.
const CLIENT: &str = r#"
import socket, ssl, sys, time
host, port, sni, mode, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2", "http/1.1"])
sock = socket.create_connection((host, port), timeout=10)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni or None)
first = True
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        data = outgoing.read()
        if first and mode == "bytewise":
            for b in data:
                sock.send(bytes([b]))
                time.sleep(0.001)
        elif data:
            sock.sendall(data)
        first = False
        got = sock.recv(65536)
        if not got:
            print("closed")
            sys.exit(0)
        incoming.write(got)
sock.sendall(outgoing.read())
der = tls.getpeercert(binary_form=True)
print(next((n for n in names if n.encode() in der), "unknown"), tls.selected_alpn_protocol())
"#;

const NAMES: [&str; 3] = ["api.example.com", "www.example.com", "fallback.example.com"];

/// Runs [`CLIENT`] against `lb` and returns its one line.
async fn tls_client(lb: SocketAddr, sni: &str, mode: &str) -> String {
    let (sni, mode) = (sni.to_string(), mode.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("python3")
            .args(["-c", CLIENT, "127.0.0.1", &lb.port().to_string(), &sni, &mode])
            .args(NAMES)
            .output()
            .expect("python3");
        assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
    .await
    .unwrap()
}

fn skip() -> bool {
    let ok =
        have_openssl() && Command::new("python3").arg("-V").stdout(Stdio::null()).status().is_ok();
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "openssl or python3 missing in CI");
        eprintln!("\n*** SKIPPED: routes tests need openssl and python3 ***\n");
    }
    !ok
}

/// Three TLS backends, each showing the certificate of one of [`NAMES`]
/// (read when they start: their directory goes when this returns).
fn tls_backends(what: &str) -> (Vec<Proc>, Vec<SocketAddr>) {
    let tmp = tempdir(what);
    let dir = tmp.path();
    let (mut procs, mut addrs) = (Vec::new(), Vec::new());
    for name in NAMES {
        make_cert(dir, name);
        let (p, a) = s_server(dir, name, &["-alpn", "h2,http/1.1"]);
        procs.push(p);
        addrs.push(a);
    }
    (procs, addrs)
}

fn routed_config(b: &[SocketAddr], default_pool: bool) -> String {
    let default = if default_pool { format!("upstreams = [\"{}\"]", b[2]) } else { String::new() };
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "edge"
listen = "127.0.0.1:0"
{default}
[[listener.route]]
name = "api"
sni = ["api.example.com"]
upstreams = ["{api}"]
[[listener.route]]
name = "www"
sni = ["www.example.com", "*.web.example.com"]
http_host = ["www.example.com"]
upstreams = ["{www}"]
"#,
        api = b[0],
        www = b[1],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_are_routed_by_server_name_without_terminating_tls() {
    if skip() {
        return;
    }
    let (_procs, b) = tls_backends("routes-sni");
    let config = tcplb::config::file::parse(&routed_config(&b, true), "edge.toml").unwrap();
    let lb = start(config).await;

    assert_eq!(tls_client(lb.addr, "api.example.com", "whole").await, "api.example.com h2");
    assert_eq!(tls_client(lb.addr, "API.Example.com", "whole").await, "api.example.com h2");
    assert_eq!(tls_client(lb.addr, "x.web.example.com", "whole").await, "www.example.com h2");
    assert_eq!(
        tls_client(lb.addr, "a.b.web.example.com", "whole").await,
        "fallback.example.com h2"
    );
    assert_eq!(tls_client(lb.addr, "other.org", "whole").await, "fallback.example.com h2");
    assert_eq!(tls_client(lb.addr, "", "whole").await, "fallback.example.com h2", "no SNI");
    // The ClientHello one byte per segment: put back together, same route.
    assert_eq!(tls_client(lb.addr, "api.example.com", "bytewise").await, "api.example.com h2");

    // openssl's own client, as an operator would try it.
    let port = lb.addr.port();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "www.example.com"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CN = www.example.com") || text.contains("CN=www.example.com"), "{text}");

    let m = scrape(lb.admin.unwrap()).await;
    let routed = |route: &str| {
        get(&m, "tcplb_routed_connections_total", &[("listener", "edge"), ("route", route)])
    };
    assert_eq!(routed("api"), 3.0);
    assert_eq!(routed("www"), 2.0);
    assert_eq!(routed("default"), 3.0);

    // The status page and the admin drain know a route as listener edge/api.
    let admin = lb.admin.unwrap();
    let (code, status) = http_request(admin, "GET", "/status", "").await;
    assert_eq!(code, 200);
    assert!(status.contains("\"edge/api\"") && status.contains(&b[0].to_string()), "{status}");
    let drain = format!("/backends/drain?listener=edge/api&backend={}", b[0]);
    let (code, body) = http_request(admin, "POST", &drain, "").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("draining"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_goes_by_host_and_the_unmatched_are_closed_and_counted() {
    if skip() {
        return;
    }
    let (_procs, b) = tls_backends("routes-host");
    let (web, _w) = tag_backend("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nwww").await;
    // The www route's TLS backend swapped for a plaintext web server.
    let text = routed_config(&[b[0], web, b[2]], false);
    let config = tcplb::config::file::parse(&text, "edge.toml").unwrap();
    let lb = start(config).await;

    let ask = |host: &'static str| async move {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(ask("www.example.com:80").await.ends_with("www"));
    // No route and no default pool: an HTTP client hears 503, a TLS one a close.
    assert!(ask("nowhere.example.com").await.starts_with("HTTP/1.1 503"));
    assert_eq!(tls_client(lb.addr, "nowhere.example.com", "whole").await, "closed");
    assert_eq!(tls_client(lb.addr, "api.example.com", "whole").await, "api.example.com h2");

    let m = scrape(lb.admin.unwrap()).await;
    assert_eq!(get(&m, "tcplb_unrouted_connections_total", &[("listener", "edge")]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_routes_and_established_connections_keep_their_backend() {
    let (a, _a) = tag_backend("A").await;
    let (echo, _e) = echo_backend().await;
    let (c, _c) = tag_backend("C").await;
    let text = |target: SocketAddr| {
        format!(
            "[[listener]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\nupstreams = [\"{a}\"]\n\
             [[listener.route]]\nname = \"svc\"\nhttp_host = [\"svc.example.com\"]\nupstreams = [\"{target}\"]\n"
        )
    };
    let lb = start(tcplb::config::file::parse(&text(echo), "t.toml").unwrap()).await;
    let head = b"PUT /k HTTP/1.1\r\nHost: svc.example.com\r\nContent-Length: 5\r\n\r\n";
    // An established connection to the echo backend, through the route.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let mut back = vec![0u8; head.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, head);

    // Point the route at C, keeping the listen address.
    let mut next = tcplb::config::file::parse(&text(c), "t.toml").unwrap();
    next.listeners[0].listen = vec![lb.addr];
    lb.handle.reload(next).await.expect("reload");
    s.write_all(b"hello").await.unwrap();
    let mut rest = [0u8; 5];
    s.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"hello", "the old connection still reaches its backend");

    let mut n = TcpStream::connect(lb.addr).await.unwrap();
    n.write_all(b"GET / HTTP/1.1\r\nHost: svc.example.com\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    n.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"C");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_flag_and_a_slow_or_silent_client() {
    if skip() {
        return;
    }
    let (_procs, b) = tls_backends("routes-cli");
    let (_child, rx) = spawn_logged(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--upstream", &b[2].to_string()])
            .args(["--route", &format!("api.example.com={}", b[0])])
            .args(["--route", &format!("*.example.com={}", b[1])])
            .args(["--peek-timeout", "300ms", "--health-check", "none"]),
    );
    let lb: SocketAddr = wait_listening(&rx).parse().unwrap();
    assert_eq!(tls_client(lb, "api.example.com", "whole").await, "api.example.com h2");
    assert_eq!(tls_client(lb, "mail.example.com", "whole").await, "www.example.com h2");
    let line = wait_line(&rx, "route=\"*.example.com\"");
    assert!(
        line.contains("sni=\"mail.example.com\"") || line.contains("sni=mail.example.com"),
        "{line}"
    );
    assert!(line.contains("alpn="), "{line}");

    // A client that says nothing goes to the default pool after the peek
    // timeout, and what it sends later reaches that backend unchanged: here
    // a TLS alert, which s_server answers with one of its own.
    let started = Instant::now();
    let mut s = TcpStream::connect(lb).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"\x15\x03\x03\x00\x02\x02\x28").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(out, b"\x15\x03\x03\x00\x02\x02\x0a", "the backend's own alert came back");
    drop(s);
    let line = wait_line(&rx, "route=\"default\"");
    assert!(line.contains(&b[2].to_string()) && line.contains("sent=7"), "{line}");
}
