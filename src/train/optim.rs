//! AdamW with decoupled weight decay (not on biases and LayerNorm weights), with its moments
//! kept as plain tensors so a checkpoint can save them and a resumed run continue exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far (bias correction uses it).
    pub t: u64,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl AdamW {
    pub fn new(weight_decay: f64) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    /// One update of `param` (named `name`) with gradient `grad_scale · g` at learning rate
    /// `lr` (the scale is where gradient clipping comes in).
    pub fn update(
        &mut self,
        name: &str,
        param: &Tensor,
        g: &Tensor,
        grad_scale: f64,
        lr: f64,
    ) -> Result<Tensor> {
        if param.device().is_cpu() && param.dtype() == DType::F32 && g.dtype() == DType::F32 {
            self.update_in_one_pass(name, param, g, grad_scale, lr)
        } else {
            self.update_with_tensor_ops(name, param, &(g * grad_scale)?, lr)
        }
    }

    fn decay_of(&self, param: &Tensor) -> f64 {
        // Biases and LayerNorm weights (rank 1) are not decayed.
        if param.rank() > 1 {
            self.weight_decay
        } else {
            0.0
        }
    }

    fn bias_corrections(&self) -> (f64, f64) {
        let t = (self.t + 1) as i32;
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }

    /// Any device and dtype: about fifteen tensor ops, each a pass over the weights.
    fn update_with_tensor_ops(
        &mut self,
        name: &str,
        param: &Tensor,
        g: &Tensor,
        lr: f64,
    ) -> Result<Tensor> {
        let m = match self.m.get(name) {
            Some(m) => ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?,
            None => (g * (1.0 - self.beta1))?,
        };
        let v = match self.v.get(name) {
            Some(v) => ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
            None => (g.sqr()? * (1.0 - self.beta2))?,
        };
        let (c1, c2) = self.bias_corrections();
        let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
        let mut next = (param - (step * lr)?)?;
        let decay = self.decay_of(param);
        if decay > 0.0 {
            next = (next - (param * (lr * decay))?)?;
        }
        self.m.insert(name.to_string(), m);
        self.v.insert(name.to_string(), v);
        Ok(next)
    }

    /// The same update as `update_with_tensor_ops` for f32 weights on the CPU, in one
    /// threaded pass: on a small model the optimizer's passes are a tenth of a step.
    fn update_in_one_pass(
        &mut self,
        name: &str,
        param: &Tensor,
        g: &Tensor,
        grad_scale: f64,
        lr: f64,
    ) -> Result<Tensor> {
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let mut p = flat(param)?;
        let g = flat(g)?;
        let moment = |saved: Option<&Tensor>| match saved {
            Some(t) => flat(t),
            None => Ok(vec![0f32; p.len()]),
        };
        let mut m = moment(self.m.get(name))?;
        let mut v = moment(self.v.get(name))?;
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            return Err(Error::input(format!(
                "{name}: gradient or optimizer state does not match the weight's shape"
            )));
        }
        let (c1, c2) = self.bias_corrections();
        let [b1, b2, eps, scale, lr, c1, c2, decay] = [
            self.beta1,
            self.beta2,
            self.eps,
            grad_scale,
            lr,
            c1,
            c2,
            lr * self.decay_of(param),
        ]
        .map(|x| x as f32);
        p.par_iter_mut()
            .zip(m.par_iter_mut())
            .zip(v.par_iter_mut())
            .zip(g.par_iter())
            .for_each(|(((p, m), v), &g)| {
                let g = g * scale;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let step = (*m / c1) / ((*v / c2).sqrt() + eps);
                *p = *p - step * lr - *p * decay;
            });
        let shape = param.shape();
        let device = param.device();
        self.m
            .insert(name.to_string(), Tensor::from_vec(m, shape, device)?);
        self.v
            .insert(name.to_string(), Tensor::from_vec(v, shape, device)?);
        Ok(Tensor::from_vec(p, shape, device)?)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut all = HashMap::new();
        for (k, t) in &self.m {
            all.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            all.insert(format!("v.{k}"), t.clone());
        }
        super::save_tensors(&all, path)
    }

    /// Restores the moments saved by `save` onto `device`; `t` comes from the trainer state.
    pub fn load(&mut self, path: &Path, t: u64, device: &Device) -> Result<()> {
        let all = candle_core::safetensors::load(path, device)
            .map_err(|e| Error::file(path.display(), e))?;
        for (k, tensor) in all {
            match k.split_once('.') {
                Some(("m", name)) => self.m.insert(name.to_string(), tensor),
                Some(("v", name)) => self.v.insert(name.to_string(), tensor),
                _ => {
                    return Err(Error::file(
                        path.display(),
                        format!("unexpected tensor {k}"),
                    ))
                }
            };
        }
        self.t = t;
        Ok(())
    }
}

/// Learning rate at `step` (1-based): linear warmup to `peak` over `warmup` steps, then a
/// cosine decay to `peak / 10` at `total`.
pub fn learning_rate(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    let decay = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / decay as f64).min(1.0);
    let min = peak / 10.0;
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        assert!((learning_rate(1, 1e-3, 10, 100) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(10, 1e-3, 10, 100) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(100, 1e-3, 10, 100) - 1e-4).abs() < 1e-12);
        let mid = learning_rate(55, 1e-3, 10, 100);
        assert!((mid - 5.5e-4).abs() < 1e-9, "{mid}");
    }

    #[test]
    fn one_pass_update_matches_the_tensor_ops() {
        let (mut fast, mut ops) = (AdamW::new(0.1), AdamW::new(0.1));
        for (name, shape) in [("w", &[6usize, 5][..]), ("b", &[5][..])] {
            let mut p_fast = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
            let mut p_ops = p_fast.clone();
            for step in 0..4 {
                let g = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
                fast.t = step;
                ops.t = step;
                p_fast = fast.update(name, &p_fast, &g, 0.5, 0.01).unwrap();
                let g = (g * 0.5).unwrap();
                p_ops = ops.update_with_tensor_ops(name, &p_ops, &g, 0.01).unwrap();
            }
            let diff: f32 = (p_fast - p_ops)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-6, "{name}: {diff}");
        }
    }

    #[test]
    fn first_adamw_step_moves_each_weight_by_lr() {
        // With bias correction the first step is lr · sign(g) (up to eps), plus decay.
        let mut opt = AdamW::new(0.0);
        let p = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
        let g = Tensor::new(&[[0.3f32, -0.1], [2.0, -5.0]], &Device::Cpu).unwrap();
        let next = opt.update("w", &p, &g, 1.0, 0.01).unwrap();
        let d: Vec<f32> = (p - next)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (d, s) in d.iter().zip([1.0, -1.0, 1.0, -1.0]) {
            assert!((d - 0.01 * s).abs() < 1e-6, "{d}");
        }
    }
}
