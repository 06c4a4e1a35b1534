//! A quantized matrix as the native kernels see it, whatever their instruction set: the
//! file's blocks where they lie, each product's activation rows quantized once to q8_0
//! blocks (as llama.cpp does for the 32-value formats), and the product split in units of
//! `TILE` weight rows across the threads the CPU kernels share.
//!
//! Each instruction set's module (`arch`: `x86`, `neon`) gives the `Format` its kernels read
//! blocks by, and the `Kernel`s they run: which the CPU has (`all_here`), what a product
//! asks of the activations' quantization (`lane_offsets`, `quantize`), and how a unit of
//! work is multiplied (`multiply`).

use std::marker::PhantomData;
use std::ops::Range;

use super::arch::{quantize, Format, Kernel};
use super::blocks::{row_bytes, Layout, Q4K, Q4_0, Q6K, Q8_0};
use super::{check_blocks, BLOCK};
use crate::error::{Error, Result};
use crate::model::disjoint::{rows_of, Disjoint};
use crate::model::stored::StoredBytes;

/// Weight rows per unit of work (and per VNNI tile: one 512-bit register of i32 lanes).
pub(super) const TILE: usize = 16;

impl Kernel {
    /// The fastest kernel this CPU runs; `None` where it runs none (candle's serve).
    pub fn best_here() -> Option<Self> {
        Self::all_here().first().copied()
    }

    /// Every kernel this CPU runs, fastest first (what tests and benchmarks compare).
    pub fn all_here() -> Vec<Self> {
        Self::EVERY.into_iter().filter(|k| k.runs_here()).collect()
    }
}

/// A `rows × cols` matrix of `F` blocks as GGUF stores them: row after row.
pub struct Matrix<F> {
    rows: usize,
    cols: usize,
    blocks: StoredBytes,
    kernel: Kernel,
    format: PhantomData<fn() -> F>,
}

pub type Q8Matrix = Matrix<Q8_0>;
pub type Q4Matrix = Matrix<Q4_0>;
pub type Q4KMatrix = Matrix<Q4K>;
pub type Q6KMatrix = Matrix<Q6K>;

impl<F: Format> Matrix<F> {
    pub(super) fn new(
        blocks: StoredBytes,
        rows: usize,
        cols: usize,
        kernel: Kernel,
    ) -> Result<Self> {
        if !kernel.runs_here() {
            return Err(Error::input(format!(
                "this CPU lacks the instructions of the {kernel:?} {:?} kernel",
                F::DTYPE
            )));
        }
        check_blocks(blocks.as_slice(), rows, cols, F::BLOCKS * BLOCK, F::BYTES)?;
        Ok(Self {
            rows,
            cols,
            blocks,
            kernel,
            format: PhantomData,
        })
    }

    /// Whether this CPU runs any of our kernels.
    pub fn runs_here() -> bool {
        Kernel::best_here().is_some()
    }

    /// Bytes held (and read by each product).
    pub fn bytes(&self) -> usize {
        self.blocks.len()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · Wᵀ` for `x` holding whole rows of `cols` values: one row of `rows` values out
    /// per row in.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        let m = rows_of(x, self.cols, "a quantized matrix")?;
        if m == 0 {
            return Ok(Vec::new());
        }
        let activations = Q8Rows::new(x, self.cols, self.kernel.lane_offsets::<F>());
        let mut out = vec![0f32; m * self.rows];
        let product = Product {
            stored: self.blocks.as_slice(),
            rows: self.rows,
            blocks_per_row: self.cols / BLOCK,
            row_bytes: row_bytes::<F>(self.cols / BLOCK),
            activation_rows: m,
            activations: &activations,
            out: Disjoint::new(&mut out),
        };
        // Each unit writes only its own rows' outputs, and `out` outlives the call.
        self.kernel
            .multiply::<F>(&product, self.rows.div_ceil(TILE));
        Ok(out)
    }
}

/// One product as each of its units sees it; its sizes known once, by `matmul`.
pub(super) struct Product<'a> {
    stored: &'a [u8],
    rows: usize,
    pub(super) blocks_per_row: usize,
    /// Bytes per stored weight row.
    pub(super) row_bytes: usize,
    pub(super) activation_rows: usize,
    activations: &'a Q8Rows,
    out: Disjoint,
}

impl Product<'_> {
    /// Unit `t`'s weight rows.
    pub(super) fn unit_rows(&self, t: usize) -> Range<usize> {
        t * TILE..(t * TILE + TILE).min(self.rows)
    }

    /// Weight rows `rows`, as stored.
    pub(super) fn weights(&self, rows: Range<usize>) -> &[u8] {
        &self.stored[rows.start * self.row_bytes..rows.end * self.row_bytes]
    }

    /// Activation row `j`.
    pub(super) fn x_row(&self, j: usize) -> XRow<'_> {
        let (per_row, x) = (self.blocks_per_row, self.activations);
        XRow {
            scales: &x.scales[j * per_row..(j + 1) * per_row],
            sums: &x.sums[j * per_row..(j + 1) * per_row],
            lane_offsets: x
                .lane_offsets
                .get(j * per_row * 8..(j + 1) * per_row * 8)
                .unwrap_or_default(),
            quants: &x.quants[j * per_row * BLOCK..(j + 1) * per_row * BLOCK],
        }
    }

    /// Weight rows `rows` against every activation row, four activation rows at a time while
    /// four are left (`four`: they share each weight load), then one at a time (`one`); each
    /// gives `W` outputs per activation row, of which the first `rows.len()` are written.
    ///
    /// # Safety
    /// As `write`'s, for `rows`.
    #[inline(always)]
    pub(super) unsafe fn in_fours<const W: usize>(
        &self,
        rows: Range<usize>,
        four: impl Fn(&[XRow; 4]) -> [[f32; W]; 4],
        one: impl Fn(&[XRow; 1]) -> [[f32; W]; 1],
    ) {
        let (m, lanes) = (self.activation_rows, rows.len());
        let mut j = 0;
        while m - j >= 4 {
            let xs = [0, 1, 2, 3].map(|n| self.x_row(j + n));
            for (n, values) in four(&xs).iter().enumerate() {
                self.write(j + n, rows.start, &values[..lanes]);
            }
            j += 4;
        }
        for j in j..m {
            self.write(j, rows.start, &one(&[self.x_row(j)])[0][..lanes]);
        }
    }

    /// Writes `values` as outputs `r..` of activation row `j`.
    ///
    /// # Safety
    /// Weight rows `r..r + values.len()` must belong to the calling unit (no other thread
    /// writes those outputs), and lie inside the matrix.
    pub(super) unsafe fn write(&self, j: usize, r: usize, values: &[f32]) {
        debug_assert!(r + values.len() <= self.rows && j < self.activation_rows);
        let at = self.out.at(j * self.rows + r);
        std::ptr::copy_nonoverlapping(values.as_ptr(), at, values.len());
    }
}

/// Activation rows quantized to q8_0 blocks, with each block's `Σq`: the weights' offsets
/// and mins add it (times themselves) to the block's products.
pub(super) struct Q8Rows {
    pub(super) scales: Vec<f32>,
    pub(super) sums: Vec<i32>,
    pub(super) quants: Vec<i8>,
    /// Where a kernel asks for them, per block, minus the weights' offset times each four
    /// activations' sum: what VNNI takes off each of `vpdpbusd`'s lanes for a format with a
    /// scale per 16 weights.
    pub(super) lane_offsets: Vec<i32>,
}

/// One quantized activation row.
pub(super) struct XRow<'a> {
    pub(super) scales: &'a [f32],
    pub(super) sums: &'a [i32],
    pub(super) quants: &'a [i8],
    /// Only VNNI's kernels ask for them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) lane_offsets: &'a [i32],
}

/// Whether `row` is a stored row of `F` blocks as long as each of the activation rows `xs`:
/// what a row kernel checks before its unchecked reads.
pub(super) fn row_fits<F: Layout>(row: &[u8], xs: &[XRow]) -> bool {
    let blocks = xs[0].scales.len();
    row.len() == row_bytes::<F>(blocks)
        && blocks.is_multiple_of(F::BLOCKS)
        && xs.iter().all(|x| x.has(blocks))
}

impl XRow<'_> {
    /// Whether the row holds `blocks` blocks.
    pub(super) fn has(&self, blocks: usize) -> bool {
        self.scales.len() == blocks
            && self.sums.len() == blocks
            && self.quants.len() == blocks * BLOCK
    }

    /// Block `b`'s value sum, `scale·Σq`, which a weight block's min multiplies.
    ///
    /// # Safety
    /// `b` is one of the row's blocks.
    #[inline(always)]
    pub(super) unsafe fn block_sum(&self, b: usize) -> f32 {
        *self.scales.get_unchecked(b) * *self.sums.get_unchecked(b) as f32
    }
}

impl Q8Rows {
    /// `x`, whole rows of `cols` values (a multiple of 32), quantized; with each block's
    /// lane offsets where the weights' `offset` is given.
    pub(super) fn new(x: &[f32], cols: usize, offset: Option<i32>) -> Self {
        let blocks = x.len() / BLOCK;
        assert!(x.len() == blocks * BLOCK && cols.is_multiple_of(BLOCK));
        let mut rows = Self {
            scales: vec![0.0; blocks],
            sums: vec![0; blocks],
            quants: vec![0; blocks * BLOCK],
            lane_offsets: vec![0; if offset.is_some() { blocks * 8 } else { 0 }],
        };
        quantize(&mut rows, x, offset);
        rows
    }
}
