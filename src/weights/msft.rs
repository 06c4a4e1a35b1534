//! The `phi-msft` (MixFormer) layout: the names microsoft/phi-2 first shipped under and that
//! early fine-tunes keep (`transformer.h.N.mixer.Wqkv`, `lm_head.linear`, …). A safetensors
//! file in that layout is read through this adapter, which asks for each tensor by its msft
//! name and cuts q, k and v out of the fused `Wqkv`, so the model sees transformers' names
//! whatever the file used.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::names::{Site, TensorId};
use crate::model::{BoxFuture, PhiConfig, StoredTensor, TensorSource, Weight};

/// Whether a file holding a tensor called `has(name)` uses the msft names: its token table
/// has the msft name.
pub fn is_msft(has: impl Fn(&str) -> bool) -> bool {
    has(&Site::Embedding.weight().msft())
}

pub struct MsftLayout {
    inner: Box<dyn TensorSource>,
    config: PhiConfig,
    /// Fused `Wqkv` tensors read, with how many of q, k and v have yet to take their rows:
    /// each part is a view of the same storage, so the fused tensor is read and converted
    /// once, and let go when its third part is taken.
    fused: Mutex<HashMap<String, (Tensor, usize)>>,
}

impl MsftLayout {
    pub fn new(inner: Box<dyn TensorSource>, config: &PhiConfig) -> Self {
        Self {
            inner,
            config: config.clone(),
            fused: Mutex::default(),
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
        let mut fused = self.fused.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((tensor, left)) = fused.get_mut(name) {
            let tensor = tensor.clone();
            *left -= 1;
            if *left == 0 {
                fused.remove(name);
            }
            return Ok(tensor);
        }
        let tensor = self.inner.tensor(name, shape)?.dense()?;
        fused.insert(name.to_string(), (tensor.clone(), 2));
        Ok(tensor)
    }

    fn is_read(&self, name: &str) -> bool {
        let fused = self.fused.lock().unwrap_or_else(|e| e.into_inner());
        fused.contains_key(name)
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

    fn fetch<'a>(&'a self, hf: &'a str, shape: &'a [usize]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let id = self.id(hf)?;
            let name = id.msft();
            match id.fused_rows(&self.config) {
                None => self.inner.fetch(&name, shape).await,
                // k and v come out of the fused tensor q's read left behind.
                Some(_) if self.is_read(&name) => Ok(()),
                Some((_, fused_shape)) => self.inner.fetch(&name, &fused_shape).await,
            }
        })
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
