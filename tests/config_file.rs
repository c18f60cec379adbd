//! The configuration file through the binary: --check, error positions,
//! usage errors, and SIGHUP reload.

mod common;

use common::spawn_logged;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tcplb");

/// `text` in a file `name` of a directory of its own, removed when the
/// directory is dropped.
fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = common::tempdir("test");
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn the_annotated_example_passes_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/tcplb.toml");
    let out = Command::new(BIN).args(["--config", example, "--check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (3 listener(s))"));
}

/// `--check` is a preflight, as `nginx -t` and `haproxy -c`: what would
/// stop the start is found without starting, all at once, and nothing is bound.
#[test]
fn check_resolves_reads_and_finds_clashes_without_binding() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (_dir, path) = temp_file(
        "preflight.toml",
        &format!(
            "[admin]\nlisten = \"{taken}\"\ntoken_file = \"/nonexistent/token\"\n\
             [[listener]]\nname = \"a\"\nlisten = \"{taken}\"\nupstreams = [\"no-such-host.invalid:80\"]\n"
        ),
    );
    let out =
        Command::new(BIN).args(["--config", path.to_str().unwrap(), "--check"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in ["no-such-host.invalid", "/nonexistent/token", "already takes"] {
        assert!(stderr.contains(needle), "no problem naming {needle:?} in: {stderr}");
    }
    // Nothing was bound: the address is still free.
    drop(TcpListener::bind(taken).expect("--check left the address bound"));
}

/// Unknown keys and wrong types are all reported, in line order, with a
/// did-you-mean; an upstream table is a table, not a string in disguise.
#[test]
fn check_lists_every_unknown_key_and_wrong_type_in_line_order() {
    let (_dir, path) = temp_file(
        "shape.toml",
        "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:1\"]\n\
         conect_timeout = \"1s\"\nconnect_attempts = \"3\"\n[listener.health]\nrize = 2\n",
    );
    let out =
        Command::new(BIN).args(["--config", path.to_str().unwrap(), "--check"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].contains(":5:1: unknown key 'conect_timeout'")
            && lines[0].contains("did you mean 'connect_timeout'"),
        "{stderr}"
    );
    assert!(
        lines[1].contains(":6:") && lines[1].contains("'connect_attempts' must be an integer"),
        "{stderr}"
    );
    assert!(
        lines[2].contains(":8:1: unknown key 'rize'") && lines[2].contains("'rise'"),
        "{stderr}"
    );

    let (_dir, path) = temp_file(
        "table.toml",
        "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n\
         upstreams = [{ address = \"127.0.0.1:9011,backup,weight=7\" }]\n",
    );
    let out =
        Command::new(BIN).args(["--config", path.to_str().unwrap(), "--check"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be HOST:PORT alone"), "{stderr}");
}

#[test]
fn check_prints_every_problem_with_its_position() {
    let (_dir, path) = temp_file(
        "bad.toml",
        "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstreams = [\"b:1,weight=0\"]\nstrategy = \"fastest\"\n[listener.health]\nfall = 0\n",
    );
    let out =
        Command::new(BIN).args(["--config", path.to_str().unwrap(), "--check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(stderr.contains(&format!("{p}:4:14: upstream weight '0'")), "{stderr}");
    assert!(stderr.contains(&format!("{p}:5:12: strategy 'fastest'")), "{stderr}");
    assert!(stderr.contains(&format!("{p}:7:8: fall must be")), "{stderr}");
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
}

#[test]
fn unknown_key_and_syntax_error() {
    let (_dir, path) =
        temp_file("unknown.toml", "[[listener]]\nname = \"a\"\nlistn = \"127.0.0.1:1\"\n");
    let out =
        Command::new(BIN).args(["--config", path.to_str().unwrap(), "--check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":3:1:") && stderr.contains("listn"), "{stderr}");

    let (_dir, path) = temp_file("syntax.toml", "[[listener]\n");
    let out = Command::new(BIN).args(["--config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":1:"));
}

#[test]
fn mixing_config_and_listener_flags_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["--config", "x.toml", "--upstream", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--config") && stderr.contains("--upstream"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1);
}

fn tag_server(tag: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(tag);
        }
    });
    addr
}

fn fetch(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn listener_file(addr: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"svc\"\nlisten = \"{addr}\"\nupstreams = [\"{upstream}\"]\n[listener.health]\ncheck = \"none\"\n"
    )
}

#[test]
fn sighup_reloads_and_an_invalid_file_keeps_the_old_config() {
    let a = tag_server(b"A");
    let b = tag_server(b"B");
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (_dir, path) = temp_file("hup.toml", &listener_file(addr, a));
    let (child, rx) = spawn_logged(
        Command::new(BIN).args(["--config", path.to_str().unwrap()]).env_remove("RUST_LOG"),
    );
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needle:?}"),
            }
        }
    };
    wait_for("tcplb listening");
    assert_eq!(fetch(addr), b"A");

    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .unwrap()
            .success())
    };
    std::fs::write(&path, listener_file(addr, b)).unwrap();
    hup();
    wait_for("reload applied");
    assert_eq!(fetch(addr), b"B");

    std::fs::write(&path, "[[listener]]\nname = \"svc\"\nlisten = \"nope\"\n").unwrap();
    hup();
    let line = wait_for("is not an address");
    assert!(line.contains(":3:"), "{line}");
    wait_for("reload rejected");
    assert_eq!(fetch(addr), b"B", "the running configuration stays");
}
