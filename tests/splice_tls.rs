//! A download over TLS through a listener that routes by SNI: tcplb reads
//! the ClientHello, the backend's first bytes are its handshake, and the
//! body after it must still be recognized as bulk and spliced. Its own test
//! binary: it reads the process-wide `tcplb_spliced_bytes_total`, which
//! other tests splicing alongside would move.

mod common;

use std::time::Duration;

use common::*;

/// A TLS client that fetches PATH from an `openssl s_server -WWW` through
/// HOST PORT with server name SNI, and prints the body's length and SHA-256.
const TLS_GET: &str = r#"
import hashlib, socket, ssl, sys
host, port, sni, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with ctx.wrap_socket(socket.create_connection((host, port), timeout=20), server_hostname=sni) as s:
    s.sendall(f"GET /{path} HTTP/1.0\r\n\r\n".encode())
    data = bytearray()
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
body = bytes(data).split(b"\r\n\r\n", 1)[1]
print(len(body), hashlib.sha256(body).hexdigest())
"#;

/// A download over TLS routed by SNI: the backend's first bytes are its
/// handshake, and the body that follows is still recognized as bulk and
/// spliced, and arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_over_tls_routed_by_sni_is_spliced() {
    use std::process::{Command, Stdio};
    let python = Command::new("python3").arg("-V").stdout(Stdio::null()).status().is_ok();
    if !(have_openssl() && python) {
        assert!(std::env::var_os("CI").is_none(), "openssl or python3 missing in CI");
        eprintln!("\n*** SKIPPED: needs openssl and python3 ***\n");
        return;
    }
    const SIZE: usize = 8 << 20;
    let tmp = tempdir("splice-tls");
    let dir = tmp.path();
    make_cert(dir, "files.example.com");
    let body = random_bytes(SIZE, 11);
    std::fs::write(dir.join("big.bin"), &body).unwrap();
    let (_server, backend) = s_server(dir, "files.example.com", &["-WWW"]);
    let toml = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "edge"
listen = "127.0.0.1:0"
[[listener.route]]
name = "files"
sni = ["files.example.com"]
upstreams = ["{backend}"]
"#
    );
    let config = tcplb::config::file::parse(&toml, "edge.toml").unwrap();
    let lb = start(config).await;
    let admin = lb.admin.expect("admin endpoint");
    let spliced = |m: &Samples| get(m, "tcplb_spliced_bytes_total", &[]);
    let before = spliced(&scrape(admin).await);

    let port = lb.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", TLS_GET, "127.0.0.1", &port, "files.example.com", "big.bin"])
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    let digest = Command::new("sha256sum").arg(dir.join("big.bin")).output().unwrap();
    let digest = String::from_utf8_lossy(&digest.stdout);
    let want = format!("{SIZE} {}", digest.split_whitespace().next().unwrap());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "the body arrived changed");

    // The client may have read the last bytes before tcplb counted them.
    let mut moved = 0.0;
    for _ in 0..500 {
        moved = spliced(&scrape(admin).await) - before;
        if moved >= (SIZE / 2) as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(moved >= (SIZE / 2) as f64, "only {moved} of {SIZE} bytes spliced");
}
