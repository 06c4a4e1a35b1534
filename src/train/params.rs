//! The trainable parameters, handed to the model as a `TensorSource` so training builds the
//! same `Phi` as inference, differentiably. Either every weight is a `Var` (full training),
//! or the weights are a frozen base and only LoRA adapters train: each adapted matrix is
//! `W + (alpha / rank) · B · A` with `A` (rank × in) and `B` (out × rank, starting at 0).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::names::{Part, TensorId, LINEARS};
use crate::model::{expected_tensors, PhiConfig};
use crate::model::{StoredTensor, TensorSource, Weight};
use crate::weights::merge_lora;

/// The dtype of the forward and backward pass. The `Var`s (master weights) and the
/// optimizer state stay f32 whatever it is: a bf16 update of a bf16 weight rounds most small
/// steps away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
}

pub struct Params {
    /// What trains, in a fixed order so saving and the optimizer walk them identically:
    /// every weight by Hugging Face name, or the LoRA adapters by PEFT name.
    pub vars: Vec<(String, Var)>,
    /// LoRA only: the frozen base weights.
    base: HashMap<String, Tensor>,
    lora: Option<LoraConfig>,
    /// The model sees every weight cast to this.
    precision: Precision,
}

impl Params {
    /// Fresh weights from `seed`: matrices uniform with transformers' std 0.02, LayerNorm
    /// weights 1, biases 0.
    pub fn init(cfg: &PhiConfig, seed: u64, device: &Device) -> Result<Self> {
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
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?;
            vars.push((name, Var::from_tensor(&t)?));
        }
        Ok(Self::full(vars))
    }

    fn full(vars: Vec<(String, Var)>) -> Self {
        Self {
            vars,
            base: HashMap::new(),
            lora: None,
            precision: Precision::F32,
        }
    }

    fn read(
        cfg: &PhiConfig,
        src: &dyn TensorSource,
        device: &Device,
    ) -> Result<Vec<(String, Tensor)>> {
        src.check(&expected_tensors(cfg))?;
        expected_tensors(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let t = src.tensor(&name, &shape)?.dense()?;
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                Ok((name, t))
            })
            .collect()
    }

    /// The weights of an existing checkpoint, all trainable.
    pub fn from_source(cfg: &PhiConfig, src: &dyn TensorSource, device: &Device) -> Result<Self> {
        let vars = Self::read(cfg, src, device)?
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        Ok(Self::full(vars))
    }

    /// A frozen `src` with fresh LoRA adapters (A uniform in ±1/√in as PEFT's Kaiming
    /// init, B zero, so training starts exactly at the base model), or the adapters saved
    /// in `adapters` when resuming.
    pub fn lora(
        cfg: &PhiConfig,
        src: &dyn TensorSource,
        lora: LoraConfig,
        seed: u64,
        adapters: Option<&Path>,
        device: &Device,
    ) -> Result<Self> {
        if lora.rank == 0 {
            return Err(Error::input("--lora-rank must be at least 1"));
        }
        let base: HashMap<String, Tensor> = Self::read(cfg, src, device)?.into_iter().collect();
        let saved = adapters
            .map(|p| {
                candle_core::safetensors::load(p, &Device::Cpu)
                    .map_err(|e| Error::file(p.display(), e))
            })
            .transpose()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut vars = Vec::new();
        // PEFT's usual Phi-2 targets: every linear layer of every block.
        for site in (0..cfg.num_hidden_layers).flat_map(|i| LINEARS.map(|s| s(i))) {
            let w = site.weight();
            let (out, inp) = (w.shape(cfg)[0], w.shape(cfg)[1]);
            for (which, name) in site.lora_names().into_iter().enumerate() {
                let shape = [(lora.rank, inp), (out, lora.rank)][which];
                let t = match &saved {
                    Some(s) => s
                        .get(&name)
                        .ok_or_else(|| Error::input(format!("adapter {name} missing")))?
                        .clone(),
                    None if which == 0 => {
                        let bound = 1.0 / (inp as f32).sqrt();
                        let v = (0..lora.rank * inp)
                            .map(|_| rng.random_range(-bound..bound))
                            .collect();
                        Tensor::from_vec(v, shape, &Device::Cpu)?
                    }
                    None => Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
                };
                if t.dims() != [shape.0, shape.1] {
                    return Err(Error::input(format!(
                        "adapter {name} has shape {:?}",
                        t.dims()
                    )));
                }
                vars.push((name, Var::from_tensor(&t.to_device(device)?)?));
            }
        }
        Ok(Self {
            vars,
            base,
            lora: Some(lora),
            precision: Precision::F32,
        })
    }

    /// Where the parameters live (CPU or a CUDA device).
    pub fn device(&self) -> Device {
        self.vars
            .first()
            .map_or(Device::Cpu, |(_, v)| v.device().clone())
    }

    pub fn lora_config(&self) -> Option<LoraConfig> {
        self.lora
    }

    pub fn with_precision(self, precision: Precision) -> Self {
        Self { precision, ..self }
    }

    /// Whether the model's weights are the `Var`s themselves, updated in place by the
    /// optimizer, so one model built at the start stays current. Otherwise (LoRA, or a cast
    /// to a lower precision) they are computed from the `Var`s and the model is rebuilt each
    /// step.
    pub fn model_tracks_vars(&self) -> bool {
        self.lora.is_none() && self.precision == Precision::F32
    }

    fn var(&self, name: &str) -> Result<&Var> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::input(format!("no parameter {name}")))
    }

    /// The weight `name` as the model sees it (LoRA: base plus the scaled adapter product).
    fn effective(&self, name: &str) -> Result<Tensor> {
        let Some(lora) = self.lora else {
            return Ok(self.var(name)?.as_tensor().clone());
        };
        let base = self
            .base
            .get(name)
            .ok_or_else(|| Error::input(format!("no parameter {name}")))?;
        let adapted = TensorId::from_hf(name)
            .filter(|id| id.part == Part::Weight && id.site.is_linear())
            .map(|id| id.site.lora_names());
        let Some([a, b]) = adapted else {
            return Ok(base.clone());
        };
        let a = self.var(&a)?.as_tensor();
        let b = self.var(&b)?.as_tensor();
        merge_lora(base, a, b, lora.alpha / lora.rank as f64)
    }

    /// Every weight as the model sees it, by Hugging Face name (LoRA merged in).
    pub fn merged(&self, cfg: &PhiConfig) -> Result<HashMap<String, Tensor>> {
        expected_tensors(cfg)
            .into_iter()
            .map(|(n, _)| Ok((n.clone(), self.effective(&n)?.detach())))
            .collect()
    }

    /// The trainable tensors by name (all weights, or the adapters in PEFT naming).
    pub fn trainable(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// In name order, so the same tensors always make the same bytes.
fn by_name(tensors: &HashMap<String, Tensor>) -> Vec<(&String, &Tensor)> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    sorted
}

/// `tensors` as a safetensors file.
pub fn tensor_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    safetensors::serialize(by_name(tensors), None).map_err(Error::input)
}

pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    safetensors::serialize_to_file(by_name(tensors), None, path)
        .map_err(|e| Error::file(path.display(), e))
}

impl TensorSource for Params {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let t = self.effective(name)?.to_dtype(self.precision.dtype())?;
        if t.dims() != shape {
            return Err(Error::input(format!(
                "parameter {name} has shape {:?}, not {shape:?}",
                t.dims()
            )));
        }
        Ok(Weight::Dense(t))
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
                bytes: 4 * v.elem_count() as u64,
            })
            .collect()
    }
}
