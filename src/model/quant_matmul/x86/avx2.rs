//! The AVX2 kernels, for x86-64 CPUs without AVX-512 VNNI.
//!
//! Decode, as llama.cpp's AVX2 q8_0 dot product: per block, `|w|` times `x` with `w`'s signs
//! by `vpmaddubsw` (pairs of products into i16: at most 2·128·127, which never saturates) and
//! `vpmaddwd` (into i32), scaled in f32, each weight row read once, in memory order. q4_0's
//! nibbles need no sign trick (see below): they are multiplied unsigned, and the offset's
//! share taken off per eight blocks.
//!
//! Prefill (four activation rows or more), as the VNNI kernel's: the weights of 8 rows are
//! transposed in registers into a per-thread scratch, lines of 4 weights × 8 rows, so one
//! broadcast of 4 activation bytes meets all 8 rows, and the transposition (and q4_0's
//! widening) is paid once per tile rather than once per activation row. Where the format's
//! weights are small enough (q4_0's nibbles, 0 to 15), they stay unsigned: `vpmaddubsw`
//! multiplies them by `x` with no sign trick, a block's 8 lines add up in i16 without
//! overflowing, and one `vpmaddwd` per block widens them, about half the instructions per
//! product of the row kernel. q8_0's take the sign trick per line. (Four weight rows against
//! two activation rows in the row kernel, to read the activations from L2 less often, had
//! been no faster: the instructions per product bound it, not the loads.)

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{horizontal_sum, prefetch_four_blocks, tile_scales, Format};
use crate::model::quant_matmul::blocks::row_bytes;
use crate::model::quant_matmul::matrix::{row_fits, Product, XRow};
use crate::model::quant_matmul::BLOCK;

/// Weight rows per prefill tile: one register of i32 lanes.
const ROWS: usize = 8;
/// Groups of 4 columns per block: the lines of a block.
const GROUPS: usize = BLOCK / 4;

/// Four weights of each of a tile's 8 rows: what one `vpmaddubsw` reads.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Line([u8; 32]);

/// One tile transposed: per block, its 8 lines, the 8 rows' scales and mins, and where the
/// format has them, its two lines of the rows' scales per 16 weights (`pair_scales`).
#[derive(Default)]
struct Scratch {
    lines: Vec<Line>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    pairs: Vec<Line>,
}

thread_local! {
    /// Each pool thread's tile, reused product after product; one tile of Phi-2's widest
    /// matrix is 92 KB, which stays in L2.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Whether `F`'s weights are multiplied unsigned: where its unsigned weights times
/// activations (at most 127 in magnitude) stay within i16 summed over a whole block's lines
/// in pairs, as `vpmaddubsw` leaves them, and one scale covers the block (with a scale per
/// 16 weights the offset's share would be needed per 16 activations).
const fn unsigned_weights<F: Format>() -> bool {
    (GROUPS as i32) * 2 * F::UNSIGNED_MAX * 127 <= i16::MAX as i32 && !F::PAIR_SCALES
}

/// Unit `t`: its weight rows against every activation row; tiles of 8 rows where there are
/// four activation rows or more, the row kernel otherwise (and for a last tile of fewer
/// than 8 rows).
pub(super) fn unit<F: Format>(p: &Product, t: usize) {
    let rows = p.unit_rows(t);
    let m = p.activation_rows;
    let tiled = if m >= 4 { rows.len() / ROWS * ROWS } else { 0 };
    for first in (rows.start..rows.start + tiled).step_by(ROWS) {
        tile::<F>(p, first);
    }
    let rest = rows.start + tiled..rows.end;
    let weights = p.weights(rest.clone());
    for (r, row) in rest.zip(weights.chunks_exact(p.row_bytes)) {
        let four = |xs: &[XRow; 4]| dots::<F, 4>(row, xs).map(|v| [v]);
        // SAFETY: row `r` is this unit's.
        unsafe { p.in_fours(r..r + 1, four, |x| [[dots::<F, 1>(row, x)[0]]]) };
    }
}

/// Weight rows `first..first + 8` (the calling unit's) against every activation row.
fn tile<F: Format>(p: &Product, first: usize) {
    SCRATCH.with_borrow_mut(|scratch| {
        let per_row = p.blocks_per_row;
        let (lines, scales) = (per_row * GROUPS, per_row * ROWS);
        // Grown to the widest matrix once, then only sliced.
        if scratch.lines.len() < lines {
            scratch.lines.resize(lines, Line([0; 32]));
        }
        if scratch.scales.len() < scales {
            scratch.scales.resize(scales, 0.0);
            scratch.mins.resize(scales, 0.0);
        }
        let pairs = if F::PAIR_SCALES { 2 * per_row } else { 0 };
        if scratch.pairs.len() < pairs {
            scratch.pairs.resize(pairs, Line([0; 32]));
        }
        let (lines, scales, mins, pairs) = (
            &mut scratch.lines[..lines],
            &mut scratch.scales[..scales],
            &mut scratch.mins[..scales],
            &mut scratch.pairs[..pairs],
        );
        let stored = p.weights(first..first + ROWS);
        // SAFETY: a Matrix with this kernel exists only where the CPU has AVX2 and F16C; the
        // lengths are the ones transpose and tile_scales read and write.
        unsafe {
            transpose::<F>(stored, per_row, lines);
            tile_scales::<F>(stored, per_row, ROWS, scales, mins);
            if F::PAIR_SCALES {
                pair_lines::<F>(stored, per_row, pairs);
            }
        }
        let tile = Tile {
            lines,
            scales,
            mins,
            pairs,
        };
        let (four, one) = (
            |xs: &[XRow; 4]| tile_dots::<F, 4>(tile, xs),
            |x: &[XRow; 1]| tile_dots::<F, 1>(tile, x),
        );
        // SAFETY: the tile's rows are this unit's.
        unsafe { p.in_fours(first..first + ROWS, four, one) };
    })
}

/// 8 whole rows of `per_row` blocks (`stored`) into lines: per block, each row's 32
/// weights are one register (unsigned where `unsigned_weights`, signed otherwise), and an 8 × 8
/// transposition of 4-byte groups turns them into the block's 8 lines.
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
unsafe fn transpose<F: Format>(stored: &[u8], per_row: usize, lines: &mut [Line]) {
    let row_bytes = row_bytes::<F>(per_row);
    assert!(stored.len() == ROWS * row_bytes && lines.len() == per_row * GROUPS);
    let base = stored.as_ptr();
    for b in 0..per_row {
        let r: [__m256i; ROWS] = std::array::from_fn(|k| {
            let row = base.add(k * row_bytes);
            if unsigned_weights::<F>() {
                F::unsigned(row, b)
            } else {
                F::signed(row, b)
            }
        });
        // Pairs of rows, then fours (groups g and g + 4 of rows 0-3 in u[g], of rows 4-7 in
        // u[g + 4]), then the halves of each row four apart.
        let t = |k: usize, hi: bool| {
            if hi {
                _mm256_unpackhi_epi32(r[k], r[k + 1])
            } else {
                _mm256_unpacklo_epi32(r[k], r[k + 1])
            }
        };
        let (t0, t1, t2, t3) = (t(0, false), t(0, true), t(2, false), t(2, true));
        let (t4, t5, t6, t7) = (t(4, false), t(4, true), t(6, false), t(6, true));
        let u = [
            _mm256_unpacklo_epi64(t0, t2),
            _mm256_unpackhi_epi64(t0, t2),
            _mm256_unpacklo_epi64(t1, t3),
            _mm256_unpackhi_epi64(t1, t3),
            _mm256_unpacklo_epi64(t4, t6),
            _mm256_unpackhi_epi64(t4, t6),
            _mm256_unpacklo_epi64(t5, t7),
            _mm256_unpackhi_epi64(t5, t7),
        ];
        let out = lines.as_mut_ptr().add(b * GROUPS);
        for g in 0..4 {
            let low = _mm256_permute2x128_si256::<0x20>(u[g], u[g + 4]);
            let high = _mm256_permute2x128_si256::<0x31>(u[g], u[g + 4]);
            _mm256_store_si256(out.add(g).cast(), low);
            _mm256_store_si256(out.add(g + 4).cast(), high);
        }
    }
}

/// Per block and half, the 8 rows' scales of that half as `vpmaddwd` multiplies a line's
/// pair sums by them: row `r`'s in i16 lanes `2r` and `2r + 1`.
///
/// # Safety
/// `stored` holds 8 whole rows of `per_row` blocks, and `pairs` two lines per block.
unsafe fn pair_lines<F: Format>(stored: &[u8], per_row: usize, pairs: &mut [Line]) {
    let row_bytes = row_bytes::<F>(per_row);
    assert!(stored.len() == ROWS * row_bytes && pairs.len() == 2 * per_row);
    for b in 0..per_row {
        let mut halves = [[0i16; 2 * ROWS]; 2];
        for r in 0..ROWS {
            let scales = F::pair_scales(stored.as_ptr().add(r * row_bytes), b);
            for (half, scale) in halves.iter_mut().zip(scales) {
                half[2 * r..2 * r + 2].fill(scale);
            }
        }
        for (line, half) in pairs[2 * b..2 * b + 2].iter_mut().zip(halves) {
            line.0 = bytemuck::cast(half);
        }
    }
}

/// One tile's blocks, for every block of its rows.
#[derive(Clone, Copy)]
struct Tile<'a> {
    lines: &'a [Line],
    scales: &'a [f32],
    mins: &'a [f32],
    pairs: &'a [Line],
}

/// The tile's 8 rows dotted with each of `N` activation rows.
fn tile_dots<F: Format, const N: usize>(tile: Tile, xs: &[XRow; N]) -> [[f32; ROWS]; N] {
    let blocks = tile.scales.len() / ROWS;
    assert!(
        tile.lines.len() == blocks * GROUPS
            && tile.mins.len() == tile.scales.len()
            && tile.pairs.len() == if F::PAIR_SCALES { 2 * blocks } else { 0 }
            && xs.iter().all(|x| x.has(blocks))
    );
    // SAFETY: a Matrix with this kernel exists only where the CPU has AVX2 and FMA, and the
    // assertion above keeps every read inside the slices.
    unsafe { tile_dots_avx2::<F, N>(tile, xs) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_dots_avx2<F: Format, const N: usize>(
    tile: Tile,
    xs: &[XRow; N],
) -> [[f32; ROWS]; N] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let lines = tile.lines.as_ptr();
    for b in 0..tile.scales.len() / ROWS {
        // Four activation bytes of row `n`, group `g`, in every lane.
        let x = |n: usize, g: usize| {
            let four = xs[n].quants.as_ptr().add(b * BLOCK + g * 4).cast::<i32>();
            _mm256_set1_epi32(four.read_unaligned())
        };
        let mut exact = [_mm256_setzero_si256(); N];
        if unsigned_weights::<F>() {
            let mut pairs = [_mm256_setzero_si256(); N];
            for g in 0..GROUPS {
                let w = _mm256_load_si256(lines.add(b * GROUPS + g).cast());
                for (n, pairs) in pairs.iter_mut().enumerate() {
                    *pairs = _mm256_add_epi16(*pairs, _mm256_maddubs_epi16(w, x(n, g)));
                }
            }
            for n in 0..N {
                let offset = _mm256_set1_epi32(F::OFFSET * *xs[n].sums.get_unchecked(b));
                exact[n] = _mm256_sub_epi32(_mm256_madd_epi16(pairs[n], ones), offset);
            }
        } else {
            for g in 0..GROUPS {
                let w = _mm256_load_si256(lines.add(b * GROUPS + g).cast());
                let magnitude = _mm256_sign_epi8(w, w);
                // Groups 0-3 are the block's first 16 weights, 4-7 its last.
                let multiplier = if F::PAIR_SCALES {
                    _mm256_load_si256(tile.pairs.as_ptr().add(2 * b + g / 4).cast())
                } else {
                    ones
                };
                for (n, exact) in exact.iter_mut().enumerate() {
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x(n, g), w));
                    *exact = _mm256_add_epi32(*exact, _mm256_madd_epi16(pairs, multiplier));
                }
            }
        }
        let scales = _mm256_loadu_ps(tile.scales.as_ptr().add(b * ROWS));
        let mins = _mm256_loadu_ps(tile.mins.as_ptr().add(b * ROWS));
        for n in 0..N {
            let scale = _mm256_mul_ps(scales, _mm256_set1_ps(*xs[n].scales.get_unchecked(b)));
            acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact[n]), scale, acc[n]);
            if F::MINS {
                acc[n] = _mm256_fnmadd_ps(mins, _mm256_set1_ps(xs[n].block_sum(b)), acc[n]);
            }
        }
    }
    acc.map(|a| {
        let mut out = [0f32; ROWS];
        _mm256_storeu_ps(out.as_mut_ptr(), a);
        out
    })
}

/// One stored weight row dotted with each of `N` quantized activation rows.
fn dots<F: Format, const N: usize>(row: &[u8], xs: &[XRow; N]) -> [f32; N] {
    assert!(row_fits::<F>(row, xs));
    // SAFETY: a Matrix with this kernel exists only where the CPU has AVX2, FMA and F16C,
    // and the assertion above keeps every read inside the slices.
    unsafe { dots_avx2::<F, N>(row, xs) }
}

/// Where `unsigned_weights`, on unsigned weights as the tiles: `vpmaddubsw` with no sign trick,
/// and what the unsigned weights carry beyond their values (the offset, `OFFSET·scale`, and
/// any min) times `Σx` per block, taken off once per eight blocks in f32 (a subtraction per
/// block would cost what the sign trick does).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2<F: Format, const N: usize>(row: &[u8], xs: &[XRow; N]) -> [f32; N] {
    let blocks = xs[0].scales.len();
    let base = row.as_ptr();
    let ones = _mm256_set1_epi16(1);
    let unsigned = unsigned_weights::<F>();
    // One activation row alone takes four accumulators, a block each in turn, to hide the
    // FMA's latency; four rows' chains interleave by themselves.
    let chains = if N == 1 { 4 } else { 1 };
    let mut acc = [[_mm256_setzero_ps(); 4]; N];
    // The offsets' and mins' share, per activation row: eight blocks a lane, then the rest.
    let mut beyond = [_mm256_setzero_ps(); N];
    let mut rest = [0f32; N];
    // Block `b` into chain `chain`, its weight scale times each activation row's in `scales`.
    let mut block = |b: usize, chain: usize, scales: [f32; N]| {
        let (w, magnitude) = if unsigned {
            (F::unsigned(base, b), _mm256_setzero_si256())
        } else {
            let w = F::signed(base, b);
            (w, _mm256_sign_epi8(w, w))
        };
        // The pair sums' i16 lanes 0-7 are the block's first 16 weights, 8-15 its last.
        let multiplier = if F::PAIR_SCALES {
            let [first, last] = F::pair_scales(base, b);
            _mm256_set_m128i(_mm_set1_epi16(last), _mm_set1_epi16(first))
        } else {
            ones
        };
        for n in 0..N {
            let x = _mm256_loadu_si256(xs[n].quants.as_ptr().add(b * BLOCK).cast());
            let pairs = if unsigned {
                _mm256_maddubs_epi16(w, x)
            } else {
                _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w))
            };
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, multiplier));
            acc[n][chain] = _mm256_fmadd_ps(sums, _mm256_set1_ps(scales[n]), acc[n][chain]);
        }
    };
    let offset = if unsigned { F::OFFSET as f32 } else { 0.0 };
    // Whether the weights carry anything beyond their values (signed q8_0 does not).
    let beyond_share = unsigned || F::MINS;
    let whole = blocks / 8 * 8;
    for b in (0..whole).step_by(8) {
        // Eight blocks' scales, weights' times activations', in one multiply per row.
        let (weight_scales, mins) = F::eight_scales(base, b);
        let extra = _mm256_fmadd_ps(_mm256_set1_ps(offset), weight_scales, mins);
        let mut scales = [[0f32; 8]; N];
        for n in 0..N {
            let x = &xs[n];
            let x_scales = _mm256_loadu_ps(x.scales.as_ptr().add(b));
            _mm256_storeu_ps(
                scales[n].as_mut_ptr(),
                _mm256_mul_ps(weight_scales, x_scales),
            );
            if beyond_share {
                let sums = _mm256_cvtepi32_ps(_mm256_loadu_si256(x.sums.as_ptr().add(b).cast()));
                beyond[n] = _mm256_fmadd_ps(extra, _mm256_mul_ps(sums, x_scales), beyond[n]);
            }
        }
        #[allow(clippy::needless_range_loop)] // `i` picks a block and each row's scale of it
        for i in 0..8 {
            if i % 4 == 0 {
                prefetch_four_blocks::<F>(base, b + i);
            }
            block(b + i, i % chains, std::array::from_fn(|n| scales[n][i]));
        }
    }
    for b in whole..blocks {
        let (weight_scale, min) = F::scale(base, b);
        block(
            b,
            0,
            std::array::from_fn(|n| weight_scale * xs[n].scales[b]),
        );
        if beyond_share {
            for n in 0..N {
                rest[n] += (offset * weight_scale + min) * xs[n].block_sum(b);
            }
        }
    }
    std::array::from_fn(|n| {
        let [a, b, c, d] = acc[n];
        let sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
        sum - horizontal_sum(beyond[n]) - rest[n]
    })
}
