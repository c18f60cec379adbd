//! The one place tcplb speaks HTTP: when no backend could be reached, it
//! looks at the client's first bytes and, if they are an HTTP/1.x request,
//! answers with a complete 502, 503 or 504 response instead of a silent close.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::io::{read_by, write_all};

/// Most bytes looked at to recognise a request line.
pub const PEEK_LIMIT: usize = 4096;
/// How long to keep reading (and discarding) after the response, so that the
/// close does not turn into a reset that destroys the response in flight.
const LINGER: Duration = Duration::from_millis(500);
/// Most bytes discarded while lingering.
const LINGER_LIMIT: usize = 256 * 1024;

/// The statuses tcplb synthesizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Backends refused or reset the connection.
    BadGateway,
    /// There was no backend to try at all.
    ServiceUnavailable,
    /// The last connect attempt timed out.
    GatewayTimeout,
    /// `http` mode: the client sent nothing within the peek timeout (as
    /// HAProxy answers a request that does not arrive in time).
    RequestTimeout,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::BadGateway => 502,
            Status::ServiceUnavailable => 503,
            Status::GatewayTimeout => 504,
            Status::RequestTimeout => 408,
        }
    }

    /// How the access log names a connection answered with this status.
    pub fn end(self) -> &'static str {
        match self {
            Status::BadGateway => "answered 502",
            Status::ServiceUnavailable => "answered 503",
            Status::GatewayTimeout => "answered 504",
            Status::RequestTimeout => "answered 408",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::BadGateway => "Bad Gateway",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::GatewayTimeout => "Gateway Timeout",
            Status::RequestTimeout => "Request Timeout",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Status::BadGateway => "502 Bad Gateway: no backend accepted the connection\n",
            Status::ServiceUnavailable => "503 Service Unavailable: no backend is available\n",
            Status::GatewayTimeout => "504 Gateway Timeout: no backend answered in time\n",
            Status::RequestTimeout => "408 Request Timeout: no request arrived in time\n",
        }
    }
}

/// The complete response bytes for `status`; without a body for HEAD.
pub fn response(status: Status, head_request: bool) -> Vec<u8> {
    let body = status.body();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        status.code(),
        status.reason(),
        body.len()
    );
    if status == Status::ServiceUnavailable {
        out.push_str("Retry-After: 1\r\n");
    }
    out.push_str("\r\n");
    if !head_request {
        out.push_str(body);
    }
    out.into_bytes()
}

/// What the first bytes of a client stream look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// A complete HTTP/1.x request line was seen.
    Http {
        /// The method is HEAD (the response must have no body).
        head: bool,
    },
    /// Definitely not HTTP/1.x.
    NotHttp,
    /// Could still be HTTP: more bytes are needed.
    NeedMore,
}

/// Classifies the first bytes of a client stream. Never panics.
pub fn sniff(buf: &[u8]) -> Sniff {
    // Only the request line decides, and it is parsed before any header:
    // with no room for headers, the first one ends the parse
    // (TooManyHeaders, after the line), and no header array is zeroed for
    // every request.
    sniff_with(buf, &mut [])
}

/// [`sniff`], parsing with room for `headers`, which do not change the verdict.
fn sniff_with<'b>(buf: &'b [u8], headers: &mut [httparse::Header<'b>]) -> Sniff {
    let mut req = httparse::Request::new(headers);
    let parsed = req.parse(buf);
    let line_seen = req.version.is_some();
    let head = req.method == Some("HEAD");
    match parsed {
        Ok(_) if line_seen => Sniff::Http { head },
        Err(httparse::Error::TooManyHeaders) if line_seen => Sniff::Http { head },
        Ok(_) if buf.len() >= PEEK_LIMIT => Sniff::NotHttp,
        Ok(_) => Sniff::NeedMore,
        // A malformed header after a valid request line is still an HTTP client.
        Err(_) if line_seen => Sniff::Http { head },
        Err(_) => Sniff::NotHttp,
    }
}

/// What a client had sent by the time it was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// A complete HTTP/1.x request line.
    Http {
        /// The method is HEAD.
        head: bool,
    },
    /// The start of what may be a request line, then nothing more.
    Partial,
    /// Nothing at all.
    Silent,
    /// Bytes that are certainly not HTTP/1.x.
    NotHttp,
}

/// Reads the client's first bytes (consuming them: the connection is about to
/// be closed anyway) until they are recognised, `PEEK_LIMIT` is reached, the
/// client stops sending, or `deadline` passes. `held` is what was already read.
pub async fn sniff_client(client: &TcpStream, held: &[u8], deadline: Instant) -> Peek {
    let mut buf = Vec::with_capacity(PEEK_LIMIT);
    buf.extend_from_slice(&held[..held.len().min(PEEK_LIMIT)]);
    // On the heap: a stack array would live in every connection's future.
    let mut chunk = vec![0u8; 1024];
    loop {
        match sniff(&buf) {
            Sniff::NeedMore => {}
            Sniff::Http { head } => return Peek::Http { head },
            Sniff::NotHttp => return Peek::NotHttp,
        }
        let room = (PEEK_LIMIT - buf.len()).min(chunk.len());
        match read_by(client, &mut chunk[..room], deadline).await {
            Some(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            // EOF, error or timeout with the request line still incomplete.
            _ if buf.is_empty() => return Peek::Silent,
            _ => return Peek::Partial,
        }
    }
}

/// Sends `status` in full, half-closes, and drains the client briefly so that
/// the kernel does not reset the response away.
pub async fn respond(client: &TcpStream, status: Status, head_request: bool) -> io::Result<()> {
    write_all(client, &response(status, head_request)).await?;
    socket2::SockRef::from(client).shutdown(std::net::Shutdown::Write)?;
    let deadline = Instant::now() + LINGER;
    let mut discarded = 0;
    let mut chunk = vec![0u8; 4096];
    while discarded < LINGER_LIMIT {
        match read_by(client, &mut chunk, deadline).await {
            Some(n) if n > 0 => discarded += n,
            _ => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recognises_requests() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Sniff::Http { head: false });
        assert_eq!(sniff(b"HEAD /x HTTP/1.0\r\n"), Sniff::Http { head: true });
        assert_eq!(sniff(b"POST /upload HTTP/1.1\r\nContent-Le"), Sniff::Http { head: false });
        assert_eq!(sniff(b"GET / HT"), Sniff::NeedMore);
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"*2\r\n$3\r\nGET\r\n"), Sniff::NotHttp);
        assert_eq!(sniff(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), Sniff::NotHttp);
        assert_eq!(sniff(b"GET / HTTP/2.0\r\n"), Sniff::NotHttp);
    }

    #[test]
    fn oversized_garbage_is_not_http() {
        assert_eq!(sniff(&[b'A'; PEEK_LIMIT]), Sniff::NotHttp);
    }

    #[test]
    fn responses_are_well_formed() {
        for (status, head) in [
            (Status::BadGateway, false),
            (Status::ServiceUnavailable, false),
            (Status::GatewayTimeout, true),
        ] {
            let bytes = response(status, head);
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(len) = resp.parse(&bytes).unwrap() else {
                panic!("incomplete response")
            };
            assert_eq!(resp.code, Some(status.code()));
            let header = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
            };
            let cl: usize = header("content-length").unwrap().parse().unwrap();
            assert_eq!(cl, status.body().len());
            assert_eq!(bytes.len() - len, if head { 0 } else { cl });
            assert_eq!(header("connection").as_deref(), Some("close"));
            assert!(header("content-type").unwrap().starts_with("text/plain"));
            assert_eq!(header("retry-after").is_some(), status == Status::ServiceUnavailable);
        }
    }

    /// `sniff` as it was, with room for 64 headers.
    fn sniff_with_headers(buf: &[u8]) -> Sniff {
        sniff_with(buf, &mut [httparse::EMPTY_HEADER; 64])
    }

    proptest! {
        #[test]
        fn sniff_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let _ = sniff(&bytes);
        }

        #[test]
        fn sniff_says_what_a_parse_with_room_for_headers_says(
            line in "(GET|HEAD|PUT|POST|BREW|G\\x00T) [ -~]{0,20} HTTP/1\\.[01]\\r\\n",
            headers in proptest::collection::vec("[A-Za-z-]{1,12}: [ -~]{0,20}\\r\\n", 0..4),
            end in "(\\r\\n)?",
            cut in 0usize..200,
            noise in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut bytes = [line, headers.concat(), end].concat().into_bytes();
            bytes.truncate(cut.min(bytes.len()));
            bytes.extend_from_slice(&noise);
            prop_assert_eq!(sniff(&bytes), sniff_with_headers(&bytes));
        }

        #[test]
        fn any_request_line_is_http(method in "GET|PUT|POST|DELETE|OPTIONS", path in "/[a-z0-9/]{0,40}") {
            let line = format!("{method} {path} HTTP/1.1\r\n");
            prop_assert_eq!(sniff(line.as_bytes()), Sniff::Http { head: false });
        }
    }
}
