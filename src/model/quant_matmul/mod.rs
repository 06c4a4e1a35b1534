//! Quantized weight matrices multiplied by our own kernels, where candle's cost memory or
//! threads.
//!
//! - Natively (`matrix`): the file's blocks used where they lie, q8_0, q4_0, q4_K and q6_K
//!   (`blocks`: their layout, which the browser's kernels read too). candle holds a copy of
//!   every quantized matrix (on VNNI and ARM CPUs a repacked one beside the original), and
//!   its q4_0 kernels ran at half llama.cpp's decode on x86; ours use the mapped file's
//!   blocks, by `x86` (AVX-512 VNNI or AVX2) or `neon` (aarch64 with the dot product
//!   instructions).
//! - `simd128` (the same four formats on wasm32): candle's kernels run on one thread in the
//!   browser; ours split the rows across rayon's pool, which the threaded build runs on Web
//!   Workers.
//!
//! All quantize each activation row once to q8_0 blocks, as llama.cpp does for its 32-value
//! formats, and give the same products (up to the order of f32 sums) as candle's `QMatMul`
//! on the same blocks dequantized. Elsewhere candle's kernels serve.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};
#[cfg(native_kernels)]
use crate::model::stored::StoredBytes;

#[cfg(target_arch = "aarch64")]
use neon as arch;
#[cfg(target_arch = "x86_64")]
use x86 as arch;

mod blocks;
#[cfg(native_kernels)]
mod matrix;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "wasm32")]
mod simd128;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(native_kernels)]
pub use arch::Kernel;
#[cfg(native_kernels)]
pub use matrix::{Q4KMatrix, Q4Matrix, Q6KMatrix, Q8Matrix};
#[cfg(target_arch = "wasm32")]
pub use simd128::{Q4KMatrix, Q4Matrix, Q6KMatrix, Q8Matrix};

/// Values per q8_0 and q4_0 block (and per block of a k-quant's super-block).
const BLOCK: usize = 32;

/// A matrix our kernels multiply, in the block format it is stored in.
pub enum QuantMatrix {
    Q8(Q8Matrix),
    Q4(Q4Matrix),
    Q4K(Q4KMatrix),
    Q6K(Q6KMatrix),
}

/// `$body` with `$m` bound to the matrix, whatever its format.
macro_rules! each_format {
    ($matrix:expr, $m:ident => $body:expr) => {
        match $matrix {
            QuantMatrix::Q8($m) => $body,
            QuantMatrix::Q4($m) => $body,
            QuantMatrix::Q4K($m) => $body,
            QuantMatrix::Q6K($m) => $body,
        }
    };
}

impl QuantMatrix {
    /// Whether our kernels multiply matrices stored as `dtype` on this CPU.
    pub fn serves(dtype: GgmlDType) -> bool {
        let format = match dtype {
            GgmlDType::Q8_0 | GgmlDType::Q4_0 => true,
            // In the browser on one thread (a page without cross-origin isolation) candle's
            // k-quant kernels are faster than ours (407M Q4_K_M: decode 13.7-14.1 tok/s
            // against 10.6-11.0), which win from two threads on (26-27 against 13-15).
            GgmlDType::Q4K | GgmlDType::Q6K => {
                cfg!(native_kernels) || rayon::current_num_threads() > 1
            }
            _ => false,
        };
        format && Q8Matrix::runs_here()
    }

    /// `rows × cols` values stored as GGUF blocks of `dtype`, copied once (natively, as
    /// they lie; in the browser, into tiles); `None` where our kernels do not serve them
    /// (candle's do).
    pub fn for_this_cpu(
        dtype: GgmlDType,
        blocks: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        #[cfg(native_kernels)]
        return Self::in_place(dtype, StoredBytes::owned(blocks.to_vec()), rows, cols);
        #[cfg(target_arch = "wasm32")]
        return Ok(match dtype {
            GgmlDType::Q8_0 => Q8Matrix::for_this_cpu(blocks, rows, cols)?.map(Self::Q8),
            GgmlDType::Q4_0 => Q4Matrix::for_this_cpu(blocks, rows, cols)?.map(Self::Q4),
            GgmlDType::Q4K => Q4KMatrix::for_this_cpu(blocks, rows, cols)?.map(Self::Q4K),
            GgmlDType::Q6K => Q6KMatrix::for_this_cpu(blocks, rows, cols)?.map(Self::Q6K),
            _ => None,
        });
    }

    /// The blocks used where they lie, never copied, by the CPU's best kernel; `None` where
    /// our kernels do not serve them.
    #[cfg(native_kernels)]
    pub fn in_place(
        dtype: GgmlDType,
        blocks: StoredBytes,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        match Kernel::best_here() {
            Some(kernel) => Self::by(kernel, dtype, blocks, rows, cols),
            None => Ok(None),
        }
    }

    /// The blocks copied once, multiplied by `kernel` (an error where the CPU lacks its
    /// instructions); `None` where our kernels do not serve `dtype`.
    #[cfg(native_kernels)]
    pub fn copied(
        kernel: Kernel,
        dtype: GgmlDType,
        blocks: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        let blocks = StoredBytes::owned(blocks.to_vec());
        Self::by(kernel, dtype, blocks, rows, cols)
    }

    #[cfg(native_kernels)]
    fn by(
        kernel: Kernel,
        dtype: GgmlDType,
        blocks: StoredBytes,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        Ok(Some(match dtype {
            GgmlDType::Q8_0 => Self::Q8(Q8Matrix::new(blocks, rows, cols, kernel)?),
            GgmlDType::Q4_0 => Self::Q4(Q4Matrix::new(blocks, rows, cols, kernel)?),
            GgmlDType::Q4K => Self::Q4K(Q4KMatrix::new(blocks, rows, cols, kernel)?),
            GgmlDType::Q6K => Self::Q6K(Q6KMatrix::new(blocks, rows, cols, kernel)?),
            _ => return Ok(None),
        }))
    }

    pub fn rows(&self) -> usize {
        each_format!(self, m => m.rows())
    }

    /// The block format its matrix is stored in.
    pub fn dtype(&self) -> GgmlDType {
        match self {
            Self::Q8(_) => GgmlDType::Q8_0,
            Self::Q4(_) => GgmlDType::Q4_0,
            Self::Q4K(_) => GgmlDType::Q4K,
            Self::Q6K(_) => GgmlDType::Q6K,
        }
    }

    /// Bytes held (and read by each product).
    pub fn bytes(&self) -> usize {
        each_format!(self, m => m.bytes())
    }

    /// `x · Wᵀ` for `x` holding whole rows of `cols` values: one row of `rows` values out
    /// per row in.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        each_format!(self, m => m.matmul(x))
    }
}

/// An error unless `blocks` holds exactly a `rows × cols` matrix stored in blocks of
/// `values` values, `block_bytes` bytes each.
fn check_blocks(
    blocks: &[u8],
    rows: usize,
    cols: usize,
    values: usize,
    block_bytes: usize,
) -> Result<()> {
    let expected = cols
        .is_multiple_of(values)
        .then(|| rows.checked_mul(cols / values)?.checked_mul(block_bytes))
        .flatten();
    if expected != Some(blocks.len()) {
        return Err(Error::input(format!(
            "{} bytes of quantized blocks are not a {rows}×{cols} matrix",
            blocks.len()
        )));
    }
    Ok(())
}

/// One block of activations quantized as llama.cpp's `quantize_row_q8_0` does: the scale is
/// the block's largest magnitude over 127, rounded to f16 as it would be stored. (On x86-64
/// a vector form serves, and this is its reference; elsewhere this serves.)
#[cfg(any(target_arch = "wasm32", target_arch = "aarch64", test))]
fn quantize_block(block: &[f32]) -> (f32, [i8; BLOCK]) {
    use half::f16;
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut quants = [0i8; BLOCK];
    for (q, v) in quants.iter_mut().zip(block) {
        *q = (v * inverse).round() as i8;
    }
    (f16::from_f32(d).to_f32(), quants)
}

#[cfg(all(test, native_kernels))]
mod tests {
    use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
    use candle_core::Device;
    use half::f16;

    use super::arch::Format;
    use super::blocks::{Q4K, Q4_0, Q6K, Q8_0};
    use super::matrix::Matrix;
    use super::*;
    use crate::model::stored::StoredBytes;

    /// Where a stored block's f16 words lie: its scale, a q4_K super-block's `d` and `dmin`,
    /// a q6_K super-block's `d` (after its quants and scales).
    fn f16_words<F: Format>() -> &'static [usize] {
        match F::DTYPE {
            GgmlDType::Q4K => &[0, 2],
            GgmlDType::Q6K => &[208],
            _ => &[0],
        }
    }

    /// `rows × cols` of `F` blocks with varied scales (and mins) and every quant byte (q8_0's
    /// extremes -128 and 127, and every pair of nibbles) among them.
    fn blocks<F: Format>(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state >> 8
        };
        let mut out = Vec::new();
        for _ in 0..rows * cols / (BLOCK * F::BLOCKS) {
            let mut block: Vec<u8> = (0..F::BYTES).map(|_| (next() % 256) as u8).collect();
            for &at in f16_words::<F>() {
                let d = f16::from_f32((next() % 1000) as f32 / 50_000.0);
                block[at..at + 2].copy_from_slice(&d.to_le_bytes());
            }
            out.extend(block);
        }
        out
    }

    fn activations(len: usize) -> Vec<f32> {
        let scale = |i: usize| if i.is_multiple_of(97) { 40.0 } else { 1.0 };
        (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * scale(i))
            .collect()
    }

    /// The product of the weights as candle dequantizes the file's blocks (a reading of the
    /// format independent of ours) and the quantized activations, summed in f64.
    fn reference(dtype: GgmlDType, stored: &[u8], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
        // candle reads the blocks in place and wants them aligned.
        let mut aligned = vec![0u64; stored.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..stored.len()].copy_from_slice(stored);
        let bytes = &bytemuck::cast_slice::<u64, u8>(&aligned)[..stored.len()];
        let q = qtensor_from_ggml(dtype, bytes, vec![rows, cols], &Device::Cpu).unwrap();
        let w: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xq: Vec<(f32, [i8; BLOCK])> = x.chunks_exact(BLOCK).map(quantize_block).collect();
        let activation = |i: usize| {
            let (d, q) = &xq[i / BLOCK];
            *d as f64 * q[i % BLOCK] as f64
        };
        let m = x.len() / cols;
        let mut out = vec![0f32; m * rows];
        for j in 0..m {
            for r in 0..rows {
                out[j * rows + r] = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * activation(j * cols + c))
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// `m`'s product with `x` is the `reference` one on its blocks, `stored` (`cols` values
    /// a row), within f32 rounding.
    fn assert_matches_reference<F: Format>(
        m: &Matrix<F>,
        (stored, cols): (&[u8], usize),
        x: &[f32],
        what: &str,
    ) {
        let got = m.matmul(x).unwrap();
        let want = reference(F::DTYPE, stored, m.rows(), cols, x);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{what}: {g} vs {w}"
            );
        }
    }

    /// Rows that do not fill the last tile, 21 blocks a row (scales widened 8 at a time,
    /// and the rest) or three super-blocks, one to nine activation rows (the row kernels
    /// alone and four at a time, prefill's tiles of four rows and of one), against the plain
    /// product, in each format, by every kernel this CPU runs, from a copy and in place at an
    /// odd offset of a larger buffer (as in a mapped file).
    #[test]
    fn products_match_the_plain_product_by_every_kernel_here() {
        let kernels = Kernel::all_here();
        #[cfg(target_arch = "x86_64")]
        let any_here = is_x86_feature_detected!("avx2");
        #[cfg(target_arch = "aarch64")]
        let any_here = std::arch::is_aarch64_feature_detected!("dotprod");
        assert_eq!(kernels.is_empty(), !any_here);
        for &kernel in &kernels {
            products_match::<Q8_0>(kernel);
            products_match::<Q4_0>(kernel);
            products_match::<Q4K>(kernel);
            products_match::<Q6K>(kernel);
        }
    }

    fn products_match<F: Format>(kernel: Kernel) {
        let per_row = if F::BLOCKS == 1 { 21 } else { 3 * F::BLOCKS };
        let (rows, cols) = (37, per_row * BLOCK);
        let stored = blocks::<F>(rows, cols, 1);
        let mut file = vec![7u8; 13];
        file.extend(&stored);
        file.extend([9u8; 5]);
        let file = std::sync::Arc::new(file);
        let shared = StoredBytes::shared(file, 13..13 + stored.len()).unwrap();
        let in_place = Matrix::<F>::new(shared, rows, cols, kernel).unwrap();
        let owned = StoredBytes::owned(stored.clone());
        let copied = Matrix::<F>::new(owned, rows, cols, kernel).unwrap();
        for m in [&copied, &in_place] {
            for n in [1, 3, 4, 5, 9] {
                let x = activations(n * cols);
                let what = format!("{:?} by {kernel:?}, {n} rows", F::DTYPE);
                assert_matches_reference(m, (&stored, cols), &x, &what);
            }
        }
    }

    /// Blocks of one extreme byte against activations all at ±127, where the kernels' i16
    /// pair sums come nearest to overflowing: q8_0's -128 and 127 (the sign trick's 2·128·127;
    /// 127 would overflow offset to unsigned), the nibbles 15 and 0 of q4_0 and q4_K (their
    /// unsigned lines summed over a whole block; q4_K's scales and mins all 63 or all 0), and
    /// q6_K's 31 and -32 under scales of -128 (the pair sums times the scale in i32), for
    /// decode and prefill's tiles alike.
    #[test]
    fn extreme_blocks_do_not_overflow() {
        for &kernel in &Kernel::all_here() {
            extremes::<Q8_0>(kernel, 0x80);
            extremes::<Q8_0>(kernel, 0x7F);
            extremes::<Q4_0>(kernel, 0xFF);
            extremes::<Q4_0>(kernel, 0x00);
            extremes::<Q4K>(kernel, 0xFF);
            extremes::<Q4K>(kernel, 0x00);
            extremes::<Q6K>(kernel, 0xFF);
            extremes::<Q6K>(kernel, 0x00);
        }
    }

    fn extremes<F: Format>(kernel: Kernel, byte: u8) {
        let (rows, cols) = (16, 3 * BLOCK * F::BLOCKS);
        let mut block = vec![byte; F::BYTES];
        if F::PAIR_SCALES {
            block[192..208].fill(0x80);
        }
        for &at in f16_words::<F>() {
            block[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        }
        let stored = block.repeat(rows * cols / (BLOCK * F::BLOCKS));
        let m = Matrix::<F>::new(StoredBytes::owned(stored.clone()), rows, cols, kernel).unwrap();
        for sign in [1.0, -1.0] {
            for n in [1, 4] {
                let x = vec![sign; n * cols];
                let what = format!(
                    "{:?} of {byte:#x} by {kernel:?}, {n} rows of {sign}",
                    F::DTYPE
                );
                assert_matches_reference(&m, (&stored, cols), &x, &what);
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        // A kernel is refused where the CPU lacks its instructions.
        for kernel in Kernel::EVERY {
            let made =
                QuantMatrix::copied(kernel, GgmlDType::Q8_0, &blocks::<Q8_0>(1, 32, 2), 1, 32);
            assert_eq!(made.is_ok(), Kernel::all_here().contains(&kernel));
        }
        let Some(kernel) = Kernel::best_here() else {
            return;
        };
        let new = |bytes: &[u8], rows, cols| {
            let stored = StoredBytes::shared(std::sync::Arc::new(bytes.to_vec()), 0..bytes.len());
            Q8Matrix::new(stored.unwrap(), rows, cols, kernel)
        };
        assert!(new(&[0; 33], 1, 32).is_err());
        assert!(new(&[], 1, 31).is_err());
        assert!(new(&[], usize::MAX, 64).is_err());
        let m = new(&blocks::<Q8_0>(2, 64, 3), 2, 64).unwrap();
        assert!(m.matmul(&[0.0; 65]).is_err());
        // A q4_0 matrix's blocks are 18 bytes: q8_0's 34 are not a q4_0 matrix.
        let copied =
            |dtype, blocks: &[u8], cols| QuantMatrix::copied(kernel, dtype, blocks, 1, cols);
        assert!(copied(GgmlDType::Q4_0, &blocks::<Q8_0>(1, 32, 4), 32).is_err());
        assert!(copied(GgmlDType::Q4_0, &blocks::<Q4_0>(1, 32, 4), 32).is_ok());
        // q4_K's super-blocks hold 256 values: a row of 32, or 288, is not one.
        let super_block = blocks::<Q4K>(1, 256, 5);
        assert!(copied(GgmlDType::Q4K, &super_block, 256).is_ok());
        assert!(copied(GgmlDType::Q4K, &super_block[..144], 32).is_err());
        assert!(copied(GgmlDType::Q4K, &super_block, 288).is_err());
        // Formats ours do not serve are left to candle's kernels.
        assert!(copied(GgmlDType::Q5K, &[0; 176], 256).unwrap().is_none());
    }
}
