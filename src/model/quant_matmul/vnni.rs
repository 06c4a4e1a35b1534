//! q8_0 on x86-64 with AVX-512 VNNI.
//!
//! Why: on exactly these CPUs candle 0.11's `QMatMul` repacks each q8_0 matrix at its first
//! use into tiles for VNNI and keeps the repacked copy beside the original, so a q8_0 Phi-2
//! needs twice its file in memory (issue #19). Ours reads the file's own blocks where they
//! lie: a memory-mapped GGUF is used in place, so loading copies nothing and the first
//! product reads the weights straight from the page cache, as llama.cpp's do. (Repacking at
//! load instead wrote 2.8 GB of fresh pages for Phi-2, which the kernel must zero first:
//! about 0.75 s on two cores, twice llama.cpp's whole load.)
//!
//! How, as llama.cpp's and candle's VNNI kernels do: weights are multiplied in tiles of 16
//! rows, offset by 128 into unsigned bytes, so one `vpdpbusd` multiplies four bytes of an
//! activation block into all 16 rows at once, and the offset comes back out as one number
//! per activation block: `Σ(w+128)·x = Σw·x + 128·Σx`. In a prefill each tile is
//! transposed into that form in registers as it is read (16 rows' blocks in, lines of 4
//! quants × 16 rows out) into a per-thread scratch that stays in L2, then every activation
//! row is multiplied against the scratch, so the transposition is paid once per tile and
//! each weight is read from memory once. A decode step has one activation row, which would
//! not pay for the transposition: there each weight row is dotted straight from its blocks,
//! in memory order, as llama.cpp's q8_0 dot product does.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use half::f16;

use super::{check_blocks, BLOCK, BLOCK_BYTES};
use crate::error::{Error, Result};
use crate::model::disjoint::{for_each_unit, rows_of, Disjoint};
/// Weight rows per tile: one 512-bit register of i32 lanes.
const TILE: usize = 16;
/// Groups of 4 columns per block: one cache line of a tile (4 quants of each of 16 rows).
const GROUPS: usize = BLOCK / 4;

/// Four quants of each of a tile's 16 rows, offset by 128: what one `vpdpbusd` reads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A matrix's stored q8_0 blocks, where they already lie (a memory-mapped file, shared by
/// all its matrices and kept alive by them) or in a buffer of their own.
#[derive(Clone)]
pub struct StoredBlocks {
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl StoredBlocks {
    /// `range` of `bytes`; an error unless it lies inside them.
    pub fn shared(bytes: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Result<Self> {
        let len = (*bytes).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(Error::input(format!(
                "bytes {range:?} of quantized blocks lie outside the {len} stored"
            )));
        }
        Ok(Self { bytes, range })
    }

    fn owned(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        Self {
            bytes: Arc::new(bytes),
            range,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.range.clone()]
    }
}

/// A `rows × cols` matrix of q8_0 blocks as GGUF stores them: row after row, each block an
/// f16 scale and 32 quants.
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    blocks: StoredBlocks,
}

/// One tile transposed for the kernel: per block, per group of 4 columns, one line, and per
/// block the 16 rows' scales (padding rows: quant 0 offset to 128, scale 0, adding nothing).
#[derive(Default)]
struct Scratch {
    quants: Vec<Line>,
    scales: Vec<f16>,
}

thread_local! {
    /// Each pool thread's tile, reused product after product so a decode step allocates
    /// nothing; one tile of Phi-2's widest matrix is 180 KB, which stays in L2.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
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
            scales: vec![0.0; blocks],
            offsets: vec![0; blocks],
            quants: vec![0; blocks * BLOCK],
        };
        assert!(x.len() == blocks * BLOCK);
        // SAFETY: a Q8Matrix exists only where runs_here found AVX-512 F; the assertion and
        // the lengths above are the ones quantize_avx512 reads and writes.
        unsafe { rows.quantize_avx512(x) };
        rows
    }

    /// `quantize_block` a block per step in two registers; libm's `roundf`, one call per
    /// value, was the larger part of a decode step's quantization. Rounds halves to even as
    /// llama.cpp's vector quantization does (the plain form rounds them away from zero, as
    /// its reference does): the two differ only where `x / d` is exactly half an integer.
    #[target_feature(enable = "avx512f")]
    unsafe fn quantize_avx512(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let halves = [0, 16].map(|at| _mm512_loadu_ps(block.as_ptr().add(at)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_abs_ps(halves[0]),
                _mm512_abs_ps(halves[1]),
            ));
            let d = amax / 127.0;
            let inverse = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let q = halves.map(|h| _mm512_cvtps_epi32(_mm512_mul_ps(h, inverse)));
            for (half, q) in q.iter().enumerate() {
                let out = self.quants.as_mut_ptr().add(b * BLOCK + half * 16);
                _mm_storeu_si128(out.cast(), _mm512_cvtsepi32_epi8(*q));
            }
            self.offsets[b] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
            self.scales[b] = f16::from_f32(d).to_f32();
        }
    }
}

impl Q8Matrix {
    /// `rows × cols` values stored as GGUF q8_0 blocks, copied once; `None` where the CPU
    /// lacks AVX-512 VNNI (candle's kernels serve there).
    pub fn for_this_cpu(blocks: &[u8], rows: usize, cols: usize) -> Result<Option<Self>> {
        if !Self::runs_here() {
            return Ok(None);
        }
        Self::new(StoredBlocks::owned(blocks.to_vec()), rows, cols).map(Some)
    }

    /// The blocks used where they lie, never copied; `None` where the CPU lacks AVX-512
    /// VNNI.
    pub fn in_place(blocks: StoredBlocks, rows: usize, cols: usize) -> Result<Option<Self>> {
        if !Self::runs_here() {
            return Ok(None);
        }
        Self::new(blocks, rows, cols).map(Some)
    }

    pub(super) fn new(blocks: StoredBlocks, rows: usize, cols: usize) -> Result<Self> {
        check_blocks(blocks.as_slice(), rows, cols, BLOCK_BYTES)?;
        Ok(Self { rows, cols, blocks })
    }

    /// Whether this CPU has the instructions the kernel needs.
    pub fn runs_here() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("fma")
    }

    /// Bytes held (and read by each product).
    pub fn bytes(&self) -> usize {
        self.blocks.range.len()
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
        let row_bytes = per_row * BLOCK_BYTES;
        let stored = self.blocks.as_slice();
        let x_row = |j: usize| XRow {
            scales: &xq.scales[j * per_row..(j + 1) * per_row],
            offsets: &xq.offsets[j * per_row..(j + 1) * per_row],
            quants: &xq.quants[j * cols..(j + 1) * cols],
        };
        let mut out = vec![0f32; m * rows];
        let shared = Disjoint::new(&mut out);
        // Units of 16 rows, on the threads the kernels share (`for_each_unit` says why).
        let units = rows.div_ceil(TILE);
        if m < 4 {
            // Decode: each weight row dotted straight from its blocks, rows in memory order
            // (one stream for the prefetchers); a tile's transposition would cost more
            // than the single activation row it serves.
            for_each_unit(units, |t| {
                for r in t * TILE..(t * TILE + TILE).min(rows) {
                    let row = &stored[r * row_bytes..(r + 1) * row_bytes];
                    for j in 0..m {
                        // SAFETY: element (j, r) of `out`, which only this unit writes;
                        // `out` outlives the pool's call.
                        unsafe { *shared.at(j * rows + r) = row_dot(row, &x_row(j)) };
                    }
                }
            });
            return Ok(out);
        }
        // Prefill: a unit is one tile against every activation row: its weights are read
        // from memory once, transposed once, then read from the scratch.
        for_each_unit(units, |t| {
            SCRATCH.with_borrow_mut(|scratch| {
                let lanes = (rows - t * TILE).min(TILE);
                let tile = scratch.fill(
                    &stored[t * TILE * row_bytes..(t * TILE + lanes) * row_bytes],
                    per_row,
                );
                let write = |j: usize, values: &[f32; TILE]| {
                    let at = j * rows + t * TILE;
                    // SAFETY: `at..at + lanes` lies inside row `j` of `out`, and no other
                    // unit writes tile `t`; `out` outlives the pool's call.
                    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), shared.at(at), lanes) };
                };
                // Four activation rows share each weight load.
                for j in (0..m).step_by(4) {
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
            })
        });
        Ok(out)
    }
}

impl Scratch {
    /// Transposes one tile's rows (`stored`: 1 to 16 whole rows of `per_row` blocks) into
    /// the scratch, and lends it.
    fn fill(&mut self, stored: &[u8], per_row: usize) -> Tile<'_> {
        let (lines, scales) = (per_row * GROUPS, per_row * TILE);
        // Grown to the widest matrix once, then only sliced: no fill on every product.
        if self.quants.len() < lines {
            self.quants.resize(lines, Line([0; 64]));
        }
        if self.scales.len() < scales {
            self.scales.resize(scales, f16::ZERO);
        }
        let (quants, scales) = (&mut self.quants[..lines], &mut self.scales[..scales]);
        if stored.len() == TILE * per_row * BLOCK_BYTES {
            // SAFETY: a Q8Matrix exists only where runs_here found AVX-512 F; the
            // lengths checked above are the ones transpose_avx512 reads and writes.
            unsafe { transpose_avx512(stored, per_row, quants, scales) };
        } else {
            transpose_plain(stored, per_row, quants, scales);
        }
        Tile { quants, scales }
    }
}

/// The tile transposition a quant at a time: for a last tile of fewer than 16 rows, and the
/// reference the vector form is tested against.
fn transpose_plain(stored: &[u8], per_row: usize, lines: &mut [Line], scales: &mut [f16]) {
    let lanes = stored.len() / (per_row * BLOCK_BYTES);
    for b in 0..per_row {
        for lane in 0..TILE {
            let (scale, quants) = if lane < lanes {
                let at = (lane * per_row + b) * BLOCK_BYTES;
                let block = &stored[at..at + BLOCK_BYTES];
                let mut quants = [0u8; BLOCK];
                quants.copy_from_slice(&block[2..]);
                (f16::from_le_bytes([block[0], block[1]]), quants)
            } else {
                (f16::ZERO, [0; BLOCK])
            };
            scales[b * TILE + lane] = scale;
            for (g, four) in quants.chunks_exact(4).enumerate() {
                for (i, q) in four.iter().enumerate() {
                    lines[b * GROUPS + g].0[lane * 4 + i] = q ^ 0x80;
                }
            }
        }
    }
}

/// The tile transposition 16 rows at a time: per block, each row's 32 quants are one load,
/// two rows share a register (rows k and k + 8), and an 8 × 8 transposition of 4-byte
/// groups in each half turns them into the block's eight lines.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(stored: &[u8], per_row: usize, lines: &mut [Line], scales: &mut [f16]) {
    use std::arch::x86_64::*;
    let row_bytes = per_row * BLOCK_BYTES;
    assert!(
        stored.len() == TILE * row_bytes
            && lines.len() == per_row * GROUPS
            && scales.len() == per_row * TILE
    );
    let base = stored.as_ptr();
    let flip = _mm512_set1_epi32(0x8080_8080_u32 as i32);
    // Lane pairs of two registers, [first low 128 bits of each half, second's] and the
    // same of the high 128 bits: the transposition's last step.
    let low = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    let high = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for b in 0..per_row {
        let block = base.add(b * BLOCK_BYTES);
        let quants = |r: usize| _mm256_loadu_si256(block.add(r * row_bytes + 2).cast());
        let r: [__m512i; 8] = std::array::from_fn(|k| {
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(quants(k)), quants(k + 8))
        });
        // Pairs of rows, then fours: u[g] holds groups g and g + 4 of rows 0-3 (u[g + 4]:
        // rows 4-7), and the same of rows 8-15 in the high half.
        let t = |i: usize, hi: bool| {
            if hi {
                _mm512_unpackhi_epi32(r[i], r[i + 1])
            } else {
                _mm512_unpacklo_epi32(r[i], r[i + 1])
            }
        };
        let (t0, t1, t2, t3) = (t(0, false), t(0, true), t(2, false), t(2, true));
        let (t4, t5, t6, t7) = (t(4, false), t(4, true), t(6, false), t(6, true));
        let u = [
            _mm512_unpacklo_epi64(t0, t2),
            _mm512_unpackhi_epi64(t0, t2),
            _mm512_unpacklo_epi64(t1, t3),
            _mm512_unpackhi_epi64(t1, t3),
            _mm512_unpacklo_epi64(t4, t6),
            _mm512_unpackhi_epi64(t4, t6),
            _mm512_unpacklo_epi64(t5, t7),
            _mm512_unpackhi_epi64(t5, t7),
        ];
        let out = lines.as_mut_ptr().add(b * GROUPS);
        for g in 0..4 {
            let first = _mm512_permutex2var_epi64(u[g], low, u[g + 4]);
            let second = _mm512_permutex2var_epi64(u[g], high, u[g + 4]);
            _mm512_store_si512(out.add(g).cast(), _mm512_xor_si512(first, flip));
            _mm512_store_si512(out.add(g + 4).cast(), _mm512_xor_si512(second, flip));
        }
        // Each row's scale is the first two bytes of its block (sixteen scalar copies: a
        // gather is several times slower on Zen 4).
        for (lane, scale) in scales[b * TILE..(b + 1) * TILE].iter_mut().enumerate() {
            *scale = block.add(lane * row_bytes).cast::<f16>().read_unaligned();
        }
    }
}

/// How far ahead of the row kernel's reads (bytes) the next cache lines are asked for: rows
/// are read in memory order, one stream, and this keeps a few hundred nanoseconds of it in
/// flight beyond what the hardware prefetcher does alone.
const PREFETCH: usize = 2048;

/// One stored weight row dotted with one quantized activation row.
fn row_dot(row: &[u8], x: &XRow) -> f32 {
    let blocks = row.len() / BLOCK_BYTES;
    assert!(
        row.len() == blocks * BLOCK_BYTES
            && x.scales.len() == blocks
            && x.quants.len() == blocks * BLOCK
    );
    // SAFETY: a Q8Matrix exists only where runs_here found AVX2, FMA and AVX-512 F, VL and
    // VNNI, and the assertion above keeps every read inside the slices.
    unsafe { row_dot_vnni(row, x) }
}

/// As llama.cpp's q8_0 dot product: per block, `|w|` times `x` with `w`'s signs (exactly
/// `w·x`: the activations never hold -128) into eight i32 lanes by `vpdpbusd`, scaled in
/// f32 and summed once at the end. The weights' scales are widened 16 blocks at a time;
/// four accumulators, a block each in turn, hide the FMA's latency.
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
unsafe fn row_dot_vnni(row: &[u8], x: &XRow) -> f32 {
    use std::arch::x86_64::*;
    let blocks = x.scales.len();
    let base = row.as_ptr();
    let block = |b: usize, scale: f32, acc: __m256| {
        let w = _mm256_loadu_si256(base.add(b * BLOCK_BYTES + 2).cast());
        let xq = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast());
        let magnitude_times_signed = _mm256_dpbusd_epi32(
            _mm256_setzero_si256(),
            _mm256_abs_epi8(w),
            _mm256_sign_epi8(xq, w),
        );
        let product = _mm256_cvtepi32_ps(magnitude_times_signed);
        _mm256_fmadd_ps(product, _mm256_set1_ps(scale), acc)
    };
    let mut acc = [_mm256_setzero_ps(); 4];
    let whole = blocks / 16 * 16;
    let mut scales = [0f32; 16];
    for b in (0..whole).step_by(16) {
        // Sixteen scalar loads: a gather of the same is several times slower on Zen 4.
        let words: [u16; 16] = std::array::from_fn(|i| {
            base.add((b + i) * BLOCK_BYTES)
                .cast::<u16>()
                .read_unaligned()
        });
        let weights = _mm512_cvtph_ps(_mm256_loadu_si256(words.as_ptr().cast()));
        let activations = _mm512_loadu_ps(x.scales.as_ptr().add(b));
        _mm512_storeu_ps(scales.as_mut_ptr(), _mm512_mul_ps(weights, activations));
        for i in (0..16).step_by(4) {
            // Four blocks are 136 bytes: three lines. A prefetch past the matrix's end
            // is harmless (it never faults), hence the wrapping address.
            let ahead = base.wrapping_add((b + i) * BLOCK_BYTES + PREFETCH);
            for line in 0..3 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64).cast());
            }
            for k in 0..4 {
                acc[k] = block(b + i + k, scales[i + k], acc[k]);
            }
        }
    }
    for b in whole..blocks {
        let at = b * BLOCK_BYTES;
        let scale = f16::from_le_bytes([row[at], row[at + 1]]).to_f32() * x.scales[b];
        acc[0] = block(b, scale, acc[0]);
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
    let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
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
    // SAFETY: a Q8Matrix exists only where runs_here found AVX-512 F and VNNI, and the
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector quantization gives `quantize_block`'s scales and quants, except a quant
    /// one apart where the value falls exactly halfway (halves to even there, away from zero
    /// in the plain form), and the offsets its quants sum to.
    #[test]
    fn vector_quantization_is_the_plain_one() {
        if !Q8Matrix::runs_here() {
            return;
        }
        let mut x: Vec<f32> = (0..7 * BLOCK)
            .map(|i| {
                ((i * 7919 % 1000) as f32 / 37.0 - 13.0) * if i % 50 == 0 { 30.0 } else { 1.0 }
            })
            .collect();
        // A block of zeros, one of a single value, and one whose scale is 1 holding ties.
        x[BLOCK..2 * BLOCK].fill(0.0);
        x[2 * BLOCK..3 * BLOCK].fill(-2.0);
        x[3 * BLOCK..4 * BLOCK].fill(1.0);
        x[3 * BLOCK] = 127.0;
        x[3 * BLOCK + 1] = 63.5;
        x[3 * BLOCK + 2] = -2.5;
        let got = Q8Rows::new(&x);
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let (scale, quants) = super::super::quantize_block(block);
            assert_eq!(got.scales[b], scale);
            let inverse = if scale != 0.0 {
                127.0 / block.iter().fold(0f32, |m, v| m.max(v.abs()))
            } else {
                0.0
            };
            for (i, (&g, &w)) in got.quants[b * BLOCK..][..BLOCK]
                .iter()
                .zip(&quants)
                .enumerate()
            {
                let tie = (block[i] * inverse).fract().abs() == 0.5;
                assert!(
                    g == w || (tie && (g as i32 - w as i32).abs() == 1),
                    "block {b}, {i}: {g} vs {w}"
                );
            }
            let sum: i32 = got.quants[b * BLOCK..][..BLOCK]
                .iter()
                .map(|&q| q as i32)
                .sum();
            assert_eq!(got.offsets[b], 128 * sum);
        }
        assert_eq!(&got.quants[3 * BLOCK..3 * BLOCK + 3], &[127, 64, -2]);
    }

    /// The vector transposition gives the plain one's lines and scales, byte for byte, on
    /// blocks whose every byte differs (so a lane or group out of place shows).
    #[test]
    fn vector_transposition_is_the_plain_one() {
        if !Q8Matrix::runs_here() {
            return;
        }
        let per_row = 5;
        let stored: Vec<u8> = (0..TILE * per_row * BLOCK_BYTES)
            .map(|i| (i * 131 % 251) as u8)
            .collect();
        let mut want = (
            vec![Line([0; 64]); per_row * GROUPS],
            vec![f16::ZERO; per_row * TILE],
        );
        transpose_plain(&stored, per_row, &mut want.0, &mut want.1);
        let mut got = (
            vec![Line([1; 64]); per_row * GROUPS],
            vec![f16::ONE; per_row * TILE],
        );
        // SAFETY: runs_here was checked above.
        unsafe { transpose_avx512(&stored, per_row, &mut got.0, &mut got.1) };
        for (g, w) in got.0.iter().zip(&want.0) {
            assert_eq!(g.0, w.0);
        }
        let bits = |s: &[f16]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.1), bits(&want.1));
    }
}
