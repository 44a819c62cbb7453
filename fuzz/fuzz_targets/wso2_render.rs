#![no_main]
//! See `artisync_fuzz::checks::wso2_render`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| artisync_fuzz::checks::wso2_render(data));
