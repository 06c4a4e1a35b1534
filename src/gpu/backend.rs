//! The whole Phi-2 forward pass on the GPU: weights, KV cache and activations stay in GPU
//! buffers; one command encoder per forward records every dispatch, and only the logits
//! rows asked for come back.
//!
//! Weight matrices stay in their stored format: f32, f16 (packed pairs) or GGUF q8_0/q4_0
//! blocks, uploaded as-is and dequantized inside the kernels; other GGUF block types are
//! dequantized to f32 at load. Norms and biases are f32.

use std::collections::HashSet;

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use wgpu::Buffer;

use super::context::GpuContext;
use super::kernels::{
    attention_partials_len, AttentionShape, Kernels, MatmulParams, RopeKvBuffers, WeightFormat,
    MAX_TOP_K,
};
use crate::backend::{BoxFuture, DeviceStats, Next, Want};
use crate::candidates::TopK;
use crate::error::{Error, Result};
use crate::model::{Activation, Logits, PhiConfig};
use crate::weights::{TensorSource, Weight};

/// Tokens processed per recorded pass; longer prompts run in several.
const CHUNK: usize = 128;

struct Linear {
    w: Buffer,
    format: WeightFormat,
    b: Buffer,
    out: u32,
    inp: u32,
}

struct Layer {
    ln_w: Buffer,
    ln_b: Buffer,
    q: Linear,
    k: Linear,
    v: Linear,
    dense: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// Everything sized by the number of positions: each layer's K and V cache (laid out
/// `[kv_head][allocated][head_dim]`), the rotary tables and attention's split partials.
/// Allocated for the positions in use and grown (doubling, up to the context) when a
/// forward needs more, so memory follows the tokens run, not the context a config allows.
struct Positions {
    allocated: usize,
    k_cache: Vec<Buffer>,
    v_cache: Vec<Buffer>,
    cos: Buffer,
    sin: Buffer,
    partials: Buffer,
}

/// Positions allocated by the first forward (more if it needs more).
const FIRST_POSITIONS: usize = 128;

impl Positions {
    fn new(ctx: &GpuContext, cfg: &PhiConfig, allocated: usize) -> Result<Self> {
        let cache = cfg.num_key_value_heads * allocated * cfg.head_dim();
        let rd = cfg.rotary_dim();
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..allocated)
            .flat_map(|p| (0..rd / 2).map(move |j| (p, j)))
            .map(|(p, j)| {
                // The CPU path's table: f32 inverse frequency times f32 position.
                let inv = 1.0 / cfg.rope_theta.powf((2 * j) as f64 / rd as f64) as f32;
                let a = p as f32 * inv;
                (a.cos(), a.sin())
            })
            .unzip();
        let layers = 0..cfg.num_hidden_layers;
        Ok(Self {
            allocated,
            k_cache: layers
                .clone()
                .map(|i| ctx.storage(&format!("layer {i} k cache"), cache))
                .collect::<Result<_>>()?,
            v_cache: layers
                .map(|i| ctx.storage(&format!("layer {i} v cache"), cache))
                .collect::<Result<_>>()?,
            cos: ctx.upload("cos", &cos)?,
            sin: ctx.upload("sin", &sin)?,
            partials: ctx.storage(
                "attention partials",
                attention_partials_len(cfg.num_attention_heads, cfg.head_dim(), allocated),
            )?,
        })
    }

    /// A larger store holding the first `len` cached positions of this one.
    fn grow(
        &self,
        ctx: &GpuContext,
        cfg: &PhiConfig,
        allocated: usize,
        len: usize,
    ) -> Result<Self> {
        let bigger = Self::new(ctx, cfg, allocated)?;
        let row = (cfg.head_dim() * 4) as u64;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let pairs = self.k_cache.iter().zip(&bigger.k_cache);
        for (old, new) in pairs.chain(self.v_cache.iter().zip(&bigger.v_cache)) {
            for head in 0..cfg.num_key_value_heads as u64 {
                enc.copy_buffer_to_buffer(
                    old,
                    head * self.allocated as u64 * row,
                    new,
                    head * allocated as u64 * row,
                    len as u64 * row,
                );
            }
        }
        ctx.queue.submit([enc.finish()]);
        Ok(bigger)
    }
}

/// Activations for up to `CHUNK` tokens, allocated once.
struct Scratch {
    ids: Buffer,
    x: Buffer,
    h: Buffer,
    q: Buffer,
    k: Buffer,
    v: Buffer,
    q_rot: Buffer,
    attn: Buffer,
    proj: Buffer,
    mlp_hidden: Buffer,
    mlp: Buffer,
    last: Buffer,
    /// The last position's top-k candidates and log-normaliser (top_k.wgsl's layout); the
    /// greedy token is its first word.
    top: Buffer,
    /// Logits of the last position: the per-token output, so allocated once.
    last_logits: Buffer,
}

/// A matrix split into row ranges that each fit one storage binding.
struct RowChunks {
    format: WeightFormat,
    chunks: Vec<(u32, u32, Buffer, Option<Buffer>)>,
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
        rows: usize,
        cols: usize,
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

pub struct GpuBackend {
    ctx: GpuContext,
    kernels: Kernels,
    cfg: PhiConfig,
    embed: RowChunks,
    layers: Vec<Layer>,
    final_ln_w: Buffer,
    final_ln_b: Buffer,
    lm_head: RowChunks,
    positions: Positions,
    scratch: Scratch,
    capacity: usize,
    len: usize,
    stats: DeviceStats,
}

fn host(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = src.tensor(name, shape)?.dense()?;
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

impl GpuBackend {
    /// Uploads a checkpoint's weights to a new GPU device, for a context of `context` tokens
    /// (default: the model's context length); the KV cache grows with the tokens run.
    pub async fn load(
        cfg: &PhiConfig,
        src: &dyn TensorSource,
        context: Option<usize>,
    ) -> Result<Self> {
        cfg.validate()?;
        if cfg.hidden_act != Activation::GeluTanh {
            return Err(Error::gpu("only the gelu_new activation has a GPU kernel"));
        }
        if cfg.head_dim() > 128 {
            return Err(Error::gpu(format!(
                "head_dim {} exceeds the attention kernel's 128",
                cfg.head_dim()
            )));
        }
        src.check(&crate::model::expected_tensors(cfg))?;
        let ctx = GpuContext::new().await?;
        let kernels = Kernels::new(&ctx);
        let capacity = context
            .unwrap_or(usize::MAX)
            .min(cfg.max_position_embeddings);
        let (h, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let kv = cfg.num_key_value_heads * cfg.head_dim();
        let upload = |name: &str, shape: &[usize]| -> Result<Buffer> {
            ctx.upload(name, &host(src, name, shape)?)
        };
        let stored_f16: HashSet<String> = src
            .stored_tensors()
            .into_iter()
            .filter(|t| t.dtype == "F16")
            .map(|t| t.name)
            .collect();
        let matrix = |name: &str, rows: usize, cols: usize| {
            HostMatrix::read(src, name, rows, cols, stored_f16.contains(name))
        };
        let linear = |prefix: &str, out: usize, inp: usize| -> Result<Linear> {
            let name = format!("{prefix}.weight");
            let w = matrix(&name, out, inp)?;
            Ok(Linear {
                w: ctx.upload_bytes(&name, &w.bytes)?,
                format: w.format,
                b: upload(&format!("{prefix}.bias"), &[out])?,
                out: out as u32,
                inp: inp as u32,
            })
        };
        let embed_name = "model.embed_tokens.weight";
        let embed = Self::row_chunks(
            &ctx,
            &matrix(embed_name, vocab, h)?,
            embed_name,
            None,
            vocab,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                ln_w: upload(&format!("{p}.input_layernorm.weight"), &[h])?,
                ln_b: upload(&format!("{p}.input_layernorm.bias"), &[h])?,
                q: linear(&format!("{p}.self_attn.q_proj"), h, h)?,
                k: linear(&format!("{p}.self_attn.k_proj"), kv, h)?,
                v: linear(&format!("{p}.self_attn.v_proj"), kv, h)?,
                dense: linear(&format!("{p}.self_attn.dense"), h, h)?,
                fc1: linear(&format!("{p}.mlp.fc1"), inter, h)?,
                fc2: linear(&format!("{p}.mlp.fc2"), h, inter)?,
            });
        }
        let head_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let head_bias = host(src, "lm_head.bias", &[vocab])?;
        let lm_head = Self::row_chunks(
            &ctx,
            &matrix(head_name, vocab, h)?,
            head_name,
            Some(&head_bias),
            vocab,
        )?;
        let rows = CHUNK.min(capacity);
        let scratch = Scratch {
            ids: ctx.storage("ids", rows)?,
            x: ctx.storage("x", rows * h)?,
            h: ctx.storage("h", rows * h)?,
            q: ctx.storage("q", rows * h)?,
            k: ctx.storage("k", rows * kv)?,
            v: ctx.storage("v", rows * kv)?,
            q_rot: ctx.storage("q_rot", rows * h)?,
            attn: ctx.storage("attn", rows * h)?,
            proj: ctx.storage("proj", rows * h)?,
            mlp_hidden: ctx.storage("mlp_hidden", rows * inter)?,
            mlp: ctx.storage("mlp", rows * h)?,
            last: ctx.storage("last", h)?,
            top: ctx.storage("top-k", 2 * MAX_TOP_K as usize + 1)?,
            last_logits: ctx.storage("last logits", vocab)?,
        };
        Ok(Self {
            positions: Positions::new(&ctx, cfg, FIRST_POSITIONS.min(capacity))?,
            final_ln_w: upload("model.final_layernorm.weight", &[h])?,
            final_ln_b: upload("model.final_layernorm.bias", &[h])?,
            ctx,
            kernels,
            cfg: cfg.clone(),
            embed,
            layers,
            lm_head,
            scratch,
            capacity,
            len: 0,
            stats: DeviceStats::default(),
        })
    }

    /// Uploads matrix `name` (`rows` rows) as row ranges that each fit one binding.
    fn row_chunks(
        ctx: &GpuContext,
        m: &HostMatrix,
        name: &str,
        bias: Option<&[f32]>,
        rows: usize,
    ) -> Result<RowChunks> {
        let limit = ctx
            .info
            .max_storage_buffer_binding_size
            .min(ctx.info.max_buffer_size);
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
            let w = ctx.upload_bytes(name, m.rows(start, n))?;
            let b = bias
                .as_ref()
                .map(|b| ctx.upload("bias", &b[start..start + n]))
                .transpose()?;
            chunks.push((start as u32, n as u32, w, b));
        }
        Ok(RowChunks {
            format: m.format,
            chunks,
        })
    }

    pub fn info(&self) -> &super::GpuInfo {
        &self.ctx.info
    }

    /// The device, for a caller that must be able to destroy it (the page's test of what
    /// happens when a browser loses its GPU).
    pub fn device(&self) -> wgpu::Device {
        self.ctx.device.clone()
    }

    /// The formats the weight matrices are held in on the GPU, each once.
    pub fn weight_formats(&self) -> Vec<WeightFormat> {
        let mut formats = vec![self.embed.format, self.lm_head.format];
        for l in &self.layers {
            formats.extend([
                l.q.format,
                l.k.format,
                l.v.format,
                l.dense.format,
                l.fc1.format,
                l.fc2.format,
            ]);
        }
        let mut seen = Vec::new();
        for f in formats {
            if !seen.contains(&f) {
                seen.push(f);
            }
        }
        seen
    }

    fn linear(
        &self,
        enc: &mut wgpu::CommandEncoder,
        l: &Linear,
        m: u32,
        x: &Buffer,
        y: &Buffer,
    ) -> Result<()> {
        let p = MatmulParams::new(m, l.out, l.inp, true);
        self.kernels
            .matmul(&self.ctx, enc, p, l.format, (x, &l.w, &l.b, y))
    }

    /// Records and submits the pass for `tokens` (at most `CHUNK`) after the cached
    /// positions, in one encoder; with `top = Some((limit, k, temperature))` it ends with the
    /// top `k` of the last logits row over ids below `limit`, left in `scratch.top` (with the
    /// log-normaliser unless the temperature is 0). Returns the logits buffer and its row
    /// count.
    fn forward_chunk(
        &mut self,
        tokens: &[u32],
        which: Logits,
        top: Option<(u32, u32, f32)>,
    ) -> Result<(Buffer, u32)> {
        let cfg = &self.cfg;
        let (seq, h) = (tokens.len() as u32, cfg.hidden_size as u32);
        let shape = AttentionShape {
            seq,
            heads: cfg.num_attention_heads as u32,
            kv_heads: cfg.num_key_value_heads as u32,
            head_dim: cfg.head_dim() as u32,
            rotary_dim: cfg.rotary_dim() as u32,
            start: self.len as u32,
            capacity: self.positions.allocated as u32,
        };
        let s = &self.scratch;
        let (k, ctx) = (&self.kernels, &self.ctx);
        ctx.queue
            .write_buffer(&s.ids, 0, bytemuck::cast_slice(tokens));
        k.begin_step();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for (start, count, table, _) in &self.embed.chunks {
            k.embedding(
                ctx,
                &mut enc,
                seq,
                h,
                (*start, *count, self.embed.format),
                (&s.ids, table, &s.x),
            )?;
        }
        let eps = cfg.layer_norm_eps as f32;
        let pos = &self.positions;
        for (i, layer) in self.layers.iter().enumerate() {
            k.layer_norm(
                ctx,
                &mut enc,
                seq,
                h,
                eps,
                (&s.x, &layer.ln_w, &layer.ln_b, &s.h),
            )?;
            self.linear(&mut enc, &layer.q, seq, &s.h, &s.q)?;
            self.linear(&mut enc, &layer.k, seq, &s.h, &s.k)?;
            self.linear(&mut enc, &layer.v, seq, &s.h, &s.v)?;
            let b = RopeKvBuffers {
                q: &s.q,
                k: &s.k,
                v: &s.v,
                cos: &pos.cos,
                sin: &pos.sin,
                q_out: &s.q_rot,
                k_cache: &pos.k_cache[i],
                v_cache: &pos.v_cache[i],
            };
            k.rope_kv(ctx, &mut enc, shape, b)?;
            k.attention(
                ctx,
                &mut enc,
                shape,
                (
                    &s.q_rot,
                    &pos.k_cache[i],
                    &pos.v_cache[i],
                    &pos.partials,
                    &s.attn,
                ),
            )?;
            self.linear(&mut enc, &layer.dense, seq, &s.attn, &s.proj)?;
            self.linear(&mut enc, &layer.fc1, seq, &s.h, &s.mlp_hidden)?;
            k.gelu_new(ctx, &mut enc, seq * layer.fc1.out, &s.mlp_hidden)?;
            self.linear(&mut enc, &layer.fc2, seq, &s.mlp_hidden, &s.mlp)?;
            k.residual(ctx, &mut enc, seq * h, (&s.x, &s.proj, &s.mlp))?;
        }
        let (rows, input) = match which {
            Logits::All => (seq, &s.x),
            Logits::Last => {
                let row = u64::from(h) * 4;
                enc.copy_buffer_to_buffer(&s.x, u64::from(seq - 1) * row, &s.last, 0, row);
                (1, &s.last)
            }
        };
        k.layer_norm(
            ctx,
            &mut enc,
            rows,
            h,
            eps,
            (input, &self.final_ln_w, &self.final_ln_b, &s.h),
        )?;
        let vocab = cfg.vocab_size as u32;
        let logits = match which {
            Logits::Last => s.last_logits.clone(),
            Logits::All => ctx.storage("logits", (rows * vocab) as usize)?,
        };
        for (start, count, w, b) in &self.lm_head.chunks {
            let bias = b
                .as_ref()
                .ok_or_else(|| Error::gpu("lm_head bias missing"))?;
            let p = MatmulParams::into_columns(rows, *count, h, true, vocab, *start);
            let format = self.lm_head.format;
            k.matmul(ctx, &mut enc, p, format, (&s.h, w, bias, &logits))?;
        }
        if let Some((limit, count, temperature)) = top {
            let inv_temp = if temperature > 0.0 {
                1.0 / temperature
            } else {
                0.0
            };
            let request = (limit.min(vocab), count, inv_temp);
            k.top_k(ctx, &mut enc, request, (&logits, &s.top))?;
        }
        ctx.queue.submit([enc.finish()]);
        self.stats.dispatches += k.dispatches_in_step();
        self.stats.submissions += 1;
        self.len += tokens.len();
        Ok((logits, rows))
    }

    /// Checks `tokens` and makes room for them in the position store.
    fn check_input(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::input("forward called with no tokens"));
        }
        let needed = self.len + tokens.len();
        if needed > self.capacity {
            return Err(Error::input(format!(
                "context length exceeded: {} tokens already, {} more, the context is {}",
                self.len,
                tokens.len(),
                self.capacity
            )));
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(Error::input(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let allocated = self.positions.allocated;
        if needed > allocated {
            let grown = needed.max(2 * allocated).min(self.capacity);
            self.positions = self.positions.grow(&self.ctx, &self.cfg, grown, self.len)?;
        }
        Ok(())
    }

    /// Runs all but the last `CHUNK`-sized piece of `tokens` into the cache; returns the rest.
    fn fill_cache<'t>(&mut self, tokens: &'t [u32]) -> Result<&'t [u32]> {
        let step = CHUNK.min(self.capacity);
        let mut rest = tokens;
        while rest.len() > step {
            self.forward_chunk(&rest[..step], Logits::Last, None)?;
            rest = &rest[step..];
        }
        Ok(rest)
    }

    async fn forward_async(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.check_input(tokens)?;
        self.stats = DeviceStats::default();
        let vocab = self.cfg.vocab_size;
        let mut out = Vec::new();
        let rest = match which {
            Logits::Last => self.fill_cache(tokens)?,
            Logits::All => tokens,
        };
        for piece in rest.chunks(CHUNK.min(self.capacity)) {
            let (logits, rows) = self.forward_chunk(piece, which, None)?;
            out.extend(self.ctx.read(&logits, rows as usize * vocab).await?);
            self.stats.bytes_read += rows as usize * vocab * 4;
        }
        Ok(out)
    }

    /// Runs `tokens` and selects the top `k` of the last row on the GPU; reads back the
    /// first `words` u32s of the result.
    async fn forward_top(
        &mut self,
        tokens: &[u32],
        (vocab_limit, k, temperature): (usize, usize, f32),
        words: usize,
    ) -> Result<Vec<u32>> {
        self.check_input(tokens)?;
        self.stats = DeviceStats::default();
        let rest = self.fill_cache(tokens)?;
        let limit = vocab_limit.min(self.cfg.vocab_size) as u32;
        self.forward_chunk(rest, Logits::Last, Some((limit, k as u32, temperature)))?;
        let out = self.ctx.read_as::<u32>(&self.scratch.top, words).await?;
        self.stats.bytes_read += words * 4;
        Ok(out)
    }

    /// Greedy next token, with the argmax (top 1, no normaliser) taken on the GPU: 4 bytes
    /// come back.
    async fn forward_greedy_async(&mut self, tokens: &[u32], vocab_limit: usize) -> Result<u32> {
        Ok(self.forward_top(tokens, (vocab_limit, 1, 0.0), 1).await?[0])
    }

    /// Sampling candidates selected on the GPU: 2k + 1 words come back.
    async fn forward_top_k_async(
        &mut self,
        tokens: &[u32],
        k: usize,
        vocab_limit: usize,
        temperature: f32,
    ) -> Result<TopK> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::input(format!(
                "top-k temperature {temperature} must be > 0"
            )));
        }
        let k = k.clamp(1, MAX_TOP_K as usize);
        let out = self
            .forward_top(tokens, (vocab_limit, k, temperature), 2 * k + 1)
            .await?;
        let found = out[..k].iter().take_while(|&&id| id != u32::MAX).count();
        Ok(TopK {
            ids: out[..found].to_vec(),
            logits: out[k..k + found]
                .iter()
                .map(|&b| f32::from_bits(b))
                .collect(),
            log_norm: f32::from_bits(out[2 * k]),
        })
    }

    /// The row behind the last `forward_top_k`, still on the GPU in `last_logits`.
    async fn last_logits_async(&mut self) -> Result<Vec<f32>> {
        if self.len == 0 {
            return Err(Error::input("no forward has run yet"));
        }
        let vocab = self.cfg.vocab_size;
        let row = self.ctx.read(&self.scratch.last_logits, vocab).await?;
        self.stats.bytes_read += vocab * 4;
        Ok(row)
    }
}

impl crate::backend::Backend for GpuBackend {
    fn name(&self) -> String {
        format!(
            "wgpu: {} ({})",
            self.ctx.info.adapter, self.ctx.info.backend
        )
    }

    fn config(&self) -> &PhiConfig {
        &self.cfg
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn cached(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn forward<'a>(&'a mut self, tokens: &'a [u32], want: Want) -> BoxFuture<'a, Result<Next>> {
        Box::pin(async move {
            Ok(match want {
                Want::Greedy { vocab_limit } => {
                    Next::Token(self.forward_greedy_async(tokens, vocab_limit).await?)
                }
                Want::Candidates {
                    k,
                    vocab_limit,
                    temperature,
                } => Next::Candidates(
                    self.forward_top_k_async(tokens, k, vocab_limit, temperature)
                        .await?,
                ),
                Want::LastRow => Next::Rows(self.forward_async(tokens, Logits::Last).await?),
                Want::AllRows => Next::Rows(self.forward_async(tokens, Logits::All).await?),
            })
        })
    }

    fn last_row(&mut self) -> BoxFuture<'_, Result<Vec<f32>>> {
        Box::pin(self.last_logits_async())
    }

    fn device_stats(&self) -> Option<DeviceStats> {
        Some(self.stats)
    }
}
