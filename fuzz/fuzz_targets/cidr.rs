//! Allow/deny networks: parsing never panics; a parsed network contains its own address.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(net) = tcplb::config::parse_cidr(s) {
            assert!(net.contains(&net.network()));
        }
    }
});
