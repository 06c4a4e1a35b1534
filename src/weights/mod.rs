//! Reading checkpoint tensors: safetensors (f32/f16/bf16, single or sharded) and GGUF.
//!
//! Every source answers one question, "give me tensor NAME of shape SHAPE", by Hugging
//! Face tensor name, so the model code never knows which file format it came from.
//! Files are untrusted: headers are bounds-checked by the parsers, and each tensor's
//! shape and dtype are compared with what the config implies before its bytes are used.

mod bytes;
mod gguf;
mod gguf_file;
mod gguf_write;
mod random;
mod safetensors;

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

pub use self::bytes::Bytes;
pub use self::gguf::Gguf;
pub use self::gguf_write::write_gguf;
pub use self::random::RandomWeights;
pub use self::safetensors::Safetensors;
use crate::error::Result;

/// A tensor as the checkpoint stores it: plain values (already converted to the compute
/// dtype) or a quantized block layout that the matmul dequantizes on the fly.
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// Plain values, dequantizing if needed (for norms, biases and the embedding table).
    pub fn dense(self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t),
            Weight::Quantized(q) => Ok(q.dequantize(&candle_core::Device::Cpu)?),
        }
    }
}

/// Summary of one stored tensor, for `medphi info`.
pub struct StoredTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// Where the model's tensors come from.
pub trait TensorSource {
    /// The tensor `name` (Hugging Face naming), checked to have exactly `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight>;
    /// Checks that `name` exists with exactly `shape` and a usable dtype, from headers only.
    fn check_tensor(&self, name: &str, shape: &[usize]) -> Result<()>;
    /// Checks every `(name, shape)`, so a bad checkpoint fails before any tensor is loaded.
    fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        expected
            .iter()
            .try_for_each(|(name, shape)| self.check_tensor(name, shape))
    }
    /// What the file holds, for `medphi info`.
    fn stored_tensors(&self) -> Vec<StoredTensor>;
}
