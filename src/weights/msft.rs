//! The `phi-msft` (MixFormer) layout: the names microsoft/phi-2 first shipped under and that
//! early fine-tunes keep (`transformer.h.N.mixer.Wqkv`, `lm_head.linear`, …). A safetensors
//! file in that layout is read through this adapter, which asks for each tensor by its msft
//! name and cuts q, k and v out of the fused `Wqkv`, so the model sees transformers' names
//! whatever the file used.

use std::sync::Mutex;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::names::{Site, TensorId};
use crate::model::{PhiConfig, StoredTensor, TensorSource, Weight};

/// Whether a file holding a tensor called `has(name)` uses the msft names: its token table
/// has the msft name.
pub fn is_msft(has: impl Fn(&str) -> bool) -> bool {
    has(&Site::Embedding.weight().msft())
}

pub struct MsftLayout {
    inner: Box<dyn TensorSource>,
    config: PhiConfig,
    /// The last fused `Wqkv` read: the model asks for q, k and v one after another, and each
    /// is a view of the same storage, so the fused tensor is converted once, not three times.
    last_fused: Mutex<Option<(String, Tensor)>>,
}

impl MsftLayout {
    pub fn new(inner: Box<dyn TensorSource>, config: &PhiConfig) -> Self {
        Self {
            inner,
            config: config.clone(),
            last_fused: Mutex::new(None),
        }
    }

    fn id(&self, hf: &str) -> Result<TensorId> {
        TensorId::from_hf(hf).ok_or_else(|| {
            Error::input(format!(
                "{hf} is not a Phi-2 tensor, so it has no phi-msft name"
            ))
        })
    }

    fn fused(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let mut last = self.last_fused.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, tensor)) = last.as_ref() {
            if cached == name {
                return Ok(tensor.clone());
            }
        }
        let tensor = self.inner.tensor(name, shape)?.dense()?;
        *last = Some((name.to_string(), tensor.clone()));
        Ok(tensor)
    }
}

impl TensorSource for MsftLayout {
    fn tensor(&self, hf: &str, shape: &[usize]) -> Result<Weight> {
        let id = self.id(hf)?;
        let name = id.msft();
        match id.fused_rows(&self.config) {
            None => self.inner.tensor(&name, shape),
            Some((rows, fused_shape)) => {
                if shape.first() != Some(&rows.len()) {
                    return Err(Error::input(format!(
                        "{hf} has {} rows in the config, asked for {shape:?}",
                        rows.len()
                    )));
                }
                let whole = self.fused(&name, &fused_shape)?;
                Ok(Weight::Dense(whole.narrow(0, rows.start, rows.len())?))
            }
        }
    }

    fn dense_rows(
        &self,
        hf: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Option<Tensor>> {
        let id = self.id(hf)?;
        match id.fused_rows(&self.config) {
            None => self.inner.dense_rows(&id.msft(), shape, rows),
            Some((part, fused_shape)) => {
                if rows.end > part.len() {
                    return Err(Error::input(format!(
                        "rows {rows:?} of {hf}, which has {}",
                        part.len()
                    )));
                }
                let within = part.start + rows.start..part.start + rows.end;
                self.inner.dense_rows(&id.msft(), &fused_shape, within)
            }
        }
    }

    fn check_tensor(&self, hf: &str, shape: &[usize]) -> Result<()> {
        let id = self.id(hf)?;
        match id.fused_rows(&self.config) {
            None => self.inner.check_tensor(&id.msft(), shape),
            Some((_, fused_shape)) => self.inner.check_tensor(&id.msft(), &fused_shape),
        }
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        self.inner.stored_tensors()
    }
}
