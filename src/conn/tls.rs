//! The TLS tcplb reads or speaks without terminating TLS: the client's
//! ClientHello, read for its server name and ALPN to choose a route (and
//! forwarded unchanged), and a ClientHello of its own for the `tls` health
//! check, whose answer is read only as far as its first message. Parsing
//! is tls-parser's; tcplb never holds a key.

use tls_parser::{
    parse_tls_extension_alpn_content, parse_tls_extension_sni_content, parse_tls_extension_unknown,
    parse_tls_message_handshake, parse_tls_plaintext, parse_tls_record_header, TlsExtension,
    TlsMessage, TlsMessageHandshake, TlsRecordType,
};

/// A TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;

/// What the first bytes of a connection say about a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A TLS handshake record that has not arrived whole yet.
    Incomplete,
    /// Not a TLS ClientHello (plaintext, or a broken one).
    NotTls,
    /// A whole ClientHello.
    Complete {
        /// The host name of the server_name extension, lower-cased.
        sni: Option<String>,
        /// The protocols offered by the ALPN extension, in order.
        alpn: Vec<String>,
    },
}

/// Longest ClientHello waited for (a post-quantum key share makes ~1.8 KiB;
/// a hello of many extensions and a long session ticket stays well inside).
pub const MAX_HELLO: usize = 16 * 1024;

/// Reads the ClientHello at the start of `buf`, which may be split over
/// several handshake records and end anywhere.
pub fn client_hello(buf: &[u8]) -> Hello {
    match buf.first() {
        None => return Hello::Incomplete,
        Some(&b) if b != u8::from(TlsRecordType::Handshake) => return Hello::NotTls,
        _ => {}
    }
    // The handshake message, put back together from the records' bodies
    // when it spans more than one.
    let mut message = Vec::new();
    let mut rest = buf;
    loop {
        let header = match parse_tls_record_header(rest) {
            Ok((_, h)) => h,
            Err(tls_parser::Err::Incomplete(_)) => return Hello::Incomplete,
            Err(_) => return Hello::NotTls,
        };
        // A ClientHello is all handshake records, and SSL 3.0 or later.
        if header.record_type != TlsRecordType::Handshake || header.version.0 >> 8 != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(header.len);
        let end = (RECORD_HEADER + len).min(rest.len());
        let body = &rest[RECORD_HEADER.min(rest.len())..end];
        // The usual hello comes whole in its first record: read in place.
        let so_far: &[u8] = if message.is_empty() {
            body
        } else {
            message.extend_from_slice(body);
            &message
        };
        if so_far.first().is_some_and(|&t| t != 1) {
            return Hello::NotTls; // a handshake that does not start with ClientHello
        }
        if so_far.len() >= 4 {
            let want = 4
                + (usize::from(so_far[1]) << 16
                    | usize::from(so_far[2]) << 8
                    | usize::from(so_far[3]));
            if want > MAX_HELLO {
                return Hello::NotTls;
            }
            if so_far.len() >= want {
                return parse_hello(&so_far[..want]);
            }
        }
        if rest.len() < RECORD_HEADER + len {
            return Hello::Incomplete;
        }
        if message.is_empty() {
            message.extend_from_slice(body);
        }
        rest = &rest[RECORD_HEADER + len..];
    }
}

/// The server name and ALPN of a whole ClientHello message.
///
/// Only those two extensions are decoded; the others are stepped over by
/// their length, as nginx's ssl_preread and HAProxy's req.ssl_sni do. A
/// browser's hello carries a dozen more (key shares, signature algorithms,
/// groups ...) that tls-parser would each decode into vectors, a dozen
/// allocations a connection for nothing routing uses, and one whose body
/// it could not decode would hide every extension after it.
fn parse_hello(message: &[u8]) -> Hello {
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        parse_tls_message_handshake(message)
    else {
        return Hello::NotTls;
    };
    let (mut sni, mut alpn) = (None, Vec::new());
    let mut rest = hello.ext.unwrap_or_default();
    // Each extension as (type, body), borrowed: `Unknown` is tls-parser's
    // undecoded form.
    while let Ok((next, TlsExtension::Unknown(kind, body))) = parse_tls_extension_unknown(rest) {
        rest = next;
        let decoded = match kind.0 {
            SERVER_NAME => parse_tls_extension_sni_content(body),
            ALPN => parse_tls_extension_alpn_content(body),
            _ => continue,
        };
        match decoded {
            Ok((_, TlsExtension::SNI(names))) => {
                sni = names
                    .iter()
                    .find(|(kind, _)| *kind == tls_parser::SNIType::HostName)
                    .and_then(|(_, name)| std::str::from_utf8(name).ok())
                    .map(|name| name.trim_end_matches('.').to_ascii_lowercase());
            }
            Ok((_, TlsExtension::ALPN(protocols))) => {
                alpn = protocols.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
            }
            _ => {}
        }
    }
    Hello::Complete { sni, alpn }
}

/// The server_name extension's type (RFC 6066).
const SERVER_NAME: u16 = 0;
/// The application_layer_protocol_negotiation extension's type (RFC 7301).
const ALPN: u16 = 16;

/// A ClientHello that a TLS 1.2 or 1.3 server answers with a ServerHello
/// (or, for 1.3, a HelloRetryRequest: no key share is offered, so nothing
/// is computed on either side), naming `server_name` when given.
pub fn probe_hello(server_name: Option<&str>) -> Vec<u8> {
    let mut ext = Vec::new();
    if let Some(name) = server_name {
        sni_extension(&mut ext, name.as_bytes());
    }
    // x25519, secp256r1, secp384r1
    extension(&mut ext, 10, &list16(&[0x001d, 0x0017, 0x0018]));
    // ec_point_formats: uncompressed
    extension(&mut ext, 11, &[1, 0]);
    // ecdsa and rsa-pss/pkcs1 with SHA-256/384/512, ed25519
    extension(
        &mut ext,
        13,
        &list16(&[0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0807]),
    );
    extension(&mut ext, 43, &[4, 0x03, 0x04, 0x03, 0x03]); // supported_versions: 1.3, 1.2
    extension(&mut ext, 51, &[0, 0]); // key_share: none offered
    hello_record(&ext)
}

/// Appends a 16-bit length.
fn put16(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u16).to_be_bytes());
}

/// Appends an extension: type, length, body.
fn extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    put16(out, body.len());
    out.extend_from_slice(body);
}

/// Appends a server_name extension naming the host `name`.
fn sni_extension(out: &mut Vec<u8>, name: &[u8]) {
    let mut body = Vec::new();
    put16(&mut body, name.len() + 3);
    body.push(0); // host_name
    put16(&mut body, name.len());
    body.extend_from_slice(name);
    extension(out, SERVER_NAME, &body);
}

/// A list of 16-bit values with its 16-bit length in bytes.
fn list16(items: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    put16(&mut v, items.len() * 2);
    items.iter().for_each(|i| v.extend_from_slice(&i.to_be_bytes()));
    v
}

/// A ClientHello record around the extension block `ext`.
fn hello_record(ext: &[u8]) -> Vec<u8> {
    let ciphers = list16(&[
        0x1301, 0x1302, 0x1303, // TLS 1.3
        0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0x009c, 0x009d, // TLS 1.2
    ]);
    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&random_bytes());
    hello.push(0); // no session id
    hello.extend_from_slice(&ciphers);
    hello.extend_from_slice(&[1, 0]); // compression: null
    put16(&mut hello, ext.len());
    hello.extend_from_slice(ext);

    let mut out = vec![u8::from(TlsRecordType::Handshake), 0x03, 0x01];
    put16(&mut out, hello.len() + 4);
    out.push(1); // client_hello
    out.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&hello);
    out
}

/// 32 bytes for the hello's random: unpredictable enough for a probe that
/// never completes a handshake.
fn random_bytes() -> [u8; 32] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
        chunk.copy_from_slice(&r.to_be_bytes());
    }
    out
}

/// How a server answered the `tls` probe's ClientHello: `None` while more bytes are
/// needed, then Ok (a ServerHello or HelloRetryRequest) or Err saying what
/// came instead.
pub fn server_answer(buf: &[u8]) -> Option<Result<String, String>> {
    let (body, header) = match parse_tls_record_header(buf) {
        Ok(h) => h,
        Err(tls_parser::Err::Incomplete(_)) => return None,
        Err(_) => return Some(Err("not a TLS answer".into())),
    };
    if header.version.0 >> 8 != 3 {
        return Some(Err("not a TLS answer".into()));
    }
    match header.record_type {
        TlsRecordType::Handshake => match parse_tls_message_handshake(body) {
            Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ServerHello(h)))) => {
                Some(Ok(format!("TLS ServerHello ({:?})", h.version)))
            }
            Ok((_, TlsMessage::Handshake(TlsMessageHandshake::HelloRetryRequest(_)))) => {
                Some(Ok("TLS HelloRetryRequest (TLS 1.3)".into()))
            }
            Ok((_, other)) => Some(Err(format!("TLS handshake without a ServerHello: {other:?}"))),
            Err(tls_parser::Err::Incomplete(_)) if body.len() < usize::from(header.len) => None,
            Err(_) => Some(Err("a broken TLS handshake record".into())),
        },
        TlsRecordType::Alert => match parse_tls_plaintext(buf) {
            Ok((_, record)) => match record.msg.first() {
                Some(TlsMessage::Alert(alert)) => Some(Err(format!("TLS alert: {}", alert.code))),
                _ => Some(Err("a broken TLS alert".into())),
            },
            Err(tls_parser::Err::Incomplete(_)) => None,
            Err(_) => Some(Err("a broken TLS alert".into())),
        },
        other => Some(Err(format!("TLS record of type {} before a ServerHello", other.0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use tls_parser::{parse_tls_plaintext, SNIType};

    /// The server name in a ClientHello record, as tls-parser reads it.
    fn sni_of(record: &[u8]) -> Option<Vec<u8>> {
        let (rest, plain) = parse_tls_plaintext(record).expect("a whole record");
        assert!(rest.is_empty());
        let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello))) =
            plain.msg.first()
        else {
            panic!("not a ClientHello: {plain:?}");
        };
        let (_, extensions) =
            tls_parser::parse_tls_client_hello_extensions(hello.ext.unwrap()).unwrap();
        extensions.into_iter().find_map(|e| match e {
            TlsExtension::SNI(names) => {
                names.iter().find(|(t, _)| *t == SNIType::HostName).map(|(_, n)| n.to_vec())
            }
            _ => None,
        })
    }

    #[test]
    fn the_probe_hello_reads_back_with_its_name() {
        assert_eq!(sni_of(&probe_hello(Some("api.example.com"))).unwrap(), b"api.example.com");
        assert_eq!(sni_of(&probe_hello(None)), None);
    }

    #[test]
    fn the_probe_hello_is_read_back_by_the_route_parser() {
        assert_eq!(
            client_hello(&probe_hello(Some("API.example.com"))),
            Hello::Complete { sni: Some("api.example.com".into()), alpn: vec![] }
        );
        assert_eq!(client_hello(&probe_hello(None)), Hello::Complete { sni: None, alpn: vec![] });
    }

    #[test]
    fn an_extension_that_cannot_be_decoded_hides_neither_name_nor_alpn() {
        let mut ext = Vec::new();
        // ec_point_formats whose list claims five bytes and has one: a
        // server rejects it, but a router steps over it by its length, as
        // nginx's ssl_preread and HAProxy's req.ssl_sni do.
        extension(&mut ext, 11, &[5, 0]);
        sni_extension(&mut ext, b"api.example.com");
        alpn_extension(&mut ext, &["h2".into(), "http/1.1".into()]);
        assert_eq!(
            client_hello(&hello_record(&ext)),
            Hello::Complete {
                sni: Some("api.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
            }
        );
    }

    #[test]
    fn every_prefix_of_a_hello_is_incomplete_and_never_misread() {
        let hello = probe_hello(Some("www.example.com"));
        for cut in 0..hello.len() {
            assert_eq!(client_hello(&hello[..cut]), Hello::Incomplete, "cut at {cut}");
        }
    }

    /// `hello`'s handshake message again, in records of `size` bytes.
    fn in_records(hello: &[u8], size: usize) -> Vec<u8> {
        let mut records = Vec::new();
        for piece in hello[RECORD_HEADER..].chunks(size) {
            records.extend_from_slice(&[22, 3, 1]);
            records.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            records.extend_from_slice(piece);
        }
        records
    }

    #[test]
    fn a_hello_split_over_records_is_put_back_together() {
        let records = in_records(&probe_hello(Some("split.example.com")), 7);
        assert_eq!(
            client_hello(&records),
            Hello::Complete { sni: Some("split.example.com".into()), alpn: vec![] }
        );
    }

    #[test]
    fn plaintext_and_broken_records_are_not_tls() {
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(client_hello(b"\x16\x03"), Hello::Incomplete);
        assert_eq!(client_hello(b"\x16\x09\x01\x00\x05hello"), Hello::NotTls);
        // A handshake that starts with something other than a ClientHello.
        assert_eq!(client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"), Hello::NotTls);
    }

    proptest! {
        #[test]
        fn any_bytes_are_judged_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = client_hello(&bytes);
            let _ = server_answer(&bytes);
        }

        #[test]
        fn a_hello_after_a_tls_record_header_never_panics(body in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut bytes = vec![22, 3, 1];
            bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&body);
            let _ = client_hello(&bytes);
        }

        #[test]
        fn any_split_of_a_hello_reads_the_same_name(size in 1usize..300, name in "[a-z]{1,20}(\\.[a-z]{1,10}){0,3}") {
            let records = in_records(&probe_hello(Some(&name)), size);
            prop_assert_eq!(
                client_hello(&records),
                Hello::Complete { sni: Some(name.clone()), alpn: vec![] }
            );
            for cut in [1, records.len() / 2, records.len() - 1] {
                prop_assert_eq!(client_hello(&records[..cut]), Hello::Incomplete);
            }
        }
    }

    /// An ALPN extension offering `protocols`.
    fn alpn_extension(out: &mut Vec<u8>, protocols: &[String]) {
        let mut list = Vec::new();
        for p in protocols {
            list.push(p.len() as u8);
            list.extend_from_slice(p.as_bytes());
        }
        let mut body = Vec::new();
        put16(&mut body, list.len());
        body.extend_from_slice(&list);
        extension(out, ALPN, &body);
    }

    proptest! {
        /// Whatever other extensions a hello carries, whatever their
        /// bodies (well-formed or not for their type), and wherever the
        /// two that route sit among them, the name and the protocols are
        /// read, also from a hello split over records.
        #[test]
        fn the_name_and_alpn_are_found_among_any_other_extensions(
            others in proptest::collection::vec(
                (
                    prop_oneof![
                        // Types tls-parser decodes, given bodies that may not fit them.
                        Just(5u16), Just(10), Just(11), Just(13), Just(35), Just(43), Just(45), Just(51),
                        17u16..=65535,
                    ],
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                0..12,
            ),
            sni_at in 0usize..13,
            alpn_at in 0usize..13,
            name in "[a-z]{1,20}(\\.[a-z]{1,10}){0,3}",
            protocols in proptest::collection::vec("[a-z0-9/.]{1,12}", 1..4),
            size in 1usize..400,
        ) {
            let (sni_at, alpn_at) = (sni_at.min(others.len()), alpn_at.min(others.len()));
            let mut ext = Vec::new();
            for i in 0..=others.len() {
                if i == sni_at {
                    sni_extension(&mut ext, name.as_bytes());
                }
                if i == alpn_at {
                    alpn_extension(&mut ext, &protocols);
                }
                if let Some((kind, body)) = others.get(i) {
                    extension(&mut ext, *kind, body);
                }
            }
            let expected = Hello::Complete { sni: Some(name.clone()), alpn: protocols.clone() };
            let hello = hello_record(&ext);
            prop_assert_eq!(client_hello(&hello), expected.clone());
            prop_assert_eq!(client_hello(&in_records(&hello, size)), expected);
        }
    }

    #[test]
    fn answers_are_told_apart() {
        // A record header alone is not an answer yet.
        assert_eq!(server_answer(b"\x16\x03\x03\x00\x50"), None);
        // A handshake failure alert.
        let alert = server_answer(b"\x15\x03\x03\x00\x02\x02\x28").unwrap().unwrap_err();
        assert!(alert.contains("alert"), "{alert}");
        assert!(server_answer(b"HTTP/1.1 400 Bad Request\r\n").unwrap().is_err());
    }
}
