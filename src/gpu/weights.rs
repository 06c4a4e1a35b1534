//! A checkpoint's weights uploaded to the GPU, each matrix in its stored format: f32, f16
//! (packed pairs) or GGUF q8_0/q4_0 blocks, uploaded as-is and dequantized inside the
//! kernels; other GGUF block types are dequantized to f32 at load. Norms and biases are f32.
//! The embedding and the output layer are split by rows into chunks that each fit one
//! storage binding (Phi-2's 51,200 × 2,560 table does not fit WebGPU's default).

use std::collections::HashSet;

use candle_core::quantized::GgmlDType;
use candle_core::DType;

use super::context::GpuContext;
use super::tensor::{GpuLinear, GpuNorm, WeightFormat};
use crate::error::{Error, Result};
use crate::model::PhiConfig;
use crate::weights::{TensorSource, Weight};

/// One decoder block's weights.
pub struct Layer {
    pub norm: GpuNorm,
    pub q: GpuLinear,
    pub k: GpuLinear,
    pub v: GpuLinear,
    pub dense: GpuLinear,
    pub fc1: GpuLinear,
    pub fc2: GpuLinear,
}

/// A matrix split into row ranges that each fit one storage binding: each chunk's first row
/// in the whole matrix, and the chunk (its rows of the bias with it).
pub struct RowChunks {
    pub chunks: Vec<(usize, GpuLinear)>,
}

pub struct GpuWeights {
    pub embed: RowChunks,
    pub layers: Vec<Layer>,
    pub final_norm: GpuNorm,
    pub lm_head: RowChunks,
}

/// A weight matrix read from the checkpoint, as the bytes the GPU will hold.
struct HostMatrix {
    bytes: Vec<u8>,
    format: WeightFormat,
    cols: usize,
}

impl HostMatrix {
    /// `stored_f16`: the checkpoint holds this matrix as f16 (the source hands it over
    /// upcast to f32, so packing it back to f16 is exact).
    fn read(
        src: &dyn TensorSource,
        name: &str,
        (rows, cols): (usize, usize),
        stored_f16: bool,
    ) -> Result<Self> {
        let dense = |t: candle_core::Tensor, f16: bool| -> Result<(Vec<u8>, WeightFormat)> {
            let t = t.flatten_all()?;
            Ok(if f16 {
                let halves = t.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
                (
                    halves.iter().flat_map(|h| h.to_le_bytes()).collect(),
                    WeightFormat::F16,
                )
            } else {
                let values = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                (bytemuck::cast_slice(&values).to_vec(), WeightFormat::F32)
            })
        };
        let (bytes, format) = match src.tensor(name, &[rows, cols])? {
            Weight::Quantized(q) => match q.dtype() {
                GgmlDType::Q8_0 => (q.data()?.into_owned(), WeightFormat::Q8_0),
                GgmlDType::Q4_0 => (q.data()?.into_owned(), WeightFormat::Q4_0),
                GgmlDType::F16 => (q.data()?.into_owned(), WeightFormat::F16),
                _ => dense(q.dequantize(&candle_core::Device::Cpu)?, false)?,
            },
            Weight::Dense(t) => dense(t, stored_f16)?,
        };
        if bytes.len() != rows * format.row_bytes(cols) {
            return Err(Error::file(
                name,
                format!("{} bytes for {rows}×{cols} in {format:?}", bytes.len()),
            ));
        }
        Ok(Self {
            bytes,
            format,
            cols,
        })
    }

    fn rows(&self, start: usize, count: usize) -> &[u8] {
        let row = self.format.row_bytes(self.cols);
        &self.bytes[start * row..(start + count) * row]
    }
}

/// Reads tensors from a checkpoint and uploads them.
struct Uploader<'a> {
    ctx: &'a GpuContext,
    src: &'a dyn TensorSource,
    /// Names of the matrices the checkpoint stores as f16 (kept f16 on the GPU).
    stored_f16: HashSet<String>,
}

impl Uploader<'_> {
    fn vector(&self, name: &str, len: usize) -> Result<super::GpuTensor> {
        let values = self.host(name, len)?;
        self.ctx.upload(name, &values, &[len])
    }

    fn host(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.src.tensor(name, &[len])?.dense()?;
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    fn matrix(&self, name: &str, shape: (usize, usize)) -> Result<HostMatrix> {
        HostMatrix::read(self.src, name, shape, self.stored_f16.contains(name))
    }

    fn norm(&self, prefix: &str, dim: usize, eps: f32) -> Result<GpuNorm> {
        Ok(GpuNorm {
            w: self.vector(&format!("{prefix}.weight"), dim)?,
            b: self.vector(&format!("{prefix}.bias"), dim)?,
            eps,
        })
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<GpuLinear> {
        let name = format!("{prefix}.weight");
        let m = self.matrix(&name, (out, inp))?;
        Ok(GpuLinear {
            w: self
                .ctx
                .upload_bytes(&name, &m.bytes, &[out, inp], m.format)?,
            b: Some(self.vector(&format!("{prefix}.bias"), out)?),
        })
    }

    /// Uploads matrix `m` (`rows` rows, named `name`) as row ranges that each fit one binding.
    fn row_chunks(
        &self,
        m: &HostMatrix,
        name: &str,
        bias: Option<&[f32]>,
        rows: usize,
    ) -> Result<RowChunks> {
        let info = &self.ctx.info;
        let limit = info
            .max_storage_buffer_binding_size
            .min(info.max_buffer_size);
        let row_bytes = m.format.row_bytes(m.cols) as u64;
        // Each chunk is its own buffer, indexed from 0, so any row count works.
        let per_chunk = ((limit / row_bytes) as usize).min(rows);
        if per_chunk == 0 {
            return Err(Error::gpu(format!(
                "one row of {name} ({row_bytes} bytes) exceeds the adapter's binding limit {limit}"
            )));
        }
        let mut chunks = Vec::new();
        for start in (0..rows).step_by(per_chunk) {
            let n = per_chunk.min(rows - start);
            let w = self
                .ctx
                .upload_bytes(name, m.rows(start, n), &[n, m.cols], m.format)?;
            let b = bias
                .map(|b| self.ctx.upload("bias", &b[start..start + n], &[n]))
                .transpose()?;
            chunks.push((start, GpuLinear { w, b }));
        }
        Ok(RowChunks { chunks })
    }
}

impl GpuWeights {
    /// Reads every tensor of `cfg` from `src` and uploads it.
    pub fn upload(ctx: &GpuContext, cfg: &PhiConfig, src: &dyn TensorSource) -> Result<Self> {
        let up = Uploader {
            ctx,
            src,
            stored_f16: src
                .stored_tensors()
                .into_iter()
                .filter(|t| t.dtype == "F16")
                .map(|t| t.name)
                .collect(),
        };
        let (h, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let kv = cfg.num_key_value_heads * cfg.head_dim();
        let eps = cfg.layer_norm_eps as f32;
        let embed_name = "model.embed_tokens.weight";
        let embed = up.row_chunks(&up.matrix(embed_name, (vocab, h))?, embed_name, None, vocab)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    norm: up.norm(&format!("{p}.input_layernorm"), h, eps)?,
                    q: up.linear(&format!("{p}.self_attn.q_proj"), h, h)?,
                    k: up.linear(&format!("{p}.self_attn.k_proj"), kv, h)?,
                    v: up.linear(&format!("{p}.self_attn.v_proj"), kv, h)?,
                    dense: up.linear(&format!("{p}.self_attn.dense"), h, h)?,
                    fc1: up.linear(&format!("{p}.mlp.fc1"), inter, h)?,
                    fc2: up.linear(&format!("{p}.mlp.fc2"), h, inter)?,
                })
            })
            .collect::<Result<_>>()?;
        let head_name = if cfg.tie_word_embeddings {
            embed_name
        } else {
            "lm_head.weight"
        };
        let head_bias = up.host("lm_head.bias", vocab)?;
        let lm_head = up.row_chunks(
            &up.matrix(head_name, (vocab, h))?,
            head_name,
            Some(&head_bias),
            vocab,
        )?;
        Ok(Self {
            embed,
            layers,
            final_norm: up.norm("model.final_layernorm", h, eps)?,
            lm_head,
        })
    }

    /// The formats the weight matrices are held in, each once.
    pub fn formats(&self) -> Vec<WeightFormat> {
        let chunks = self.embed.chunks.iter().chain(&self.lm_head.chunks);
        let mut formats: Vec<WeightFormat> = chunks.map(|(_, c)| c.w.format).collect();
        for l in &self.layers {
            formats.extend([&l.q, &l.k, &l.v, &l.dense, &l.fc1, &l.fc2].map(|m| m.w.format));
        }
        let mut seen = Vec::new();
        for f in formats {
            if !seen.contains(&f) {
                seen.push(f);
            }
        }
        seen
    }
}
