//! The Phi-2 forward pass (transformers' `PhiForCausalLM`), written out in full.
//!
//! ```text
//! tokens → embed → [ block × L ] → final LayerNorm → lm_head → logits
//! block(x):  h = LayerNorm(x)                      (one norm shared by both branches)
//!            x + Attention(h) + MLP(h)             (parallel, not sequential)
//! Attention: q,k,v = Linear(h) (with bias); partial NeoX rotary on the first
//!            `rotary_dim` dims of each head; causal softmax(q·kᵀ/√d)·v; dense
//! MLP:       fc2(gelu_new(fc1(h)))
//! ```
//!
//! With `fused = true` (inference) LayerNorm, rotary and softmax use candle's fused CPU
//! kernels. Those record no backward pass, so training builds the model with
//! `fused = false`: LayerNorm and the causal softmax then come from `grad_kernels` (fused
//! CPU kernels with their own backward pass, composed primitives on other devices) and
//! rotary is composed from differentiable primitives. gelu_new comes from `grad_kernels`
//! in both: its one `exp` per value costs a fraction of candle's libm `tanhf`.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use super::config::{Activation, PhiConfig};
use super::decode_attention;
#[cfg(target_arch = "x86_64")]
use super::f16_matmul::F16Matrix;
use super::grad_kernels;
use super::kv_cache::KvCache;
use super::names::{expected_tensors, Site};
#[cfg(quant_kernels)]
use super::quant_matmul::QuantMatrix;
use super::source::{TensorSource, Weight};
use crate::error::{Error, Result};

/// Which positions to compute logits for: all (scoring, parity) or the last (generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

/// A linear layer: dense or quantized weight, optional bias.
struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

enum LinearWeight {
    Dense(candle_nn::Linear),
    Quantized(QMatMul),
    /// A block format our own kernels multiply: natively on x86-64 and aarch64, and in wasm
    /// (quant_matmul says why).
    #[cfg(quant_kernels)]
    Ours(QuantMatrix),
    /// Stored as f16, on an x86-64 CPU with AVX2 and F16C (f16_matmul.rs says why).
    #[cfg(target_arch = "x86_64")]
    F16(F16Matrix),
}

impl Linear {
    /// `stored_f16`: the names of matrices to keep f16 where a kernel serves them.
    fn load(
        src: &dyn TensorSource,
        site: Site,
        cfg: &PhiConfig,
        stored_f16: &HashSet<String>,
    ) -> Result<Self> {
        let (w, b) = (site.weight(), site.bias());
        let (name, shape) = (w.hf(), w.shape(cfg));
        let weight = match Self::stored_half(src, &name, &shape, stored_f16)? {
            Some(half) => half,
            None => match Self::stored_quantized(src, &name, &shape)? {
                Some(ours) => ours,
                None => Self::weight(src.tensor(&name, &shape)?)?,
            },
        };
        let bias = Some(src.tensor(&b.hf(), &b.shape(cfg))?.dense()?);
        Ok(Self { weight, bias })
    }

    /// A matrix stored as f16, read as stored (never widened to f32) where the f16 kernel
    /// runs; `None` elsewhere, and for every other matrix.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn stored_half(
        src: &dyn TensorSource,
        name: &str,
        shape: &[usize],
        stored_f16: &HashSet<String>,
    ) -> Result<Option<LinearWeight>> {
        #[cfg(target_arch = "x86_64")]
        if let (true, &[rows, cols]) = (stored_f16.contains(name) && F16Matrix::runs_here(), shape)
        {
            if let Some(values) = src.stored_f16_bytes(name, shape, true)? {
                return Ok(Some(LinearWeight::F16(F16Matrix::new(values, rows, cols)?)));
            }
        }
        Ok(None)
    }

    /// A matrix stored in a block format our kernels multiply, made for them straight from
    /// the stored blocks where they run; `None` elsewhere, and for every other matrix.
    #[cfg_attr(not(quant_kernels), allow(unused_variables))]
    fn stored_quantized(
        src: &dyn TensorSource,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<LinearWeight>> {
        #[cfg(quant_kernels)]
        if let Some(m) = src.stored_quantized(name, shape)? {
            return Ok(Some(LinearWeight::Ours(m)));
        }
        Ok(None)
    }

    fn weight(weight: Weight) -> Result<LinearWeight> {
        Ok(match weight {
            Weight::Dense(w) => LinearWeight::Dense(candle_nn::Linear::new(w, None)),
            #[cfg(quant_kernels)]
            Weight::Quantized(q) if QuantMatrix::serves(q.dtype()) && q.device().is_cpu() => {
                let (rows, cols) = q.shape().dims2()?;
                match QuantMatrix::for_this_cpu(q.dtype(), &q.data()?, rows, cols)? {
                    Some(m) => LinearWeight::Ours(m),
                    None => LinearWeight::Quantized(QMatMul::from_arc(q)?),
                }
            }
            Weight::Quantized(q) => LinearWeight::Quantized(QMatMul::from_arc(q)?),
        })
    }

    /// Bytes one product reads: the weight as held, and the bias.
    fn bytes(&self) -> usize {
        let weight = match &self.weight {
            LinearWeight::Dense(l) => tensor_bytes(l.weight()),
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearWeight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => tensor_bytes(t),
            #[cfg(quant_kernels)]
            LinearWeight::Ours(q) => q.bytes(),
            #[cfg(target_arch = "x86_64")]
            LinearWeight::F16(m) => m.bytes(),
        };
        weight + self.bias.as_ref().map_or(0, tensor_bytes)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (LinearWeight::Dense(l), Some(b)) = (&self.weight, &self.bias) {
            if grad_kernels::linear_applies(x, l.weight()) {
                return Ok(grad_kernels::linear(x, l.weight(), b)?);
            }
        }
        let y = match &self.weight {
            LinearWeight::Dense(l) => l.forward(x)?,
            LinearWeight::Quantized(q) => q.forward(x)?,
            #[cfg(quant_kernels)]
            LinearWeight::Ours(q) => host_product(x, q.rows(), |v| q.matmul(v))?,
            #[cfg(target_arch = "x86_64")]
            LinearWeight::F16(m) => host_product(x, m.rows(), |v| m.matmul(v))?,
        };
        Ok(match &self.bias {
            Some(b) => grad_kernels::add_bias(&y, b)?,
            None => y,
        })
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(src: &dyn TensorSource, site: Site, cfg: &PhiConfig) -> Result<Self> {
        let (w, b) = (site.weight(), site.bias());
        Ok(Self {
            weight: src.tensor(&w.hf(), &w.shape(cfg))?.dense()?,
            bias: src.tensor(&b.hf(), &b.shape(cfg))?.dense()?,
            eps: cfg.layer_norm_eps,
        })
    }

    fn bytes(&self) -> usize {
        tensor_bytes(&self.weight) + tensor_bytes(&self.bias)
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused && x.is_contiguous() {
            return Ok(candle_nn::ops::layer_norm(
                x,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?);
        }
        Ok(grad_kernels::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// NeoX rotary embedding of the first `dim` features of each head. The cos/sin tables are
/// made per forward for the positions it covers, so memory follows the tokens in use,
/// whatever context length a config claims.
struct Rotary {
    dim: usize,
    /// `(1, dim / 2)`
    inv_freq: Tensor,
    dtype: DType,
}

/// cos/sin for positions `start..start+seq`, each `(seq, dim / 2)`.
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &PhiConfig, dtype: DType, device: &Device) -> Result<Self> {
        let dim = cfg.rotary_dim();
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / cfg.rope_theta.powf(i as f64 / dim as f64) as f32)
            .collect();
        Ok(Self {
            dim,
            inv_freq: Tensor::from_vec(inv_freq, (1, dim / 2), device)?,
            dtype,
        })
    }

    fn tables(&self, start: usize, seq: usize) -> Result<RopeTables> {
        let positions = Tensor::arange(start as u32, (start + seq) as u32, self.inv_freq.device())?
            .to_dtype(DType::F32)?
            .reshape((seq, 1))?;
        let freqs = positions.matmul(&self.inv_freq)?;
        Ok(RopeTables {
            cos: freqs.cos()?.to_dtype(self.dtype)?,
            sin: freqs.sin()?.to_dtype(self.dtype)?,
        })
    }

    /// Rotates the first `dim` features of `x` `(batch, heads, seq, head_dim)`, NeoX style
    /// (first half paired with second half), at the positions of `t`.
    fn apply(&self, x: &Tensor, t: &RopeTables, fused: bool) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)?;
        let rot = x.narrow(D::Minus1, 0, self.dim)?.contiguous()?;
        let rot = if fused {
            candle_nn::rotary_emb::rope(&rot, &t.cos, &t.sin)?
        } else {
            candle_nn::rotary_emb::rope_slow(&rot, &t.cos, &t.sin)?
        };
        if self.dim == head_dim {
            return Ok(rot);
        }
        let pass = x.narrow(D::Minus1, self.dim, head_dim - self.dim)?;
        Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?)
    }
}

struct Block {
    norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    dense: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// `x`'s rows through one of our CPU kernels, which take and give plain f32 rows: the
/// last dimension becomes `rows`.
#[cfg(quant_kernels)]
fn host_product(
    x: &Tensor,
    rows: usize,
    product: impl Fn(&[f32]) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let values = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if let Some(last) = dims.last_mut() {
        *last = rows;
    }
    Ok(Tensor::from_vec(product(&values)?, dims, x.device())?.to_dtype(x.dtype())?)
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl Block {
    fn bytes(&self) -> usize {
        let linears = [&self.q, &self.k, &self.v, &self.dense, &self.fc1, &self.fc2];
        self.norm.bytes() + linears.iter().map(|l| l.bytes()).sum::<usize>()
    }

    fn load(
        src: &dyn TensorSource,
        cfg: &PhiConfig,
        i: usize,
        stored_f16: &HashSet<String>,
    ) -> Result<Self> {
        let linear = |site| Linear::load(src, site, cfg, stored_f16);
        Ok(Self {
            norm: LayerNorm::load(src, Site::Norm(i), cfg)?,
            q: linear(Site::Q(i))?,
            k: linear(Site::K(i))?,
            v: linear(Site::V(i))?,
            dense: linear(Site::Dense(i))?,
            fc1: linear(Site::Fc1(i))?,
            fc2: linear(Site::Fc2(i))?,
        })
    }
}

pub struct Phi {
    cfg: PhiConfig,
    /// The token table, dense or quantized. A quantized table stays in its blocks and only
    /// the rows a forward looks up are decoded: Phi-2's is 524 MB as f32, 74 MB as q4_0.
    embed: QMatMul,
    dtype: DType,
    device: Device,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    lm_head: Linear,
    rotary: Rotary,
    fused: bool,
}

impl Phi {
    /// Loads every tensor from `src` after checking all names and shapes against `cfg`.
    pub fn load(cfg: &PhiConfig, src: &dyn TensorSource, fused: bool) -> Result<Self> {
        cfg.validate()?;
        src.check(&expected_tensors(cfg))?;
        // Matrices stored as f16 stay f16 for inference; training's (`fused = false`) stay
        // candle tensors, which carry gradients.
        let stored_f16 = if fused {
            src.stored_f16()
        } else {
            HashSet::new()
        };
        let e = Site::Embedding.weight();
        let half_table = Self::stored_half_table(src, &e.hf(), &e.shape(cfg), cfg, &stored_f16)?;
        let (embed, dtype, device) = match half_table {
            Some(table) => (table, DType::F32, Device::Cpu),
            None => match src.tensor(&e.hf(), &e.shape(cfg))? {
                Weight::Dense(t) => {
                    let (dtype, device) = (t.dtype(), t.device().clone());
                    (QMatMul::Tensor(t), dtype, device)
                }
                Weight::Quantized(q) => {
                    let device = q.device();
                    (QMatMul::QTensor(q), DType::F32, device)
                }
            },
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(src, cfg, i, &stored_f16))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::load(src, Site::FinalNorm, cfg)?;
        let lm_head = if cfg.tie_word_embeddings {
            let b = Site::Head.bias();
            let bias = src.tensor(&b.hf(), &b.shape(cfg))?.dense()?;
            let weight = match &embed {
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    LinearWeight::Dense(candle_nn::Linear::new(t.clone(), None))
                }
                QMatMul::QTensor(_) => LinearWeight::Quantized(embed.clone()),
            };
            Linear {
                weight,
                bias: Some(bias),
            }
        } else {
            Linear::load(src, Site::Head, cfg, &stored_f16)?
        };
        let rotary = Rotary::new(cfg, dtype, &device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            dtype,
            device,
            blocks,
            final_norm,
            lm_head,
            rotary,
            fused,
        })
    }

    /// The token table stored as f16, kept so as a GGML f16 tensor whose lookups widen only
    /// the rows asked for (Phi-2's: 262 MB instead of 524). Not when the output layer is tied
    /// to it: candle's f16 product would round the activations to f16.
    fn stored_half_table(
        src: &dyn TensorSource,
        name: &str,
        shape: &[usize],
        cfg: &PhiConfig,
        stored_f16: &HashSet<String>,
    ) -> Result<Option<QMatMul>> {
        if cfg.tie_word_embeddings || !stored_f16.contains(name) {
            return Ok(None);
        }
        // candle's table holds values of its own: copied, the file's pages let go.
        let Some(stored) = src.stored_f16_bytes(name, shape, false)? else {
            return Ok(None);
        };
        let values: Vec<half::f16> = stored
            .as_slice()
            .chunks_exact(2)
            .map(|v| half::f16::from_le_bytes([v[0], v[1]]))
            .collect();
        let table = QTensor::new(QStorage::Cpu(Box::new(values)), shape)?;
        Ok(Some(QMatMul::QTensor(Arc::new(table))))
    }

    pub fn config(&self) -> &PhiConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes a forward of `tokens` tokens after `cached` ones reads from memory: every
    /// layer's and the head's weights as held, the embedding rows looked up and the KV cache
    /// attended over. Per decode token, over the token's time, this is the bandwidth reached.
    pub fn bytes_read(&self, tokens: usize, cached: usize) -> usize {
        let cfg = &self.cfg;
        let embed_row = match &self.embed {
            QMatMul::QTensor(q) => q.storage_size_in_bytes() / cfg.vocab_size.max(1),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => tensor_bytes(t) / cfg.vocab_size.max(1),
        };
        let kv_row = cfg.num_key_value_heads * cfg.head_dim() * self.dtype.size_in_bytes();
        let weights: usize = self.blocks.iter().map(Block::bytes).sum::<usize>()
            + self.final_norm.bytes()
            + self.lm_head.bytes();
        weights + tokens * embed_row + 2 * cfg.num_hidden_layers * (cached + tokens) * kv_row
    }

    /// A cache for `batch` sequences of up to `capacity` tokens (at most the context length).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let capacity = capacity.min(self.cfg.max_position_embeddings);
        KvCache::new(
            self.cfg.num_hidden_layers,
            batch,
            self.cfg.num_key_value_heads,
            capacity,
            self.cfg.head_dim(),
            self.dtype(),
            self.device(),
        )
    }

    /// `tokens` is `(batch, seq)` u32. With a cache, the tokens continue the cached
    /// sequence and are appended to it; without one, they are a whole sequence from
    /// position 0 (the training path). Returns `(batch, seq or 1, vocab)` logits.
    pub fn forward(
        &self,
        tokens: &Tensor,
        cache: Option<&mut KvCache>,
        which: Logits,
    ) -> Result<Tensor> {
        let (_, seq) = tokens.dims2()?;
        if seq == 0 {
            return Err(Error::input("forward called with no tokens"));
        }
        let start = cache.as_ref().map_or(0, |c| c.len());
        if start + seq > self.cfg.max_position_embeddings {
            return Err(Error::input(format!(
                "sequence of {} tokens exceeds the model's context length {}",
                start + seq,
                self.cfg.max_position_embeddings
            )));
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = tokens
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&t| t >= vocab)
        {
            return Err(Error::input(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let mut cache = cache;
        if let Some(c) = cache.as_deref_mut() {
            c.reserve(seq)?;
        }
        let mask = grad_kernels::causal_mask(seq, start, self.dtype(), self.device())?;
        let rope = self.rotary.tables(start, seq)?;
        let mut x = self
            .embed
            .embedding(&tokens.flatten_all()?)?
            .to_dtype(self.dtype)?
            .reshape((tokens.dim(0)?, seq, ()))?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(
                block,
                &x,
                &rope,
                mask.as_ref(),
                cache.as_deref_mut().map(|c| (c, i)),
            )?;
        }
        if let Some(c) = cache {
            c.advance(seq);
        }
        let x = match which {
            Logits::All => x,
            Logits::Last => x.narrow(1, seq - 1, 1)?,
        };
        let x = self.final_norm.forward(&x, self.fused)?;
        self.lm_head.forward(&x)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let h = block.norm.forward(x, self.fused)?;
        let attn = self.attention(block, &h, rope, mask, cache)?;
        let mlp = block.fc1.forward(&h)?;
        let mlp = match self.cfg.hidden_act {
            Activation::GeluTanh => grad_kernels::gelu_tanh(&mlp)?,
            Activation::GeluErf => mlp.gelu_erf()?,
        };
        let mlp = block.fc2.forward(&mlp)?;
        Ok(((x + attn)? + mlp)?)
    }

    fn attention(
        &self,
        block: &Block,
        h: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, seq, _) = h.dims3()?;
        let (heads, kv_heads, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
        );
        let scale = 1.0 / (hd as f64).sqrt();
        // Training from position 0 on the CPU: one kernel from projections to merged heads.
        if !self.fused && cache.is_none() && kv_heads == heads && grad_kernels::kernels_apply(h) {
            let (q, k, v) = (
                block.q.forward(h)?,
                block.k.forward(h)?,
                block.v.forward(h)?,
            );
            let rotary = (&rope.cos, &rope.sin);
            let out = grad_kernels::attention(&q, &k, &v, heads, rotary, scale)?;
            return block.dense.forward(&out);
        }
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, seq, n, hd))?.transpose(1, 2)?)
        };
        let q = split(block.q.forward(h)?, heads)?;
        let k = split(block.k.forward(h)?, kv_heads)?;
        let v = split(block.v.forward(h)?, kv_heads)?;
        let q = self.rotary.apply(&q, rope, self.fused)?;
        let k = self.rotary.apply(&k, rope, self.fused)?.contiguous()?;
        let v = v.contiguous()?;
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        if self.fused && decode_attention::applies(&q, &k, &v) {
            return block
                .dense
                .forward(&decode_attention::attend(&q, &k, &v, scale as f32)?);
        }
        let k = repeat_kv(k, heads / kv_heads)?;
        let v = repeat_kv(v, heads / kv_heads)?;
        let scores = q.contiguous()?.matmul(&k.t()?)?;
        let probs = if self.fused {
            let scores = (scores * scale)?;
            let scores = match mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            grad_kernels::causal_softmax(&scores, scale, mask)?
        };
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, seq, heads * hd))?;
        block.dense.forward(&out)
    }
}

fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, n, t, hd))?
        .reshape((b, kv * n, t, hd))?)
}
