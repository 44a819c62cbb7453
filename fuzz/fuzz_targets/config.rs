#![no_main]
//! See `artisync_fuzz::checks::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| artisync_fuzz::checks::config(data));
