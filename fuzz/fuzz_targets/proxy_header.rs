//! PROXY protocol v1/v2 headers from untrusted peers: never panics, a decoded
//! header never claims more bytes than given, and re-encoding round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcplb::config::ProxyVersion;
use tcplb::proxy_protocol::{encode, parse, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Header { header, len }) = parse(data) {
        assert!(len <= data.len());
        if let (Some(s), Some(d)) = (header.source, header.destination) {
            if s.is_ipv4() == d.is_ipv4() {
                for v in [ProxyVersion::V1, ProxyVersion::V2] {
                    let bytes = encode(v, s, d);
                    assert_eq!(
                        parse(&bytes),
                        Ok(Parsed::Header { header, len: bytes.len() })
                    );
                }
            }
        }
    }
});
