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
use crate::model::names::{Site, TensorId};
use crate::model::PhiConfig;
use crate::model::{TensorSource, Weight};

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
    data: HostData,
    format: WeightFormat,
    cols: usize,
}

/// f32 values stay the `Vec<f32>` they were read into: copying them into bytes would hold a
/// third copy of Phi-2's 524 MB output layer in wasm memory beside the staged file bytes.
enum HostData {
    Bytes(Vec<u8>),
    F32(Vec<f32>),
}

impl HostData {
    fn bytes(&self) -> &[u8] {
        match self {
            HostData::Bytes(b) => b,
            HostData::F32(v) => bytemuck::cast_slice(v),
        }
    }
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
        // The tensor is consumed, so its values are freed as soon as they are copied out.
        let dense = |t: candle_core::Tensor, f16: bool| -> Result<(HostData, WeightFormat)> {
            let t = t.flatten_all()?;
            Ok(if f16 {
                let halves = t.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
                let bytes = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
                (HostData::Bytes(bytes), WeightFormat::F16)
            } else {
                let values = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                (HostData::F32(values), WeightFormat::F32)
            })
        };
        let blocks = |q: &candle_core::quantized::QTensor| -> Result<HostData> {
            Ok(HostData::Bytes(q.data()?.into_owned()))
        };
        let (data, format) = match src.tensor(name, &[rows, cols])? {
            Weight::Quantized(q) => match q.dtype() {
                GgmlDType::Q8_0 => (blocks(&q)?, WeightFormat::Q8_0),
                GgmlDType::Q4_0 => (blocks(&q)?, WeightFormat::Q4_0),
                GgmlDType::F16 => (blocks(&q)?, WeightFormat::F16),
                _ => dense(q.dequantize(&candle_core::Device::Cpu)?, false)?,
            },
            Weight::Dense(t) => dense(t, stored_f16)?,
        };
        let len = data.bytes().len();
        if len != rows * format.row_bytes(cols) {
            return Err(Error::file(
                name,
                format!("{len} bytes for {rows}×{cols} in {format:?}"),
            ));
        }
        Ok(Self { data, format, cols })
    }

    fn rows(&self, start: usize, count: usize) -> &[u8] {
        let row = self.format.row_bytes(self.cols);
        &self.data.bytes()[start * row..(start + count) * row]
    }
}

/// Reads tensors from a checkpoint and uploads them.
struct Uploader<'a> {
    ctx: &'a GpuContext,
    cfg: &'a PhiConfig,
    src: &'a dyn TensorSource,
    /// Names of the matrices the checkpoint stores as f16 (kept f16 on the GPU).
    stored_f16: HashSet<String>,
}

impl Uploader<'_> {
    async fn vector(&self, id: TensorId) -> Result<super::GpuTensor> {
        let values = self.host(id).await?;
        self.ctx.upload(&id.hf(), &values, &[values.len()])
    }

    async fn host(&self, id: TensorId) -> Result<Vec<f32>> {
        let (name, shape) = (id.hf(), id.shape(self.cfg));
        self.src.fetch(&name, &shape).await?;
        let t = self.src.tensor(&name, &shape)?.dense()?;
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    async fn matrix(&self, id: TensorId) -> Result<HostMatrix> {
        let name = id.hf();
        let shape = id.shape(self.cfg);
        self.src.fetch(&name, &shape).await?;
        let stored_f16 = self.stored_f16.contains(&name);
        HostMatrix::read(self.src, &name, (shape[0], shape[1]), stored_f16)
    }

    async fn norm(&self, site: Site) -> Result<GpuNorm> {
        Ok(GpuNorm {
            w: self.vector(site.weight()).await?,
            b: self.vector(site.bias()).await?,
            eps: self.cfg.layer_norm_eps as f32,
        })
    }

    async fn linear(&self, site: Site) -> Result<GpuLinear> {
        let m = self.matrix(site.weight()).await?;
        let shape = site.weight().shape(self.cfg);
        Ok(GpuLinear {
            w: self
                .ctx
                .upload_bytes(&site.weight().hf(), m.data.bytes(), &shape, m.format)?,
            b: Some(self.vector(site.bias()).await?),
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
    /// Reads every tensor of `cfg` from `src` and uploads it, one tensor at a time: each is
    /// fetched, converted and uploaded before the next is read.
    pub async fn upload(ctx: &GpuContext, cfg: &PhiConfig, src: &dyn TensorSource) -> Result<Self> {
        let up = Uploader {
            ctx,
            cfg,
            src,
            stored_f16: src.stored_f16(),
        };
        let vocab = cfg.vocab_size;
        let embed_id = Site::Embedding.weight();
        let embed = up.row_chunks(&up.matrix(embed_id).await?, &embed_id.hf(), None, vocab)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(Layer {
                norm: up.norm(Site::Norm(i)).await?,
                q: up.linear(Site::Q(i)).await?,
                k: up.linear(Site::K(i)).await?,
                v: up.linear(Site::V(i)).await?,
                dense: up.linear(Site::Dense(i)).await?,
                fc1: up.linear(Site::Fc1(i)).await?,
                fc2: up.linear(Site::Fc2(i)).await?,
            });
        }
        // A tied output layer reads the embedding's matrix.
        let head_id = if cfg.tie_word_embeddings {
            embed_id
        } else {
            Site::Head.weight()
        };
        let final_norm = up.norm(Site::FinalNorm).await?;
        let head_bias = up.host(Site::Head.bias()).await?;
        let head = up.matrix(head_id).await?;
        let lm_head = up.row_chunks(&head, &head_id.hf(), Some(&head_bias), vocab)?;
        Ok(Self {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// Bytes of weights one pass over the layers and the output layer reads (the embedding
    /// is gathered, not read whole).
    pub fn pass_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.norm.bytes()
                    + [&l.q, &l.k, &l.v, &l.dense, &l.fc1, &l.fc2]
                        .iter()
                        .map(|m| m.bytes())
                        .sum::<usize>()
            })
            .sum();
        let head: usize = self.lm_head.chunks.iter().map(|(_, c)| c.bytes()).sum();
        layers + self.final_norm.bytes() + head
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
