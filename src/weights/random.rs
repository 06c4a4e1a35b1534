//! Random weights of any Phi shape, for benchmarks and for checking that a model of a given
//! size fits a device, without a checkpoint file.

use candle_core::{DType, Device, Tensor};

use super::{StoredTensor, TensorSource, Weight};
use crate::error::Result;

/// Matrices uniform with std 0.02 (transformers' `initializer_range`), norms at 1, biases at 0.
pub struct RandomWeights {
    pub dtype: DType,
}

impl TensorSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let t = if shape.len() == 1 {
            let value = if name.contains("layernorm.weight") {
                1.0
            } else {
                0.0
            };
            Tensor::full(value, shape, &Device::Cpu)?
        } else {
            let a = 0.02 * 3f32.sqrt();
            Tensor::rand(-a, a, shape, &Device::Cpu)?
        };
        Ok(Weight::Dense(t.to_dtype(self.dtype)?))
    }

    fn check_tensor(&self, _name: &str, _shape: &[usize]) -> Result<()> {
        Ok(())
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        Vec::new()
    }
}
