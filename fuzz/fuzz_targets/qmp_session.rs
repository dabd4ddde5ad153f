//! libFuzzer entry of `qmp_session`: the body is `minivmm_fuzz::qmp_session` (src/qmp_session.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| minivmm_fuzz::qmp_session(data));
