//! q8_0 on wasm32 with SIMD128, its rows split across rayon's pool.
//!
//! Why: candle's q8_0 kernel runs on one thread in the browser, where a laptop has 4–16
//! cores; the threaded build (`initThreadPool`) gives rayon Web Workers sharing the
//! module's memory, and the single-threaded build runs the same code on the caller's thread.
//!
//! How: the file's blocks are repacked once into tiles of four rows, block by block (the
//! four rows' f16 scales, then their 32 quants each: 34 bytes per 32 weights, as stored), so
//! a product reads the matrix as one stream. The repacked matrix is one buffer of exactly
//! the stored size, as the bytes it was made from were: the allocator reuses each freed
//! download for the next matrix (two buffers of other sizes left wasm memory, which never
//! shrinks, 1.5× larger). Each tile meets each activation row: `v128.load8x8_s` widens eight weights to i16 as it loads them, and
//! `i32x4.dot_i16x8_s` multiplies them into the activations, which were quantized and
//! widened to i16 once per product. Scales come from a table of every f16's f32 (256 KB, as
//! llama.cpp keeps one where the CPU cannot convert f16).

use std::arch::wasm32::*;
use std::sync::OnceLock;

use half::f16;

use super::{check_blocks, quantize_block, BLOCK, BLOCK_BYTES};
use crate::error::Result;
use crate::model::disjoint::{rows_of, Disjoint};
use crate::model::spin_pool;

/// Weight rows per tile: they share each activation load.
const ROWS: usize = 4;

/// Bytes of one block of a tile: four f16 scales, then four rows of 32 quants.
const TILE_BLOCK: usize = ROWS * BLOCK_BYTES;

/// A `rows × cols` matrix of q8_0 blocks in tiles of four rows (the last padded with zeros).
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// Per tile, per block: `TILE_BLOCK` bytes.
    tiles: Vec<u8>,
}

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

impl Q8Matrix {
    /// `rows × cols` values stored as GGUF q8_0 blocks (SIMD128 is part of every wasm
    /// build, so there is always a matrix).
    pub fn for_this_cpu(blocks: &[u8], rows: usize, cols: usize) -> Result<Option<Self>> {
        check_blocks(blocks, rows, cols)?;
        let per_row = cols / BLOCK;
        let mut tiles = vec![0; rows.div_ceil(ROWS) * per_row * TILE_BLOCK];
        for (n, block) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
            let (r, b) = (n / per_row, n % per_row);
            let tile = &mut tiles[(r / ROWS * per_row + b) * TILE_BLOCK..][..TILE_BLOCK];
            let i = r % ROWS;
            tile[2 * i..2 * i + 2].copy_from_slice(&block[..2]);
            tile[2 * ROWS + BLOCK * i..][..BLOCK].copy_from_slice(&block[2..]);
        }
        Ok(Some(Self { rows, cols, tiles }))
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
        let m = rows_of(x, self.cols, "a q8_0 matrix")?;
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
        let tile = &self.tiles[t * per_row * TILE_BLOCK..][..per_row * TILE_BLOCK];
        let x = xq.quants[j * cols..][..cols].as_ptr();
        let x_scales = &xq.scales[j * per_row..][..per_row];
        let mut acc = [f32x4_splat(0.0); ROWS];
        for (b, (&x_scale, block)) in x_scales
            .iter()
            .zip(tile.chunks_exact(TILE_BLOCK))
            .enumerate()
        {
            let quants = block[2 * ROWS..].as_ptr().cast::<i8>();
            // SAFETY: `x` starts `per_row` blocks of activations and `quants` four rows of
            // 32 quants; each load reads eight quants (16 bytes of i16 activations, 8 bytes
            // of i8 weights) of one of them.
            unsafe {
                let xs = [0, 8, 16, 24].map(|k| v128_load(x.add(b * BLOCK + k).cast()));
                for (i, scale) in block[..2 * ROWS].chunks_exact(2).enumerate() {
                    let w = quants.add(i * BLOCK);
                    let mut sum = i32x4_dot_i16x8(i16x8_load_extend_i8x8(w), xs[0]);
                    for (k, &xk) in xs.iter().enumerate().skip(1) {
                        let wk = i16x8_load_extend_i8x8(w.add(8 * k));
                        sum = i32x4_add(sum, i32x4_dot_i16x8(wk, xk));
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
