//! A key/value cache written in place, so a decode step costs no allocation and no
//! concatenation of the past. Its buffers grow (doubling, up to the capacity) as positions
//! are used: memory follows the tokens actually run, not the context a config allows.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Positions allocated by the first append (more if it needs more).
const FIRST_ALLOCATION: usize = 64;

pub struct KvCache {
    /// Per layer: keys and values, each `(batch, kv_heads, allocated, head_dim)`.
    layers: Vec<(Tensor, Tensor)>,
    shape: CacheShape,
    len: usize,
    capacity: usize,
}

struct CacheShape {
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
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
        let shape = CacheShape {
            batch,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
        };
        let empty = shape.zeros(0)?;
        Ok(Self {
            layers: vec![(empty.clone(), empty); layers],
            shape,
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

    /// Positions the buffers hold now (grown on demand up to `capacity`).
    pub fn allocated(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Forgets positions from `len` on (keeps a shared prefix, e.g. a question before its choices).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `new` more positions, or errors if they would overflow the context.
    pub fn reserve(&mut self, new: usize) -> Result<()> {
        let needed = self.len + new;
        if needed > self.capacity {
            return Err(Error::input(format!(
                "context length exceeded: {} tokens already, {new} more, the model's context is {}",
                self.len, self.capacity
            )));
        }
        let allocated = self.allocated();
        if needed <= allocated {
            return Ok(());
        }
        let grown = needed
            .max(2 * allocated)
            .max(FIRST_ALLOCATION)
            .min(self.capacity);
        for (k, v) in &mut self.layers {
            for t in [k, v] {
                let bigger = self.shape.zeros(grown)?;
                if self.len > 0 {
                    bigger.slice_set(&t.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                *t = bigger;
            }
        }
        Ok(())
    }

    /// Writes `k`, `v` (`(batch, kv_heads, new, head_dim)`) for `layer` after the stored
    /// positions and returns views of all positions so far. `reserve` has made room.
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

impl CacheShape {
    fn zeros(&self, positions: usize) -> Result<Tensor> {
        let shape = (self.batch, self.kv_heads, positions, self.head_dim);
        Ok(Tensor::zeros(shape, self.dtype, &self.device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_use_and_keeps_what_it_holds() {
        let mut c = KvCache::new(1, 1, 2, 1_000_000, 4, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(c.allocated(), 0);
        let step = |c: &mut KvCache, n: usize, value: f32| {
            c.reserve(n).unwrap();
            let t = Tensor::full(value, (1, 2, n, 4), &Device::Cpu).unwrap();
            let (k, _) = c.append(0, &t, &t).unwrap();
            c.advance(n);
            k
        };
        step(&mut c, 3, 1.0);
        assert_eq!(c.allocated(), FIRST_ALLOCATION);
        step(&mut c, 100, 2.0);
        assert_eq!(c.allocated(), 128);
        let k = step(&mut c, 1, 3.0);
        let firsts: Vec<f32> = k
            .narrow(3, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(firsts.len(), 2 * 104);
        assert_eq!(&firsts[..4], &[1.0, 1.0, 1.0, 2.0]);
        assert_eq!(firsts[103], 3.0);
        c.truncate(10);
        assert!(c.reserve(1_000_001 - 10).is_err());
    }
}
