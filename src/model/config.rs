//! `PhiConfig`: the Hugging Face `config.json` of a `PhiForCausalLM`, parsed and validated.
//!
//! Two layouts exist in the wild. microsoft/phi-2 (transformers 4) keeps `rope_theta` and
//! `partial_rotary_factor` at the top level; transformers 5 moves them into a nested
//! `rope_parameters` object. Both parse to the same struct, and every size is checked
//! before any tensor is allocated from it. The `phi-msft` config that microsoft/phi-2 first
//! shipped with (and early fine-tunes keep) names the same sizes GPT-2 style (`n_embd`,
//! `n_layer`, `rotary_dim`, …); it is read into the same struct.

use serde::Deserialize;

use crate::error::{Error, Result};

/// The MLP activation. Phi-2 uses `gelu_new` (the tanh approximation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation: `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`.
    GeluTanh,
    /// exact erf form: `gelu`.
    GeluErf,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::GeluErf),
            other => Err(Error::config(format!(
                "hidden_act {other:?} is not supported (expected gelu_new, gelu_pytorch_tanh, gelu_fast or gelu)"
            ))),
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::GeluTanh => "gelu_new",
            Activation::GeluErf => "gelu",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PhiConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The raw JSON, with every field optional so that missing ones get a named error.
#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    max_position_embeddings: Option<usize>,
    layer_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    hidden_act: Option<String>,
    qk_layernorm: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    // phi-msft's names.
    n_embd: Option<usize>,
    n_inner: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_head_kv: Option<usize>,
    n_positions: Option<usize>,
    rotary_dim: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
}

impl RawConfig {
    /// Moves a `phi-msft` config's sizes to transformers' names. Only for that model_type, so
    /// a transformers config that also carries stray GPT-2 keys is read by its own names.
    fn into_phi_names(mut self) -> Result<Self> {
        let n_embd = required(self.n_embd, "n_embd")?;
        let n_head = required(self.n_head, "n_head")?;
        if let Some(rotary_dim) = self.rotary_dim {
            if n_head == 0 || n_embd < n_head {
                return Err(Error::config(format!(
                    "n_embd {n_embd} and n_head {n_head} give no head dimension"
                )));
            }
            self.partial_rotary_factor = Some(rotary_dim as f64 / (n_embd / n_head) as f64);
        }
        self.model_type = Some("phi".into());
        self.hidden_size = Some(n_embd);
        // MixFormer's default MLP width.
        self.intermediate_size = Some(self.n_inner.unwrap_or(n_embd.saturating_mul(4)));
        self.num_hidden_layers = self.n_layer;
        self.num_attention_heads = Some(n_head);
        self.num_key_value_heads = self.n_head_kv;
        self.max_position_embeddings = self.n_positions;
        self.layer_norm_eps = self.layer_norm_epsilon;
        self.hidden_act = self.activation_function.take();
        self.rope_parameters = None;
        Ok(self)
    }
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
}

fn required<T>(value: Option<T>, name: &str) -> Result<T> {
    value.ok_or_else(|| Error::config(format!("missing field `{name}`")))
}

impl PhiConfig {
    /// Parses a `config.json`; `source` names the file in error messages.
    pub fn from_json(json: &str, source: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(json)
            .map_err(|e| Error::file(source, format!("not a valid config.json: {e}")))?;
        Self::from_raw(raw).map_err(|e| match e {
            Error::Config(msg) => Error::file(source, format!("invalid model config: {msg}")),
            other => other,
        })
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        let raw = match raw.model_type.as_deref() {
            Some("phi-msft") => raw.into_phi_names()?,
            _ => raw,
        };
        if let Some(model_type) = &raw.model_type {
            if model_type != "phi" {
                return Err(Error::config(format!(
                    "model_type is {model_type:?}, only \"phi\" and \"phi-msft\" (PhiForCausalLM) are supported"
                )));
            }
        }
        if let Some(archs) = &raw.architectures {
            if !archs.iter().any(|a| a == "PhiForCausalLM") {
                return Err(Error::config(format!(
                    "architectures is {archs:?}, expected PhiForCausalLM"
                )));
            }
        }
        if raw.qk_layernorm == Some(true) {
            return Err(Error::config(
                "qk_layernorm = true is not supported (Phi-2 has none)",
            ));
        }
        if let Some(scaling) = &raw.rope_scaling {
            if !scaling.is_null() {
                return Err(Error::config(
                    "rope_scaling is not supported (Phi-2 uses none)",
                ));
            }
        }
        let nested = raw.rope_parameters.as_ref();
        if let Some(rope_type) = nested.and_then(|p| p.rope_type.as_deref()) {
            if rope_type != "default" {
                return Err(Error::config(format!(
                    "rope_parameters.rope_type {rope_type:?} is not supported (expected \"default\")"
                )));
            }
        }
        let rope_theta = raw
            .rope_theta
            .or(nested.and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0);
        let partial_rotary_factor = raw
            .partial_rotary_factor
            .or(nested.and_then(|p| p.partial_rotary_factor))
            .unwrap_or(0.5);
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let config = PhiConfig {
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            hidden_size: required(raw.hidden_size, "hidden_size")?,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
            rope_theta,
            partial_rotary_factor,
            hidden_act: Activation::parse(raw.hidden_act.as_deref().unwrap_or("gelu_new"))?,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants the forward pass relies on. Sizes are capped so that a
    /// hostile config cannot make us allocate terabytes before a tensor is even read.
    pub fn validate(&self) -> Result<()> {
        const MAX_DIM: usize = 1 << 20;
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 || value > MAX_DIM {
                return Err(Error::config(format!(
                    "{name} = {value} is out of range 1..={MAX_DIM}"
                )));
            }
        }
        if self.num_hidden_layers > 1024 {
            return Err(Error::config(format!(
                "num_hidden_layers = {} is out of range 1..=1024",
                self.num_hidden_layers
            )));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::config(format!(
                "num_attention_heads {} is not divisible by num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0) {
            return Err(Error::config(format!(
                "partial_rotary_factor {} must be in (0, 1]",
                self.partial_rotary_factor
            )));
        }
        let rotary_dim = self.rotary_dim();
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(Error::config(format!(
                "rotary dimension {rotary_dim} (partial_rotary_factor × head_dim) must be even and positive"
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config(format!(
                "rope_theta {} must be positive",
                self.rope_theta
            )));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::config(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of leading head dimensions that get rotary embedding (transformers truncates).
    pub fn rotary_dim(&self) -> usize {
        (self.partial_rotary_factor * self.head_dim() as f64) as usize
    }

    /// Parameters of the model this config describes (tied embeddings counted once).
    pub fn parameter_count(&self) -> usize {
        super::names::expected_tensors(self)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The config in the classic (transformers 4 / microsoft/phi-2) layout, which both
    /// transformers 4 and 5 read.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "hidden_act": self.hidden_act.hf_name(),
            "qk_layernorm": false,
            "rope_scaling": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        })
    }
}
