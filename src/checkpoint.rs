//! Finding and opening a model: a Hugging Face model folder (`config.json`,
//! `tokenizer.json`, safetensors single or sharded) or a GGUF file. Natively from paths;
//! in the browser from byte buffers, through the same parsing code.

use std::rc::Rc;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::model::{Phi, PhiConfig};
use crate::tokenizer::PhiTokenizer;
use crate::weights::{
    Adapter, Bytes, Gguf, MsftLayout, Quantization, QuantizeOnLoad, RangeRead, Safetensors,
    TensorSource, WithAdapter,
};

/// A checkpoint whose headers have been read and checked, ready to build a model from.
pub struct Checkpoint {
    pub config: PhiConfig,
    pub tokenizer: PhiTokenizer,
    pub weights: Box<dyn TensorSource>,
    /// "safetensors" or "gguf".
    pub format: &'static str,
    /// Total bytes of the weight files.
    pub weight_bytes: u64,
}

/// One file handed over as bytes (the browser's files, or tests).
pub struct NamedBytes {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Checkpoint {
    /// Checks that the parts fit together: every id the tokenizer can produce must have a
    /// row in the model's embedding, or a prompt could index past it.
    fn new(
        config: PhiConfig,
        tokenizer: PhiTokenizer,
        weights: Box<dyn TensorSource>,
        format: &'static str,
        weight_bytes: u64,
    ) -> Result<Self> {
        if tokenizer.vocab_limit() > config.vocab_size {
            return Err(Error::input(format!(
                "the tokenizer has ids up to {} but the model's vocabulary has {} rows: they do not belong together",
                tokenizer.vocab_limit() - 1,
                config.vocab_size
            )));
        }
        Ok(Self {
            config,
            tokenizer,
            weights,
            format,
            weight_bytes,
        })
    }

    /// Merges a LoRA `adapter` into the weights, then converts the matrices to `quantize`
    /// blocks, each as its tensor is read. The adapter goes first: its update is merged at
    /// full precision, and quantizing after merging is what an exported merged model gets.
    pub fn convert_on_load(
        mut self,
        adapter: Option<Adapter>,
        quantize: Option<Quantization>,
    ) -> Self {
        if let Some(adapter) = adapter {
            self.weights = Box::new(WithAdapter::new(self.weights, adapter));
        }
        if let Some(q) = quantize {
            self.weights = Box::new(QuantizeOnLoad::new(self.weights, q));
        }
        self
    }

    /// Builds the CPU model (`fused`: inference kernels; `false`: the differentiable path).
    pub fn into_model(self, fused: bool) -> Result<(Phi, PhiTokenizer)> {
        let model = Phi::load(&self.config, self.weights.as_ref(), fused)?;
        Ok((model, self.tokenizer))
    }

    /// From in-memory files: `config` and `tokenizer` JSON, and weight files that are
    /// either one GGUF or one or more safetensors files (shards in any order).
    pub fn from_bytes(
        config: Option<NamedBytes>,
        tokenizer: Option<NamedBytes>,
        weights: Vec<NamedBytes>,
        dtype: DType,
    ) -> Result<Self> {
        let weight_bytes = weights.iter().map(|w| w.bytes.len() as u64).sum();
        if weights.len() == 1 && weights[0].name.ends_with(".gguf") {
            let w = weights.into_iter().next().expect("one element");
            let gguf = Gguf::from_bytes(w.name, Bytes::Owned(w.bytes), dtype)?;
            return Self::from_gguf(gguf, tokenizer, weight_bytes);
        }
        let (config, tokenizer) = config_and_tokenizer(config, tokenizer)?;
        let shards = weights
            .into_iter()
            .map(|w| (w.name, Bytes::Owned(w.bytes)))
            .collect();
        let weights = in_its_layout(Safetensors::from_shards(shards, dtype)?, &config);
        Self::new(config, tokenizer, weights, "safetensors", weight_bytes)
    }

    /// Like `from_bytes`, with the weights (one GGUF or safetensors files) read by ranges as
    /// each tensor is fetched (the browser's downloads kept on disk, picked files): only
    /// their headers are read here, so a checkpoint larger than memory can stream through.
    pub async fn from_ranged(
        config: Option<NamedBytes>,
        tokenizer: Option<NamedBytes>,
        weights: Vec<(String, Rc<dyn RangeRead>)>,
        dtype: DType,
    ) -> Result<Self> {
        let weight_bytes = weights.iter().map(|(_, f)| f.size()).sum();
        if weights.len() == 1 && weights[0].0.ends_with(".gguf") {
            let (name, file) = weights.into_iter().next().expect("one element");
            let gguf = Gguf::from_ranged(name, file, dtype).await?;
            return Self::from_gguf(gguf, tokenizer, weight_bytes);
        }
        if let Some((name, _)) = weights.iter().find(|(n, _)| !n.ends_with(".safetensors")) {
            return Err(Error::file(
                name,
                "expected one .gguf file or safetensors files (a GGUF model is one file by itself)",
            ));
        }
        let (config, tokenizer) = config_and_tokenizer(config, tokenizer)?;
        let file = Safetensors::from_ranged(weights, dtype).await?;
        let weights = in_its_layout(file, &config);
        Self::new(config, tokenizer, weights, "safetensors", weight_bytes)
    }

    fn from_gguf(gguf: Gguf, tokenizer: Option<NamedBytes>, weight_bytes: u64) -> Result<Self> {
        let config = gguf.config()?;
        let tokenizer = match tokenizer {
            Some(t) => PhiTokenizer::from_bytes(&t.bytes, &t.name)?,
            None => match gguf.tokenizer_json()? {
                Some(json) => PhiTokenizer::from_bytes(json.as_bytes(), "GGUF embedded tokenizer")?,
                None => {
                    return Err(Error::input(
                        "the GGUF file has no tokenizer: give a tokenizer.json (--tokenizer FILE)",
                    ))
                }
            },
        };
        Self::new(config, tokenizer, Box::new(gguf), "gguf", weight_bytes)
    }

    /// Opens a model folder or a `.gguf` file. `tokenizer` overrides the tokenizer file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(
        path: &std::path::Path,
        tokenizer: Option<&std::path::Path>,
        dtype: DType,
    ) -> Result<Self> {
        use std::path::Path;
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err(Error::file(
                    path.display(),
                    "expected a model folder or a .gguf file",
                ));
            }
            let bytes = Bytes::open(path)?;
            let weight_bytes = bytes.len() as u64;
            let gguf = Gguf::from_bytes(path.display().to_string(), bytes, dtype)?;
            let beside = path.with_file_name("tokenizer.json");
            let tokenizer_path = tokenizer.map(Path::to_path_buf).or_else(|| {
                // An embedded tokenizer wins over a file that merely sits beside the model.
                match gguf.tokenizer_json() {
                    Ok(Some(_)) => None,
                    _ => beside.is_file().then_some(beside),
                }
            });
            let tokenizer = match tokenizer_path {
                Some(p) => Some(NamedBytes {
                    name: p.display().to_string(),
                    bytes: std::fs::read(&p).map_err(|e| Error::file(p.display(), e))?,
                }),
                None => None,
            };
            return Self::from_gguf(gguf, tokenizer, weight_bytes);
        }
        if !path.is_dir() {
            return Err(Error::file(path.display(), "no such model folder or file"));
        }
        let config_path = path.join("config.json");
        let config_json = std::fs::read_to_string(&config_path)
            .map_err(|e| Error::file(config_path.display(), e))?;
        let config = PhiConfig::from_json(&config_json, &config_path.display().to_string())?;
        let tokenizer = PhiTokenizer::from_file(
            &tokenizer
                .map(Path::to_path_buf)
                .unwrap_or(path.join("tokenizer.json")),
        )?;
        let single = path.join("model.safetensors");
        let index = path.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let json =
                std::fs::read_to_string(&index).map_err(|e| Error::file(index.display(), e))?;
            Safetensors::shard_names(&json, &index.display().to_string())?
                .into_iter()
                .map(|n| path.join(n))
                .collect()
        } else {
            return Err(Error::file(
                path.display(),
                "no model.safetensors or model.safetensors.index.json in this folder",
            ));
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut weight_bytes = 0;
        for f in files {
            let bytes = Bytes::open(&f)?;
            weight_bytes += bytes.len() as u64;
            shards.push((f.display().to_string(), bytes));
        }
        let weights = in_its_layout(Safetensors::from_shards(shards, dtype)?, &config);
        Self::new(config, tokenizer, weights, "safetensors", weight_bytes)
    }
}

/// The model config and tokenizer that safetensors weights need beside them.
fn config_and_tokenizer(
    config: Option<NamedBytes>,
    tokenizer: Option<NamedBytes>,
) -> Result<(PhiConfig, PhiTokenizer)> {
    let config =
        config.ok_or_else(|| Error::input("config.json is required for safetensors weights"))?;
    let config = PhiConfig::from_json(&utf8(&config)?, &config.name)?;
    let tokenizer = tokenizer.ok_or_else(|| Error::input("tokenizer.json is required"))?;
    let tokenizer = PhiTokenizer::from_bytes(&tokenizer.bytes, &tokenizer.name)?;
    Ok((config, tokenizer))
}

/// Safetensors weights, read through the phi-msft names when the file uses them (whichever
/// config format came with it).
pub(crate) fn in_its_layout(file: Safetensors, config: &PhiConfig) -> Box<dyn TensorSource> {
    if crate::weights::is_msft(|name| file.contains(name)) {
        Box::new(MsftLayout::new(Box::new(file), config))
    } else {
        Box::new(file)
    }
}

fn utf8(file: &NamedBytes) -> Result<String> {
    String::from_utf8(file.bytes.clone()).map_err(|_| Error::file(&file.name, "not valid UTF-8"))
}
