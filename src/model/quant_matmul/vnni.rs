//! q8_0 on x86-64 with AVX-512 VNNI.
//!
//! Why: on exactly these CPUs candle 0.11's `QMatMul` repacks each q8_0 matrix at its first
//! use into tiles for VNNI and keeps the repacked copy beside the original, so a q8_0 Phi-2
//! needs twice its file in memory (issue #19). Here the blocks are repacked once, when the
//! weight is loaded, and the file's copy is dropped: 34 bytes per 32 weights, as in the
//! file. Elsewhere on x86 candle's kernels run as before (they keep one copy there).
//!
//! How, as llama.cpp's and candle's VNNI kernels do: weights sit in tiles of 16 rows,
//! offset by 128 into unsigned bytes, so one `vpdpbusd` multiplies four bytes of an
//! activation block into all 16 rows at once, and the offset comes back out as one number
//! per activation block: `Σ(w+128)·x = Σw·x + 128·Σx`. Tiles are 64-byte aligned (each
//! weight load one cache line) and split across candle's thread pool; four activation rows
//! share each weight load in a prefill.

use candle_core::utils::barrier_pool;
use half::f16;
use rayon::prelude::*;

use super::{check_blocks, quantize_block, BLOCK, BLOCK_BYTES};
use crate::error::Result;
use crate::model::disjoint::{rows_of, Disjoint};
/// Weight rows per tile: one 512-bit register of i32 lanes.
const TILE: usize = 16;
/// Groups of 4 columns per block: one cache line of a tile (4 quants of each of 16 rows).
const GROUPS: usize = BLOCK / 4;

/// Four quants of each of a tile's 16 rows, offset by 128: what one `vpdpbusd` reads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A `rows × cols` matrix of q8_0 blocks in tiles of 16 rows (the last padded with zeros).
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// Per tile, per block, per group of 4 columns: one line.
    quants: Vec<Line>,
    /// Per tile, per block: the 16 rows' scales.
    scales: Vec<f16>,
}

/// Activation rows quantized to q8_0 blocks, with each block's `128·Σq` that the weights'
/// offset adds to its products.
struct Q8Rows {
    scales: Vec<f32>,
    offsets: Vec<i32>,
    quants: Vec<i8>,
}

impl Q8Rows {
    fn new(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut rows = Self {
            scales: Vec::with_capacity(blocks),
            offsets: Vec::with_capacity(blocks),
            quants: Vec::with_capacity(x.len()),
        };
        for block in x.chunks_exact(BLOCK) {
            let (scale, quants) = quantize_block(block);
            rows.scales.push(scale);
            rows.offsets
                .push(128 * quants.iter().map(|&q| q as i32).sum::<i32>());
            rows.quants.extend(quants);
        }
        rows
    }
}

impl Q8Matrix {
    /// `rows × cols` values stored as GGUF q8_0 blocks, repacked for this CPU; `None` where
    /// the CPU lacks AVX-512 VNNI (candle's kernels serve there).
    pub fn for_this_cpu(blocks: &[u8], rows: usize, cols: usize) -> Result<Option<Self>> {
        if !Self::runs_here() {
            return Ok(None);
        }
        Self::repack(blocks, rows, cols).map(Some)
    }

    pub(super) fn repack(blocks: &[u8], rows: usize, cols: usize) -> Result<Self> {
        check_blocks(blocks, rows, cols, BLOCK_BYTES)?;
        let per_row = cols / BLOCK;
        let tile_blocks = rows.div_ceil(TILE) * per_row;
        // Padding rows hold quant 0, offset to 128, and scale 0: they add nothing.
        let mut quants = vec![Line([128; 64]); tile_blocks * GROUPS];
        let mut scales = vec![f16::ZERO; tile_blocks * TILE];
        // A tile at a time, in parallel (loading Phi-2 repacks 2.8 GB): each row's block
        // is read as eight words of four quants, offset by 128 with one xor each.
        let tiles = quants.par_chunks_mut(per_row * GROUPS);
        tiles
            .zip(scales.par_chunks_mut(per_row * TILE))
            .enumerate()
            .for_each(|(t, (lines, scales))| {
                // Block by block, so the tile is written front to back.
                for b in 0..per_row {
                    for lane in 0..TILE.min(rows - t * TILE) {
                        let at = ((t * TILE + lane) * per_row + b) * BLOCK_BYTES;
                        let block = &blocks[at..at + BLOCK_BYTES];
                        scales[b * TILE + lane] = f16::from_le_bytes([block[0], block[1]]);
                        for (g, four) in block[2..].chunks_exact(4).enumerate() {
                            let word = u32::from_le_bytes([four[0], four[1], four[2], four[3]]);
                            lines[b * GROUPS + g].0[lane * 4..lane * 4 + 4]
                                .copy_from_slice(&(word ^ 0x8080_8080).to_le_bytes());
                        }
                    }
                }
            });
        Ok(Self {
            rows,
            cols,
            quants,
            scales,
        })
    }

    /// Whether this CPU has the instructions the kernel needs.
    pub fn runs_here() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")
    }

    /// Bytes held (and read by each product).
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.quants.as_slice())
            + std::mem::size_of_val(self.scales.as_slice())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · Wᵀ` for `x` holding whole rows of `cols` values: one row of `rows` values out
    /// per row in.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        let m = rows_of(x, self.cols, "a q8_0 matrix")?;
        if m == 0 {
            return Ok(Vec::new());
        }
        let xq = Q8Rows::new(x);
        let (per_row, cols, rows) = (self.cols / BLOCK, self.cols, self.rows);
        let x_row = |j: usize| XRow {
            scales: &xq.scales[j * per_row..(j + 1) * per_row],
            offsets: &xq.offsets[j * per_row..(j + 1) * per_row],
            quants: &xq.quants[j * cols..(j + 1) * cols],
        };
        let mut out = vec![0f32; m * rows];
        let shared = Disjoint::new(&mut out);
        // A unit is one tile against up to four activation rows; a tile's units run one
        // after another, so its weights are read from memory once and then from cache.
        // Candle's own pool runs them: its workers spin between the model's other candle
        // operations, so a decode step's short products do not wait for sleeping threads,
        // and no second pool competes with it for the cores.
        let groups = m.div_ceil(4);
        barrier_pool().execute_chunked(rows.div_ceil(TILE) * groups, |units| {
            for unit in units {
                let (t, j) = (unit / groups, unit % groups * 4);
                let tile = Tile {
                    quants: &self.quants[t * per_row * GROUPS..(t + 1) * per_row * GROUPS],
                    scales: &self.scales[t * per_row * TILE..(t + 1) * per_row * TILE],
                };
                let lanes = (rows - t * TILE).min(TILE);
                let write = |j: usize, values: &[f32; TILE]| {
                    let at = j * rows + t * TILE;
                    // SAFETY: `at..at + lanes` lies inside row `j` of `out`, and no other
                    // unit writes tile `t` of row `j`; `out` outlives the pool's call.
                    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), shared.at(at), lanes) };
                };
                if m - j >= 4 {
                    let xs = [x_row(j), x_row(j + 1), x_row(j + 2), x_row(j + 3)];
                    for (n, values) in tile_dots(tile, &xs).iter().enumerate() {
                        write(j + n, values);
                    }
                } else {
                    for j in j..m {
                        write(j, &tile_dots(tile, &[x_row(j)])[0]);
                    }
                }
            }
        });
        Ok(out)
    }
}

/// One tile's blocks, for every block of its rows.
#[derive(Clone, Copy)]
struct Tile<'a> {
    quants: &'a [Line],
    scales: &'a [f16],
}

/// One quantized activation row.
struct XRow<'a> {
    scales: &'a [f32],
    offsets: &'a [i32],
    quants: &'a [i8],
}

/// The tile's 16 rows dotted with each of `N` activation rows.
fn tile_dots<const N: usize>(tile: Tile, xs: &[XRow; N]) -> [[f32; TILE]; N] {
    let blocks = tile.scales.len() / TILE;
    let fits = |x: &XRow| {
        x.scales.len() == blocks && x.offsets.len() == blocks && x.quants.len() == blocks * BLOCK
    };
    assert!(tile.quants.len() == blocks * GROUPS && xs.iter().all(fits));
    // SAFETY: a Q8Matrix exists only where for_this_cpu found AVX-512 F and VNNI, and the
    // assertion above keeps every read inside the slices.
    unsafe { tile_dots_vnni(tile, xs) }
}

#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_dots_vnni<const N: usize>(tile: Tile, xs: &[XRow; N]) -> [[f32; TILE]; N] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); N];
    let lines = tile.quants.as_ptr();
    for b in 0..tile.scales.len() / TILE {
        // Two chains per activation row, even and odd groups: one row alone would otherwise
        // wait out vpdpbusd's latency eight times per block.
        let mut products = [[_mm512_setzero_si512(); 2]; N];
        for g in 0..GROUPS {
            let w = _mm512_load_si512(lines.add(b * GROUPS + g).cast());
            for n in 0..N {
                let four = xs[n].quants.as_ptr().add(b * BLOCK + g * 4).cast::<i32>();
                let x = _mm512_set1_epi32(four.read_unaligned());
                products[n][g % 2] = _mm512_dpbusd_epi32(products[n][g % 2], w, x);
            }
        }
        let scales = _mm512_cvtph_ps(_mm256_loadu_si256(
            tile.scales.as_ptr().add(b * TILE).cast(),
        ));
        for n in 0..N {
            let [even, odd] = products[n];
            let offset = _mm512_set1_epi32(*xs[n].offsets.get_unchecked(b));
            let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(even, odd), offset));
            let scale = _mm512_mul_ps(scales, _mm512_set1_ps(*xs[n].scales.get_unchecked(b)));
            acc[n] = _mm512_fmadd_ps(exact, scale, acc[n]);
        }
    }
    acc.map(|a| {
        let mut out = [0f32; TILE];
        _mm512_storeu_ps(out.as_mut_ptr(), a);
        out
    })
}
