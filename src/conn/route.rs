//! Choosing a route: the client's first bytes are read (and kept, to be
//! forwarded unchanged) until they are a whole TLS ClientHello, the head of
//! a plaintext HTTP/1 request, or plainly neither; then the ClientHello's
//! server name, or the request's Host, picks the route. Waiting is bounded
//! by the listener's `peek_timeout` and costs no CPU: each read waits for
//! readiness, and a client that sends nothing more is simply not read again
//! until it does or the deadline passes.

use std::pin::Pin;

use tokio::net::TcpStream;

use crate::config::route::{self, RouteConfig};
use crate::conn::http::{self, Sniff};
use crate::conn::tls::{self, Hello};
use crate::conn::watch::{Alarm, Watch};
use crate::io::{read_some, with_scratch};

/// Most bytes read to decide: a ClientHello of many extensions, or a
/// request head with large cookies.
pub const LIMIT: usize = tls::MAX_HELLO;

/// Most bytes one read takes: a whole ClientHello, or a request head,
/// nearly always.
const READ: usize = 4096;

/// What the client's first bytes said, and where they go.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The index of the route in the listener's routes; None: the default pool.
    pub route: Option<usize>,
    /// The ClientHello's server name.
    pub sni: Option<String>,
    /// The ClientHello's ALPN protocols, comma-separated.
    pub alpn: Option<String>,
    /// The plaintext request's Host (without a port).
    pub host: Option<String>,
    /// The client half-closed while being read.
    pub ended: bool,
    /// The bytes read are a whole TLS ClientHello.
    pub tls: bool,
}

/// What a prefix of the client's bytes is.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    NeedMore,
    Tls { sni: Option<String>, alpn: Vec<String> },
    Http { host: Option<String> },
    Other,
}

/// Reads the client's first bytes into `early` until a route is chosen,
/// the deadline `watch` keeps passes, or the client stops sending; None
/// when the drain deadline passed first.
pub async fn choose(
    client: &TcpStream,
    routes: &[RouteConfig],
    early: &mut Vec<u8>,
    mut watch: Pin<&mut Watch<'_>>,
) -> Option<Choice> {
    let mut choice = Choice::default();
    let seen = loop {
        match classify(early) {
            Seen::NeedMore if early.len() < LIMIT => {}
            Seen::NeedMore => break Seen::Other,
            seen => break seen,
        }
        let room = (LIMIT - early.len()).min(READ);
        let read = loop {
            tokio::select! {
                biased;
                ready = client.readable() => if ready.is_err() { break None },
                alarm = watch.as_mut() => match alarm {
                    Alarm::Deadline => break None,
                    Alarm::Drain => return None,
                },
            }
            // Into the worker's scratch, then copied: `early` is then
            // allocated at the size the client sent (a ClientHello is some
            // 500 bytes), which glibc serves from its per-thread cache,
            // where a buffer of READ bytes bypasses it. A short read clears
            // the readiness, so the byte pump's first read after a whole
            // ClientHello waits instead of failing.
            match with_scratch(|scratch| {
                let got = read_some(client, &mut scratch[..room]);
                if let Ok(Some(n)) = got {
                    early.extend_from_slice(&scratch[..n]);
                }
                got
            }) {
                Ok(Some(n)) => break Some(n),
                Ok(None) => {}
                Err(_) => break None,
            }
        };
        match read {
            Some(0) => {
                choice.ended = true;
                break classify_final(early);
            }
            Some(_) => {}
            // Timeout or a failed read: the default pool, with what came.
            None => break classify_final(early),
        }
    };
    match seen {
        Seen::Tls { sni, alpn } => {
            choice.route = sni.as_deref().and_then(|name| route::by_sni(routes, name));
            choice.sni = sni;
            choice.alpn = (!alpn.is_empty()).then(|| alpn.join(","));
            choice.tls = true;
        }
        Seen::Http { host } => {
            choice.route = host.as_deref().and_then(|h| route::by_host(routes, h));
            choice.host = host;
        }
        Seen::NeedMore | Seen::Other => {}
    }
    Some(choice)
}

fn classify(buf: &[u8]) -> Seen {
    match buf.first() {
        None => Seen::NeedMore,
        Some(22) => match tls::client_hello(buf) {
            Hello::Incomplete => Seen::NeedMore,
            Hello::NotTls => Seen::Other,
            Hello::Complete { sni, alpn } => Seen::Tls { sni, alpn },
        },
        Some(_) => match http::sniff(buf) {
            Sniff::NotHttp => Seen::Other,
            Sniff::NeedMore | Sniff::Http { .. } => match host(buf) {
                Some(found) => Seen::Http { host: found },
                None => Seen::NeedMore,
            },
        },
    }
}

/// What is left to say when no more bytes will come.
fn classify_final(buf: &[u8]) -> Seen {
    match classify(buf) {
        Seen::NeedMore => Seen::Other,
        seen => seen,
    }
}

/// The Host of a request head, once the head is whole (`Some(None)`: a
/// whole head without a Host, or one that is not valid HTTP).
fn host(buf: &[u8]) -> Option<Option<String>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(None),
    }
    let Some(value) = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
    else {
        return Some(None);
    };
    let value = value.trim();
    // Without the port: `example.com:8080`, `[2001:db8::1]:443`.
    let name = match value.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => value,
    };
    Some(Some(name.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_heads_give_their_host() {
        let seen = |b: &[u8]| classify(b);
        assert_eq!(
            seen(b"GET / HTTP/1.1\r\nHost: WWW.example.com:8080\r\n\r\n"),
            Seen::Http { host: Some("www.example.com".into()) }
        );
        assert_eq!(seen(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n"), Seen::NeedMore);
        assert_eq!(seen(b"GET / HTTP/1.0\r\n\r\n"), Seen::Http { host: None });
        assert_eq!(seen(b"SSH-2.0-OpenSSH\r\n"), Seen::Other);
        assert_eq!(seen(b"*1\r\n$4\r\nPING\r\n"), Seen::Other);
        assert_eq!(classify_final(b"GET / HTTP/1.1\r\nHo"), Seen::Other);
    }

    /// Whether the reactor would be asked before `s` is read again: false
    /// when tokio still holds a readiness for it, which the next read of
    /// the byte pump would pay for with a recv that fails with EAGAIN.
    fn waits_for_the_reactor(s: &TcpStream) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let ready = std::pin::pin!(s.readable());
        std::future::Future::poll(ready, &mut cx).is_pending()
    }

    #[tokio::test]
    async fn a_hello_read_whole_leaves_no_stale_readiness() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (client, _) = l.accept().await.unwrap();
        let hello = tls::probe_hello(Some("api.example.com"));
        peer.write_all(&hello).await.unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let watch = std::pin::pin!(Watch::new(&token));
        let mut early = Vec::new();
        let choice = choose(&client, &[], &mut early, watch).await.unwrap();
        assert_eq!(choice.sni.as_deref(), Some("api.example.com"));
        assert_eq!(early, hello);
        assert!(waits_for_the_reactor(&client), "a short read must clear tokio's readiness");
        // And the next bytes are seen all the same.
        peer.write_all(b"more").await.unwrap();
        client.readable().await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(client.try_read(&mut buf).unwrap(), 4);
    }

    proptest! {
        #[test]
        fn any_bytes_are_classified_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4000)) {
            let _ = classify(&bytes);
            let _ = classify_final(&bytes);
        }
    }
}
