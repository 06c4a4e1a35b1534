//! The trainable parameters: one `Var` per Hugging Face tensor name, handed to the model
//! as a `TensorSource` so training builds the same `Phi` as inference, differentiably.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::{expected_tensors, PhiConfig};
use crate::weights::{StoredTensor, TensorSource, Weight};

pub struct Params {
    /// In `expected_tensors` order, so saving and the optimizer walk them identically.
    pub vars: Vec<(String, Var)>,
}

impl Params {
    /// Fresh weights from `seed`: matrices uniform with transformers' std 0.02, LayerNorm
    /// weights 1, biases 0.
    pub fn init(cfg: &PhiConfig, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let a = 0.02 * 3f32.sqrt();
        let mut vars = Vec::new();
        for (name, shape) in expected_tensors(cfg) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() > 1 {
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            } else {
                let v = if name.ends_with("layernorm.weight") {
                    1.0
                } else {
                    0.0
                };
                vec![v; n]
            };
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
            vars.push((name, Var::from_tensor(&t)?));
        }
        Ok(Self { vars })
    }

    /// The weights of an existing checkpoint, as f32 `Var`s.
    pub fn from_source(cfg: &PhiConfig, src: &dyn TensorSource) -> Result<Self> {
        src.check(&expected_tensors(cfg))?;
        let mut vars = Vec::new();
        for (name, shape) in expected_tensors(cfg) {
            let t = src.tensor(&name, &shape)?.dense()?.to_dtype(DType::F32)?;
            vars.push((name, Var::from_tensor(&t)?));
        }
        Ok(Self { vars })
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.tensors(), path)
            .map_err(|e| Error::file(path.display(), e))
    }

    pub fn count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

impl TensorSource for Params {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let (_, var) = self
            .vars
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::input(format!("no parameter {name}")))?;
        if var.dims() != shape {
            return Err(Error::input(format!(
                "parameter {name} has shape {:?}, not {shape:?}",
                var.dims()
            )));
        }
        Ok(Weight::Dense(var.as_tensor().clone()))
    }

    fn check_tensor(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.tensor(name, shape).map(|_| ())
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        self.vars
            .iter()
            .map(|(n, v)| StoredTensor {
                name: n.clone(),
                shape: v.dims().to_vec(),
                dtype: "F32".into(),
            })
            .collect()
    }
}
