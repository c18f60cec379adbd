//! The PROXY protocol (HAProxy's spec, versions 1 and 2): encoding the header
//! tcplb sends to backends, and decoding the one a load balancer in front
//! sends to tcplb.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::ProxyVersion;

/// The 12-byte signature that starts a v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (from the spec).
pub const V1_MAX: usize = 107;
/// Longest v2 header accepted (16-byte preamble plus address block and TLVs).
pub const V2_MAX: usize = 16 + 4096;

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The original client; None for UNKNOWN (v1) or LOCAL/UNSPEC (v2).
    pub source: Option<SocketAddr>,
    /// The address the client connected to.
    pub destination: Option<SocketAddr>,
}

/// Why a header was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Neither the v1 nor the v2 signature.
    #[error("no PROXY header")]
    Missing,
    /// The header is malformed.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// Result of looking at the first bytes of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A complete header of `len` bytes.
    Header {
        /// The decoded header.
        header: ProxyHeader,
        /// Its length in bytes.
        len: usize,
    },
}

/// Encodes the header for a connection from `source` to `destination`.
/// Mixed families (an IPv4 client on an IPv6 socket) are sent as IPv6 with
/// the IPv4 address mapped.
pub fn encode(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(source, destination);
    match version {
        ProxyVersion::V1 => encode_v1(src, dst),
        ProxyVersion::V2 => encode_v2(src, dst),
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let six = |s: SocketAddr| match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (six(a), six(b))
    }
}

fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {family} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port())
        .into_bytes()
}

fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// Decodes a v1 or v2 header at the start of `buf`. Never panics.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() { Ok(Parsed::Incomplete) } else { parse_v2(buf) };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if n < 6 { Ok(Parsed::Incomplete) } else { parse_v1(buf) };
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    // The line ends at the first LF, which the spec wants preceded by CR: a
    // bare LF is refused at once rather than waited on until the timeout.
    if let Some(lf) = window.iter().position(|&b| b == b'\n') {
        if lf == 0 || window[lf - 1] != b'\r' {
            return Err(ProxyError::Malformed("v1 header line ends in LF without CR"));
        }
    }
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::Malformed("v1 header longer than 107 bytes"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProxyError::Malformed("v1 header is not text"))?;
    let len = end + 2;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    let family = parts.next().ok_or(ProxyError::Malformed("v1 header has no family"))?;
    if family == "UNKNOWN" {
        return Ok(Parsed::Header { header: ProxyHeader { source: None, destination: None }, len });
    }
    let fields: Vec<&str> = parts.collect();
    if fields.len() != 4 {
        return Err(ProxyError::Malformed("v1 header needs 4 address fields"));
    }
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        match family {
            "TCP4" => s
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyError::Malformed("bad IPv4 address")),
            "TCP6" => s
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyError::Malformed("bad IPv6 address")),
            _ => Err(ProxyError::Malformed("v1 family must be TCP4, TCP6 or UNKNOWN")),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        if s.is_empty()
            || s.len() > 5
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(ProxyError::Malformed("bad port"));
        }
        s.parse().map_err(|_| ProxyError::Malformed("bad port"))
    };
    let source = SocketAddr::new(ip(fields[0])?, port(fields[2])?);
    let destination = SocketAddr::new(ip(fields[1])?, port(fields[3])?);
    Ok(Parsed::Header {
        header: ProxyHeader { source: Some(source), destination: Some(destination) },
        len,
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version nibble is not 2"));
    }
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > V2_MAX {
        return Err(ProxyError::Malformed("v2 header too long"));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let addrs = &buf[16..len];
    let none = ProxyHeader { source: None, destination: None };
    match ver_cmd & 0x0f {
        0x0 => return Ok(Parsed::Header { header: none, len }), // LOCAL: health checks
        0x1 => {}
        _ => return Err(ProxyError::Malformed("v2 command is neither LOCAL nor PROXY")),
    }
    let header = match buf[13] {
        0x11 | 0x12 => {
            if addrs.len() < 12 {
                return Err(ProxyError::Malformed("v2 IPv4 address block too short"));
            }
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(addrs[o], addrs[o + 1], addrs[o + 2], addrs[o + 3]))
            };
            let port = |o: usize| u16::from_be_bytes([addrs[o], addrs[o + 1]]);
            ProxyHeader {
                source: Some(SocketAddr::new(ip(0), port(8))),
                destination: Some(SocketAddr::new(ip(4), port(10))),
            }
        }
        0x21 | 0x22 => {
            if addrs.len() < 36 {
                return Err(ProxyError::Malformed("v2 IPv6 address block too short"));
            }
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&addrs[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([addrs[o], addrs[o + 1]]);
            ProxyHeader {
                source: Some(SocketAddr::new(ip(0), port(32))),
                destination: Some(SocketAddr::new(ip(16), port(34))),
            }
        }
        // UNSPEC or AF_UNIX: the addresses are not ours to use.
        _ => none,
    };
    Ok(Parsed::Header { header, len })
}

/// Reads exactly one PROXY header from `stream` (nothing after it), waiting
/// until `deadline`. The common case (the header in the first segment) costs
/// one peek and one read. A header that arrives in pieces is consumed piece
/// by piece (every byte before its end belongs to it), and the wait for the
/// next piece is on readiness: a client that sends half a header and stops
/// costs a timer, not a wake-up every few milliseconds.
pub async fn read_header(stream: &TcpStream, deadline: Instant) -> io::Result<ProxyHeader> {
    let timed_out =
        || io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for the PROXY header");
    // The header's bytes consumed so far, then room to peek at the rest.
    let mut buf = vec![0u8; V2_MAX];
    let mut have = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf[have..]))
            .await
            .map_err(|_| timed_out())??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the PROXY header",
            ));
        }
        let parsed =
            parse(&buf[..have + n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // What to take off the socket: the rest of the header, or all that
        // was peeked while the header is incomplete.
        let (take, header) = match parsed {
            Parsed::Header { header, len } => (len - have, Some(header)),
            Parsed::Incomplete if have + n >= buf.len() => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "PROXY header too long"))
            }
            Parsed::Incomplete => (n, None),
        };
        let mut rest = &mut buf[have..have + take];
        while !rest.is_empty() {
            stream.readable().await?;
            match stream.try_read(rest) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => rest = &mut rest[k..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        have += take;
        if let Some(header) = header {
            return Ok(header);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_matches_the_spec_examples() {
        // The spec's worst-case TCP4 and TCP6 lines.
        let v4 = encode(ProxyVersion::V1, sa("255.255.255.255:65535"), sa("255.255.255.255:65535"));
        assert_eq!(v4, b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n");
        let max6 = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let v6 = encode(ProxyVersion::V1, sa(max6), sa(max6));
        assert_eq!(
            v6,
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
        );
        assert_eq!(v6.len(), 104);
        // The spec's example line and UNKNOWN.
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n";
        let Parsed::Header { header, len } = parse(line).unwrap() else { panic!() };
        assert_eq!(len, 47);
        assert_eq!(header.source, Some(sa("192.168.0.1:56324")));
        assert_eq!(header.destination, Some(sa("192.168.0.11:443")));
        let Parsed::Header { header, len } = parse(b"PROXY UNKNOWN\r\n").unwrap() else { panic!() };
        assert_eq!((header.source, len), (None, 15));
    }

    #[test]
    fn v2_bytes_follow_the_spec() {
        let h = encode(ProxyVersion::V2, sa("10.0.0.1:1234"), sa("10.0.0.2:80"));
        let want: Vec<u8> = [
            &V2_SIGNATURE[..],
            &[0x21, 0x11, 0x00, 0x0c],
            &[10, 0, 0, 1, 10, 0, 0, 2],
            &[0x04, 0xd2, 0x00, 0x50],
        ]
        .concat();
        assert_eq!(h, want);
        let h6 = encode(ProxyVersion::V2, sa("[::1]:1"), sa("[2001:db8::2]:443"));
        assert_eq!(&h6[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(h6.len(), 16 + 36);
        // LOCAL (a health check from the proxy itself) has no addresses.
        let local: Vec<u8> = [&V2_SIGNATURE[..], &[0x20, 0x00, 0x00, 0x00]].concat();
        assert_eq!(
            parse(&local).unwrap(),
            Parsed::Header { header: ProxyHeader { source: None, destination: None }, len: 16 }
        );
    }

    #[test]
    fn round_trips() {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            for (s, d) in [("1.2.3.4:5", "6.7.8.9:10"), ("[2001:db8::1]:443", "[::1]:8443")] {
                let bytes = encode(v, sa(s), sa(d));
                let Parsed::Header { header, len } = parse(&bytes).unwrap() else { panic!() };
                assert_eq!(len, bytes.len());
                assert_eq!((header.source, header.destination), (Some(sa(s)), Some(sa(d))));
                // Every strict prefix is incomplete, never an error.
                for cut in 1..bytes.len() {
                    assert_eq!(
                        parse(&bytes[..cut]).unwrap(),
                        Parsed::Incomplete,
                        "{v:?} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let bytes = encode(ProxyVersion::V1, sa("1.2.3.4:5"), sa("[::1]:80"));
        assert_eq!(bytes, b"PROXY TCP6 ::ffff:1.2.3.4 ::1 5 80\r\n");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing));
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 1\r\n").is_err());
        assert!(parse(b"PROXY TCP9 1.2.3.4 5.6.7.8 1 1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 1\r\n").is_err());
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'A'].repeat(20)).is_err());
        let bad_version: Vec<u8> = [&V2_SIGNATURE[..], &[0x11, 0x11, 0x00, 0x0c]].concat();
        assert!(parse(&bad_version).is_err());
    }

    #[test]
    fn a_v1_line_ending_in_a_bare_lf_is_refused_at_once() {
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
            Err(ProxyError::Malformed("v1 header line ends in LF without CR"))
        );
        assert!(parse(b"PROXY \n").is_err());
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"), Ok(Parsed::Incomplete));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_after_a_signature(tail in proptest::collection::vec(any::<u8>(), 0..300), v2 in any::<bool>()) {
            let mut bytes = if v2 { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
            bytes.extend(tail);
            if let Ok(Parsed::Header { len, .. }) = parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        #[test]
        fn v4_round_trip(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), p in any::<u16>(), q in any::<u16>(), v2 in any::<bool>()) {
            let s = SocketAddr::from((a, p));
            let d = SocketAddr::from((b, q));
            let v = if v2 { ProxyVersion::V2 } else { ProxyVersion::V1 };
            let bytes = encode(v, s, d);
            prop_assert_eq!(parse(&bytes).unwrap(), Parsed::Header { header: ProxyHeader { source: Some(s), destination: Some(d) }, len: bytes.len() });
        }
    }
}
