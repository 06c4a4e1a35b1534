//! What the fuzz targets (`fuzz/`) and their replay test (`tests/fuzz_replay.rs`) run: one
//! function per parser of untrusted input, taking the raw bytes and going as far as the
//! CLI and the page go with such a file before the first token is generated. Each ends in
//! `Ok` or an [`Error`]; a panic, an abort or a runaway allocation is a bug in the parser.
//!
//! The safetensors target pairs the fuzzed weights with [`tiny_config_json`] and
//! [`tiny_tokenizer_json`], a model small enough (1 layer, hidden 32, 64-row vocabulary)
//! that whole valid checkpoints fit in a fuzz input.
#![cfg(not(target_arch = "wasm32"))] // native tooling; the page never runs it

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::checkpoint::{in_its_layout, Checkpoint, NamedBytes};
use crate::error::{Error, Result};
use crate::eval::Task;
use crate::generate::{GenerateOptions, PromptFormat, Sampler, SamplingParams, Turn};
use crate::memory_plan::{MemoryPlan, Target};
use crate::model::{expected_tensors, Activation, Logits, PhiConfig};
use crate::tokenizer::{PhiTokenizer, TokenStream};
use crate::weights::{Bytes, Gguf, GgufFile, Parsed, Safetensors, TensorSource};

/// The text every tokenizer is tried on: a prompt in Phi-2's QA format with accents, a
/// character outside the BMP and a newline.
pub const SAMPLE_TEXT: &str = "Instruct: What is sepsis? Ünïcödé 🩺 test\nOutput:";

/// The benchmark tasks [`benchmarks`] parses every input as: one of each file format.
pub const BENCHMARK_TASKS: [&str; 6] = [
    "medqa_4options",
    "medqa_4options_continuation",
    "pubmedqa",
    "medmcqa",
    "mmlu_anatomy",
    "medexqa_cardiology",
];

/// How many prompt tokens the model is run on (enough for prefill plus one decode step).
const FORWARD_TOKENS: usize = 8;
/// How many ids go through the streaming detokenizer (it decodes its window at each id).
const STREAM_TOKENS: usize = 64;

/// A GGUF file as the page hands it over (`Checkpoint::from_bytes`, one `.gguf`): its
/// header, config, embedded tokenizer and every tensor the config expects, read
/// ([`read_checkpoint`]). Its header is also parsed from prefixes, as a file read by ranges
/// is, which must agree with the whole file.
pub fn gguf(bytes: &[u8]) -> Result<()> {
    gguf_prefixes_agree(bytes);
    read_checkpoint(&gguf_checkpoint(bytes)?)?;
    Ok(())
}

/// [`gguf`]'s file on to a model and a forward pass ([`exercise_checkpoint`]): the deeper
/// and much slower target.
pub fn gguf_forward(bytes: &[u8]) -> Result<()> {
    exercise_checkpoint(gguf_checkpoint(bytes)?)
}

/// [`gguf`] without building the tokenizer the file embeds (the `tokenizers` crate's
/// parsing, which [`tokenizer_json`] fuzzes on its own and which dominates [`gguf`]'s time):
/// the container, the config, the tokenizer JSON handed over, and every tensor read. About
/// six times [`gguf`]'s runs per second, so millions of runs fit in an hour of one core.
pub fn gguf_weights(bytes: &[u8]) -> Result<()> {
    gguf_prefixes_agree(bytes);
    let gguf = Gguf::from_bytes("fuzz.gguf".into(), Bytes::Owned(bytes.to_vec()), DType::F32)?;
    let _ = gguf.tokenizer_json()?;
    let config = gguf.config()?;
    read_weights(&gguf, &config)
}

fn gguf_checkpoint(bytes: &[u8]) -> Result<Checkpoint> {
    let weights = vec![named("fuzz.gguf", bytes)];
    Checkpoint::from_bytes(None, None, weights, DType::F32)
}

/// Panics unless the header parsed from prefixes of `bytes` (cut at a quarter, half and
/// three quarters) agrees with the whole file's: a header read from a prefix is the whole
/// file's, more bytes asked for are more than the prefix and within the file, and an error
/// found in a prefix is the whole file's error.
fn gguf_prefixes_agree(bytes: &[u8]) {
    let whole = GgufFile::parse(bytes);
    let len = bytes.len();
    for cut in [len / 4, len / 2, len * 3 / 4] {
        match GgufFile::parse_prefix(&bytes[..cut], len as u64) {
            Ok(Parsed::Header(h)) => match &whole {
                Ok(w) if (&h.metadata, &h.tensors) == (&w.metadata, &w.tensors) => {}
                other => panic!("a {cut}-byte prefix gave a header, the whole file {other:?}"),
            },
            Ok(Parsed::NeedBytes(n)) => {
                assert!(
                    n > cut && n <= len,
                    "a {cut}-byte prefix of {len} asked for {n}"
                )
            }
            Err(e) => assert_eq!(whole.as_ref().err(), Some(&e), "prefix of {cut} bytes"),
        }
    }
}

/// safetensors weights beside [`tiny_config_json`] and [`tiny_tokenizer_json`], every
/// tensor read ([`read_checkpoint`]). The first byte chooses what the rest is: `mode % 4` 0
/// or 1: one `model.safetensors`; 2: two shards, split where the next two bytes say; 3: a
/// `model.safetensors.index.json` (its shard names). `mode & 4`: the config ties the
/// embeddings (no `lm_head.weight`).
pub fn safetensors(data: &[u8]) -> Result<()> {
    if let Some(ckpt) = safetensors_checkpoint(data)? {
        read_checkpoint(&ckpt)?;
    }
    Ok(())
}

/// [`safetensors`]'s files on to a model and a forward pass ([`exercise_checkpoint`]).
pub fn safetensors_forward(data: &[u8]) -> Result<()> {
    match safetensors_checkpoint(data)? {
        Some(ckpt) => exercise_checkpoint(ckpt),
        None => Ok(()),
    }
}

/// [`safetensors`] without building the tokenizer beside the weights (see [`gguf_weights`]).
pub fn safetensors_weights(data: &[u8]) -> Result<()> {
    let Some((shards, tie)) = safetensors_shards(data)? else {
        return Ok(());
    };
    let shards = shards
        .into_iter()
        .map(|f| (f.name, Bytes::Owned(f.bytes)))
        .collect();
    let file = Safetensors::from_shards(shards, DType::F32)?;
    let config = tiny_config(tie);
    read_weights(in_its_layout(file, &config).as_ref(), &config)
}

/// The checkpoint [`safetensors`] describes; `None` for an index (mode 3), which is only
/// parsed.
fn safetensors_checkpoint(data: &[u8]) -> Result<Option<Checkpoint>> {
    let Some((weights, tie)) = safetensors_shards(data)? else {
        return Ok(None);
    };
    let config = named("config.json", tiny_config_json(tie).as_bytes());
    let tokenizer = named("tokenizer.json", tiny_tokenizer_json().as_bytes());
    Checkpoint::from_bytes(Some(config), Some(tokenizer), weights, DType::F32).map(Some)
}

/// The weight files [`safetensors`] describes and whether its config ties the embeddings;
/// `None` for an index (mode 3), which is only parsed.
fn safetensors_shards(data: &[u8]) -> Result<Option<(Vec<NamedBytes>, bool)>> {
    let (&mode, rest) = data
        .split_first()
        .ok_or_else(|| Error::input("empty input"))?;
    let weights = match mode % 4 {
        3 => {
            let json = String::from_utf8_lossy(rest);
            let names = Safetensors::shard_names(&json, "model.safetensors.index.json")?;
            for n in &names {
                if n.is_empty() || n.contains(['/', '\\']) || n.starts_with('.') {
                    panic!("shard_names let {n:?} through");
                }
            }
            return Ok(None);
        }
        2 => {
            let (at, rest) = match rest {
                [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
                _ => return Err(Error::input("too short for two shards")),
            };
            let at = at % (rest.len() + 1);
            vec![
                named("model-00001-of-00002.safetensors", &rest[..at]),
                named("model-00002-of-00002.safetensors", &rest[at..]),
            ]
        }
        _ => vec![named("model.safetensors", rest)],
    };
    Ok(Some((weights, mode & 4 != 0)))
}

/// A `config.json`, and what is derived from it before any tensor is read.
pub fn config_json(data: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(data).map_err(|_| Error::input("not UTF-8"))?;
    let cfg = PhiConfig::from_json(text, "config.json")?;
    let _ = (cfg.head_dim(), cfg.rotary_dim(), cfg.to_hf_json());
    // What `medphi info` prints, and the list every loader checks a checkpoint against.
    let _ = cfg.parameter_count();
    let _ = expected_tensors(&cfg);
    Ok(())
}

/// A `tokenizer.json`, then [`SAMPLE_TEXT`] encoded, decoded and streamed back.
pub fn tokenizer_json(data: &[u8]) -> Result<()> {
    let tokenizer = PhiTokenizer::from_bytes(data, "tokenizer.json")?;
    exercise_tokenizer(&tokenizer, SAMPLE_TEXT)?;
    Ok(())
}

/// A benchmark file, parsed as every format of [`BENCHMARK_TASKS`] (invalid UTF-8 is
/// replaced, as a browser's `TextDecoder` does). `Ok` when any format accepts it.
pub fn benchmarks(data: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(data);
    let mut result = Err(Error::input("no task accepted the file"));
    for name in BENCHMARK_TASKS {
        let task: Task = name.parse()?;
        match task.load(&text, "fuzz") {
            Ok(items) => {
                for item in &items {
                    if item.gold >= item.choices.len() || item.choices.len() < 2 {
                        panic!(
                            "{name}: item with gold {} of {} choices",
                            item.gold,
                            item.choices.len()
                        );
                    }
                }
                result = Ok(());
            }
            Err(e) => {
                if result.is_err() {
                    result = Err(e);
                }
            }
        }
    }
    result
}

/// A generate request as the page sends it (`{prompt, format, history: [{user,
/// assistant}], maxNewTokens, stop, temperature, topK, topP, repetitionPenalty, seed}`).
#[derive(Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ChatRequest {
    pub prompt: String,
    pub format: PromptFormat,
    pub history: Vec<Turn>,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    #[serde(flatten)]
    pub sampling: SamplingParams,
}

impl Default for ChatRequest {
    fn default() -> Self {
        let opts = GenerateOptions::default();
        Self {
            prompt: String::new(),
            format: PromptFormat::Raw,
            history: Vec::new(),
            max_new_tokens: opts.max_new_tokens,
            stop: Vec::new(),
            sampling: opts.sampling,
        }
    }
}

/// A generate request (JSON), its prompt rendered in its format after its history and
/// tokenized by `tokenizer` (the target uses Phi-2's), as the page does before generating.
pub fn chat_template(tokenizer: &PhiTokenizer, data: &[u8]) -> Result<()> {
    let req: ChatRequest = serde_json::from_slice(data)
        .map_err(|e| Error::input(format!("not a generate request: {e}")))?;
    Sampler::new(req.sampling)?;
    let prompt = req.format.render(&req.history, &req.prompt);
    let mut stop = req.format.stop_strings();
    stop.extend(req.stop);
    let _ = stop.iter().map(|s| prompt.matches(s.as_str()).count());
    exercise_tokenizer(tokenizer, &prompt)?;
    Ok(())
}

/// Phi-2's tokenizer from the test fixtures, for [`chat_template`].
pub fn fixture_tokenizer() -> Result<PhiTokenizer> {
    PhiTokenizer::from_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-phi/tokenizer.json"),
    )
}

/// The tiny model's `config.json` (1 layer, hidden 32, 4 heads, vocabulary 64).
pub fn tiny_config_json(tie_word_embeddings: bool) -> String {
    tiny_config(tie_word_embeddings).to_hf_json().to_string()
}

/// The tiny model's configuration.
pub fn tiny_config(tie_word_embeddings: bool) -> PhiConfig {
    PhiConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        max_position_embeddings: 64,
        layer_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        partial_rotary_factor: 0.5,
        hidden_act: Activation::GeluTanh,
        tie_word_embeddings,
        bos_token_id: Some(62),
        eos_token_id: Some(62),
    }
}

/// A byte-level BPE `tokenizer.json` in Phi-2's format with 63 tokens: letters, space,
/// newline, `: . ? ,`, four merges and `<|endoftext|>` (id 62).
pub fn tiny_tokenizer_json() -> String {
    let (tokens, types, merges) = tiny_vocabulary();
    crate::tokenizer::byte_level_bpe_json(&tokens, &types, &merges)
        .expect("the tiny vocabulary is well-formed")
}

/// The tiny tokenizer as GGUF stores it: tokens by id, their types, merges.
pub fn tiny_vocabulary() -> (Vec<String>, Vec<i64>, Vec<String>) {
    let mut tokens: Vec<String> = ('a'..='z').chain('A'..='Z').map(String::from).collect();
    // GPT-2's byte-level alphabet writes space and newline as Ġ and Ċ.
    tokens.extend(["Ġ", "Ċ", ":", ".", "?", ","].map(String::from));
    let merges: Vec<String> = ["Ġ t", "t h", "i n", "e r"].map(String::from).to_vec();
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let mut types = vec![1; tokens.len()];
    tokens.push("<|endoftext|>".into());
    types.push(3);
    (tokens, types, merges)
}

fn named(name: &str, bytes: &[u8]) -> NamedBytes {
    NamedBytes {
        name: name.into(),
        bytes: bytes.to_vec(),
    }
}

/// What `medphi info` and the page do with a checkpoint before building a model: check
/// every tensor from headers, count parameters, plan the memory (both targets), tokenize,
/// and read every tensor the config expects. Returns the sample text's ids.
pub fn read_checkpoint(ckpt: &Checkpoint) -> Result<Vec<u32>> {
    read_weights(ckpt.weights.as_ref(), &ckpt.config)?;
    exercise_tokenizer(&ckpt.tokenizer, SAMPLE_TEXT)
}

/// [`read_checkpoint`]'s part that concerns the weights.
fn read_weights(weights: &dyn TensorSource, config: &PhiConfig) -> Result<()> {
    let expected = expected_tensors(config);
    weights.check(&expected)?;
    let _ = config.parameter_count();
    let stored = weights.stored_tensors();
    for target in [Target::Cpu, Target::Gpu] {
        let _ = MemoryPlan::new(&stored, config, usize::MAX, target).total();
    }
    for (name, shape) in &expected {
        weights.tensor(name, shape)?;
    }
    Ok(())
}

/// [`read_checkpoint`], then what `medphi generate` does before the first token: build the
/// model and run a short prefill and one decode step.
pub fn exercise_checkpoint(ckpt: Checkpoint) -> Result<()> {
    let mut ids = read_checkpoint(&ckpt)?;
    ids.truncate(FORWARD_TOKENS);
    if ids.is_empty() {
        ids.push(0);
    }
    let (model, _tokenizer) = ckpt.into_model(true)?;
    let mut cache = model.new_cache(1, ids.len() + 1)?;
    let prompt = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&prompt, Some(&mut cache), Logits::Last)?;
    let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    let step = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
    model.forward(&step, Some(&mut cache), Logits::Last)?;
    Ok(())
}

/// Encodes `text`, decodes it, streams the ids back, and decodes the last id and one past
/// it (as a model with a larger vocabulary could produce). Returns the ids.
fn exercise_tokenizer(tokenizer: &PhiTokenizer, text: &str) -> Result<Vec<u32>> {
    let ids = tokenizer.encode(text)?;
    tokenizer.decode(&ids)?;
    let mut stream = TokenStream::new(tokenizer);
    for &id in ids.iter().take(STREAM_TOKENS) {
        stream.push(id)?;
    }
    stream.finish()?;
    let last = u32::try_from(tokenizer.vocab_limit() - 1).unwrap_or(u32::MAX);
    let _ = tokenizer.id_to_token(last);
    let _ = tokenizer.decode(&[last]);
    let _ = tokenizer.decode(&[last.saturating_add(1)]);
    Ok(ids)
}

/// Panics unless `result` is `Ok` or an error a user can act on. A [`Error::Tensor`] means
/// a file got past validation into the tensor code (such errors name no file and usually
/// mean a check is missing), and an error must say something.
pub fn assert_clean(result: Result<()>) {
    if let Err(e) = result {
        if let Error::Tensor(_) = e {
            panic!("input got past validation into the tensor code: {e}");
        }
        assert!(
            !e.to_string().trim().is_empty(),
            "an error without a message"
        );
    }
}
