//! A small byte-level BPE tokenizer trained on our own corpus, in the same shape as Phi-2's
//! (GPT-2 byte-level pre-tokenizer without a prefix space, `<|endoftext|>` as the only
//! special token), so every loader of Phi-2's `tokenizer.json` loads it unchanged. A
//! 51,200-entry vocabulary would make the embedding and output layers most of a tiny model;
//! a few thousand merges learnt on medical text cover it with short sequences.

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::error::{Error, Result};

pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Trains on `texts` (paragraphs or documents) and returns the `tokenizer.json` text.
/// `<|endoftext|>` gets id 0.
pub fn train<'a>(texts: impl Iterator<Item = &'a str> + Send, vocab_size: usize) -> Result<String> {
    // 256 byte symbols plus the special token must fit, and merges need room to be useful.
    if !(512..=1 << 20).contains(&vocab_size) {
        return Err(Error::input(format!(
            "vocabulary size {vocab_size} is out of range (512 to 1048576)"
        )));
    }
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::default()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(|e| Error::input(format!("cannot build the tokenizer: {e}")))?;
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| Error::input(format!("tokenizer training failed: {e}")))?;
    tokenizer
        .to_string(true)
        .map_err(|e| Error::input(format!("cannot serialise the tokenizer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::PhiTokenizer;

    #[test]
    fn trained_tokenizer_round_trips_and_compresses() {
        let para = "Macrocephaly. Occipitofrontal (head) circumference greater than 97th centile \
                    compared to appropriate, age matched, sex-matched normal standards.";
        let texts: Vec<String> = (0..50).map(|i| format!("{para} Case {i}.")).collect();
        let json = train(texts.iter().map(String::as_str), 600).unwrap();
        let tok = PhiTokenizer::from_bytes(json.as_bytes(), "trained").unwrap();
        assert_eq!(tok.eos_token_id(), Some(0));
        let text = "Instruct: What is macrocephaly?\nOutput: A large head, é ü 🙂.";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Learnt merges: the training paragraph needs far fewer tokens than bytes.
        assert!(tok.encode(para).unwrap().len() * 4 < para.len());
        assert!(train(texts.iter().map(String::as_str), 100).is_err());
    }
}
