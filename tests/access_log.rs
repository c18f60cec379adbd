//! Access log events (JSON for log shippers), `--access-log off`, and the
//! generated completions and man page, through the binary.

mod common;

use common::{spawn_logged, wait_line, Proc, BIN};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// Starts tcplb with JSON logs; returns it, its listen address and its log lines.
fn start(upstream: &str, extra: &[&str]) -> (Proc, String, Receiver<serde_json::Value>) {
    let (child, lines) = spawn_logged(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream, "--health-check", "none"])
            .args(["--log-format", "json"])
            .args(extra)
            .env_remove("RUST_LOG"),
    );
    let start: serde_json::Value =
        serde_json::from_str(&wait_line(&lines, "\"tcplb listening\"")).expect("a JSON line");
    // List fields are JSON arrays, not strings that look like lists.
    assert_eq!(start["backends"], serde_json::json!([upstream]), "{start}");
    let listen = start["listen"][0].as_str().expect("listen is an array of addresses").to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(&line).expect("every log line is JSON");
            let _ = tx.send(v);
        }
    });
    (child, listen, rx)
}

fn one_exchange(addr: &str) -> std::net::SocketAddr {
    let mut c = TcpStream::connect(addr).unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(b"hello").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"hello");
    me
}

#[test]
fn one_json_access_event_per_connection() {
    let backend = common::thread_echo_server().to_string();
    let (_p, addr, logs) = start(&backend, &[]);
    let me = one_exchange(&addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    let event = loop {
        let v = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("access event");
        if v["target"] == "tcplb::access" {
            break v;
        }
    };
    assert_eq!(event["level"], "INFO");
    assert_eq!(event["listener"], "default");
    assert_eq!(event["client"], me.to_string());
    assert_eq!(event["backend"], backend);
    assert_eq!(event["sent"], 5);
    assert_eq!(event["received"], 5);
    assert_eq!(event["end"], "client closed");
    assert!(event["duration_ms"].is_u64());
}

#[test]
fn access_log_off() {
    let backend = common::thread_echo_server().to_string();
    let (_p, addr, logs) = start(&backend, &["--access-log", "off"]);
    one_exchange(&addr);
    one_exchange(&addr);
    // Longer than access lines may wait for the log writer (a second).
    std::thread::sleep(Duration::from_millis(1500));
    while let Ok(v) = logs.try_recv() {
        assert_ne!(v["target"], "tcplb::access", "{v}");
    }
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("upstream") && text.contains("connect-timeout"), "{shell}");
    }
    let out = Command::new(BIN).arg("manpage").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(man.contains(".TH tcplb 1") && man.contains("upstream"));
    let out = Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
