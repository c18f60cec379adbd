//! The ClientHello reader that routes by SNI, and the tls probe's reading of
//! a server's answer: never panic on any bytes, and a whole hello is still
//! read the same when it arrives cut short.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = tcplb::parse::client_hello(data);
    if let tcplb::parse::Hello::Complete { .. } = whole {
        // Any prefix is either incomplete or the same hello (bytes after
        // the hello do not change it).
        for cut in [1, data.len() / 2] {
            let part = tcplb::parse::client_hello(&data[..cut.min(data.len())]);
            assert!(part == tcplb::parse::Hello::Incomplete || part == whole);
        }
    }
    let _ = tcplb::parse::server_answer(data);
});
