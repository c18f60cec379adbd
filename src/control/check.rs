//! What a health probe says to a backend and what it must hear back, per
//! protocol. Each dialogue runs on a connected stream (after the PROXY
//! header, when one is sent) and returns Ok with a short description or
//! Err with the reason, both for the log and the status page. A backend
//! that accepts and closes at once, or answers something else, fails.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::HealthCheck;
use crate::conn::tls;
use crate::io::describe_io;

/// Most of an answer read before giving up on finding what was expected.
const ANSWER_LIMIT: usize = 4096;

/// How long a `tcp` probe waits, once connected, for a close or reset that
/// says the backend accepts connections only to drop them. A backend that
/// is merely quiet (a client-first protocol) passes once it is over.
const LINGER: Duration = Duration::from_millis(100);

/// A PostgreSQL SSLRequest: length 8, code 80877103.
const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Runs `check`'s dialogue on `stream`; `sni` is the `tls` probe's server
/// name. `timeout` bounds the `tcp` check's linger (the caller bounds the rest).
pub async fn converse(
    stream: &mut TcpStream,
    check: &HealthCheck,
    host: &str,
    sni: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    match check {
        HealthCheck::None => Ok("connect succeeded".into()),
        HealthCheck::Connect => linger(stream, LINGER.min(timeout / 2)).await,
        HealthCheck::Http { host: given, path } => {
            let host = given.as_deref().unwrap_or(host);
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tcplb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            );
            send(stream, request.as_bytes()).await?;
            let status = read_until(stream, 8192, http_status).await?;
            if (200..400).contains(&status) {
                Ok(format!("HTTP {status}"))
            } else {
                Err(format!("HTTP {status}"))
            }
        }
        HealthCheck::Redis => {
            send(stream, b"PING\r\n").await?;
            let line = read_until(stream, ANSWER_LIMIT, first_line).await?;
            redis_answer(&line)
        }
        HealthCheck::Postgres => {
            send(stream, &PG_SSL_REQUEST).await?;
            match read_until(stream, 1, |b| b.first().copied()).await? {
                b'S' => Ok("PostgreSQL (SSL offered)".into()),
                b'N' => Ok("PostgreSQL (no SSL)".into()),
                other => Err(format!("not PostgreSQL: answered {:?}", char::from(other))),
            }
        }
        HealthCheck::Mysql => read_until(stream, ANSWER_LIMIT, mysql_greeting).await?,
        HealthCheck::Smtp => {
            let greeting = read_until(stream, ANSWER_LIMIT, smtp_reply).await?;
            if !greeting.starts_with("220") {
                return Err(format!("SMTP greeting: {greeting}"));
            }
            // Polite: a server logs a dropped session as lost.
            let _ = stream.write_all(b"QUIT\r\n").await;
            Ok(format!("SMTP {greeting}"))
        }
        HealthCheck::Tls => {
            send(stream, &tls::probe_hello(sni)).await?;
            read_until(stream, 16 * 1024 + 5, tls::server_answer).await?
        }
        HealthCheck::Expect { send: bytes, expect } => {
            if !bytes.is_empty() {
                send(stream, bytes).await?;
            }
            read_until(stream, ANSWER_LIMIT, |b| contains(b, expect).then_some(()))
                .await
                .map_err(|e| format!("{e}; expected {}", show(expect)))?;
            Ok(format!("answer holds {}", show(expect)))
        }
    }
}

/// The `tcp` check after the connect: a close or reset within `wait` fails
/// it; silence or a greeting passes.
async fn linger(stream: &mut TcpStream, wait: Duration) -> Result<String, String> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut byte)).await {
        Err(_) | Ok(Ok(1..)) => Ok("connect succeeded".into()),
        Ok(Ok(0)) => Err("connection closed by the backend at once".into()),
        Ok(Err(e)) => Err(describe_io(&e)),
    }
}

async fn send(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    stream.write_all(bytes).await.map_err(|e| describe_io(&e))
}

/// Reads until `done` finds what it looks for in what has arrived, at most
/// `limit` bytes. A close before that fails, saying how much came.
async fn read_until<T>(
    stream: &mut TcpStream,
    limit: usize,
    done: impl Fn(&[u8]) -> Option<T>,
) -> Result<T, String> {
    let mut buf = Vec::with_capacity(limit.min(4096));
    loop {
        let mut chunk = [0u8; 2048];
        let room = (limit - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await.map_err(|e| describe_io(&e))?;
        if n == 0 {
            return Err(match buf.len() {
                0 => "connection closed before an answer".into(),
                _ => format!("connection closed after {}", show(&buf)),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(found) = done(&buf) {
            return Ok(found);
        }
        if buf.len() >= limit {
            return Err(format!("unexpected answer {}", show(&buf)));
        }
    }
}

/// The status of an HTTP response once its status line is whole.
fn http_status(buf: &[u8]) -> Option<u16> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(_) | Err(httparse::Error::TooManyHeaders) => resp.code,
        // Not HTTP: report it as an answer of status 0.
        Err(_) => Some(0),
    }
}

/// The first line, once its CRLF (or LF) has arrived.
fn first_line(buf: &[u8]) -> Option<String> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    Some(String::from_utf8_lossy(&buf[..end]).trim_end().to_string())
}

/// An SMTP reply, whole: the last line of a multi-line one (`220-...`)
/// is the one whose code is followed by a space.
fn smtp_reply(buf: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(buf);
    let mut lines = text.split_inclusive('\n');
    lines
        .find(|l| l.ends_with('\n') && l.as_bytes().get(3) != Some(&b'-'))
        .map(|l| l.trim_end().to_string())
}

fn redis_answer(line: &str) -> Result<String, String> {
    if line == "+PONG" {
        Ok("redis +PONG".into())
    } else if line.starts_with("-NOAUTH") || line.starts_with("-WRONGPASS") {
        // Up and speaking Redis; clients authenticate, the probe cannot.
        Ok(format!("redis requires AUTH ({line})"))
    } else if line.starts_with('-') {
        // -LOADING, -MASTERDOWN, -BUSY: up but not serving.
        Err(format!("redis {line}"))
    } else {
        Err(format!("not redis: {}", show(line.as_bytes())))
    }
}

/// MySQL's first packet, once whole: a handshake of protocol version 10,
/// or an error packet (a blocked host, too many connections).
fn mysql_greeting(buf: &[u8]) -> Option<Result<String, String>> {
    if buf.len() < 5 {
        return None;
    }
    let len = usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16;
    if len == 0 || len > ANSWER_LIMIT {
        return Some(Err(format!("not MySQL: {}", show(buf))));
    }
    let payload = buf.get(4..4 + len)?;
    Some(match payload[0] {
        10 => {
            let version = payload[1..].split(|&b| b == 0).next().unwrap_or_default();
            Ok(format!("MySQL {}", String::from_utf8_lossy(version)))
        }
        0xff if payload.len() > 3 => {
            let message =
                payload[3..].strip_prefix(b"#").map_or(&payload[3..], |m| &m[5.min(m.len())..]);
            Err(format!("MySQL error: {}", String::from_utf8_lossy(message)))
        }
        v => Err(format!("not MySQL protocol 10 (first byte {v})")),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Bytes for a message: text when printable, escaped otherwise, cut short.
fn show(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(64)];
    let text: String = cut.escape_ascii().to_string();
    if bytes.len() > cut.len() {
        format!("\"{text}\"...")
    } else {
        format!("\"{text}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_each_protocol_means_them() {
        assert!(redis_answer("+PONG").is_ok());
        assert!(redis_answer("-NOAUTH Authentication required.").is_ok());
        assert!(redis_answer("-LOADING Redis is loading the dataset in memory").is_err());
        assert!(redis_answer("HTTP/1.1 400 Bad Request").is_err());
        assert_eq!(smtp_reply(b"220-mail.example\r\n220 ready"), None);
        assert_eq!(smtp_reply(b"220-mail.example\r\n220 ready\r\n").as_deref(), Some("220 ready"));
        let mut greeting = vec![0u8, 0, 0, 0, 10];
        greeting.extend_from_slice(b"8.0.36\0rest");
        greeting[0] = (greeting.len() - 4) as u8;
        assert_eq!(mysql_greeting(&greeting), Some(Ok("MySQL 8.0.36".into())));
        assert_eq!(mysql_greeting(&greeting[..8]), None);
        let error = b"\x17\x00\x00\x00\xff\x6a\x04Host is blocked......";
        assert!(mysql_greeting(error).unwrap().unwrap_err().contains("Host is blocked"));
        assert_eq!(http_status(b"HTTP/1.1 204 No"), Some(204));
        assert_eq!(http_status(b"SSH-2.0-OpenSSH\r\n"), Some(0));
        assert_eq!(show(b"+PONG\r\n"), "\"+PONG\\r\\n\"");
    }
}
