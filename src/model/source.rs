//! What the model needs from wherever its weights come from (a safetensors or GGUF file, the
//! trainer's parameters, random values): "tensor NAME of SHAPE", by the transformers names
//! of `names.rs`. Defined here, beside the model that asks, so the file formats depend on
//! the model and not the other way round.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

#[cfg(quant_kernels)]
use super::quant_matmul::QuantMatrix;
use super::stored::StoredBytes;
use crate::error::Result;

/// A future borrowed from its owner: boxed so trait objects stay possible, and not `Send`,
/// as the browser's futures are not.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// A tensor as the checkpoint stores it: plain values (already converted to the compute
/// dtype) or a quantized block layout that the matmul dequantizes on the fly.
#[derive(Clone)]
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
#[derive(Clone)]
pub struct StoredTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// Its size in the form described (after any conversion a wrapper applies).
    pub bytes: u64,
}

/// Where the model's tensors come from.
pub trait TensorSource {
    /// The tensor `name` (Hugging Face naming), checked to have exactly `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight>;
    /// Gets the bytes of tensor `name` ready for `tensor`: a file read by ranges (the
    /// browser's downloads and picked files) fetches them now; any other source has them
    /// already. Loaders await this before each tensor, so a streamed checkpoint is held one
    /// tensor at a time.
    fn fetch<'a>(&'a self, _name: &'a str, _shape: &'a [usize]) -> BoxFuture<'a, Result<()>> {
        Box::pin(std::future::ready(Ok(())))
    }
    /// The tensor `name` (of `shape`) as the f16 values it is stored as (little-endian,
    /// unconverted), where it is stored as f16 and the source can hand them over (`None`
    /// where not: the caller reads it with `tensor`). `in_place`: where they lie in a whole
    /// (mapped) file, whose pages are then never released; otherwise a copy, the file's
    /// pages let go as it is made. Either call reads a tensor once.
    fn stored_f16_bytes(
        &self,
        _name: &str,
        _shape: &[usize],
        _in_place: bool,
    ) -> Result<Option<StoredBytes>> {
        Ok(None)
    }
    /// The matrix `name` (of `shape`) made straight from its stored blocks for our kernels,
    /// where it is stored in a format they multiply on this CPU (`None` where not: the
    /// caller reads it with `tensor`). No other copy of the blocks is made on the way.
    #[cfg(quant_kernels)]
    fn stored_quantized(&self, _name: &str, _shape: &[usize]) -> Result<Option<QuantMatrix>> {
        Ok(None)
    }
    /// Rows `rows` of the 2-D tensor `name` (of `shape`) as plain values, read without the
    /// rest of it, where the source can (`None` where it cannot: the caller reads the whole
    /// tensor). Converting a large matrix in row blocks keeps only one block's values in
    /// memory; Phi-2's 51,200-row output layer is 524 MB as f32.
    fn dense_rows(
        &self,
        _name: &str,
        _shape: &[usize],
        _rows: std::ops::Range<usize>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
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
    /// Names of the tensors stored as f16 (handed over as f32, so converting back is exact):
    /// the GPU and the CPU kernels keep these matrices f16.
    fn stored_f16(&self) -> HashSet<String> {
        self.stored_tensors()
            .into_iter()
            .filter(|t| t.dtype == "F16")
            .map(|t| t.name)
            .collect()
    }
}
