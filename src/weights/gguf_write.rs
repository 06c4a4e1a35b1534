//! Writing a phi2 GGUF for llama.cpp users and the page: llama.cpp's tensor names and
//! metadata, the byte-level BPE vocabulary embedded (padded to the embedding's rows as
//! llama.cpp's converter does), matrices in the chosen block type.
//!
//! The file is streamed: every tensor's size follows from its shape and type, so the header
//! with all offsets is written first, then each tensor is read from its source, converted,
//! written and dropped. Memory stays about one tensor, whatever the model's size.

use std::io::Write;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};
use crate::model::names::{all_tensors, TensorId};
use crate::model::{PhiConfig, TensorSource};

const ALIGNMENT: usize = 32;

/// A metadata value, in the types this writer needs (GGUF's codes).
enum Meta {
    U32(u32),
    F32(f32),
    String(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
}

impl Meta {
    fn write(&self, w: &mut Vec<u8>) {
        let string = |w: &mut Vec<u8>, s: &str| {
            w.extend((s.len() as u64).to_le_bytes());
            w.extend(s.as_bytes());
        };
        match self {
            Meta::U32(v) => {
                w.extend(4u32.to_le_bytes());
                w.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                w.extend(6u32.to_le_bytes());
                w.extend(v.to_le_bytes());
            }
            Meta::String(s) => {
                w.extend(8u32.to_le_bytes());
                string(w, s);
            }
            Meta::Strings(items) => {
                w.extend(9u32.to_le_bytes());
                w.extend(8u32.to_le_bytes());
                w.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    string(w, s);
                }
            }
            Meta::I32s(items) => {
                w.extend(9u32.to_le_bytes());
                w.extend(5u32.to_le_bytes());
                w.extend((items.len() as u64).to_le_bytes());
                for v in items {
                    w.extend(v.to_le_bytes());
                }
            }
        }
    }
}

/// GGML's code for the types this writer produces.
fn ggml_code(dtype: GgmlDType) -> Result<u32> {
    Ok(match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 8,
        other => return Err(Error::input(format!("cannot write {other:?} tensors"))),
    })
}

/// `tokenizer.json`'s byte-level BPE as GGUF arrays: tokens by id, their types (1 normal, 3
/// control for special added tokens, 4 other added tokens, 5 the `[PAD…]` rows beyond the
/// vocabulary up to `rows`, as llama.cpp's converter writes them) and the merges.
fn tokenizer_metadata(json: &str, rows: usize) -> Result<Vec<(&'static str, Meta)>> {
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
    let mut put = |id: usize, token: &str, kind: i32| -> Result<()> {
        if id >= rows {
            return Err(bad(&format!(
                "token id {id} has no row in the embedding ({rows} rows)"
            )));
        }
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((token.to_string(), kind));
        Ok(())
    };
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("a vocab id is not a number"))?;
        put(id as usize, token, 1)?;
    }
    for t in v["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(bad("an added token without id or content"));
        };
        put(
            id as usize,
            content,
            if t["special"] == true { 3 } else { 4 },
        )?;
    }
    let defined = by_id.len();
    let mut tokens = Vec::with_capacity(rows);
    let mut types = Vec::with_capacity(rows);
    for (id, t) in by_id.into_iter().enumerate() {
        let (token, kind) = t.ok_or_else(|| bad(&format!("no token has id {id}")))?;
        tokens.push(token);
        types.push(kind);
    }
    for id in defined..rows {
        tokens.push(format!("[PAD{id}]"));
        types.push(5);
    }
    let merges: Vec<String> = model["merges"]
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
        ("tokenizer.ggml.model", Meta::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::Strings(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strings(merges)),
    ];
    if let Some(eos) = special("<|endoftext|>") {
        out.push(("tokenizer.ggml.bos_token_id", Meta::U32(eos as u32)));
        out.push(("tokenizer.ggml.eos_token_id", Meta::U32(eos as u32)));
    }
    Ok(out)
}

/// One tensor of the file: its id, GGUF type, shape (outermost first) and byte size.
struct Planned {
    id: TensorId,
    dtype: GgmlDType,
    shape: Vec<usize>,
    bytes: usize,
}

/// Writes the model `src` holds (of config `cfg`) as a phi2 GGUF. Matrices whose rows are
/// whole blocks take `quant` (f32 when `None`); vectors stay f32. `on_tensor` hears each
/// tensor's name as it is written.
pub fn write_gguf(
    out: &mut impl Write,
    cfg: &PhiConfig,
    src: &dyn TensorSource,
    tokenizer_json: &str,
    quant: Option<GgmlDType>,
    on_tensor: &mut dyn FnMut(&str),
) -> Result<()> {
    let mut meta = vec![
        ("general.architecture", Meta::String("phi2".into())),
        ("general.name", Meta::String("medphi".into())),
        ("general.alignment", Meta::U32(ALIGNMENT as u32)),
        (
            "phi2.context_length",
            Meta::U32(cfg.max_position_embeddings as u32),
        ),
        ("phi2.embedding_length", Meta::U32(cfg.hidden_size as u32)),
        (
            "phi2.feed_forward_length",
            Meta::U32(cfg.intermediate_size as u32),
        ),
        ("phi2.block_count", Meta::U32(cfg.num_hidden_layers as u32)),
        (
            "phi2.attention.head_count",
            Meta::U32(cfg.num_attention_heads as u32),
        ),
        (
            "phi2.attention.head_count_kv",
            Meta::U32(cfg.num_key_value_heads as u32),
        ),
        (
            "phi2.attention.layer_norm_epsilon",
            Meta::F32(cfg.layer_norm_eps as f32),
        ),
        (
            "phi2.rope.dimension_count",
            Meta::U32(cfg.rotary_dim() as u32),
        ),
        ("phi2.rope.freq_base", Meta::F32(cfg.rope_theta as f32)),
    ];
    if let Some(q) = quant {
        // llama.cpp's LLAMA_FTYPE: mostly q4_0 (2), mostly q8_0 (7); a u32, which llama.cpp
        // checks (an i32 fails its load with "general.file_type has wrong type").
        let file_type = match q {
            GgmlDType::Q4_0 => 2,
            GgmlDType::Q8_0 => 7,
            _ => 0,
        };
        meta.push(("general.file_type", Meta::U32(file_type)));
    }
    meta.extend(tokenizer_metadata(tokenizer_json, cfg.vocab_size)?);
    let plan: Vec<Planned> = all_tensors(cfg)
        .into_iter()
        .map(|id| {
            let shape = id.shape(cfg);
            let cols = *shape.last().unwrap_or(&1);
            let dtype = match quant {
                Some(q) if shape.len() == 2 && cols.is_multiple_of(q.block_size()) => q,
                _ => GgmlDType::F32,
            };
            let elems: usize = shape.iter().product();
            Planned {
                id,
                dtype,
                bytes: elems / dtype.block_size() * dtype.type_size(),
                shape,
            }
        })
        .collect();

    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend((plan.len() as u64).to_le_bytes());
    header.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in &meta {
        header.extend((key.len() as u64).to_le_bytes());
        header.extend(key.as_bytes());
        value.write(&mut header);
    }
    let mut offset = 0usize;
    for t in &plan {
        let name = t.id.gguf();
        header.extend((name.len() as u64).to_le_bytes());
        header.extend(name.as_bytes());
        header.extend((t.shape.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for d in t.shape.iter().rev() {
            header.extend((*d as u64).to_le_bytes());
        }
        header.extend(ggml_code(t.dtype)?.to_le_bytes());
        header.extend((offset as u64).to_le_bytes());
        offset = (offset + t.bytes).next_multiple_of(ALIGNMENT);
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
    out.write_all(&header)
        .map_err(|e| Error::input(format!("writing the GGUF header: {e}")))?;

    for t in &plan {
        let name = t.id.gguf();
        on_tensor(&name);
        let dense = src.tensor(&t.id.hf(), &t.shape)?.dense()?;
        let data = super::quantize::quantize(&dense, t.dtype)?
            .data()?
            .into_owned();
        if data.len() != t.bytes {
            return Err(Error::input(format!(
                "{name}: {} bytes, {} planned",
                data.len(),
                t.bytes
            )));
        }
        let padding = t.bytes.next_multiple_of(ALIGNMENT) - t.bytes;
        out.write_all(&data)
            .and_then(|_| out.write_all(&[0; ALIGNMENT][..padding]))
            .map_err(|e| Error::input(format!("writing {name}: {e}")))?;
    }
    Ok(())
}
