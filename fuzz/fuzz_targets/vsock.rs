//! libFuzzer entry of `vsock`: the body is `minivmm_fuzz::vsock` (src/vsock.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| minivmm_fuzz::vsock(data));
