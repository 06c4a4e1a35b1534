//! Attention of one new position per sequence against the KV cache (a decode step), every
//! head in one pass over the cache where it lies.
//!
//! Why: through candle a decode step's attention was about ten ops per layer: a batched
//! product of one query row per head with the cached keys (copied to transpose them), the
//! scale, the mask, a softmax and a second batched product, each allocating. At 407M
//! parameters those ops, not the weights, made a step grow by 2 µs per layer for every
//! cached position. Here each head reads its keys and values once, in place.

use candle_core::{DType, Device, Layout, Storage, Tensor};

use super::disjoint::{for_each_unit, Disjoint};
use super::grad_kernels::exp;
use crate::error::{Error, Result};

/// Whether [`attend`] serves: one new position, f32 on the CPU, a key head per query head,
/// keys and values whose rows are contiguous (as the cache hands them over).
pub(super) fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let rows_contiguous = |t: &Tensor| t.dtype() == DType::F32 && t.stride().last() == Some(&1);
    q.device().is_cpu()
        && q.dtype() == DType::F32
        && rows_contiguous(k)
        && rows_contiguous(v)
        && q.dims().get(2) == Some(&1)
        && q.dims().get(1) == k.dims().get(1)
}

/// Softmax attention of `q` (`(batch, heads, 1, head_dim)`) over every position of `k` and
/// `v` (`(batch, heads, positions, head_dim)`, views of the cache), scores scaled by
/// `scale`; returned as `(batch, 1, heads · head_dim)`, heads side by side.
pub(super) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let (batch, heads, _, hd) = q.dims4()?;
    let positions = k.dim(2)?;
    if k.dims4()? != (batch, heads, positions, hd) || v.dims4()? != k.dims4()? {
        return Err(Error::input(
            "attention's keys and values do not match its queries",
        ));
    }
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (q, k, v) = (
        cpu_f32(&q_storage)?,
        Rows::of(cpu_f32(&k_storage)?, k_layout)?,
        Rows::of(cpu_f32(&v_storage)?, v_layout)?,
    );
    let q = &q[q_layout.start_offset()..];
    let mut out = vec![0f32; batch * heads * hd];
    let shared = Disjoint::new(&mut out);
    for_each_unit(batch * heads, |unit| {
        let (b, h) = (unit / heads, unit % heads);
        let head = Head {
            query: &q[unit * hd..(unit + 1) * hd],
            keys: &k,
            values: &v,
            sequence_head: (b, h),
            positions,
            scale,
        };
        // SAFETY: elements `unit · hd ..` of `out`, `hd` of them, belong to this unit alone;
        // `out` outlives the pool's call.
        let out = unsafe { std::slice::from_raw_parts_mut(shared.at(unit * hd), hd) };
        head.attend(out);
    });
    Ok(Tensor::from_vec(out, (batch, 1, heads * hd), &Device::Cpu)?)
}

/// One head's query against its cached keys and values.
struct Head<'a> {
    query: &'a [f32],
    keys: &'a Rows<'a>,
    values: &'a Rows<'a>,
    sequence_head: (usize, usize),
    positions: usize,
    scale: f32,
}

impl Head<'_> {
    /// Writes the softmax-weighted sum of the values into `out` (zeroed, `head_dim` long).
    fn attend(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected just above.
            return unsafe { self.attend_avx2(out) };
        }
        self.attend_portable(out)
    }

    /// The same loops compiled for AVX2: eight lanes where the crate's baseline (SSE2, for
    /// any x86-64) has four; at Phi-2's head size these loops are a tenth of a decode step
    /// at a context of 512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn attend_avx2(&self, out: &mut [f32]) {
        self.attend_portable(out)
    }

    #[inline(always)]
    fn attend_portable(&self, out: &mut [f32]) {
        // Plain loops and calls marked inline: anything left out of line is compiled
        // without AVX2.
        let ((b, h), hd) = (self.sequence_head, self.query.len());
        let mut weights = vec![0f32; self.positions];
        for (t, w) in weights.iter_mut().enumerate() {
            *w = dot(self.query, self.keys.row(b, h, t, hd)) * self.scale;
        }
        let max = weights.iter().fold(f32::NEG_INFINITY, |m, &w| m.max(w));
        // The exponentials in a loop of their own, so that it vectorizes.
        weights.iter_mut().for_each(|w| *w = exp(*w - max));
        let total = sum(&weights);
        for (t, w) in weights.iter().enumerate() {
            for (s, x) in out.iter_mut().zip(self.values.row(b, h, t, hd)) {
                *s += w * x;
            }
        }
        let inverse = 1.0 / total;
        out.iter_mut().for_each(|s| *s *= inverse);
    }
}

fn cpu_f32(storage: &Storage) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(s) => Ok(s.as_slice::<f32>()?),
        _ => Err(Error::input("decode attention runs on the CPU")),
    }
}

/// A `(batch, heads, positions, head_dim)` view whose rows (one position of one head) are
/// contiguous: the cache's layout.
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 3],
}

impl<'a> Rows<'a> {
    fn of(data: &'a [f32], layout: &Layout) -> Result<Self> {
        match *layout.stride() {
            [batch, head, position, 1] => Ok(Self {
                data,
                start: layout.start_offset(),
                strides: [batch, head, position],
            }),
            _ => Err(Error::input(
                "cached keys and values must have contiguous rows",
            )),
        }
    }

    #[inline(always)]
    fn row(&self, b: usize, h: usize, t: usize, hd: usize) -> &[f32] {
        let [sb, sh, st] = self.strides;
        let at = self.start + b * sb + h * sh + t * st;
        &self.data[at..at + hd]
    }
}

/// Eight partial sums, so the loop vectorizes (a single running f32 sum cannot be
/// reordered).
#[inline(always)]
fn lanes_sum(eights: impl Iterator<Item = [f32; 8]>, tail: f32) -> f32 {
    let mut lanes = [0f32; 8];
    for eight in eights {
        for i in 0..8 {
            lanes[i] += eight[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y);
    let eights = a8
        .zip(b8)
        .map(|(x, y)| std::array::from_fn(|i| x[i] * y[i]));
    lanes_sum(eights, tail.sum())
}

#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let a8 = a.chunks_exact(8);
    let tail = a8.remainder().iter().sum();
    lanes_sum(a8.map(|x| std::array::from_fn(|i| x[i])), tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loops as compiled for the crate's baseline (what CPUs without AVX2 and the
    /// browser run) give what the dispatched ones (AVX2 here) give.
    #[test]
    fn the_portable_loops_give_what_the_dispatched_ones_give() {
        let (hd, positions) = (80, 37);
        let wave =
            |k: f32| -> Vec<f32> { (0..positions * hd).map(|i| (i as f32 * k).sin()).collect() };
        let (keys, values) = (wave(0.37), wave(0.11));
        let rows = |data| Rows {
            data,
            start: 0,
            strides: [0, 0, hd],
        };
        let (keys, values) = (rows(&keys), rows(&values));
        let query: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.23).cos() * 3.0).collect();
        let head = Head {
            query: &query,
            keys: &keys,
            values: &values,
            sequence_head: (0, 0),
            positions,
            scale: 0.3,
        };
        let (mut portable, mut dispatched) = (vec![0f32; hd], vec![0f32; hd]);
        head.attend_portable(&mut portable);
        head.attend(&mut dispatched);
        for (p, d) in portable.iter().zip(&dispatched) {
            assert!((p - d).abs() < 1e-5, "{p} vs {d}");
        }
        assert!(portable.iter().any(|p| p.abs() > 0.01));
    }

    /// Against candle's ops, on keys and values that are views of a larger cache (as the KV
    /// cache hands them over), two sequences, Phi-2's head size, one position and many.
    #[test]
    fn matches_the_composed_attention_on_cache_views() {
        let dev = Device::Cpu;
        let (batch, heads, hd, allocated) = (2, 3, 80, 40);
        let wave =
            |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin() * 2.0).collect() };
        let shape = (batch, heads, allocated, hd);
        let cache_k = Tensor::from_vec(wave(batch * heads * allocated * hd, 0.37), shape, &dev);
        let cache_v = Tensor::from_vec(wave(batch * heads * allocated * hd, 0.11), shape, &dev);
        let q = Tensor::from_vec(wave(batch * heads * hd, 0.23), (batch, heads, 1, hd), &dev);
        let (cache_k, cache_v, q) = (cache_k.unwrap(), cache_v.unwrap(), q.unwrap());
        let scale = 1.0 / (hd as f32).sqrt();
        for positions in [1, 29] {
            let k = cache_k.narrow(2, 0, positions).unwrap();
            let v = cache_v.narrow(2, 0, positions).unwrap();
            assert!(applies(&q, &k, &v));
            let got = attend(&q, &k, &v, scale).unwrap();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let want = probs.matmul(&v).unwrap().transpose(1, 2).unwrap();
            let want = want.reshape((batch, 1, heads * hd)).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap();
            let worst = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(worst < 1e-5, "{positions} positions: off by {worst}");
        }
        let wrong = cache_v.narrow(2, 0, 3).unwrap();
        assert!(attend(&q, &cache_k.narrow(2, 0, 4).unwrap(), &wrong, scale).is_err());
    }
}
