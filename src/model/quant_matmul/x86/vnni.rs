//! The AVX-512 VNNI kernels.
//!
//! How, as llama.cpp's and candle's VNNI kernels do: weights are multiplied as unsigned
//! bytes, offset (q8_0's by 128; q4_0's nibbles are stored plus 8 and widened as they are),
//! and the offset comes back out as one number per activation block: `Σ(w+128)·x = Σw·x +
//! 128·Σx`. A prefill multiplies tiles of 16 rows, so one `vpdpbusd` multiplies four bytes
//! of an activation block into all 16 rows at once: each tile is transposed into that form
//! in registers as it is read (16 rows' blocks in, lines of 4
//! quants × 16 rows out) into a per-thread scratch that stays in L2, then every activation
//! row is multiplied against the scratch, so the transposition is paid once per tile and
//! each weight is read from memory once. A decode step has one activation row, which would
//! not pay for the transposition: there each weight row is dotted straight from its blocks,
//! in memory order, as llama.cpp's q8_0 dot product does.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{horizontal_sum, prefetch_four_blocks, tile_scales, Format};
use crate::model::quant_matmul::blocks::row_bytes;
use crate::model::quant_matmul::matrix::{row_fits, Product, XRow, TILE};
use crate::model::quant_matmul::BLOCK;

/// Groups of 4 columns per block: one cache line of a tile (4 quants of each of 16 rows).
const GROUPS: usize = BLOCK / 4;

/// Four weights of each of a tile's 16 rows, offset: what one `vpdpbusd` reads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// One tile transposed for the kernel: per block, per group of 4 columns, one line, and per
/// block the 16 rows' scales and mins (padding rows: 0, adding nothing), and where the
/// format has them, per block and half the rows' scales times their scale of that half.
#[derive(Default)]
struct Scratch {
    quants: Vec<Line>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    pairs: Vec<f32>,
}

thread_local! {
    /// Each pool thread's tile, reused product after product so a decode step allocates
    /// nothing; one tile of Phi-2's widest matrix is 200 KB, which stays in L2.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Unit `t` of a decode step (fewer than four activation rows): each weight row dotted
/// straight from its blocks, rows in memory order (one stream for the prefetchers); a tile's
/// transposition would cost more than the single activation row it serves.
pub(super) fn decode_unit<F: Format>(p: &Product, t: usize) {
    let rows = p.unit_rows(t);
    let weights = p.weights(rows.clone());
    for (r, row) in rows.zip(weights.chunks_exact(p.row_bytes)) {
        for j in 0..p.activation_rows {
            // SAFETY: row `r` is this unit's.
            unsafe { p.write(j, r, &[row_dot::<F>(row, &p.x_row(j))]) };
        }
    }
}

/// Unit `t` of a prefill: one tile against every activation row; its weights are read from
/// memory once, transposed once, then read from the scratch.
pub(super) fn prefill_unit<F: Format>(p: &Product, t: usize) {
    SCRATCH.with_borrow_mut(|scratch| {
        let rows = p.unit_rows(t);
        let tile = scratch.fill::<F>(p.weights(rows.clone()), p.blocks_per_row);
        let (four, one) = (
            |xs: &[XRow; 4]| tile_dots::<F, 4>(tile, xs),
            |x: &[XRow; 1]| tile_dots::<F, 1>(tile, x),
        );
        // SAFETY: the tile's rows are this unit's.
        unsafe { p.in_fours(rows, four, one) };
    })
}

impl Scratch {
    /// Transposes one tile's rows (`stored`: 1 to 16 whole rows of `per_row` blocks) into
    /// the scratch, and lends it.
    fn fill<F: Format>(&mut self, stored: &[u8], per_row: usize) -> Tile<'_> {
        let (lines, scales) = (per_row * GROUPS, per_row * TILE);
        // Grown to the widest matrix once, then only sliced: no fill on every product.
        if self.quants.len() < lines {
            self.quants.resize(lines, Line([0; 64]));
        }
        if self.scales.len() < scales {
            self.scales.resize(scales, 0.0);
            self.mins.resize(scales, 0.0);
        }
        let pairs = if F::PAIR_SCALES { 2 * scales } else { 0 };
        if self.pairs.len() < pairs {
            self.pairs.resize(pairs, 0.0);
        }
        let (quants, scales, mins, pairs) = (
            &mut self.quants[..lines],
            &mut self.scales[..scales],
            &mut self.mins[..scales],
            &mut self.pairs[..pairs],
        );
        // SAFETY: a Matrix with this kernel exists only where the CPU has AVX-512 (and
        // AVX2 and F16C); the lengths above are the ones the transpositions read and write.
        unsafe {
            if stored.len() == TILE * row_bytes::<F>(per_row) {
                transpose_avx512::<F>(stored, per_row, quants);
                tile_scales::<F>(stored, per_row, TILE, scales, mins);
            } else {
                transpose_plain::<F>(stored, per_row, quants, scales, mins);
            }
            if F::PAIR_SCALES {
                half_scales::<F>(stored, per_row, pairs);
            }
        }
        Tile {
            quants,
            scales,
            mins,
            pairs,
        }
    }
}

/// Per block and half, the tile's rows' scales times their scales of that half (padding
/// rows: 0).
///
/// # Safety
/// As `transpose_plain`'s, and `pairs` holds `2 · TILE` values per block.
unsafe fn half_scales<F: Format>(stored: &[u8], per_row: usize, pairs: &mut [f32]) {
    let row_bytes = row_bytes::<F>(per_row);
    let lanes = stored.len() / row_bytes;
    assert!(stored.len() == lanes * row_bytes && pairs.len() == 2 * TILE * per_row);
    for b in 0..per_row {
        for lane in 0..TILE {
            let both = if lane < lanes {
                let row = stored[lane * row_bytes..].as_ptr();
                let scale = F::scale(row, b).0;
                F::pair_scales(row, b).map(|s| scale * s as f32)
            } else {
                [0.0; 2]
            };
            for (half, s) in both.into_iter().enumerate() {
                pairs[(2 * b + half) * TILE + lane] = s;
            }
        }
    }
}

/// The tile transposition a quant at a time: for a last tile of fewer than 16 rows, and the
/// reference the vector form is tested against.
///
/// # Safety
/// The CPU has AVX2 and F16C (for `F`'s methods), `stored` holds whole rows of `per_row`
/// blocks, and `lines`, `scales` and `mins` one block's worth per block.
unsafe fn transpose_plain<F: Format>(
    stored: &[u8],
    per_row: usize,
    lines: &mut [Line],
    scales: &mut [f32],
    mins: &mut [f32],
) {
    let row_bytes = row_bytes::<F>(per_row);
    let lanes = stored.len() / row_bytes;
    for b in 0..per_row {
        for lane in 0..TILE {
            let (scale, quants) = if lane < lanes {
                let row = stored[lane * row_bytes..].as_ptr();
                let mut quants = [0u8; BLOCK];
                _mm256_storeu_si256(quants.as_mut_ptr().cast(), F::unsigned(row, b));
                (F::scale(row, b), quants)
            } else {
                ((0.0, 0.0), [0; BLOCK])
            };
            (scales[b * TILE + lane], mins[b * TILE + lane]) = scale;
            for (g, four) in quants.chunks_exact(4).enumerate() {
                for (i, q) in four.iter().enumerate() {
                    lines[b * GROUPS + g].0[lane * 4 + i] = *q;
                }
            }
        }
    }
}

/// The tile's quants transposed 16 rows at a time: per block, each row's 32 weights are one
/// register's half, two rows share a register (rows k and k + 8), and an 8 × 8
/// transposition of 4-byte groups in each half turns them into the block's eight lines.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn transpose_avx512<F: Format>(stored: &[u8], per_row: usize, lines: &mut [Line]) {
    let row_bytes = row_bytes::<F>(per_row);
    assert!(stored.len() == TILE * row_bytes && lines.len() == per_row * GROUPS);
    let base = stored.as_ptr();
    // Lane pairs of two registers, [first low 128 bits of each half, second's] and the
    // same of the high 128 bits: the transposition's last step.
    let low = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    let high = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for b in 0..per_row {
        let quants = |r: usize| F::unsigned(base.add(r * row_bytes), b);
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
            _mm512_store_si512(out.add(g).cast(), first);
            _mm512_store_si512(out.add(g + 4).cast(), second);
        }
    }
}

/// One stored weight row dotted with one quantized activation row.
fn row_dot<F: Format>(row: &[u8], x: &XRow) -> f32 {
    assert!(
        row_fits::<F>(row, std::slice::from_ref(x))
            && (!F::PAIR_SCALES || x.lane_offsets.len() == 8 * x.scales.len())
    );
    // SAFETY: a Matrix with this kernel exists only where the CPU has AVX2, FMA, F16C and
    // AVX-512 F, VL and VNNI, and the assertion above keeps every read inside the slices.
    unsafe { row_dot_vnni::<F>(row, x) }
}

/// Per pair of blocks, the offset weights times `x` into sixteen i32 lanes (eight a block) by
/// one 512-bit `vpdpbusd`, starting from minus the offset's share so each block's sum is
/// exact; scaled in f32 and summed once at the end. (llama.cpp's dot products take `|w|`
/// times `x` with `w`'s signs instead: as many instructions for q8_0, three more per block
/// for q4_0.) The weights' scales (and mins, whose share is taken off per eight blocks) are
/// widened eight blocks at a time and spread over a pair's halves by one permutation; four
/// accumulators, a pair each in turn, hide the FMA's latency. With a scale per 16 weights
/// (q6_K), each lane starts from minus its own offset share, and each four lanes take their
/// own scale. (A block a 256-bit register, as the AVX2 kernels go, left q4_K and q6_K short of
/// the memory's speed on two cores, 27.9 and 26.8 GB/s against q4_0's 32.6: the instructions
/// per weight, not the reads, were the limit.)
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn row_dot_vnni<F: Format>(row: &[u8], x: &XRow) -> f32 {
    let blocks = x.scales.len();
    let base = row.as_ptr();
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut mins = _mm256_setzero_ps();
    for eight in 0..blocks / 8 {
        // As a multiple of 8 the compiler sees, so each pair's place in a super-block is known.
        let b = 8 * eight;
        let (weights, weight_mins) = F::eight_scales(base, b);
        let activations = _mm256_loadu_ps(x.scales.as_ptr().add(b));
        let scales = _mm512_castps256_ps512(_mm256_mul_ps(weights, activations));
        let sums = _mm256_loadu_si256(x.sums.as_ptr().add(b).cast());
        if F::MINS {
            let values = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), activations);
            mins = _mm256_fmadd_ps(weight_mins, values, mins);
        }
        let shares = _mm256_mullo_epi32(sums, _mm256_set1_epi32(-F::OFFSET));
        // With a scale per 16 weights, each 16's whole scale: its block's times its own.
        let sixteens = if F::PAIR_SCALES {
            let spread = _mm512_permutexvar_ps(lanes(|l| l as i32 / 2), scales);
            _mm512_mul_ps(F::sixteen_scales(base, b), spread)
        } else {
            _mm512_setzero_ps()
        };
        for (k, acc) in acc.iter_mut().enumerate() {
            if k % 2 == 0 {
                prefetch_four_blocks::<F>(base, b + 2 * k);
            }
            let pair = b + 2 * k;
            // Lanes 0-7 take the pair's first block's, 8-15 its second's.
            let halves = lanes(|l| (2 * k + l / 8) as i32);
            let start = if F::PAIR_SCALES {
                _mm512_loadu_si512(x.lane_offsets.as_ptr().add(pair * 8).cast())
            } else if F::OFFSET != 0 {
                _mm512_maskz_permutexvar_epi32(0x0101, halves, _mm512_castsi256_si512(shares))
            } else {
                _mm512_setzero_si512()
            };
            let xq = _mm512_loadu_si512(x.quants.as_ptr().add(pair * BLOCK).cast());
            let product = _mm512_dpbusd_epi32(start, F::unsigned_pair(base, pair), xq);
            let scale = if F::PAIR_SCALES {
                // Each four lanes (16 weights) take their 16's: the pair's are 4k to 4k + 3.
                _mm512_permutexvar_ps(lanes(|l| (4 * k + l / 4) as i32), sixteens)
            } else {
                _mm512_permutexvar_ps(halves, scales)
            };
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(product), scale, *acc);
        }
    }
    // Only formats of one block at a time leave blocks over, and the tail below takes none
    // of their mins or pair scales: a format with either would be summed wrong, so it does
    // not build.
    const { assert!(F::BLOCKS > 1 || !(F::MINS || F::PAIR_SCALES)) };
    let mut tail = _mm256_setzero_ps();
    for b in blocks / 8 * 8..blocks {
        let (scale, _) = F::scale(base, b);
        let xq = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast());
        let share = -F::OFFSET * x.sums.get_unchecked(b);
        let start = _mm256_zextsi128_si256(_mm_cvtsi32_si128(share));
        let product = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, F::unsigned(base, b), xq));
        tail = _mm256_fmadd_ps(product, _mm256_set1_ps(scale * x.scales[b]), tail);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum) + horizontal_sum(tail) - horizontal_sum(mins)
}

/// A register of sixteen i32 lanes, lane `l` holding `f(l)` (constants, once the loop that
/// asks is unrolled).
#[inline(always)]
unsafe fn lanes(f: impl Fn(usize) -> i32) -> __m512i {
    let values: [i32; 16] = std::array::from_fn(f);
    _mm512_loadu_si512(values.as_ptr().cast())
}

/// One tile's blocks, for every block of its rows.
#[derive(Clone, Copy)]
struct Tile<'a> {
    quants: &'a [Line],
    scales: &'a [f32],
    mins: &'a [f32],
    pairs: &'a [f32],
}

/// The tile's 16 rows dotted with each of `N` activation rows.
fn tile_dots<F: Format, const N: usize>(tile: Tile, xs: &[XRow; N]) -> [[f32; TILE]; N] {
    let blocks = tile.scales.len() / TILE;
    assert!(
        tile.quants.len() == blocks * GROUPS
            && tile.mins.len() == tile.scales.len()
            && tile.pairs.len()
                == if F::PAIR_SCALES {
                    2 * tile.scales.len()
                } else {
                    0
                }
            && xs.iter().all(|x| x.has(blocks))
            && xs
                .iter()
                .all(|x| !F::PAIR_SCALES || x.lane_offsets.len() == 8 * blocks)
    );
    // SAFETY: a Matrix with this kernel exists only where the CPU has AVX-512 F and VNNI, and
    // the assertion above keeps every read inside the slices.
    unsafe { tile_dots_vnni::<F, N>(tile, xs) }
}

#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_dots_vnni<F: Format, const N: usize>(
    tile: Tile,
    xs: &[XRow; N],
) -> [[f32; TILE]; N] {
    let mut acc = [_mm512_setzero_ps(); N];
    let lines = tile.quants.as_ptr();
    for b in 0..tile.scales.len() / TILE {
        // Two chains per activation row, even and odd groups (one row alone would otherwise
        // wait out vpdpbusd's latency eight times per block), or with a scale per 16 weights,
        // the block's halves.
        let mut products = [[_mm512_setzero_si512(); 2]; N];
        for g in 0..GROUPS {
            let w = _mm512_load_si512(lines.add(b * GROUPS + g).cast());
            let chain = if F::PAIR_SCALES { g / 4 } else { g % 2 };
            for n in 0..N {
                let four = xs[n].quants.as_ptr().add(b * BLOCK + g * 4).cast::<i32>();
                let x = _mm512_set1_epi32(four.read_unaligned());
                products[n][chain] = _mm512_dpbusd_epi32(products[n][chain], w, x);
            }
        }
        if F::PAIR_SCALES {
            for n in 0..N {
                let x_scale = _mm512_set1_ps(*xs[n].scales.get_unchecked(b));
                for (half, product) in products[n].into_iter().enumerate() {
                    let lanes = xs[n].lane_offsets.get_unchecked(b * 8 + 4 * half..);
                    let offset = _mm512_set1_epi32(lanes[..4].iter().sum());
                    let exact = _mm512_cvtepi32_ps(_mm512_add_epi32(product, offset));
                    let pairs = tile.pairs.as_ptr().add((2 * b + half) * TILE);
                    let scale = _mm512_mul_ps(_mm512_loadu_ps(pairs), x_scale);
                    acc[n] = _mm512_fmadd_ps(exact, scale, acc[n]);
                }
            }
            continue;
        }
        let scales = _mm512_loadu_ps(tile.scales.as_ptr().add(b * TILE));
        let mins = _mm512_loadu_ps(tile.mins.as_ptr().add(b * TILE));
        for n in 0..N {
            let [even, odd] = products[n];
            let offset = _mm512_set1_epi32(F::OFFSET * *xs[n].sums.get_unchecked(b));
            let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(even, odd), offset));
            let scale = _mm512_mul_ps(scales, _mm512_set1_ps(*xs[n].scales.get_unchecked(b)));
            acc[n] = _mm512_fmadd_ps(exact, scale, acc[n]);
            if F::MINS {
                acc[n] = _mm512_fnmadd_ps(mins, _mm512_set1_ps(xs[n].block_sum(b)), acc[n]);
            }
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
    use crate::model::quant_matmul::blocks::{Q4K, Q4_0, Q8_0};
    use crate::model::quant_matmul::x86::Kernel;

    /// The vector transposition gives the plain one's lines and scales, byte for byte, on
    /// blocks whose every byte differs (so a lane or group out of place shows), in each
    /// format.
    #[test]
    fn vector_transposition_is_the_plain_one() {
        if !Kernel::all_here().contains(&Kernel::Vnni) {
            return;
        }
        // SAFETY: the CPU's kernels were checked above.
        unsafe {
            same_transpositions::<Q8_0>();
            same_transpositions::<Q4_0>();
            same_transpositions::<Q4K>();
        }
    }

    unsafe fn same_transpositions<F: Format>() {
        let per_row = 2 * F::BLOCKS + if F::BLOCKS == 1 { 5 } else { 0 };
        let stored: Vec<u8> = (0..TILE * row_bytes::<F>(per_row))
            .map(|i| (i * 131 % 251) as u8)
            .collect();
        let blocks = per_row * TILE;
        let mut want = (
            vec![Line([0; 64]); per_row * GROUPS],
            vec![0f32; blocks],
            vec![0f32; blocks],
        );
        transpose_plain::<F>(&stored, per_row, &mut want.0, &mut want.1, &mut want.2);
        let mut got = (
            vec![Line([1; 64]); per_row * GROUPS],
            vec![1f32; blocks],
            vec![1f32; blocks],
        );
        transpose_avx512::<F>(&stored, per_row, &mut got.0);
        tile_scales::<F>(&stored, per_row, TILE, &mut got.1, &mut got.2);
        for (g, w) in got.0.iter().zip(&want.0) {
            assert_eq!(g.0, w.0, "{:?}", F::DTYPE);
        }
        let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.1), bits(&want.1), "{:?} scales", F::DTYPE);
        assert_eq!(bits(&got.2), bits(&want.2), "{:?} mins", F::DTYPE);
    }
}
