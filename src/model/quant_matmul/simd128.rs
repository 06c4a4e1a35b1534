//! q8_0 and q4_0 on wasm32 with SIMD128, rows split across rayon's pool.
//!
//! Why: candle's kernels run on one thread in the browser, where a laptop has 4–16 cores;
//! the threaded build (`initThreadPool`) gives rayon Web Workers sharing the module's
//! memory, and the single-threaded build runs the same code on the caller's thread.
//!
//! How: the file's blocks are repacked once into tiles of four rows, block by block (the
//! four rows' f16 scales, then their quants: the stored size), so a product reads the matrix
//! as one stream. Each tile meets each activation row: a block's weights are widened to
//! i16 as they load (`v128.load8x8_s` for q8_0; nibbles masked, shifted and offset by 8 for
//! q4_0), and `i32x4.dot_i16x8_s` multiplies them into the activations, which were quantized
//! to q8_0 and widened to i16 once per product (llama.cpp pairs both formats with q8_0
//! activations too). Scales come from a table of every f16's f32 (256 KB, as llama.cpp keeps
//! one where the CPU cannot convert f16).

use std::arch::wasm32::*;
use std::marker::PhantomData;
use std::sync::OnceLock;

use half::f16;

use super::{check_blocks, quantize_block, BLOCK};
use crate::error::Result;
use crate::model::disjoint::{rows_of, Disjoint};
use crate::model::spin_pool;

/// Weight rows per tile: they share each activation load.
const ROWS: usize = 4;

/// A GGML block format: its quant bytes per block of 32 weights, and how they widen.
pub trait Format {
    /// Bytes of quants per block (after the f16 scale).
    const QUANTS: usize;
    /// The block's 32 weights at `q`, as four i16x8 vectors in order.
    ///
    /// # Safety
    /// `q` must point at `QUANTS` readable bytes.
    unsafe fn widen(q: *const u8) -> [v128; 4];
}

/// q8_0: 32 signed bytes.
pub struct Q8_0;

impl Format for Q8_0 {
    const QUANTS: usize = BLOCK;
    unsafe fn widen(q: *const u8) -> [v128; 4] {
        [0, 8, 16, 24].map(|k| i16x8_load_extend_i8x8(q.add(k).cast()))
    }
}

/// q4_0: 16 bytes, weight `j` in the low nibble of byte `j` and weight `j + 16` in its high
/// nibble, both stored plus 8.
pub struct Q4_0;

impl Format for Q4_0 {
    const QUANTS: usize = BLOCK / 2;
    unsafe fn widen(q: *const u8) -> [v128; 4] {
        let bytes = v128_load(q.cast());
        let eight = i8x16_splat(8);
        let low = i8x16_sub(v128_and(bytes, u8x16_splat(0x0F)), eight);
        let high = i8x16_sub(u8x16_shr(bytes, 4), eight);
        [
            i16x8_extend_low_i8x16(low),
            i16x8_extend_high_i8x16(low),
            i16x8_extend_low_i8x16(high),
            i16x8_extend_high_i8x16(high),
        ]
    }
}

/// A `rows × cols` matrix of `F` blocks in tiles of four rows (the last padded with zeros).
pub struct Tiled<F> {
    rows: usize,
    cols: usize,
    /// Per tile, per block: four f16 scales, then four rows' quants.
    tiles: Vec<u8>,
    format: PhantomData<fn() -> F>,
}

pub type Q8Matrix = Tiled<Q8_0>;
pub type Q4Matrix = Tiled<Q4_0>;

/// Activation rows quantized to q8_0 blocks, quants widened to i16.
struct Activations {
    scales: Vec<f32>,
    quants: Vec<i16>,
}

impl Activations {
    fn new(x: &[f32]) -> Self {
        let mut out = Self {
            scales: Vec::with_capacity(x.len() / BLOCK),
            quants: Vec::with_capacity(x.len()),
        };
        for block in x.chunks_exact(BLOCK) {
            let (scale, quants) = quantize_block(block);
            out.scales.push(scale);
            out.quants.extend(quants.map(i16::from));
        }
        out
    }
}

/// Every f16's value as f32, indexed by its bits.
fn f16_table() -> &'static [f32; 1 << 16] {
    static TABLE: OnceLock<Box<[f32; 1 << 16]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Box::new([0f32; 1 << 16]);
        for (bits, value) in table.iter_mut().enumerate() {
            *value = f16::from_bits(bits as u16).to_f32();
        }
        table
    })
}

impl<F: Format> Tiled<F> {
    /// Bytes of one block of a tile: four scales, then four rows' quants.
    const TILE_BLOCK: usize = ROWS * (2 + F::QUANTS);

    /// `rows × cols` values stored as GGUF blocks of this format (SIMD128 is part of every
    /// wasm build, so there is always a matrix).
    pub fn for_this_cpu(blocks: &[u8], rows: usize, cols: usize) -> Result<Option<Self>> {
        let stored = 2 + F::QUANTS;
        check_blocks(blocks, rows, cols, BLOCK, stored)?;
        let per_row = cols / BLOCK;
        let mut tiles = vec![0; rows.div_ceil(ROWS) * per_row * Self::TILE_BLOCK];
        for (n, block) in blocks.chunks_exact(stored).enumerate() {
            let (r, b) = (n / per_row, n % per_row);
            let tile =
                &mut tiles[(r / ROWS * per_row + b) * Self::TILE_BLOCK..][..Self::TILE_BLOCK];
            let i = r % ROWS;
            tile[2 * i..2 * i + 2].copy_from_slice(&block[..2]);
            tile[2 * ROWS + F::QUANTS * i..][..F::QUANTS].copy_from_slice(&block[2..]);
        }
        Ok(Some(Self {
            rows,
            cols,
            tiles,
            format: PhantomData,
        }))
    }

    /// SIMD128 is part of every wasm build.
    pub fn runs_here() -> bool {
        true
    }

    /// Bytes held (and read by each product).
    pub fn bytes(&self) -> usize {
        self.tiles.len()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · Wᵀ` for `x` holding whole rows of `cols` values: one row of `rows` values out
    /// per row in.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        let m = rows_of(x, self.cols, "a quantized matrix")?;
        if m == 0 || self.rows == 0 {
            return Ok(Vec::new());
        }
        let xq = Activations::new(x);
        let rows = self.rows;
        let mut out = vec![0f32; m * rows];
        let shared = Disjoint::new(&mut out);
        let table = f16_table();
        // A few units per thread, so a thread that started late does not hold up the rest;
        // within a unit, each tile meets every activation row while it is in cache.
        let tiles = rows.div_ceil(ROWS);
        let per_unit = tiles.div_ceil(rayon::current_num_threads() * 4);
        spin_pool::split(tiles.div_ceil(per_unit), |u| {
            for t in u * per_unit..tiles.min((u + 1) * per_unit) {
                let n = (rows - t * ROWS).min(ROWS);
                for j in 0..m {
                    let dots = self.dots(t, &xq, j, table);
                    // SAFETY: `j * rows + t * 4 .. + n` lies inside row `j` of `out`, and
                    // only this unit writes tile `t`'s rows of it; `out` outlives the call.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            dots.as_ptr(),
                            shared.at(j * rows + t * ROWS),
                            n,
                        )
                    };
                }
            }
        });
        Ok(out)
    }

    /// Tile `t`'s four rows dotted with activation row `j`.
    fn dots(&self, t: usize, xq: &Activations, j: usize, table: &[f32; 1 << 16]) -> [f32; ROWS] {
        let (cols, per_row) = (self.cols, self.cols / BLOCK);
        let tile = &self.tiles[t * per_row * Self::TILE_BLOCK..][..per_row * Self::TILE_BLOCK];
        let x = xq.quants[j * cols..][..cols].as_ptr();
        let x_scales = &xq.scales[j * per_row..][..per_row];
        let mut acc = [f32x4_splat(0.0); ROWS];
        for (b, (&x_scale, block)) in x_scales
            .iter()
            .zip(tile.chunks_exact(Self::TILE_BLOCK))
            .enumerate()
        {
            let quants = block[2 * ROWS..].as_ptr();
            // SAFETY: `x` starts `per_row` blocks of 32 activations, read as four loads of
            // eight i16 of block `b`; `quants` starts four rows of `F::QUANTS` bytes.
            unsafe {
                let xs = [0, 8, 16, 24].map(|k| v128_load(x.add(b * BLOCK + k).cast()));
                for (i, scale) in block[..2 * ROWS].chunks_exact(2).enumerate() {
                    let ws = F::widen(quants.add(i * F::QUANTS));
                    let mut sum = i32x4_dot_i16x8(ws[0], xs[0]);
                    for (&w, &xk) in ws.iter().zip(&xs).skip(1) {
                        sum = i32x4_add(sum, i32x4_dot_i16x8(w, xk));
                    }
                    let bits = u16::from_le_bytes([scale[0], scale[1]]);
                    let scale = f32x4_splat(table[bits as usize] * x_scale);
                    acc[i] = f32x4_add(acc[i], f32x4_mul(f32x4_convert_i32x4(sum), scale));
                }
            }
        }
        acc.map(|a| {
            f32x4_extract_lane::<0>(a)
                + f32x4_extract_lane::<1>(a)
                + f32x4_extract_lane::<2>(a)
                + f32x4_extract_lane::<3>(a)
        })
    }
}
