//! A key/value cache allocated once for the whole context and written in place, so a
//! decode step costs no allocation and no concatenation of the past.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub struct KvCache {
    /// Per layer: keys and values, each `(batch, kv_heads, capacity, head_dim)`.
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, kv_heads, capacity, head_dim);
        let layers = (0..layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Number of positions already stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets positions from `len` on (keeps a shared prefix, e.g. a question before its choices).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Errors if `new` more positions would overflow the cache.
    pub fn reserve(&self, new: usize) -> Result<()> {
        if self.len + new > self.capacity {
            return Err(Error::input(format!(
                "context length exceeded: {} tokens already, {new} more, the model's context is {}",
                self.len, self.capacity
            )));
        }
        Ok(())
    }

    /// Writes `k`, `v` (`(batch, kv_heads, new, head_dim)`) for `layer` after the stored
    /// positions and returns views of all positions so far.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(k, 2, self.len)?;
        vc.slice_set(v, 2, self.len)?;
        Ok((
            kc.narrow(2, 0, self.len + new)?,
            vc.narrow(2, 0, self.len + new)?,
        ))
    }

    /// Called once per forward, after every layer has appended `new` positions.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}
