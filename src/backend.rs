//! The one interface through which generation and evaluation reach a compute backend.
//!
//! A backend owns the model weights and a KV cache for one sequence. Callers append
//! tokens with [`Backend::forward`], saying with a [`Want`] what they need back, and may cut
//! the cache back to a prefix, which is how chat reuses the conversation so far and how
//! evaluation scores several answer choices after one pass over the shared question. What a
//! forward hands back is exactly what was asked for ([`Next`]): a GPU picks the greedy token
//! or the sampling candidates on the device, so decoding moves a few bytes, not a row.
//!
//! The forward calls return futures because in the browser a GPU readback can only be
//! awaited, never waited for; natively the callers drive them with `pollster`.

use candle_core::Tensor;

use crate::candidates::{argmax, top_k, TopK};
use crate::error::{Error, Result};
use crate::model::{KvCache, Logits, Phi, PhiConfig};

pub use crate::model::BoxFuture;

/// What the caller of a forward needs back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Want {
    /// The most likely next token among ids below `vocab_limit` (greedy decoding).
    Greedy { vocab_limit: usize },
    /// The `k` most likely next tokens among ids below `vocab_limit`, with the row's
    /// log-normaliser at `temperature` (sampling).
    Candidates {
        k: usize,
        vocab_limit: usize,
        temperature: f32,
    },
    /// The logits row of the last position.
    LastRow,
    /// The logits rows of every position run (scoring, parity checks).
    AllRows,
}

/// What a forward hands back, one variant per [`Want`].
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Token(u32),
    Candidates(TopK),
    /// One row of `vocab_size` logits (`LastRow`), or one per position, row-major (`AllRows`).
    Rows(Vec<f32>),
}

impl Next {
    /// The logits of a `LastRow` or `AllRows` forward.
    pub fn rows(self) -> Result<Vec<f32>> {
        match self {
            Next::Rows(rows) => Ok(rows),
            other => Err(Error::input(format!("expected logits rows, got {other:?}"))),
        }
    }

    /// What `want` asks of a row of logits on the host.
    fn from_row(row: &[f32], want: Want) -> Next {
        match want {
            Want::Greedy { vocab_limit } => Next::Token(argmax(&row[..vocab_limit.min(row.len())])),
            Want::Candidates {
                k,
                vocab_limit,
                temperature,
            } => Next::Candidates(top_k(&row[..vocab_limit.min(row.len())], k, temperature)),
            Want::LastRow | Want::AllRows => Next::Rows(row.to_vec()),
        }
    }
}

/// What the last forward cost on a device (for `medphi bench`); on the CPU, where there are
/// no dispatches and nothing to copy back, only `bytes_moved`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DeviceStats {
    /// Compute dispatches recorded.
    pub dispatches: usize,
    /// Command buffers submitted.
    pub submissions: usize,
    /// Bytes copied back to the host.
    pub bytes_read: usize,
    /// Bytes the kernels read from device memory: every weight matrix (as held), the
    /// embedding rows gathered and the KV cache attended over. Per decode token this over
    /// the token's time is the bandwidth reached.
    pub bytes_moved: usize,
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
    /// Runs `tokens` after the cached positions, caches them, and returns what `want` asks.
    fn forward<'a>(&'a mut self, tokens: &'a [u32], want: Want) -> BoxFuture<'a, Result<Next>>;
    /// The logits row of the last position of the last forward, for a sampling draw that
    /// lands outside the candidates it returned.
    fn last_row(&mut self) -> BoxFuture<'_, Result<Vec<f32>>>;
    /// The device work of the last forward call (on the CPU only the bytes it read).
    fn device_stats(&self) -> Option<DeviceStats> {
        None
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
    fn forward<'a>(&'a mut self, tokens: &'a [u32], want: Want) -> BoxFuture<'a, Result<Next>> {
        (**self).forward(tokens, want)
    }
    fn last_row(&mut self) -> BoxFuture<'_, Result<Vec<f32>>> {
        (**self).last_row()
    }
    fn device_stats(&self) -> Option<DeviceStats> {
        (**self).device_stats()
    }
}

/// The candle CPU path (natively, and in wasm with simd128).
pub struct CpuBackend {
    model: Phi,
    cache: KvCache,
    /// The last row of the last forward that picked a token from it (moved out by `last_row`).
    last_row: Vec<f32>,
    /// Bytes the last forward read from memory.
    bytes_read: usize,
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
            bytes_read: 0,
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

    fn forward<'a>(&'a mut self, tokens: &'a [u32], want: Want) -> BoxFuture<'a, Result<Next>> {
        Box::pin(async move {
            let which = match want {
                Want::AllRows => Logits::All,
                _ => Logits::Last,
            };
            let rows = self.forward_now(tokens, which)?;
            Ok(match want {
                Want::LastRow | Want::AllRows => Next::Rows(rows),
                Want::Greedy { .. } | Want::Candidates { .. } => {
                    let next = Next::from_row(&rows, want);
                    // Kept (moved, not copied) for a draw outside the candidates.
                    self.last_row = rows;
                    next
                }
            })
        })
    }

    fn last_row(&mut self) -> BoxFuture<'_, Result<Vec<f32>>> {
        Box::pin(async move {
            if self.last_row.is_empty() {
                return Err(Error::input("no forward row to read"));
            }
            Ok(std::mem::take(&mut self.last_row))
        })
    }
    fn device_stats(&self) -> Option<DeviceStats> {
        Some(DeviceStats {
            bytes_moved: self.bytes_read,
            ..DeviceStats::default()
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
        self.bytes_read = 0;
        for (i, piece) in tokens.chunks(CPU_CHUNK).enumerate() {
            self.bytes_read += self.model.bytes_read(piece.len(), self.cache.len());
            let input = Tensor::new(piece, self.model.device())?.unsqueeze(0)?;
            let (model, cache) = (&mut self.model, &mut self.cache);
            let logits = on_cpu_pool(|| model.forward(&input, Some(cache), which))?;
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

/// In the browser the forward pass runs on rayon's pool with its other threads spinning,
/// ready for the matrix products' units (`model::spin_pool` says why). Natively candle's own
/// pool serves the products, from here.
fn on_cpu_pool<R: Send>(forward: impl FnOnce() -> R + Send) -> R {
    #[cfg(target_arch = "wasm32")]
    return crate::model::spin_pool::forward_on_pool(forward);
    #[cfg(not(target_arch = "wasm32"))]
    forward()
}
