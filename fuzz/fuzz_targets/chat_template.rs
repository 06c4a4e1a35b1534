#![no_main]
//! See `medphi::fuzzing::chat_template`; the tokenizer is Phi-2's, read once.
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use medphi::tokenizer::PhiTokenizer;

static TOKENIZER: OnceLock<PhiTokenizer> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let tokenizer = TOKENIZER.get_or_init(|| medphi::fuzzing::fixture_tokenizer().unwrap());
    medphi::fuzzing::assert_clean(medphi::fuzzing::chat_template(tokenizer, data));
});
