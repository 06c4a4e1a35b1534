//! wasm32: the training path's f32 matrix products on rayon's pool. candle's CPU matmul asks
//! the operating system how many cores there are, which a browser does not answer, so in the
//! page every product of a training step ran on one thread: one and two threads trained at
//! the same speed (906 and 898 tokens/s). This is the same `gemm` call with rayon's thread
//! count, forward and backward, so the threaded build's Web Workers share the work; in the
//! single-threaded build rayon has one thread and it runs as before.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;

/// `a · b` for 2-D f32 tensors of any strides (transposed views included, nothing copied).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.apply_op2(b, PoolMatmul)?)
}

struct PoolMatmul;

impl CustomOp2 for PoolMatmul {
    fn name(&self) -> &'static str {
        "pool-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            bail!("pool-matmul: f32 operands only")
        };
        let (&[m, k], &[k2, n]) = (l1.dims(), l2.dims()) else {
            bail!(
                "pool-matmul: 2-D operands only, got {:?} and {:?}",
                l1.dims(),
                l2.dims()
            )
        };
        if k != k2 {
            bail!("pool-matmul: {m}×{k} times {k2}×{n}")
        }
        let (a, b) = (&a[l1.start_offset()..], &b[l2.start_offset()..]);
        // The last element each operand's strides reach must lie in its storage.
        let reach = |l: &Layout, rows: usize, cols: usize| {
            (rows.max(1) - 1) * l.stride()[0] + (cols.max(1) - 1) * l.stride()[1]
        };
        if (m * k > 0 && reach(l1, m, k) >= a.len()) || (k * n > 0 && reach(l2, k, n) >= b.len()) {
            bail!("pool-matmul: an operand's layout runs past its storage")
        }
        let mut dst = vec![0f32; m * n];
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let stride = |l: &Layout, i: usize| l.stride()[i] as isize;
        // SAFETY: dst holds m×n values written at (i, j) → i·n + j; every (i, p) of a and
        // (p, j) of b lies within its slice (checked above); gemm reads dst not at all
        // (read_dst false).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                stride(l1, 1),
                stride(l1, 0),
                b.as_ptr(),
                stride(l2, 1),
                stride(l2, 0),
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let da = grad.apply_op2(&b.t()?, PoolMatmul)?;
        let db = a.t()?.apply_op2(grad, PoolMatmul)?;
        Ok((Some(da), Some(db)))
    }
}
