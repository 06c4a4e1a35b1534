//! q8_0, q4_0, q4_K and q6_K on wasm32 with SIMD128, rows split across rayon's pool.
//!
//! Why: candle's kernels run on one thread in the browser, where a laptop has 4–16 cores;
//! the threaded build (`initThreadPool`) gives rayon Web Workers sharing the module's
//! memory, and the single-threaded build runs the same code on the caller's thread. (On one
//! thread candle's k-quant kernels are the faster: they sum a super-block in integers against
//! activations rounded per 256. `QuantMatrix::serves` leaves k-quants to them there.)
//!
//! How: the file's blocks are repacked once into tiles of four rows, stored unit by stored
//! unit (a block, or a k-quant's super-block of eight: the four rows' units as stored, so the
//! tiles are the file's size), so a product reads the matrix as one stream. Each tile meets
//! each activation row: a block's weights are widened to i16 as they load (`v128.load8x8_s`
//! for q8_0; nibbles masked and shifted, q4_0's offset by 8; q6_K's six bits less 32, times
//! their scale per 16 weights, which fits i16), and `i32x4.dot_i16x8_s` multiplies them into
//! the activations, which were quantized to q8_0 and widened to i16 once per product
//! (llama.cpp pairs its 32-value formats with q8_0 activations too). A q4_K block's min comes
//! off as `min·Σx`. Scales stored as one f16 per block come from a table of every f16's f32
//! (256 KB, as llama.cpp keeps one where the CPU cannot convert f16), and so do a
//! super-block's `d` and `dmin` (`half`'s conversion, in software here, had cost a quarter of
//! a Q4_K_M decode); its packed scales are unpacked once per unit and row.

use std::arch::wasm32::*;
use std::marker::PhantomData;
use std::sync::OnceLock;

use half::f16;

use super::blocks::{Layout, Q4K, Q4_0, Q6K, Q8_0};
use super::{check_blocks, quantize_block, BLOCK};
use crate::error::Result;
use crate::model::disjoint::{rows_of, Disjoint};
use crate::model::spin_pool;

/// Weight rows per tile: they share each activation load.
const ROWS: usize = 4;

/// How the kernel reads a block format (`Layout`: what lies where) from one stored unit
/// (`Layout::BLOCKS` blocks, `Layout::BYTES` bytes) of a tile's row.
///
/// # Safety (every method)
/// `unit` points at a whole stored unit, and `k` is one of its blocks.
pub trait Format: Layout {
    /// Block `k`'s 32 weights, signed, as four i16x8 vectors in order (times their scale
    /// per 16 weights, where the format has one).
    unsafe fn widen(unit: *const u8, k: usize) -> [v128; 4];
    /// The unit's blocks' scales and mins, in the first `BLOCKS` lanes; by default a lone
    /// block's f16 scale, from the table.
    #[inline(always)]
    unsafe fn unit_scales(unit: *const u8, table: &[f32; 1 << 16]) -> ([f32; 8], [f32; 8]) {
        let bits = u16::from_le_bytes([*unit, *unit.add(1)]);
        let mut scales = [0.0; 8];
        scales[0] = table[bits as usize];
        (scales, [0.0; 8])
    }
}

/// Sixteen bytes as two i16x8 vectors, in order.
#[inline(always)]
fn widen_bytes(bytes: v128) -> [v128; 2] {
    [
        i16x8_extend_low_i8x16(bytes),
        i16x8_extend_high_i8x16(bytes),
    ]
}

impl Format for Q8_0 {
    #[inline(always)]
    unsafe fn widen(unit: *const u8, _k: usize) -> [v128; 4] {
        [0, 8, 16, 24].map(|at| i16x8_load_extend_i8x8(unit.add(2 + at).cast()))
    }
}

impl Format for Q4_0 {
    #[inline(always)]
    unsafe fn widen(unit: *const u8, _k: usize) -> [v128; 4] {
        let bytes = v128_load(unit.add(2).cast());
        let eight = i8x16_splat(8);
        let [a, b] = widen_bytes(i8x16_sub(v128_and(bytes, u8x16_splat(0x0F)), eight));
        let [c, d] = widen_bytes(i8x16_sub(u8x16_shr(bytes, 4), eight));
        [a, b, c, d]
    }
}

impl Format for Q4K {
    #[inline(always)]
    unsafe fn widen(unit: *const u8, k: usize) -> [v128; 4] {
        let bytes = unit.add(16 + k / 2 * 32);
        let nibbles = |at: usize| {
            let v = v128_load(bytes.add(at).cast());
            if k.is_multiple_of(2) {
                v128_and(v, u8x16_splat(0x0F))
            } else {
                u8x16_shr(v, 4)
            }
        };
        let [a, b] = widen_bytes(nibbles(0));
        let [c, d] = widen_bytes(nibbles(16));
        [a, b, c, d]
    }

    /// `d` and `dmin` from the table, the 6-bit scales and mins widened in two vectors.
    #[inline(always)]
    unsafe fn unit_scales(unit: *const u8, table: &[f32; 1 << 16]) -> ([f32; 8], [f32; 8]) {
        let ([d, dmin], [s0, s1, m0, m1]) = Self::stored(unit, 0);
        let eight = |low: u32, high: u32, by: u16| {
            let bytes = u16x8_extend_low_u8x16(u32x4(low, high, 0, 0));
            let by = f32x4_splat(table[by as usize]);
            let widen = |v: v128| f32x4_mul(f32x4_convert_u32x4(v), by);
            let halves = [
                widen(u32x4_extend_low_u16x8(bytes)),
                widen(u32x4_extend_high_u16x8(bytes)),
            ];
            std::mem::transmute::<[v128; 2], [f32; 8]>(halves)
        };
        (eight(s0, s1, d), eight(m0, m1, dmin))
    }
}

impl Format for Q6K {
    #[inline(always)]
    unsafe fn widen(unit: *const u8, k: usize) -> [v128; 4] {
        let (half, j) = (k / 4, k % 4);
        let low = unit.add(64 * half + 32 * (j % 2));
        let high = unit.add(128 + 32 * half);
        let scales = Self::pair_scales(unit, k);
        let sixteen = |at: usize| {
            let low = u8x16_shr(v128_load(low.add(at).cast()), 4 * (j as u32 / 2));
            let high = u8x16_shr(v128_load(high.add(at).cast()), 2 * j as u32);
            let w = v128_or(
                v128_and(low, u8x16_splat(0x0F)),
                i8x16_shl(v128_and(high, u8x16_splat(3)), 4),
            );
            let scale = i16x8_splat(scales[at / 16]);
            widen_bytes(i8x16_sub(w, i8x16_splat(32))).map(|w| i16x8_mul(w, scale))
        };
        let [a, b] = sixteen(0);
        let [c, d] = sixteen(16);
        [a, b, c, d]
    }

    #[inline(always)]
    unsafe fn unit_scales(unit: *const u8, table: &[f32; 1 << 16]) -> ([f32; 8], [f32; 8]) {
        ([table[Self::d_bits(unit, 0) as usize]; 8], [0.0; 8])
    }
}

/// A `rows × cols` matrix of `F` blocks in tiles of four rows (the last padded with zeros).
pub struct Tiled<F> {
    rows: usize,
    cols: usize,
    /// Per tile, per stored unit: the four rows' units as stored.
    tiles: Vec<u8>,
    format: PhantomData<fn() -> F>,
}

pub type Q8Matrix = Tiled<Q8_0>;
pub type Q4Matrix = Tiled<Q4_0>;
pub type Q4KMatrix = Tiled<Q4K>;
pub type Q6KMatrix = Tiled<Q6K>;

/// Activation rows quantized to q8_0 blocks, quants widened to i16, with each block's sum
/// (`scale·Σq`, what a weight block's min multiplies).
struct Activations {
    scales: Vec<f32>,
    sums: Vec<f32>,
    quants: Vec<i16>,
}

impl Activations {
    fn new(x: &[f32]) -> Self {
        let mut out = Self {
            scales: Vec::with_capacity(x.len() / BLOCK),
            sums: Vec::with_capacity(x.len() / BLOCK),
            quants: Vec::with_capacity(x.len()),
        };
        for block in x.chunks_exact(BLOCK) {
            let (scale, quants) = quantize_block(block);
            out.scales.push(scale);
            out.sums
                .push(scale * quants.iter().map(|&q| i32::from(q)).sum::<i32>() as f32);
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
    /// Bytes of one stored unit of a tile: the four rows'.
    const TILE_UNIT: usize = ROWS * F::BYTES;

    /// `rows × cols` values stored as GGUF blocks of this format (SIMD128 is part of every
    /// wasm build, so there is always a matrix).
    pub fn for_this_cpu(blocks: &[u8], rows: usize, cols: usize) -> Result<Option<Self>> {
        check_blocks(blocks, rows, cols, BLOCK * F::BLOCKS, F::BYTES)?;
        let units = cols / (BLOCK * F::BLOCKS);
        // Padding rows stay zeros: scales of zero, outputs never written.
        let mut tiles = vec![0; rows.div_ceil(ROWS) * units * Self::TILE_UNIT];
        for (n, unit) in blocks.chunks_exact(F::BYTES).enumerate() {
            let (r, u) = (n / units, n % units);
            let at = (r / ROWS * units + u) * Self::TILE_UNIT + r % ROWS * F::BYTES;
            tiles[at..at + F::BYTES].copy_from_slice(unit);
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
        let units = per_row / F::BLOCKS;
        let tile = &self.tiles[t * units * Self::TILE_UNIT..][..units * Self::TILE_UNIT];
        let x = xq.quants[j * cols..][..cols].as_ptr();
        let x_scales = &xq.scales[j * per_row..][..per_row];
        let x_sums = &xq.sums[j * per_row..][..per_row];
        let mut acc = [f32x4_splat(0.0); ROWS];
        let mut mins = [0f32; ROWS];
        for (u, unit) in tile.chunks_exact(Self::TILE_UNIT).enumerate() {
            let row_unit = |i: usize| unit[i * F::BYTES..].as_ptr();
            // SAFETY: `unit` holds the four rows' whole units, each `F::BYTES` long; `x`
            // starts `per_row` blocks of 32 activations, read as four loads of eight i16 of
            // block `b`, one of the row's.
            unsafe {
                let scales: [_; ROWS] = std::array::from_fn(|i| F::unit_scales(row_unit(i), table));
                if F::MINS {
                    let sums = &x_sums[u * F::BLOCKS..][..F::BLOCKS];
                    for (min, (_, weight_mins)) in mins.iter_mut().zip(&scales) {
                        *min += sums
                            .iter()
                            .zip(weight_mins)
                            .map(|(s, m)| s * m)
                            .sum::<f32>();
                    }
                }
                for k in 0..F::BLOCKS {
                    let b = u * F::BLOCKS + k;
                    let xs = [0, 8, 16, 24].map(|c| v128_load(x.add(b * BLOCK + c).cast()));
                    let x_scale = x_scales[b];
                    for (i, (weight_scales, _)) in scales.iter().enumerate() {
                        let ws = F::widen(row_unit(i), k);
                        let mut sum = i32x4_dot_i16x8(ws[0], xs[0]);
                        for (&w, &xk) in ws.iter().zip(&xs).skip(1) {
                            sum = i32x4_add(sum, i32x4_dot_i16x8(w, xk));
                        }
                        let scale = f32x4_splat(weight_scales[k] * x_scale);
                        acc[i] = f32x4_add(acc[i], f32x4_mul(f32x4_convert_i32x4(sum), scale));
                    }
                }
            }
        }
        std::array::from_fn(|i| {
            let a = acc[i];
            f32x4_extract_lane::<0>(a)
                + f32x4_extract_lane::<1>(a)
                + f32x4_extract_lane::<2>(a)
                + f32x4_extract_lane::<3>(a)
                - mins[i]
        })
    }
}
