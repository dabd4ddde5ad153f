//! libFuzzer entry of `qmp_args`: the body is `minivmm_fuzz::qmp_args` (src/qmp_args.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| minivmm_fuzz::qmp_args(data));
