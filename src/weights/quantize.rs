//! Quantization on load: a checkpoint's f32/f16/bf16 weight matrices converted to GGML's
//! q8_0 or q4_0 blocks one at a time as the model asks for them, so a user with published f16
//! shards gets a model that fits without running a tool first. The blocks are those
//! `medphi export-gguf` writes for the same tensor (both are candle's `QTensor::quantize`).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Storage, Tensor};

use crate::error::{Error, Result};
use crate::model::{BoxFuture, StoredTensor, TensorSource, Weight};

/// The block types a checkpoint can be converted to on load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    Q8_0,
    Q4_0,
}

impl std::str::FromStr for Quantization {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            other => Err(Error::input(format!(
                "unknown quantization {other:?} (expected q8_0 or q4_0)"
            ))),
        }
    }
}

impl Quantization {
    /// The name users write (`--quantize`, the page's `quantize`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// What a stored tensor becomes when converted on load: dense matrices whose rows are
    /// whole blocks turn into blocks; anything else stays as it is.
    pub fn stored(self, mut t: StoredTensor) -> StoredTensor {
        let to = self.ggml();
        let dense = matches!(t.dtype.as_str(), "F32" | "F16" | "BF16");
        if dense && converts(to, &t.shape) {
            t.dtype = format!("{to:?}");
            let values = t.shape.iter().product::<usize>();
            t.bytes = (values / to.block_size() * to.type_size()) as u64;
        }
        t
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }
}

/// Whether a tensor of `shape` becomes `to` blocks: matrices whose rows are whole blocks.
fn converts(to: GgmlDType, shape: &[usize]) -> bool {
    shape.len() == 2 && shape[1].is_multiple_of(to.block_size())
}

/// GGML blocks of `t`. candle's `QTensor::quantize` reads the tensor's whole storage and
/// ignores a view's offset and extent (a row range of a fused tensor would come out as the
/// first rows, or panic), so a view is first copied into storage of its own.
pub(crate) fn quantize(t: &Tensor, to: GgmlDType) -> Result<QTensor> {
    let t = t.to_dtype(DType::F32)?;
    let owns_its_storage = {
        let (storage, layout) = t.storage_and_layout();
        layout.start_offset() == 0
            && layout.is_contiguous()
            && matches!(&*storage, Storage::Cpu(CpuStorage::F32(v)) if v.len() == t.elem_count())
    };
    let owned = if owns_its_storage {
        t
    } else {
        t.force_contiguous()?
    };
    Ok(QTensor::quantize(&owned, to)?)
}

/// A checkpoint whose dense matrices come out quantized (rows of whole 32-value blocks);
/// vectors and already-quantized matrices pass through.
pub struct QuantizeOnLoad {
    base: Box<dyn TensorSource>,
    to: Quantization,
}

impl QuantizeOnLoad {
    pub fn new(base: Box<dyn TensorSource>, to: Quantization) -> Self {
        Self { base, to }
    }
}

impl QuantizeOnLoad {
    /// The matrix quantized a block of rows at a time from the base's values, where the base
    /// can read rows (`None` where it cannot). Blocks never span rows, so the bytes are those
    /// of quantizing the whole matrix at once.
    fn quantize_by_rows(&self, name: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        const ROWS: usize = 1024;
        let to = self.to.ggml();
        let (rows, cols) = (shape[0], shape[1]);
        let mut bytes = Vec::with_capacity(rows * cols / to.block_size() * to.type_size());
        for start in (0..rows).step_by(ROWS) {
            let end = (start + ROWS).min(rows);
            let Some(block) = self.base.dense_rows(name, shape, start..end)? else {
                return Ok(None);
            };
            bytes.extend_from_slice(&quantize(&block, to)?.data()?);
        }
        Ok(Some(super::gguf::qtensor(to, &bytes, shape.to_vec())?))
    }
}

impl TensorSource for QuantizeOnLoad {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        if converts(self.to.ggml(), shape) {
            if let Some(q) = self.quantize_by_rows(name, shape)? {
                return Ok(Weight::Quantized(Arc::new(q)));
            }
        }
        match self.base.tensor(name, shape)? {
            Weight::Dense(t) if converts(self.to.ggml(), shape) => {
                Ok(Weight::Quantized(Arc::new(quantize(&t, self.to.ggml())?)))
            }
            other => Ok(other),
        }
    }

    fn fetch<'a>(&'a self, name: &'a str, shape: &'a [usize]) -> BoxFuture<'a, Result<()>> {
        self.base.fetch(name, shape)
    }

    fn check_tensor(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.base.check_tensor(name, shape)
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        self.base
            .stored_tensors()
            .into_iter()
            .map(|t| self.to.stored(t))
            .collect()
    }
}
