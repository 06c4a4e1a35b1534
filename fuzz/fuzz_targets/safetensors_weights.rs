#![no_main]
//! See `medphi::fuzzing::safetensors_weights`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| medphi::fuzzing::assert_clean(medphi::fuzzing::safetensors_weights(data)));
