#![no_main]
//! See `medphi::fuzzing::tokenizer_json`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| medphi::fuzzing::assert_clean(medphi::fuzzing::tokenizer_json(data)));
