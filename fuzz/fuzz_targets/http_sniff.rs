//! The failure-path HTTP peek and the replay check: never panic on any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tcplb::parse::sniff(data);
    let _ = tcplb::parse::verdict(data);
});
