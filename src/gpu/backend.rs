//! The whole Phi-2 forward pass on the GPU: weights, KV cache and activations stay in GPU
//! buffers; one command encoder per forward records every dispatch, and only what the
//! caller asked for comes back (a token, the sampling candidates, or logits rows).

use super::context::GpuContext;
use super::kernels::{
    attention_partials_len, AttentionBuffers, AttentionShape, KernelChoice, KernelFamily, Kernels,
    RopeKvBuffers, MAX_TOP_K,
};
use super::tensor::{GpuTensor, WeightFormat};
use super::weights::{GpuWeights, Layer};
use crate::backend::{BoxFuture, DeviceStats, Next, Want};
use crate::candidates::TopK;
use crate::error::{Error, Result};
use crate::memory_plan::{readable, MemoryPlan, Target};
use crate::model::TensorSource;
use crate::model::{Activation, Logits, PhiConfig};

/// Tokens processed per recorded pass; longer prompts run in several.
const CHUNK: usize = 128;

/// Everything sized by the number of positions: each layer's K and V cache (laid out
/// `[kv_head][allocated][head_dim]`), the rotary tables and attention's split partials.
/// Allocated for the positions in use and grown (doubling, up to the context) when a
/// forward needs more, so memory follows the tokens run, not the context a config allows.
struct Positions {
    allocated: usize,
    k_cache: Vec<GpuTensor>,
    v_cache: Vec<GpuTensor>,
    cos: GpuTensor,
    sin: GpuTensor,
    partials: GpuTensor,
}

/// Positions allocated by the first forward (more if it needs more).
const FIRST_POSITIONS: usize = 128;

impl Positions {
    fn new(ctx: &GpuContext, cfg: &PhiConfig, allocated: usize) -> Result<Self> {
        let cache = [cfg.num_key_value_heads, allocated, cfg.head_dim()];
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
        let partials = attention_partials_len(cfg.num_attention_heads, cfg.head_dim(), allocated);
        Ok(Self {
            allocated,
            k_cache: layers
                .clone()
                .map(|i| ctx.zeros(&format!("layer {i} k cache"), &cache))
                .collect::<Result<_>>()?,
            v_cache: layers
                .map(|i| ctx.zeros(&format!("layer {i} v cache"), &cache))
                .collect::<Result<_>>()?,
            cos: ctx.upload("cos", &cos, &[allocated, rd / 2])?,
            sin: ctx.upload("sin", &sin, &[allocated, rd / 2])?,
            partials: ctx.zeros("attention partials", &[partials])?,
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
                    &old.buffer,
                    head * self.allocated as u64 * row,
                    &new.buffer,
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
    /// Token ids (u32 bits).
    ids: GpuTensor,
    x: GpuTensor,
    h: GpuTensor,
    q: GpuTensor,
    k: GpuTensor,
    v: GpuTensor,
    q_rot: GpuTensor,
    attn: GpuTensor,
    proj: GpuTensor,
    mlp_hidden: GpuTensor,
    mlp: GpuTensor,
    /// The last position's hidden state, when only its logits are wanted.
    last: GpuTensor,
    /// The last position's top-k candidates and log-normaliser (top_k.wgsl's layout); the
    /// greedy token is its first word.
    top: GpuTensor,
    /// Logits of the last position: the per-token output, so allocated once.
    last_logits: GpuTensor,
}

impl Scratch {
    fn new(ctx: &GpuContext, cfg: &PhiConfig, rows: usize) -> Result<Self> {
        let (h, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let kv = cfg.num_key_value_heads * cfg.head_dim();
        Ok(Self {
            ids: ctx.zeros("ids", &[rows])?,
            x: ctx.zeros("x", &[rows, h])?,
            h: ctx.zeros("h", &[rows, h])?,
            q: ctx.zeros("q", &[rows, h])?,
            k: ctx.zeros("k", &[rows, kv])?,
            v: ctx.zeros("v", &[rows, kv])?,
            q_rot: ctx.zeros("q_rot", &[rows, h])?,
            attn: ctx.zeros("attn", &[rows, h])?,
            proj: ctx.zeros("proj", &[rows, h])?,
            mlp_hidden: ctx.zeros("mlp_hidden", &[rows, inter])?,
            mlp: ctx.zeros("mlp", &[rows, h])?,
            last: ctx.zeros("last", &[1, h])?,
            top: ctx.zeros("top-k", &[2 * MAX_TOP_K as usize + 1])?,
            last_logits: ctx.zeros("last logits", &[1, vocab])?,
        })
    }
}

pub struct GpuBackend {
    ctx: GpuContext,
    kernels: Kernels,
    cfg: PhiConfig,
    weights: GpuWeights,
    positions: Positions,
    scratch: Scratch,
    capacity: usize,
    len: usize,
    stats: DeviceStats,
}

impl GpuBackend {
    /// Uploads a checkpoint's weights to a new GPU device, for a context of `context` tokens
    /// (default: the model's context length; the KV cache grows with the tokens run), with
    /// the kernel family `kernels` asks for.
    pub async fn load(
        cfg: &PhiConfig,
        src: &dyn TensorSource,
        context: Option<usize>,
        kernels: KernelChoice,
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
        // The gpu family reads whole 32-value chunks of every weight row.
        let rows_fit =
            cfg.hidden_size.is_multiple_of(32) && cfg.intermediate_size.is_multiple_of(32);
        let family = match (kernels.resolve(&ctx.info), kernels) {
            (KernelFamily::Gpu, KernelChoice::Auto) if !rows_fit => KernelFamily::Emulator,
            (KernelFamily::Gpu, _) if !rows_fit => {
                return Err(Error::gpu(format!(
                    "the gpu kernels need hidden_size and intermediate_size multiples of 32 (this model has {} and {}); use the emulator kernels",
                    cfg.hidden_size, cfg.intermediate_size
                )))
            }
            (family, _) => family,
        };
        let kernels = Kernels::new(&ctx, family);
        let capacity = context
            .unwrap_or(usize::MAX)
            .min(cfg.max_position_embeddings);
        let plan = MemoryPlan::new(&src.stored_tensors(), cfg, capacity, Target::Gpu);
        let binding = ctx
            .info
            .max_storage_buffer_binding_size
            .min(ctx.info.max_buffer_size);
        if plan.largest_binding > binding {
            return Err(Error::input(format!(
                "a weight matrix of this model takes {} on the GPU, more than the {} this adapter can bind at once; convert on load (quantize q8_0 or q4_0) to shrink it",
                readable(plan.largest_binding),
                readable(binding)
            )));
        }
        Ok(Self {
            weights: GpuWeights::upload(&ctx, cfg, src).await?,
            positions: Positions::new(&ctx, cfg, FIRST_POSITIONS.min(capacity))?,
            scratch: Scratch::new(&ctx, cfg, CHUNK.min(capacity))?,
            ctx,
            kernels,
            cfg: cfg.clone(),
            capacity,
            len: 0,
            stats: DeviceStats::default(),
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
        self.weights.formats()
    }

    /// The kernel family recording the matrix products and attention.
    pub fn kernel_family(&self) -> KernelFamily {
        self.kernels.family()
    }

    /// Records and submits the pass for `tokens` (at most `CHUNK`) after the cached
    /// positions, in one encoder; with `top = Some((limit, k, temperature))` it ends with the
    /// top `k` of the last logits row over ids below `limit`, left in `scratch.top` (with the
    /// log-normaliser unless the temperature is 0). Returns the logits and their row count.
    fn forward_chunk(
        &mut self,
        tokens: &[u32],
        which: Logits,
        top: Option<(u32, u32, f32)>,
    ) -> Result<(GpuTensor, usize)> {
        let shape = AttentionShape {
            seq: tokens.len() as u32,
            heads: self.cfg.num_attention_heads as u32,
            kv_heads: self.cfg.num_key_value_heads as u32,
            head_dim: self.cfg.head_dim() as u32,
            rotary_dim: self.cfg.rotary_dim() as u32,
            start: self.len as u32,
            capacity: self.positions.allocated as u32,
        };
        self.ctx
            .queue
            .write_buffer(&self.scratch.ids.buffer, 0, bytemuck::cast_slice(tokens));
        self.kernels.begin_step();
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        self.record_embedding(&mut enc, tokens.len())?;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            self.record_layer(&mut enc, i, layer, shape)?;
        }
        let (logits, rows) = self.record_head(&mut enc, tokens.len(), which, top)?;
        self.ctx.queue.submit([enc.finish()]);
        self.stats.dispatches += self.kernels.dispatches_in_step();
        self.stats.submissions += 1;
        let cfg = &self.cfg;
        let kv_row = cfg.num_key_value_heads * cfg.head_dim() * 4;
        let embed_row = self.weights.embed.chunks[0]
            .1
            .w
            .format
            .row_bytes(cfg.hidden_size);
        self.stats.bytes_moved += self.weights.pass_bytes()
            + tokens.len() * embed_row
            + 2 * cfg.num_hidden_layers * (self.len + tokens.len()) * kv_row;
        self.len += tokens.len();
        Ok((logits, rows))
    }

    /// `x = embedding[ids]`, one dispatch per row chunk of the table.
    fn record_embedding(&self, enc: &mut wgpu::CommandEncoder, seq: usize) -> Result<()> {
        let s = &self.scratch;
        for (start, chunk) in &self.weights.embed.chunks {
            let table = (&chunk.w, *start);
            self.kernels
                .embedding(&self.ctx, enc, seq, &s.ids, table, &s.x)?;
        }
        Ok(())
    }

    /// One decoder block over the scratch rows: `x += attention(ln(x)) + mlp(ln(x))`, with
    /// the block's keys and values written into its cache.
    fn record_layer(
        &self,
        enc: &mut wgpu::CommandEncoder,
        i: usize,
        layer: &Layer,
        shape: AttentionShape,
    ) -> Result<()> {
        let (s, k, ctx) = (&self.scratch, &self.kernels, &self.ctx);
        let pos = &self.positions;
        let seq = shape.seq as usize;
        k.layer_norm(ctx, enc, seq, &s.x, &layer.norm, &s.h)?;
        k.matmul(ctx, enc, seq, &s.h, &layer.q, (&s.q, 0))?;
        k.matmul(ctx, enc, seq, &s.h, &layer.k, (&s.k, 0))?;
        k.matmul(ctx, enc, seq, &s.h, &layer.v, (&s.v, 0))?;
        let rope = RopeKvBuffers {
            q: &s.q,
            k: &s.k,
            v: &s.v,
            cos: &pos.cos,
            sin: &pos.sin,
            q_out: &s.q_rot,
            k_cache: &pos.k_cache[i],
            v_cache: &pos.v_cache[i],
        };
        k.rope_kv(ctx, enc, shape, rope)?;
        let attention = AttentionBuffers {
            q: &s.q_rot,
            k_cache: &pos.k_cache[i],
            v_cache: &pos.v_cache[i],
            partials: &pos.partials,
            out: &s.attn,
        };
        k.attention(ctx, enc, shape, attention)?;
        k.matmul(ctx, enc, seq, &s.attn, &layer.dense, (&s.proj, 0))?;
        k.matmul(ctx, enc, seq, &s.h, &layer.fc1, (&s.mlp_hidden, 0))?;
        k.gelu_new(ctx, enc, seq, &s.mlp_hidden)?;
        k.matmul(ctx, enc, seq, &s.mlp_hidden, &layer.fc2, (&s.mlp, 0))?;
        k.residual(ctx, enc, seq, (&s.x, &s.proj, &s.mlp))
    }

    /// The final LayerNorm and the output layer, over every row (`Logits::All`) or the last,
    /// then `top_k` of the last row if asked. Returns the logits and their row count.
    fn record_head(
        &self,
        enc: &mut wgpu::CommandEncoder,
        seq: usize,
        which: Logits,
        top: Option<(u32, u32, f32)>,
    ) -> Result<(GpuTensor, usize)> {
        let (s, k, ctx) = (&self.scratch, &self.kernels, &self.ctx);
        let (rows, input) = match which {
            Logits::All => (seq, &s.x),
            Logits::Last => {
                let row = (self.cfg.hidden_size * 4) as u64;
                let at = (seq as u64 - 1) * row;
                enc.copy_buffer_to_buffer(&s.x.buffer, at, &s.last.buffer, 0, row);
                (1, &s.last)
            }
        };
        k.layer_norm(ctx, enc, rows, input, &self.weights.final_norm, &s.h)?;
        let vocab = self.cfg.vocab_size;
        let logits = match which {
            Logits::Last => s.last_logits.clone(),
            Logits::All => ctx.zeros("logits", &[rows, vocab])?,
        };
        for (start, chunk) in &self.weights.lm_head.chunks {
            k.matmul(ctx, enc, rows, &s.h, chunk, (&logits, *start))?;
        }
        if let Some((limit, count, temperature)) = top {
            let inv_temp = if temperature > 0.0 {
                1.0 / temperature
            } else {
                0.0
            };
            let request = (limit.min(vocab as u32), count, inv_temp);
            k.top_k(ctx, enc, request, (&logits, &s.top))?;
        }
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

    async fn forward_rows(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
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
            out.extend(self.ctx.read(&logits, rows * vocab).await?);
            self.stats.bytes_read += rows * vocab * 4;
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
    async fn forward_greedy(&mut self, tokens: &[u32], vocab_limit: usize) -> Result<u32> {
        Ok(self.forward_top(tokens, (vocab_limit, 1, 0.0), 1).await?[0])
    }

    /// Sampling candidates selected on the GPU: 2k + 1 words come back.
    async fn forward_candidates(
        &mut self,
        tokens: &[u32],
        (k, vocab_limit, temperature): (usize, usize, f32),
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

    /// The row behind the last candidates forward, still on the GPU in `last_logits`.
    async fn read_last_row(&mut self) -> Result<Vec<f32>> {
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
                    Next::Token(self.forward_greedy(tokens, vocab_limit).await?)
                }
                Want::Candidates {
                    k,
                    vocab_limit,
                    temperature,
                } => Next::Candidates(
                    self.forward_candidates(tokens, (k, vocab_limit, temperature))
                        .await?,
                ),
                Want::LastRow => Next::Rows(self.forward_rows(tokens, Logits::Last).await?),
                Want::AllRows => Next::Rows(self.forward_rows(tokens, Logits::All).await?),
            })
        })
    }

    fn last_row(&mut self) -> BoxFuture<'_, Result<Vec<f32>>> {
        Box::pin(self.read_last_row())
    }

    fn device_stats(&self) -> Option<DeviceStats> {
        Some(self.stats)
    }
}
