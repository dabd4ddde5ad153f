//! libFuzzer entry of `vproxy_decode`: the body is `minivmm_fuzz::vproxy_decode` (src/vproxy_decode.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| minivmm_fuzz::vproxy_decode(data));
