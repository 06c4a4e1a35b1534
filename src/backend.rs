//! The one interface through which generation and evaluation reach a compute backend.
//!
//! A backend owns the model weights and a KV cache for one sequence. Callers append
//! tokens and get logits back; they may also cut the cache back to a prefix, which is how
//! chat reuses the conversation so far and how evaluation scores several answer choices
//! after one pass over the shared question.
//!
//! The forward calls return futures because in the browser a GPU readback can only be
//! awaited, never waited for; natively the callers drive them with `pollster`.

use std::future::Future;
use std::pin::Pin;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::generate::{top_k, TopK};
use crate::model::{KvCache, Logits, Phi, PhiConfig};

/// A future borrowed from its backend (boxed so `dyn Backend` stays possible).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What the last forward cost on a device (for `medphi bench`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DeviceStats {
    /// Compute dispatches recorded.
    pub dispatches: usize,
    /// Command buffers submitted.
    pub submissions: usize,
    /// Bytes copied back to the host.
    pub bytes_read: usize,
}

pub trait Backend {
    /// A short description for the user ("cpu", "webgpu: <adapter>", …).
    fn name(&self) -> String;
    fn config(&self) -> &PhiConfig;
    /// How many positions the cache can hold.
    fn capacity(&self) -> usize;
    /// Number of positions currently cached.
    fn cached(&self) -> usize;
    /// Forgets cached positions from `len` on.
    fn truncate(&mut self, len: usize);
    /// Runs `tokens` after the cached positions and caches them. Returns row-major logits,
    /// one row of `vocab_size` per token (`Logits::All`) or for the last token only.
    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        which: Logits,
    ) -> BoxFuture<'a, Result<Vec<f32>>>;
    /// The device work of the last forward call; `None` for the CPU.
    fn device_stats(&self) -> Option<DeviceStats> {
        None
    }
    /// Runs `tokens` like `forward` and returns the `k` most likely next tokens among ids
    /// below `vocab_limit`, with the row's log-normaliser at `temperature`: what sampling
    /// needs unless a draw lands outside the candidates. A GPU selects them on the device, so
    /// a sampled token moves a few numbers instead of a row of logits.
    fn forward_top_k<'a>(
        &'a mut self,
        tokens: &'a [u32],
        k: usize,
        vocab_limit: usize,
        temperature: f32,
    ) -> BoxFuture<'a, Result<TopK>>;
    /// The logits row behind the last `forward_top_k`, for a draw that lands outside its
    /// candidates.
    fn last_logits(&mut self) -> BoxFuture<'_, Result<Vec<f32>>>;
    /// Runs `tokens` like `forward` and returns the most likely next token among ids below
    /// `vocab_limit`. A backend that can take the argmax on its device overrides this, so
    /// greedy decoding moves one id instead of a row of logits.
    fn forward_greedy<'a>(
        &'a mut self,
        tokens: &'a [u32],
        vocab_limit: usize,
    ) -> BoxFuture<'a, Result<u32>> {
        Box::pin(async move {
            let logits = self.forward(tokens, Logits::Last).await?;
            Ok(crate::generate::argmax(
                &logits[..vocab_limit.min(logits.len())],
            ))
        })
    }
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn config(&self) -> &PhiConfig {
        (**self).config()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn cached(&self) -> usize {
        (**self).cached()
    }
    fn truncate(&mut self, len: usize) {
        (**self).truncate(len)
    }
    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        which: Logits,
    ) -> BoxFuture<'a, Result<Vec<f32>>> {
        (**self).forward(tokens, which)
    }
    fn forward_greedy<'a>(
        &'a mut self,
        tokens: &'a [u32],
        vocab_limit: usize,
    ) -> BoxFuture<'a, Result<u32>> {
        (**self).forward_greedy(tokens, vocab_limit)
    }
    fn device_stats(&self) -> Option<DeviceStats> {
        (**self).device_stats()
    }
    fn last_logits(&mut self) -> BoxFuture<'_, Result<Vec<f32>>> {
        (**self).last_logits()
    }
    fn forward_top_k<'a>(
        &'a mut self,
        tokens: &'a [u32],
        k: usize,
        vocab_limit: usize,
        temperature: f32,
    ) -> BoxFuture<'a, Result<TopK>> {
        (**self).forward_top_k(tokens, k, vocab_limit, temperature)
    }
}

/// The candle CPU path (natively, and in wasm with simd128).
pub struct CpuBackend {
    model: Phi,
    cache: KvCache,
    /// The row behind the last `forward_top_k` (moved out by `last_logits`).
    last_row: Vec<f32>,
}

impl CpuBackend {
    /// `context` caps the cache (and so the memory) below the model's full context length.
    pub fn new(model: Phi, context: Option<usize>) -> Result<Self> {
        let capacity = context
            .unwrap_or(usize::MAX)
            .min(model.config().max_position_embeddings);
        let cache = model.new_cache(1, capacity)?;
        Ok(Self {
            model,
            cache,
            last_row: Vec::new(),
        })
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn config(&self) -> &PhiConfig {
        self.model.config()
    }

    fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    fn cached(&self) -> usize {
        self.cache.len()
    }

    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
    }

    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        which: Logits,
    ) -> BoxFuture<'a, Result<Vec<f32>>> {
        Box::pin(async move { self.forward_now(tokens, which) })
    }

    fn forward_top_k<'a>(
        &'a mut self,
        tokens: &'a [u32],
        k: usize,
        vocab_limit: usize,
        temperature: f32,
    ) -> BoxFuture<'a, Result<TopK>> {
        Box::pin(async move {
            let row = self.forward_now(tokens, Logits::Last)?;
            let top = top_k(&row[..vocab_limit.min(row.len())], k, temperature);
            self.last_row = row;
            Ok(top)
        })
    }

    fn last_logits(&mut self) -> BoxFuture<'_, Result<Vec<f32>>> {
        Box::pin(async move {
            if self.last_row.is_empty() {
                return Err(Error::input("no forward_top_k row to read"));
            }
            Ok(std::mem::take(&mut self.last_row))
        })
    }
}

/// Tokens per CPU forward: a long prompt's attention scores (heads × chunk × context
/// floats) stay bounded, whatever its length.
const CPU_CHUNK: usize = 512;

impl CpuBackend {
    fn forward_now(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::input("forward called with no tokens"));
        }
        let mut out = Vec::new();
        let pieces = tokens.chunks(CPU_CHUNK).count();
        for (i, piece) in tokens.chunks(CPU_CHUNK).enumerate() {
            let input = Tensor::new(piece, self.model.device())?.unsqueeze(0)?;
            let logits = self.model.forward(&input, Some(&mut self.cache), which)?;
            if which == Logits::All || i + 1 == pieces {
                out.extend(
                    logits
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
        }
        Ok(out)
    }
}
