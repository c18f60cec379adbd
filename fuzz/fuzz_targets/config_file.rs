//! The TOML configuration file: any text yields a config or positioned errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Err(problems) = tcplb::config::file::parse(s, "fuzz.toml") {
            assert!(!problems.0.is_empty());
        }
    }
});
