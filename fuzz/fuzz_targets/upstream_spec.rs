//! `--upstream` specs: parsing never panics, and what parses prints back parseable.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcplb::config::Upstream;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = s.parse::<Upstream>() {
            let again: Upstream = u.authority().parse().expect("authority re-parses");
            assert_eq!((again.host, again.port), (u.host, u.port));
        }
    }
});
