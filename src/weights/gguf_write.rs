//! Writing a phi2 GGUF for llama.cpp users and the page: llama.cpp's tensor names and
//! metadata, the byte-level BPE vocabulary embedded, matrices in the chosen block type.

use std::collections::HashMap;
use std::io::Write;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Tensor;

use super::gguf::gguf_name;
use crate::error::{Error, Result};
use crate::model::PhiConfig;

/// `tokenizer.json`'s byte-level BPE as GGUF arrays: tokens by id, their types (1 normal,
/// 3 control for special added tokens, 4 other added tokens) and the merges.
fn tokenizer_metadata(json: &str) -> Result<Vec<(&'static str, gguf_file::Value)>> {
    let bad = |m: &str| Error::file("tokenizer.json", m);
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let model = &v["model"];
    if model["type"] != "BPE" {
        return Err(bad(
            "only byte-level BPE tokenizers can be embedded in a GGUF",
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is missing"))?;
    let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
    let mut put = |id: usize, token: &str, kind: i32| {
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((token.to_string(), kind));
    };
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("a vocab id is not a number"))?;
        put(id as usize, token, 1);
    }
    for t in v["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(bad("an added token without id or content"));
        };
        put(
            id as usize,
            content,
            if t["special"] == true { 3 } else { 4 },
        );
    }
    let (tokens, types): (Vec<_>, Vec<_>) = by_id
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.ok_or_else(|| bad(&format!("no token has id {id}"))))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .map(|(s, k)| (gguf_file::Value::String(s), gguf_file::Value::I32(k)))
        .unzip();
    let merges: Vec<gguf_file::Value> = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is missing"))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            _ => Err(bad("a merge is neither \"a b\" nor [a, b]")),
        })
        .map(|m| m.map(gguf_file::Value::String))
        .collect::<Result<_>>()?;
    let special = |name: &str| {
        v["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["content"] == name)
            .and_then(|t| t["id"].as_u64())
    };
    let mut out = vec![
        (
            "tokenizer.ggml.model",
            gguf_file::Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.tokens", gguf_file::Value::Array(tokens)),
        ("tokenizer.ggml.token_type", gguf_file::Value::Array(types)),
        ("tokenizer.ggml.merges", gguf_file::Value::Array(merges)),
    ];
    if let Some(eos) = special("<|endoftext|>") {
        out.push((
            "tokenizer.ggml.bos_token_id",
            gguf_file::Value::U32(eos as u32),
        ));
        out.push((
            "tokenizer.ggml.eos_token_id",
            gguf_file::Value::U32(eos as u32),
        ));
    }
    Ok(out)
}

/// Writes `tensors` (Hugging Face names) as a phi2 GGUF. Matrices whose rows are whole
/// blocks take `quant` (f32 when `None`); vectors stay f32.
pub fn write_gguf(
    out: &mut (impl Write + std::io::Seek),
    cfg: &PhiConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer_json: &str,
    quant: Option<GgmlDType>,
) -> Result<()> {
    let u32v = |v: usize| gguf_file::Value::U32(v as u32);
    let mut meta = vec![
        (
            "general.architecture",
            gguf_file::Value::String("phi2".into()),
        ),
        ("general.name", gguf_file::Value::String("medphi".into())),
        ("phi2.context_length", u32v(cfg.max_position_embeddings)),
        ("phi2.embedding_length", u32v(cfg.hidden_size)),
        ("phi2.feed_forward_length", u32v(cfg.intermediate_size)),
        ("phi2.block_count", u32v(cfg.num_hidden_layers)),
        ("phi2.attention.head_count", u32v(cfg.num_attention_heads)),
        (
            "phi2.attention.head_count_kv",
            u32v(cfg.num_key_value_heads),
        ),
        (
            "phi2.attention.layer_norm_epsilon",
            gguf_file::Value::F32(cfg.layer_norm_eps as f32),
        ),
        ("phi2.rope.dimension_count", u32v(cfg.rotary_dim())),
        (
            "phi2.rope.freq_base",
            gguf_file::Value::F32(cfg.rope_theta as f32),
        ),
    ];
    meta.extend(tokenizer_metadata(tokenizer_json)?);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut qtensors = Vec::with_capacity(names.len());
    for name in names {
        let t = &tensors[name];
        let gguf =
            gguf_name(name).ok_or_else(|| Error::input(format!("{name} is not a Phi tensor")))?;
        let dtype = match quant {
            Some(q) if t.rank() == 2 && t.dim(1)? % q.block_size() == 0 => q,
            _ => GgmlDType::F32,
        };
        let t = t.to_dtype(candle_core::DType::F32)?;
        qtensors.push((gguf, QTensor::quantize(&t, dtype)?));
    }
    let meta: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let qt: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(out, &meta, &qt)?;
    Ok(())
}
