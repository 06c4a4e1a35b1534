//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) merged into a base
//! checkpoint as it loads: each adapted weight becomes `W + s · B · A` (s = α / r, or α / √r
//! with `use_rslora`), before any quantization, so the model runs at the base's speed.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::names::{Part, TensorId};
use crate::model::{BoxFuture, PhiConfig, StoredTensor, TensorSource, Weight};

/// The fields of `adapter_config.json` that decide the merge.
#[derive(Deserialize)]
struct AdapterConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    target_modules: Targets,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    /// Per-module ranks and alphas overriding `r` and `lora_alpha`.
    #[serde(default)]
    rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    bias: Option<String>,
}

/// PEFT's `target_modules`: module names, or `"all-linear"` (other strings are regular
/// expressions, refused when the adapter is read).
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Targets {
    #[default]
    None,
    Names(Vec<String>),
    One(String),
}

/// A LoRA adapter, checked against the model it adapts.
pub struct Adapter {
    scale: f64,
    /// `(A, B)` by the adapted weight's transformers name.
    pairs: HashMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    /// Parses an adapter's two files (`source` names them in errors) for a model of `cfg`:
    /// every matrix must have the shape its layer and rank imply.
    pub fn from_bytes(
        config_json: &str,
        weights: &[u8],
        cfg: &PhiConfig,
        source: &str,
    ) -> Result<Self> {
        let bad = |m: String| Error::file(source, m);
        let config: AdapterConfig = serde_json::from_str(config_json)
            .map_err(|e| bad(format!("not a valid adapter_config.json: {e}")))?;
        if config.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(bad(format!(
                "peft_type {:?} is not LORA",
                config.peft_type.unwrap_or_default()
            )));
        }
        if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            return Err(bad(
                "per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported".into(),
            ));
        }
        if config.use_dora {
            return Err(bad("DoRA adapters (use_dora) are not supported".into()));
        }
        if config.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(bad(
                "adapters that train biases (bias != \"none\") are not supported".into(),
            ));
        }
        if config.r == 0 || !config.lora_alpha.is_finite() {
            return Err(bad(format!(
                "rank {} and lora_alpha {} make no scale",
                config.r, config.lora_alpha
            )));
        }
        if let Targets::One(pattern) = &config.target_modules {
            if pattern != "all-linear" {
                return Err(bad(format!(
                    "target_modules {pattern:?} is a regular expression; list the module names instead"
                )));
            }
        }
        // `fan_in_fan_out` is not read: PEFT ignores it for Linear layers (it warns and sets
        // it false), and every layer of Phi-2 is a Linear.
        let scale = if config.use_rslora {
            config.lora_alpha / (config.r as f64).sqrt()
        } else {
            config.lora_alpha / config.r as f64
        };
        let tensors = candle_core::safetensors::load_buffer(weights, &Device::Cpu)
            .map_err(|e| bad(format!("not a valid adapter_model.safetensors: {e}")))?;
        let mut pairs = HashMap::new();
        for id in crate::model::names::all_tensors(cfg) {
            if id.part != Part::Weight || !id.site.is_linear() {
                continue;
            }
            let [a_name, b_name] = id.site.lora_names();
            let (a, b) = match (tensors.get(&a_name), tensors.get(&b_name)) {
                (Some(a), Some(b)) => (a, b),
                (None, None) => continue,
                _ => return Err(bad(format!("{a_name} and {b_name} must come together"))),
            };
            if !config.target_modules.includes(&id.site.peft_target()) {
                return Err(bad(format!(
                    "{a_name} adapts {} but target_modules does not name it",
                    id.site.peft_target()
                )));
            }
            let shape = id.shape(cfg);
            let (out, inp) = (shape[0], shape[1]);
            if a.dims() != [config.r, inp] || b.dims() != [out, config.r] {
                return Err(bad(format!(
                    "{a_name} is {:?} and {b_name} {:?}; rank {} on a {out}×{inp} layer needs [{}, {inp}] and [{out}, {}]",
                    a.dims(),
                    b.dims(),
                    config.r,
                    config.r,
                    config.r
                )));
            }
            pairs.insert(id.hf(), (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?));
        }
        let known = 2 * pairs.len();
        if let Some(stray) = tensors.keys().find(|k| {
            !pairs
                .keys()
                .any(|w| TensorId::from_hf(w).is_some_and(|id| id.site.lora_names().contains(k)))
        }) {
            return Err(bad(format!(
                "{stray} is not a LoRA matrix of this model ({known} of {} tensors are)",
                tensors.len()
            )));
        }
        if pairs.is_empty() {
            return Err(bad("the adapter holds no LoRA matrices".into()));
        }
        Ok(Self { scale, pairs })
    }

    /// Reads an adapter folder.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(dir: &std::path::Path, cfg: &PhiConfig) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| Error::file(p.display(), e))
        };
        let config = String::from_utf8(read("adapter_config.json")?)
            .map_err(|_| Error::file(dir.join("adapter_config.json").display(), "not UTF-8"))?;
        Self::from_bytes(
            &config,
            &read("adapter_model.safetensors")?,
            cfg,
            &dir.display().to_string(),
        )
    }

    /// Number of weight matrices the adapter changes.
    pub fn adapted(&self) -> usize {
        self.pairs.len()
    }
}

/// `w + scale · B · A`: a LoRA update merged into a weight (also how the trainer's adapters
/// become a full model).
pub fn merge_lora(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let w = w.to_dtype(DType::F32)?;
    Ok((&w + (b.matmul(a)? * scale)?)?)
}

/// A checkpoint with an adapter merged into the weights it adapts.
pub struct WithAdapter {
    base: Box<dyn TensorSource>,
    adapter: Adapter,
}

impl WithAdapter {
    pub fn new(base: Box<dyn TensorSource>, adapter: Adapter) -> Self {
        Self { base, adapter }
    }
}

impl TensorSource for WithAdapter {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let Some((a, b)) = self.adapter.pairs.get(name) else {
            return self.base.tensor(name, shape);
        };
        let w = self.base.tensor(name, shape)?.dense()?;
        Ok(Weight::Dense(merge_lora(&w, a, b, self.adapter.scale)?))
    }

    fn fetch<'a>(&'a self, name: &'a str, shape: &'a [usize]) -> BoxFuture<'a, Result<()>> {
        self.base.fetch(name, shape)
    }

    fn check_tensor(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.base.check_tensor(name, shape)
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        // Adapted matrices come out as f32 whatever the base stores.
        self.base
            .stored_tensors()
            .into_iter()
            .map(|mut t| {
                if self.adapter.pairs.contains_key(&t.name) {
                    t.dtype = "F32".into();
                    t.bytes = 4 * t.shape.iter().product::<usize>() as u64;
                }
                t
            })
            .collect()
    }
}

impl Targets {
    fn includes(&self, module: &str) -> bool {
        match self {
            Targets::None => false,
            Targets::One(_) => true,
            Targets::Names(names) => names.iter().any(|n| n == module),
        }
    }
}
