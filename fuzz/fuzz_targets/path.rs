#![no_main]
//! See `artisync_fuzz::checks::path`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| artisync_fuzz::checks::path(data));
