//! libFuzzer entry of `uart`: the body is `minivmm_fuzz::uart` (src/uart.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| minivmm_fuzz::uart(data));
