//! Phi-2's tokenizer (GPT-2/CodeGen byte-level BPE) through the `tokenizers` crate, and a
//! streaming detokenizer that only ever emits whole UTF-8 characters.

use crate::error::{Error, Result};

pub struct PhiTokenizer {
    inner: tokenizers::Tokenizer,
    /// One past the largest id the tokenizer can produce. The model's embedding table is
    /// padded beyond this (51200 vs 50295 for Phi-2); those ids are never sampled.
    vocab_limit: usize,
    eos: Option<u32>,
    /// `truncation.max_length` of the tokenizer.json, if it sets one: a longer text is
    /// refused rather than silently cut.
    max_tokens: Option<usize>,
}

impl PhiTokenizer {
    /// Parses a `tokenizer.json`; `source` names it in errors.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        if bytes.is_empty() {
            return Err(Error::file(source, "file is empty"));
        }
        check_tokenizer_json(bytes)
            .map_err(|e| Error::file(source, format!("not a valid tokenizer.json: {e}")))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::file(source, format!("not a valid tokenizer.json: {e}")))?;
        // The file's truncation would cut prompts without a word (and some settings of it
        // panic inside `tokenizers`); its padding would append tokens to every prompt.
        // Generation wants neither: the limit is kept and enforced as an error instead.
        let max_tokens = inner.get_truncation().map(|t| t.max_length);
        inner
            .with_truncation(None)
            .map_err(|e| Error::file(source, format!("truncation: {e}")))?;
        inner.with_padding(None);
        let vocab = inner.get_vocab(true);
        let vocab_limit = vocab.values().max().map_or(0, |&m| m as usize + 1);
        if vocab_limit == 0 {
            return Err(Error::file(source, "tokenizer has an empty vocabulary"));
        }
        let eos = vocab.get("<|endoftext|>").copied();
        Ok(Self {
            inner,
            vocab_limit,
            eos,
            max_tokens,
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path.display(), e))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::input(format!("cannot tokenize the text: {e}")))?;
        let ids = enc.get_ids();
        if let Some(max) = self.max_tokens.filter(|&m| ids.len() > m) {
            return Err(Error::input(format!(
                "the text is {} tokens, more than the {max} that tokenizer.json's truncation.max_length allows",
                ids.len()
            )));
        }
        Ok(ids.to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::input(format!("cannot decode token ids: {e}")))
    }

    pub fn vocab_limit(&self) -> usize {
        self.vocab_limit
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// The string form of one token (for inspecting tokenizations).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Checks what `tokenizers` 0.22 would panic on instead of returning an error:
/// - it parses the `decoder` section with `expect("Helper")`, so any JSON error there (a
///   file cut short by an interrupted download, `{"decoder":`; invalid UTF-8 or a lone
///   surrogate escape in one of its strings) panics; the whole file's syntax and the
///   `decoder` section are parsed here first;
/// - a BPE model slices `continuing_subword_prefix` off the right part of every merge
///   (`&b[prefix_len..]`), which panics when that part is shorter than the prefix or the
///   cut falls inside a character; each such part must start with the prefix.
///
/// Everything else is skipped without building anything.
fn check_tokenizer_json(bytes: &[u8]) -> std::result::Result<(), String> {
    use serde_json::Value;
    #[derive(serde::Deserialize)]
    struct Sections {
        #[allow(dead_code)]
        decoder: Option<Value>,
        model: Option<Model>,
    }
    // Only the two fields of `model` that matter are kept (its vocabulary is skipped).
    #[derive(serde::Deserialize)]
    struct Model {
        continuing_subword_prefix: Option<Value>,
        merges: Option<Value>,
    }
    let sections: Sections = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let Some(model) = sections.model else {
        return Ok(());
    };
    let prefix = match &model.continuing_subword_prefix {
        Some(Value::String(p)) if !p.is_empty() => p,
        _ => return Ok(()),
    };
    let merges = model.merges.as_ref().and_then(Value::as_array);
    for merge in merges.into_iter().flatten() {
        // Merges are "left right" strings (older files) or [left, right] pairs.
        let right = match merge {
            Value::String(s) => s.split_once(' ').map(|(_, b)| b),
            Value::Array(pair) => pair.get(1).and_then(Value::as_str),
            _ => None,
        };
        if let Some(right) = right.filter(|b| !b.starts_with(prefix.as_str())) {
            return Err(format!(
                "model.merges has {merge}, whose right part {right:?} does not start with continuing_subword_prefix {prefix:?}"
            ));
        }
    }
    Ok(())
}

/// Turns a stream of token ids into text pieces, holding back a piece while it ends in a
/// partial UTF-8 character (a byte-level token can carry half of an emoji).
pub struct TokenStream<'a> {
    tokenizer: &'a PhiTokenizer,
    ids: Vec<u32>,
    /// `ids[prefix..emitted]` is the already-emitted tail kept as context for decoding.
    prefix: usize,
    emitted: usize,
}

impl<'a> TokenStream<'a> {
    pub fn new(tokenizer: &'a PhiTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            emitted: 0,
        }
    }

    /// Adds one id; returns newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.emitted])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(piece) = now.get(before.len()..) {
                let piece = piece.to_string();
                self.prefix = self.emitted;
                self.emitted = self.ids.len();
                return Ok(Some(piece));
            }
        }
        Ok(None)
    }

    /// Whatever is still held back (a genuinely incomplete character decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.emitted])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.emitted = self.ids.len();
        Ok(now
            .get(before.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }
}

/// A `tokenizer.json` for a GPT-2 style byte-level BPE given as GGUF stores it: token
/// strings by id, token types (1 normal, 3 control, 4 user-defined, 5 unused, 6 byte)
/// and merges as "left right" strings.
pub fn byte_level_bpe_json(tokens: &[String], types: &[i64], merges: &[String]) -> Result<String> {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(1) {
            5 => continue,
            kind @ (3 | 4) => added.push(serde_json::json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == 3,
            })),
            _ => {}
        }
        vocab.insert(token.clone(), serde_json::json!(id));
    }
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| serde_json::json!([a, b]))
                .ok_or_else(|| Error::input(format!("merge {m:?} is not \"left right\"")))
        })
        .collect::<Result<_>>()?;
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    })
    .to_string())
}
