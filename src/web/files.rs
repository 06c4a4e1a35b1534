//! The page's files: a model's (config, tokenizer, weights) and an adapter's, each given
//! either whole (`{name, bytes: Uint8Array}`) or as a file to read by ranges
//! (`{name, size, read(start, end) → Promise<Uint8Array>}`: a download the page keeps on disk,
//! a picked file). Ranged safetensors weights stream through the load one tensor at a time.

use std::rc::Rc;

use candle_core::DType;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use super::js_error;
use crate::checkpoint::{Checkpoint, NamedBytes};
use crate::error::{Error, Result};
use crate::model::{BoxFuture, PhiConfig, StoredTensor, TensorSource, Weight};
use crate::weights::{Adapter, RangeRead};

/// One file from the page.
enum PageFile {
    Whole(NamedBytes),
    Ranged(String, Rc<dyn RangeRead>),
}

impl PageFile {
    fn name(&self) -> &str {
        match self {
            PageFile::Whole(f) => &f.name,
            PageFile::Ranged(name, _) => name,
        }
    }

    /// The file's bytes, read whole (config, tokenizer and adapter files are small).
    async fn whole(self) -> Result<NamedBytes> {
        match self {
            PageFile::Whole(f) => Ok(f),
            PageFile::Ranged(name, file) => {
                let bytes = file.read(0..file.size()).await?;
                Ok(NamedBytes { name, bytes })
            }
        }
    }
}

/// A file the page reads by ranges through its `read(start, end)` function.
struct JsFile {
    name: String,
    size: u64,
    read: js_sys::Function,
}

impl RangeRead for JsFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, range: std::ops::Range<u64>) -> BoxFuture<'_, Result<Vec<u8>>> {
        Box::pin(async move {
            let failed = |e: JsValue| {
                let message = e
                    .dyn_ref::<js_sys::Error>()
                    .map(|e| String::from(e.message()))
                    .or_else(|| e.as_string())
                    .unwrap_or_else(|| "the read failed".into());
                Error::file(&self.name, format!("reading bytes {range:?}: {message}"))
            };
            let promise = self
                .read
                .call2(
                    &JsValue::NULL,
                    &(range.start as f64).into(),
                    &(range.end as f64).into(),
                )
                .map_err(failed)?;
            let value = JsFuture::from(js_sys::Promise::resolve(&promise))
                .await
                .map_err(failed)?;
            let bytes = value.dyn_into::<js_sys::Uint8Array>().map_err(|_| {
                Error::file(&self.name, "read(start, end) must resolve to a Uint8Array")
            })?;
            Ok(bytes.to_vec())
        })
    }
}

/// Reads the page's array of files, naming each by the last part of its path.
fn page_files(files: js_sys::Array) -> std::result::Result<Vec<(String, PageFile)>, JsValue> {
    files
        .iter()
        .map(|file| {
            let get = |key: &str| js_sys::Reflect::get(&file, &key.into()).ok();
            let name = get("name")
                .and_then(|n| n.as_string())
                .ok_or_else(|| js_error(Error::input("each file needs a string `name`")))?;
            let base = name.rsplit('/').next().unwrap_or(&name).to_string();
            if let Some(read) = get("read").and_then(|r| r.dyn_into::<js_sys::Function>().ok()) {
                let size = get("size")
                    .and_then(|s| s.as_f64())
                    .filter(|s| s.is_finite() && *s >= 0.0 && s.fract() == 0.0)
                    .ok_or_else(|| {
                        js_error(Error::input(format!(
                            "{name}: a file read by ranges needs its `size` in bytes"
                        )))
                    })?;
                let file = JsFile {
                    name: name.clone(),
                    size: size as u64,
                    read,
                };
                return Ok((base, PageFile::Ranged(name, Rc::new(file))));
            }
            let bytes = get("bytes")
                .and_then(|b| b.dyn_into::<js_sys::Uint8Array>().ok())
                .ok_or_else(|| {
                    js_error(Error::input(format!(
                        "{name}: give `bytes` (a Uint8Array) or `size` and `read(start, end)`"
                    )))
                })?
                .to_vec();
            Ok((base, PageFile::Whole(NamedBytes { name, bytes })))
        })
        .collect()
}

/// Sorts the page's files into config, tokenizer and weights by their names, and opens
/// them as a checkpoint: read by ranges when the weights were given that way.
pub async fn open_checkpoint(files: js_sys::Array) -> std::result::Result<Checkpoint, JsValue> {
    let (mut config, mut tokenizer, mut weights) = (None, None, Vec::new());
    for (base, file) in page_files(files)? {
        match base.as_str() {
            "config.json" => config = Some(file.whole().await.map_err(js_error)?),
            "tokenizer.json" => tokenizer = Some(file.whole().await.map_err(js_error)?),
            "model.safetensors.index.json" => {}
            b if b.ends_with(".safetensors") || b.ends_with(".gguf") => weights.push(file),
            _ => return Err(js_error(Error::file(
                file.name(),
                "not a model file (expected config.json, tokenizer.json, *.safetensors or *.gguf)",
            ))),
        }
    }
    if weights.is_empty() {
        return Err(js_error(Error::input(
            "no weights: give a model.safetensors (or its shards) or a .gguf file",
        )));
    }
    let opened = if weights.iter().any(|w| matches!(w, PageFile::Ranged(..))) {
        let mut ranged = Vec::with_capacity(weights.len());
        for w in weights {
            ranged.push(match w {
                PageFile::Ranged(name, file) => (name, file),
                PageFile::Whole(f) => {
                    let file: Rc<dyn RangeRead> = Rc::new(Held(f.bytes));
                    (f.name, file)
                }
            });
        }
        Checkpoint::from_ranged(config, tokenizer, ranged, DType::F32).await
    } else {
        let mut whole = Vec::with_capacity(weights.len());
        for w in weights {
            whole.push(w.whole().await.map_err(js_error)?);
        }
        Checkpoint::from_bytes(config, tokenizer, whole, DType::F32)
    };
    opened.map_err(js_error)
}

/// Bytes already in memory, read by ranges beside files that are not.
struct Held(Vec<u8>);

impl RangeRead for Held {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read(&self, range: std::ops::Range<u64>) -> BoxFuture<'_, Result<Vec<u8>>> {
        let bytes = usize::try_from(range.start)
            .ok()
            .zip(usize::try_from(range.end).ok())
            .and_then(|(s, e)| self.0.get(s..e))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::input(format!("bytes {range:?} of {}", self.0.len())));
        Box::pin(std::future::ready(bytes))
    }
}

/// A PEFT adapter's two files, checked against the model it is for.
pub async fn open_adapter(
    files: js_sys::Array,
    cfg: &PhiConfig,
) -> std::result::Result<Adapter, JsValue> {
    let (mut config, mut weights) = (None, None);
    for (base, file) in page_files(files)? {
        match base.as_str() {
            "adapter_config.json" => config = Some(file.whole().await.map_err(js_error)?),
            "adapter_model.safetensors" => weights = Some(file.whole().await.map_err(js_error)?),
            _ => return Err(js_error(Error::file(
                file.name(),
                "not an adapter file (expected adapter_config.json and adapter_model.safetensors)",
            ))),
        }
    }
    let (Some(config), Some(weights)) = (config, weights) else {
        return Err(js_error(Error::input(
            "an adapter needs adapter_config.json and adapter_model.safetensors",
        )));
    };
    let json = String::from_utf8(config.bytes)
        .map_err(|_| js_error(Error::file(&config.name, "not valid UTF-8")))?;
    Adapter::from_bytes(&json, &weights.bytes, cfg, &weights.name).map_err(js_error)
}

/// A checkpoint that tells the page which tensor it starts on (`on_tensor(name, index,
/// total)`), for a progress display that names what is being read and converted.
pub struct Announced {
    inner: Box<dyn TensorSource>,
    on_tensor: js_sys::Function,
    total: usize,
    started: std::cell::Cell<usize>,
}

impl Announced {
    pub fn new(inner: Box<dyn TensorSource>, on_tensor: js_sys::Function, total: usize) -> Self {
        Self {
            inner,
            on_tensor,
            total,
            started: std::cell::Cell::new(0),
        }
    }
}

impl TensorSource for Announced {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.inner.tensor(name, shape)
    }

    fn fetch<'a>(&'a self, name: &'a str, shape: &'a [usize]) -> BoxFuture<'a, Result<()>> {
        let index = self.started.get();
        self.started.set(index + 1);
        // A throwing callback only loses the progress display, never the load.
        let _ = self.on_tensor.call3(
            &JsValue::NULL,
            &name.into(),
            &(index as f64).into(),
            &(self.total as f64).into(),
        );
        self.inner.fetch(name, shape)
    }

    fn dense_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Option<candle_core::Tensor>> {
        self.inner.dense_rows(name, shape, rows)
    }

    fn check_tensor(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.inner.check_tensor(name, shape)
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        self.inner.stored_tensors()
    }
}
