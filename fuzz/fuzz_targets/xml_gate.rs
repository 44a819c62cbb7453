#![no_main]
//! See `artisync_fuzz::checks::xml_gate`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| artisync_fuzz::checks::xml_gate(data));
