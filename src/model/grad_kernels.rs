//! The training path's hot ops as single CPU kernels with hand-written backward passes:
//! LayerNorm, a linear layer (product and bias), the bias add alone, gelu_new, causal
//! attention with rotary (and its softmax alone) and the target log-probability of the loss.
//!
//! Composed from candle primitives each of these is 5–15 passes over its tensor forward and
//! as many again backward, each allocating; on a small model those passes, not the matrix
//! multiplies, are most of a training step (the attention scores and the logits are the
//! biggest tensors in it). Here each op is one pass forward and one backward, split across
//! threads by row. The composed forms (`*_composed`) run on other devices and dtypes, and
//! are what the tests and `benches/grad_kernels.rs` check the kernels against.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, D,
};
use std::ops::Range;
use std::sync::Mutex;

use rayon::prelude::*;

use super::disjoint::Disjoint;

type CResult<T> = candle_core::Result<T>;

/// Whether the kernels serve `x`: f32 on the CPU.
pub fn kernels_apply(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The contiguous f32 data of an op's input (callers make inputs contiguous first).
fn data<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => bail!("fused kernel input is not contiguous"),
    }
}

fn last_dim(l: &Layout) -> CResult<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!("fused kernel input has no last dimension"),
    }
}

/// Rows per rayon task: enough work per task that scheduling stays negligible.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// Runs `f(row_index, out_row)` over the rows of a fresh output of `len` elements.
fn map_rows(len: usize, row: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; len];
    let per = rows_per_task(row);
    out.par_chunks_mut(row * per)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (i, r) in rows.chunks_mut(row).enumerate() {
                f(chunk * per + i, r);
            }
        });
    out
}

/// Sums per-task partial vectors in task order. rayon's `reduce` pairs partials in an
/// order that depends on scheduling, and float addition is not associative: the same run
/// twice would then differ in the last bits. Collecting first keeps the order fixed.
fn sum_in_order(partials: impl IndexedParallelIterator<Item = Vec<f32>>, len: usize) -> Vec<f32> {
    partials
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0f32; len], |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
}

/// e^x within about 2 ulp (Cephes' expf: x = n·ln 2 + r, a degree-7 polynomial in r, times
/// 2^n built in the exponent bits), without branches or calls so that loops over it
/// vectorize: libm's expf is one call per value, and the softmaxes, gelu and the loss take
/// tens of millions per training step. NaN stays NaN; arguments are clamped to [−87, 88],
/// where e^x is a normal f32 (below, e^−87 ≈ 1.6e−38 stands for 0).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    let two_n = (t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    p * f32::from_bits(two_n as u32)
}

/// `softmax(scale · row)` in place (`scale > 0`).
fn softmax_in_place(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
    row.iter_mut().for_each(|v| *v = exp(*v * scale - max));
    let inv = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|v| *v *= inv);
}

// ---------------------------------------------------------------- LayerNorm

/// `(x − mean) / sqrt(var + eps) · w + b` over the last dimension.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !kernels_apply(x) {
        return layer_norm_composed(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

/// `layer_norm` from candle primitives.
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> CResult<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// Mean and 1/sqrt(var + eps) of a row.
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "medphi-layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, b) = (data(sx, lx)?, data(sw, lw)?, data(sb, lb)?);
        let dim = last_dim(lx)?;
        if w.len() != dim || b.len() != dim {
            bail!("layer norm weight and bias must have {dim} elements");
        }
        let out = map_rows(x.len(), dim, |r, y| {
            let x = &x[r * dim..(r + 1) * dim];
            let (mean, rstd) = moments(x, self.eps);
            for i in 0..dim {
                y[i] = (x[i] - mean) * rstd * w[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dim = w.elem_count();
        let rows = x.elem_count() / dim;
        let packed =
            x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(w.shape())?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm's backward: `(rows + 2, dim)` holding dx's rows, then dw, then db.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "medphi-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, g) = (data(sx, lx)?, data(sw, lw)?, data(sg, lg)?);
        let dim = last_dim(lx)?;
        if g.len() != x.len() || w.len() != dim {
            bail!("layer norm gradient has the wrong shape");
        }
        let rows = x.len() / dim;
        let mut out = vec![0f32; x.len() + 2 * dim];
        let per = rows_per_task(dim);
        let (dx, _) = out.split_at_mut(x.len());
        // Each task writes its rows of dx and returns its partial dw, db, summed after.
        let partials = dx.par_chunks_mut(dim * per).enumerate().map(|(chunk, dx)| {
            let mut acc = vec![0f32; 2 * dim];
            let mut wg = vec![0f32; dim];
            for (i, dx) in dx.chunks_mut(dim).enumerate() {
                let r = chunk * per + i;
                let x = &x[r * dim..(r + 1) * dim];
                let g = &g[r * dim..(r + 1) * dim];
                let (mean, rstd) = moments(x, self.eps);
                let (mut mean_wg, mut mean_wg_xhat) = (0f32, 0f32);
                for j in 0..dim {
                    let xhat = (x[j] - mean) * rstd;
                    wg[j] = w[j] * g[j];
                    mean_wg += wg[j];
                    mean_wg_xhat += wg[j] * xhat;
                    acc[j] += g[j] * xhat;
                    acc[dim + j] += g[j];
                }
                mean_wg /= dim as f32;
                mean_wg_xhat /= dim as f32;
                for j in 0..dim {
                    let xhat = (x[j] - mean) * rstd;
                    dx[j] = rstd * (wg[j] - mean_wg - xhat * mean_wg_xhat);
                }
            }
            acc
        });
        let partial = sum_in_order(partials, 2 * dim);
        out[x.len()..].copy_from_slice(&partial);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, dim))))
    }
}

// ---------------------------------------------------------------- bias

/// `x + b` over the last dimension. Backward, the bias gradient is one column-sum kernel
/// where candle reduces over the broadcast dimensions with strided loops.
pub fn add_bias(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    // Without a graph to record there is no backward to save: candle's add is one pass too.
    if !kernels_apply(x) || !(x.track_op() || b.track_op()) {
        return x.broadcast_add(b);
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "medphi-add-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, b) = (data(sx, lx)?, data(sb, lb)?);
        let dim = last_dim(lx)?;
        if b.len() != dim {
            bail!("bias must have {dim} elements");
        }
        let out = map_rows(x.len(), dim, |r, y| {
            let x = &x[r * dim..(r + 1) * dim];
            for ((y, x), b) in y.iter_mut().zip(x).zip(b) {
                *y = x + b;
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(grad.clone()), Some(db.reshape(b.shape())?)))
    }
}

/// Sums the rows of `(…, dim)` into `(dim)`.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "medphi-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let dim = last_dim(l)?;
        let partials = x.par_chunks(dim * rows_per_task(dim)).map(|rows| {
            let mut acc = vec![0f32; dim];
            for row in rows.chunks(dim) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        });
        let sums = sum_in_order(partials, dim);
        Ok((CpuStorage::F32(sums), Shape::from(dim)))
    }
}

// ---------------------------------------------------------------- linear

/// `x · wᵀ + b` over `x`'s last dimension as one graph node, for training on the CPU. Composed
/// (reshape, transpose, matmul, reshape, bias) it was five nodes, and candle's backward pass
/// allocates, zeroes and adds a gradient for every node's input: the layers' products made
/// most of those passes over activation-sized tensors. Here forward is one product into rows
/// that start as the bias; backward is two products and a column sum, strided as the operands
/// lie (nothing transposed by copying). Products are `gemm`'s, on rayon's pool: in the browser
/// that is the one pool whose threads exist (candle's matmul asks the OS how many cores there
/// are, which a browser does not answer, so there every product ran on one thread).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

/// Whether `linear` serves a product by `w`: f32 on the CPU, and a weight being trained.
pub fn linear_applies(x: &Tensor, w: &Tensor) -> bool {
    kernels_apply(x) && kernels_apply(w) && w.track_op()
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "medphi-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, b) = (data(sx, lx)?, data(sw, lw)?, data(sb, lb)?);
        let inputs = last_dim(lx)?;
        let &[outputs, k] = lw.dims() else {
            bail!("linear: the weight must be 2-D, got {:?}", lw.dims())
        };
        if k != inputs || b.len() != outputs {
            bail!(
                "linear: input of {inputs} features, weight {outputs}×{k}, bias of {}",
                b.len()
            )
        }
        let rows = x.len() / inputs;
        let mut y = vec![0f32; rows * outputs];
        y.chunks_mut(outputs).for_each(|row| row.copy_from_slice(b));
        // y += x · wᵀ: wᵀ's (p, j) is w's (j, p).
        let x = Operand::rows(x, rows, inputs);
        let wt = Operand::rows(w, outputs, inputs).t();
        product(&mut y, outputs, true, x, wt)?;
        let mut dims = lx.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = outputs;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (outputs, inputs) = w.dims2()?;
        let g = grad.contiguous()?.reshape(((), outputs))?;
        let x2 = x.reshape(((), inputs))?;
        let dx = g.apply_op2_no_bwd(w, &MatMul)?.reshape(x.shape())?;
        let dw = g.t()?.apply_op2_no_bwd(&x2, &MatMul)?;
        let db = g.apply_op1_no_bwd(&ColumnSum)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `a · b` for 2-D f32 tensors of any strides (transposed views included, nothing copied).
struct MatMul;

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "medphi-matmul"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (a, b) = (Operand::of(sa, la)?, Operand::of(sb, lb)?);
        let mut dst = vec![0f32; a.rows * b.cols];
        let shape = Shape::from((a.rows, b.cols));
        product(&mut dst, b.cols, false, a, b)?;
        Ok((CpuStorage::F32(dst), shape))
    }
}

/// A 2-D f32 matrix as it lies in memory: element (i, j) at `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    fn of(s: &'a CpuStorage, l: &Layout) -> CResult<Self> {
        let (&[rows, cols], &[row_stride, col_stride]) = (l.dims(), l.stride()) else {
            bail!("matmul: 2-D operands only, got {:?}", l.dims())
        };
        Ok(Self {
            data: &s.as_slice::<f32>()?[l.start_offset()..],
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The rows `rows` and columns `cols` of this matrix.
    fn block(self, rows: Range<usize>, cols: Range<usize>) -> Self {
        let start = rows.start * self.row_stride + cols.start * self.col_stride;
        Self {
            data: self.data.get(start..).unwrap_or(&[]),
            rows: rows.len(),
            cols: cols.len(),
            ..self
        }
    }

    /// Whether every element lies within `data`.
    fn in_bounds(&self) -> bool {
        self.rows * self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst = [dst +] a · b`, `dst` row-major with rows `stride` apart, on rayon's threads.
fn product(
    dst: &mut [f32],
    stride: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
) -> CResult<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let fits = m == 0 || (stride >= n && (m - 1) * stride + n <= dst.len());
    if b.rows != k || !fits || !a.in_bounds() || !b.in_bounds() {
        bail!(
            "matmul: {m}×{k} times {}×{n} into {} values, rows {stride} apart",
            b.rows,
            dst.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(stride)
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
        }
        return Ok(());
    }
    // Inside one of the pool's tasks (attention's heads) the product keeps to its thread.
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && rayon::current_thread_index().is_none() {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let s = |stride: usize| stride as isize;
    // SAFETY: dst holds m rows of n values, (i, j) at i·stride + j (fits); every element of a
    // and b lies within its slice (in_bounds); dst is read only when accumulating, and then it
    // is initialised.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            s(stride),
            accumulate,
            a.data.as_ptr(),
            s(a.col_stride),
            s(a.row_stride),
            b.data.as_ptr(),
            s(b.col_stride),
            s(b.row_stride),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- gelu_new

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;
/// gelu is element-wise: its "rows" are just chunks of the flat data (the last one shorter).
const GELU_CHUNK: usize = 4096;

/// gelu_new(v) / v: `0.5 · (1 + tanh(u)) = sigmoid(2u)` with `u = √(2/π)·(v + a·v³)`; the
/// sigmoid form needs one `exp`, several times cheaper than libm's `tanhf`.
fn gelu_gate(v: f32) -> f32 {
    1.0 / (1.0 + exp(-2.0 * SQRT_2_OVER_PI * v * (1.0 + GELU_A * v * v)))
}

/// gelu_new, the tanh approximation of GELU (Phi-2's activation).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    if !kernels_apply(x) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(GeluTanh)
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "medphi-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let out = map_rows(x.len(), GELU_CHUNK, |r, y| {
            let x = &x[r * GELU_CHUNK..r * GELU_CHUNK + y.len()];
            for (y, &v) in y.iter_mut().zip(x) {
                *y = v * gelu_gate(v);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluTanhGrad)?,
        ))
    }
}

/// `grad · gelu_new′(x)`.
struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "medphi-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, g) = (data(sx, lx)?, data(sg, lg)?);
        if x.len() != g.len() {
            bail!("gelu gradient has the wrong shape");
        }
        let out = map_rows(x.len(), GELU_CHUNK, |r, d| {
            let span = r * GELU_CHUNK..r * GELU_CHUNK + d.len();
            for ((d, &v), &g) in d.iter_mut().zip(&x[span.clone()]).zip(&g[span]) {
                let s = gelu_gate(v);
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_A * v * v);
                *d = g * (s + 2.0 * v * s * (1.0 - s) * du);
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

// ---------------------------------------------------------------- causal softmax

/// Additive mask `(seq, start+seq)`: query i (at absolute position start+i) sees keys ≤ start+i;
/// `None` for a single query, which sees every key.
pub fn causal_mask(
    seq: usize,
    start: usize,
    dtype: DType,
    device: &Device,
) -> CResult<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let total = start + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(
        Tensor::from_vec(mask, (seq, total), device)?.to_dtype(dtype)?,
    ))
}

/// `softmax(scale · scores)` over the last dimension of `(…, queries, keys)` scores, where
/// query `i` sees keys `0..=i + keys − queries` (the queries are the last ones of the
/// sequence); the keys it cannot see get probability 0. `mask` is `causal_mask` of these
/// scores: the composed form adds it, the kernel applies the same rule by position.
pub fn causal_softmax(
    scores: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !kernels_apply(scores) {
        return causal_softmax_composed(scores, scale, mask);
    }
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
    })
}

/// `causal_softmax` from candle primitives.
pub fn causal_softmax_composed(
    scores: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> CResult<Tensor> {
    let scores = (scores * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    candle_nn::ops::softmax(&scores, D::Minus1)
}

/// Queries and keys of `(…, queries, keys)`, with `queries <= keys`.
fn queries_keys(l: &Layout) -> CResult<(usize, usize)> {
    match l.dims() {
        [.., q, k] if q <= k && *q > 0 => Ok((*q, *k)),
        _ => bail!("causal softmax needs (…, queries, keys) scores with queries <= keys"),
    }
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "medphi-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let (q, k) = queries_keys(l)?;
        let out = map_rows(x.len(), k, |r, y| {
            let seen = r % q + 1 + k - q;
            y[..seen].copy_from_slice(&x[r * k..r * k + seen]);
            softmax_in_place(&mut y[..seen], self.scale);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// `scale · y ⊙ (grad − Σ grad·y)` per row, from the softmax output `y`.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "medphi-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (y, g) = (data(sy, ly)?, data(sg, lg)?);
        let k = last_dim(ly)?;
        if y.len() != g.len() {
            bail!("softmax gradient has the wrong shape");
        }
        let out = map_rows(y.len(), k, |r, d| {
            let (y, g) = (&y[r * k..(r + 1) * k], &g[r * k..(r + 1) * k]);
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                *d = self.scale * y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), ly.shape().clone()))
    }
}

// ---------------------------------------------------------------- attention

/// Causal self-attention of `(batch, seq, heads·head_dim)` queries, keys and values from
/// position 0, with NeoX rotary on the first `2·half` features of each head's queries and
/// keys: `softmax(scale · q·kᵀ)·v`, back in `(batch, seq, heads·head_dim)`. One graph node
/// for what composed is some thirty (head split, rotary, contiguous copies, the products,
/// the softmax, the merge), each of which candle's backward pass gives an allocated, zeroed
/// and added gradient. Each (sequence, head) is one task; forward keeps the probabilities
/// for backward, as the composed form did.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    rotary: (&Tensor, &Tensor),
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (cos, sin) = rotary;
    let op = Attention {
        heads,
        half: cos.dim(D::Minus1)?,
        scale: scale as f32,
        cos: cos.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        sin: sin.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        saved: Mutex::new(Vec::new()),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// `attention` from candle primitives (what the model composes on other devices).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    rotary: (&Tensor, &Tensor),
    scale: f64,
) -> CResult<Tensor> {
    let (b, t, channels) = q.dims3()?;
    let dim = channels / heads;
    let (cos, sin) = rotary;
    let turned = 2 * cos.dim(D::Minus1)?;
    let split = |x: &Tensor| x.reshape((b, t, heads, dim))?.transpose(1, 2);
    let rotate = |x: &Tensor| -> CResult<Tensor> {
        let front = x.narrow(D::Minus1, 0, turned)?.contiguous()?;
        let front = candle_nn::rotary_emb::rope_slow(&front, cos, sin)?;
        let rest = x.narrow(D::Minus1, turned, dim - turned)?;
        Tensor::cat(&[&front, &rest], D::Minus1)
    };
    let (qh, kh) = (rotate(&split(q)?)?, rotate(&split(k)?)?);
    let scores = qh.contiguous()?.matmul(&kh.contiguous()?.t()?)?;
    let mask = causal_mask(t, 0, q.dtype(), q.device())?;
    causal_softmax_composed(&scores, scale, mask.as_ref())?
        .matmul(&split(v)?.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, t, channels))
}

struct Attention {
    heads: usize,
    /// Rotary pairs per head: feature `i < half` turns with feature `i + half`.
    half: usize,
    scale: f32,
    /// `(seq, half)` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Each (sequence, head)'s probabilities from forward, for backward (which recomputes
    /// them if they are not here).
    saved: Mutex<Vec<Vec<f32>>>,
}

/// One (sequence, head)'s rows: `seq × head_dim`, gathered from `(batch, seq, channels)`.
struct Head {
    seq: usize,
    dim: usize,
    channels: usize,
    /// Offset of the head's first feature in the first row.
    start: usize,
}

impl Head {
    fn gather(&self, x: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.seq * self.dim);
        for t in 0..self.seq {
            let at = self.start + t * self.channels;
            out.extend_from_slice(&x[at..at + self.dim]);
        }
        out
    }

    /// Writes `rows` back into the head's place.
    fn scatter(&self, rows: &[f32], out: Disjoint) {
        for (t, row) in rows.chunks(self.dim).enumerate() {
            let at = self.start + t * self.channels;
            // SAFETY: each (sequence, head) owns its rows' head_dim features of the output.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.at(at), self.dim) };
        }
    }
}

impl Attention {
    fn shape(&self, l: &Layout) -> CResult<(usize, usize, usize, usize)> {
        let &[batch, seq, channels] = l.dims() else {
            bail!(
                "attention needs (batch, seq, channels) inputs, got {:?}",
                l.dims()
            )
        };
        let dim = channels / self.heads.max(1);
        if dim * self.heads != channels
            || 2 * self.half > dim
            || self.cos.len() != seq * self.half
            || self.sin.len() != seq * self.half
        {
            bail!(
                "attention: {channels} channels, {} heads, rotary tables for another shape",
                self.heads
            )
        }
        Ok((batch, seq, channels, dim))
    }

    /// Rotates each row's first `2·half` features by its position's angles; `back` turns them
    /// the other way (the transpose, which carries gradients back through the rotation).
    fn rotate(&self, rows: &mut [f32], dim: usize, back: bool) {
        let h = self.half;
        for (t, row) in rows.chunks_mut(dim).enumerate() {
            let (cos, sin) = (&self.cos[t * h..(t + 1) * h], &self.sin[t * h..(t + 1) * h]);
            for i in 0..h {
                let (a, b) = (row[i], row[i + h]);
                let s = if back { -sin[i] } else { sin[i] };
                row[i] = a * cos[i] - b * s;
                row[i + h] = b * cos[i] + a * s;
            }
        }
    }

    /// A head's rows of `x`, rotated.
    fn rotated(&self, head: &Head, x: &[f32]) -> Vec<f32> {
        let mut rows = head.gather(x);
        self.rotate(&mut rows, head.dim, false);
        rows
    }

    /// A head's probabilities `seq × seq` from its rotated queries and keys.
    fn probabilities(&self, head: &Head, qr: &[f32], kr: &[f32]) -> CResult<Vec<f32>> {
        let (seq, dim) = (head.seq, head.dim);
        let mut p = vec![0f32; seq * seq];
        let (q, kt) = (Operand::rows(qr, seq, dim), Operand::rows(kr, seq, dim).t());
        causal_product(&mut p, q, kt, Causal::Columns)?;
        for (i, row) in p.chunks_mut(seq).enumerate() {
            softmax_in_place(&mut row[..=i], self.scale);
            row[i + 1..].fill(0.0);
        }
        Ok(p)
    }

    /// Puts `with` where forward keeps its probabilities for backward, and returns what was there.
    fn swap_saved(&self, with: Vec<Vec<f32>>) -> CResult<Vec<Vec<f32>>> {
        match self.saved.lock() {
            Ok(mut saved) => Ok(std::mem::replace(&mut *saved, with)),
            Err(_) => bail!("attention: a thread failed while holding the saved probabilities"),
        }
    }
}

/// Output rows per product in `causal_product`: a query block's keys end where it does.
const CAUSAL_BLOCK: usize = 64;

/// Which part of a causal product is computed, per block `r` of output rows (a sequence's
/// positions). Query `i` sees keys `..=i`, so about half of each full product is zeros or
/// masked; skipping them by blocks saves 3/8 of attention's products at 256 tokens.
#[derive(Clone, Copy)]
enum Causal {
    /// Scores (`q·kᵀ`, `do·vᵀ`): the columns `..r.end` (later keys are masked).
    Columns,
    /// By a lower-triangular left operand (`p·v`, `ds·k`): the inner positions `..r.end`.
    Lower,
    /// By an upper-triangular left operand (`pᵀ·do`, `dsᵀ·q`): the inner positions `r.start..`.
    Upper,
}

/// `dst = a · b` (`dst` row-major, zeroed) where only `part` of it can be non-zero.
fn causal_product(dst: &mut [f32], a: Operand, b: Operand, part: Causal) -> CResult<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if dst.len() != m * n {
        bail!("attention: {m}×{n} product into {} values", dst.len())
    }
    for start in (0..m).step_by(CAUSAL_BLOCK) {
        let r = start..(start + CAUSAL_BLOCK).min(m);
        let (inner, cols) = match part {
            Causal::Columns => (0..k, 0..r.end.min(n)),
            Causal::Lower => (0..r.end.min(k), 0..n),
            Causal::Upper => (r.start.min(k)..k, 0..n),
        };
        let rows = a.block(r.clone(), inner.clone());
        product(
            &mut dst[r.start * n..],
            n,
            false,
            rows,
            b.block(inner, cols),
        )?;
    }
    Ok(())
}

/// The (sequence, head) tasks of a `(batch, seq, channels)` input.
fn heads_of(batch: usize, heads: usize, seq: usize, channels: usize, dim: usize) -> Vec<Head> {
    (0..batch * heads)
        .map(|i| Head {
            seq,
            dim,
            channels,
            start: (i / heads) * seq * channels + (i % heads) * dim,
        })
        .collect()
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "medphi-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (batch, seq, channels, dim) = self.shape(lq)?;
        if lk.dims() != lq.dims() || lv.dims() != lq.dims() {
            bail!("attention: queries, keys and values differ in shape")
        }
        let (q, k, v) = (data(sq, lq)?, data(sk, lk)?, data(sv, lv)?);
        let mut out = vec![0f32; q.len()];
        let at = Disjoint::new(&mut out);
        let probabilities = heads_of(batch, self.heads, seq, channels, dim)
            .par_iter()
            .map(|head| -> CResult<Vec<f32>> {
                let p = self.probabilities(head, &self.rotated(head, q), &self.rotated(head, k))?;
                let mut o = vec![0f32; seq * dim];
                let (pm, vm) = (Operand::rows(&p, seq, seq), head.gather(v));
                causal_product(&mut o, pm, Operand::rows(&vm, seq, dim), Causal::Lower)?;
                head.scatter(&o, at);
                Ok(p)
            })
            .collect::<CResult<Vec<_>>>()?;
        self.swap_saved(probabilities)?;
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, seq, channels) = q.dims3()?;
        let dim = channels / self.heads.max(1);
        let flat = |t: &Tensor| -> CResult<Vec<f32>> { t.flatten_all()?.to_vec1() };
        let (qv, kv, vv, g) = (flat(q)?, flat(k)?, flat(v)?, flat(grad)?);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; qv.len()],
            vec![0f32; qv.len()],
            vec![0f32; qv.len()],
        );
        let (at_q, at_k, at_v) = (
            Disjoint::new(&mut dq),
            Disjoint::new(&mut dk),
            Disjoint::new(&mut dv),
        );
        let saved = self.swap_saved(Vec::new())?;
        heads_of(batch, self.heads, seq, channels, dim)
            .par_iter()
            .enumerate()
            .try_for_each(|(i, head)| -> CResult<()> {
                let (qr, kr, vh) = (
                    self.rotated(head, &qv),
                    self.rotated(head, &kv),
                    head.gather(&vv),
                );
                let recomputed;
                let p = match saved.get(i) {
                    Some(p) => p,
                    None => {
                        recomputed = self.probabilities(head, &qr, &kr)?;
                        &recomputed
                    }
                };
                let go = head.gather(&g);
                let (pm, gm) = (Operand::rows(p, seq, seq), Operand::rows(&go, seq, dim));
                // dv = pᵀ·do; dp = do·vᵀ; ds = scale · p ⊙ (dp − Σ dp⊙p per row).
                let mut d_v = vec![0f32; seq * dim];
                causal_product(&mut d_v, pm.t(), gm, Causal::Upper)?;
                let mut ds = vec![0f32; seq * seq];
                let vt = Operand::rows(&vh, seq, dim).t();
                causal_product(&mut ds, gm, vt, Causal::Columns)?;
                for (d, p) in ds.chunks_mut(seq).zip(p.chunks(seq)) {
                    let dot: f32 = d.iter().zip(p).map(|(d, p)| d * p).sum();
                    d.iter_mut()
                        .zip(p)
                        .for_each(|(d, &p)| *d = self.scale * p * (*d - dot));
                }
                // dq = ds·k, dk = dsᵀ·q (rotated), then turned back through the rotation.
                let dsm = Operand::rows(&ds, seq, seq);
                let (mut d_q, mut d_k) = (vec![0f32; seq * dim], vec![0f32; seq * dim]);
                causal_product(&mut d_q, dsm, Operand::rows(&kr, seq, dim), Causal::Lower)?;
                causal_product(
                    &mut d_k,
                    dsm.t(),
                    Operand::rows(&qr, seq, dim),
                    Causal::Upper,
                )?;
                self.rotate(&mut d_q, dim, true);
                self.rotate(&mut d_k, dim, true);
                head.scatter(&d_q, at_q);
                head.scatter(&d_k, at_k);
                head.scatter(&d_v, at_v);
                Ok(())
            })?;
        let back = |d: Vec<f32>| Tensor::from_vec(d, q.shape(), q.device());
        Ok((Some(back(dq)?), Some(back(dk)?), Some(back(dv)?)))
    }
}

// ---------------------------------------------------------------- target log-probability

/// `log softmax(logits)[target]` for each row: `(…, vocab)` f32 logits and `(…)` u32
/// targets give `(…)` log-probabilities.
pub fn target_logp(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if !kernels_apply(logits) {
        return target_logp_composed(logits, targets);
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TargetLogp)
}

/// `target_logp` from candle primitives.
pub fn target_logp_composed(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, rows: usize, vocab: usize) -> CResult<&'a [u32]> {
    let t = match l.contiguous_offsets() {
        Some((a, b)) => &s.as_slice::<u32>()?[a..b],
        None => bail!("targets are not contiguous"),
    };
    if t.len() != rows {
        bail!("{} targets for {rows} rows of logits", t.len());
    }
    if let Some(bad) = t.iter().find(|&&t| t as usize >= vocab) {
        bail!("target {bad} is outside the vocabulary (size {vocab})");
    }
    Ok(t)
}

/// Max and log Σ exp(row − max).
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    // The exponentials a block at a time, so that they vectorize apart from the ordered sum.
    let mut block = [0f32; 64];
    let mut sum = 0f32;
    for part in row.chunks(block.len()) {
        let e = &mut block[..part.len()];
        e.iter_mut().zip(part).for_each(|(e, v)| *e = exp(v - max));
        sum += e.iter().sum::<f32>();
    }
    (max, sum.ln())
}

struct TargetLogp;

impl CustomOp2 for TargetLogp {
    fn name(&self) -> &'static str {
        "medphi-target-logp"
    }

    fn cpu_fwd(
        &self,
        sl: &CpuStorage,
        ll: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = data(sl, ll)?;
        let v = last_dim(ll)?;
        let rows = x.len() / v;
        let t = targets_of(st, lt, rows, v)?;
        let mut out = vec![0f32; rows];
        out.par_iter_mut().enumerate().for_each(|(r, o)| {
            let row = &x[r * v..(r + 1) * v];
            let (max, lse) = log_sum_exp(row);
            *o = row[t[r] as usize] - max - lse;
        });
        Ok((CpuStorage::F32(out), lt.shape().clone()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let d = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &TargetLogpGrad)?;
        Ok((Some(d), None))
    }
}

/// `grad · (onehot(target) − softmax(row))` per row; rows with zero gradient (masked
/// targets: prompts and padding) are skipped.
struct TargetLogpGrad;

impl CustomOp3 for TargetLogpGrad {
    fn name(&self) -> &'static str {
        "medphi-target-logp-grad"
    }

    fn cpu_fwd(
        &self,
        sl: &CpuStorage,
        ll: &Layout,
        st: &CpuStorage,
        lt: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = data(sl, ll)?;
        let v = last_dim(ll)?;
        let rows = x.len() / v;
        let t = targets_of(st, lt, rows, v)?;
        let g = data(sg, lg)?;
        if g.len() != rows {
            bail!("target log-probability gradient has the wrong shape");
        }
        let out = map_rows(x.len(), v, |r, d| {
            if g[r] == 0.0 {
                return;
            }
            let row = &x[r * v..(r + 1) * v];
            let (max, lse) = log_sum_exp(row);
            for (d, &l) in d.iter_mut().zip(row) {
                *d = -g[r] * exp(l - max - lse);
            }
            d[t[r] as usize] += g[r];
        });
        Ok((CpuStorage::F32(out), ll.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        assert!(worst < tol, "largest relative difference {worst}");
    }

    fn random(shape: &[usize], scale: f64) -> Var {
        Var::from_tensor(&(Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap())
            .unwrap()
    }

    /// Forward values and input gradients of the kernel and the composed form agree, for a
    /// random weighting of the outputs (so every output's gradient matters).
    fn same_as_composed(
        inputs: &[&Var],
        fused: impl Fn() -> CResult<Tensor>,
        composed: impl Fn() -> CResult<Tensor>,
    ) {
        let (f, c) = (fused().unwrap(), composed().unwrap());
        close(&f, &c, 1e-5);
        let weights = Tensor::randn(0f32, 1.0, f.shape(), &Device::Cpu).unwrap();
        let gf = (f * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (c * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in inputs {
            close(gf.get(v).unwrap(), gc.get(v).unwrap(), 1e-4);
        }
    }

    #[test]
    fn layer_norm_matches_composed() {
        let (x, w, b) = (
            random(&[3, 5, 64], 3.0),
            random(&[64], 1.0),
            random(&[64], 1.0),
        );
        same_as_composed(
            &[&x, &w, &b],
            || layer_norm(&x, &w, &b, 1e-5),
            || layer_norm_composed(&x, &w, &b, 1e-5),
        );
    }

    #[test]
    fn linear_matches_matmul_and_bias() {
        let (x, w, b) = (
            random(&[3, 70, 40], 1.0),
            random(&[24, 40], 1.0),
            random(&[24], 1.0),
        );
        assert!(linear_applies(&x, &w));
        same_as_composed(
            &[&x, &w, &b],
            || linear(&x, &w, &b),
            || x.broadcast_matmul(&w.t()?)?.broadcast_add(&b),
        );
    }

    #[test]
    fn attention_matches_composed() {
        // Sequences of one block and of three (the last shorter); Phi-2's head shape (80
        // features, the first 32 turned).
        attention_case(7, 8, 2);
        attention_case(2 * CAUSAL_BLOCK + 9, 8, 2);
        attention_case(CAUSAL_BLOCK + 6, 80, 16);
    }

    fn attention_case(t: usize, dim: usize, half: usize) {
        let (b, heads) = (2, 3);
        let (q, k, v) = (
            random(&[b, t, heads * dim], 1.0),
            random(&[b, t, heads * dim], 1.0),
            random(&[b, t, heads * dim], 1.0),
        );
        let angles = Tensor::randn(0f32, 1.0, (t, half), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let scale = 1.0 / (dim as f64).sqrt();
        let composed = || attention_composed(&q, &k, &v, heads, (&cos, &sin), scale);
        same_as_composed(
            &[&q, &k, &v],
            || attention(&q, &k, &v, heads, (&cos, &sin), scale),
            composed,
        );
        // A second backward finds the kept probabilities taken and recomputes them.
        let out = attention(&q, &k, &v, heads, (&cos, &sin), scale).unwrap();
        let weights = Tensor::randn(0f32, 1.0, out.shape(), &Device::Cpu).unwrap();
        let loss = (out * weights).unwrap().sum_all().unwrap();
        let (first, second) = (loss.backward().unwrap(), loss.backward().unwrap());
        for x in [&q, &k, &v] {
            close(first.get(x).unwrap(), second.get(x).unwrap(), 1e-6);
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        assert!(worst < 4.0 * f32::EPSILON, "largest relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1e4) < 1e-37 && exp(-1e4) >= 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn add_bias_matches_broadcast_add() {
        let (x, b) = (random(&[3, 70, 40], 1.0), random(&[40], 1.0));
        same_as_composed(&[&x, &b], || add_bias(&x, &b), || x.broadcast_add(&b));
    }

    #[test]
    fn gelu_matches_candle() {
        let x = random(&[7, 1000], 3.0);
        same_as_composed(&[&x], || gelu_tanh(&x), || x.gelu());
    }

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        // Square (training) and with earlier keys (queries are the sequence's last ones).
        for (q, k) in [(9, 9), (4, 11), (1, 6)] {
            let s = random(&[2, 3, q, k], 4.0);
            let mask = causal_mask(q, k - q, DType::F32, &Device::Cpu).unwrap();
            same_as_composed(
                &[&s],
                || causal_softmax(&s, 0.25, mask.as_ref()),
                || causal_softmax_composed(&s, 0.25, mask.as_ref()),
            );
        }
    }

    #[test]
    fn target_logp_matches_log_softmax() {
        let l = random(&[2, 6, 50], 5.0);
        let t = Tensor::new(
            &[[1u32, 0, 49, 7, 7, 3], [2, 2, 10, 48, 0, 1]],
            &Device::Cpu,
        )
        .unwrap();
        same_as_composed(
            &[&l],
            || target_logp(&l, &t),
            || target_logp_composed(&l, &t),
        );
    }

    #[test]
    fn bad_targets_are_an_error() {
        let l = random(&[2, 5], 1.0);
        let t = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
        let err = target_logp(&l, &t).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
    }
}
