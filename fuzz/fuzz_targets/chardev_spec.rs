//! libFuzzer entry of `chardev_spec`: the body is `minivmm_fuzz::chardev_spec` (src/chardev_spec.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| minivmm_fuzz::chardev_spec(data));
