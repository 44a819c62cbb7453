#![no_main]
//! See `artisync_fuzz::checks::peer_batch`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| artisync_fuzz::checks::peer_batch(data));
