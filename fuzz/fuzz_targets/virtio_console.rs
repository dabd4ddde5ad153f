//! libFuzzer entry of `virtio_console`: the body is `minivmm_fuzz::virtio_console` (src/virtio_console.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| minivmm_fuzz::virtio_console(data));
