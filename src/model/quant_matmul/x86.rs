//! q8_0, q4_0, q4_K and q6_K on x86-64: the file's own blocks multiplied where they lie, by
//! AVX-512 VNNI kernels (`vnni`) or, on CPUs without them, by AVX2 kernels (`avx2`: most
//! laptops' Intel CPUs, AMD before Zen 4).
//!
//! Why: candle 0.11's `QMatMul` holds a copy of every quantized matrix (on VNNI CPUs a
//! repacked one beside the original), so a q8_0 Phi-2 needed twice its file in memory and
//! loading it wrote gigabytes of fresh pages (issue #19); and its q4_0 kernels ran at half
//! llama.cpp's decode and an eighth of its prefill. Ours read the file's blocks where they
//! lie: a memory-mapped GGUF is used in place, so loading copies nothing and the first
//! product reads the weights straight from the page cache, as llama.cpp's do. (Repacking at
//! load instead wrote 2.8 GB for Phi-2, pages the kernel must zero first: about 0.75 s on two
//! cores, twice llama.cpp's whole load.)
//!
//! The kernels are written once over the block `Format`: a format says how a block's 32
//! weights come out of its bytes, as bytes in a register, and what its scale and min are;
//! everything after that is the same for every format (q6_K's second scale per 16 weights
//! aside). Each activation row is quantized once per product to q8_0 blocks, as llama.cpp
//! does for the 32-value formats, and a matrix's rows are split in units of 16 across the
//! threads the CPU kernels share.

mod avx2;
mod vnni;

use std::arch::x86_64::*;

use half::f16;

use super::blocks::{row_bytes, Layout, Q4K, Q4_0, Q6K, Q8_0};
use super::matrix::{Product, Q8Rows};
use super::BLOCK;
use crate::model::disjoint::for_each_unit;

/// How far ahead of the row kernels' reads (bytes) the next cache lines are asked for: rows
/// are read in memory order, one stream, and this keeps a few hundred nanoseconds of it in
/// flight beyond what the hardware prefetcher does alone.
const PREFETCH: usize = 2048;

/// Which instructions multiply a matrix, chosen once by what the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 F, BW, VL and VNNI (Intel's servers since Ice Lake, AMD since Zen 4).
    Vnni,
    /// AVX2, FMA and F16C (x86-64 CPUs since 2013–2015).
    Avx2,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const EVERY: [Self; 2] = [Self::Vnni, Self::Avx2];

    pub(super) fn runs_here(self) -> bool {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match self {
            Self::Vnni => {
                avx2 && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            Self::Avx2 => avx2,
        }
    }

    /// What the activations' quantization adds for `F`'s products: the lane offsets, where
    /// VNNI's kernels read a format with a scale per 16 weights.
    pub(super) fn lane_offsets<F: Format>(self) -> Option<i32> {
        (self == Self::Vnni && F::PAIR_SCALES).then_some(F::OFFSET)
    }

    /// Every unit of `p`, `units` of them, on the threads the kernels share
    /// (`for_each_unit` says why).
    pub(super) fn multiply<F: Format>(self, p: &Product, units: usize) {
        match self {
            Self::Vnni if p.activation_rows >= 4 => {
                for_each_unit(units, |t| vnni::prefill_unit::<F>(p, t))
            }
            Self::Vnni => for_each_unit(units, |t| vnni::decode_unit::<F>(p, t)),
            Self::Avx2 => for_each_unit(units, |t| avx2::unit::<F>(p, t)),
        }
    }
}

/// How the kernels read a block format's weights (`Layout`: what lies where). A block's
/// weights come out in two forms: signed, for AVX2's `vpmaddubsw`, and offset to unsigned,
/// for VNNI's `vpdpbusd`, which multiplies unsigned bytes by signed ones; the offset comes
/// back out as one integer per activation block, `OFFSET·Σx`, so the block's sum stays
/// exact. A min (`w = scale·q − min`) is not an integer multiple of the scale, so its share,
/// `min·Σx`, comes off in f32, eight blocks at a time. A second scale per 16 weights
/// (`PAIR_SCALES`) the AVX2 kernels multiply in as an integer by `vpmaddwd` on signed
/// weights; the VNNI kernels scale each half's i32 sums by it in f32, the offset's share
/// taken off per four activations (`Q8Rows::lane_offsets`).
///
/// # Safety (every method)
/// As `Layout`'s (for `eight_scales` and `sixteen_scales`, blocks `b` to `b + 7`, `b` a
/// multiple of 8; for `unsigned_pair`, `b` and `b + 1`, `b` even), and the CPU has AVX2 and
/// F16C (for `unsigned_pair` and `sixteen_scales`, which only VNNI's kernels call, AVX-512 F
/// and BW).
pub trait Format: Layout {
    /// What `unsigned` adds to each weight.
    const OFFSET: i32;
    /// The largest byte `unsigned` gives.
    const UNSIGNED_MAX: i32;

    /// Block `b`'s 32 weights in order.
    unsafe fn signed(row: *const u8, b: usize) -> __m256i;
    /// Block `b`'s 32 weights plus `OFFSET`, in order.
    unsafe fn unsigned(row: *const u8, b: usize) -> __m256i;
    /// The scales and mins (zero where the format has none) of blocks `b..b + 8`; by
    /// default, of blocks each stored alone as an f16 scale and then the quants. (Always
    /// inlined, so without target features of its own: called as a function, it made the
    /// row kernels spill their accumulators around every call.)
    #[inline(always)]
    unsafe fn eight_scales(row: *const u8, b: usize) -> (__m256, __m256) {
        // Read one by one (a gather of the same is several times slower on Zen 4) for one
        // vector conversion.
        let words: [u16; 8] = std::array::from_fn(|i| {
            row.add((b + i) * Self::BYTES)
                .cast::<u16>()
                .read_unaligned()
        });
        let scales = _mm256_cvtph_ps(_mm_loadu_si128(words.as_ptr().cast()));
        (scales, _mm256_setzero_ps())
    }
    /// Blocks `b` and `b + 1` as `unsigned` gives them, the first in the register's low half:
    /// what VNNI's row kernel multiplies at once.
    unsafe fn unsigned_pair(row: *const u8, b: usize) -> __m512i;
    /// `pair_scales` of blocks `b..b + 8` as f32, in order (two a block).
    #[inline(always)]
    unsafe fn sixteen_scales(_row: *const u8, _b: usize) -> __m512 {
        _mm512_set1_ps(1.0)
    }
}

/// The upper sixteen of a 512-bit register's 16-bit lanes: where `unsigned_pair` puts a
/// pair's second block.
const SECOND_OF_PAIR: __mmask32 = 0xFFFF_0000;

impl Format for Q8_0 {
    const OFFSET: i32 = 128;
    const UNSIGNED_MAX: i32 = 255;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn signed(row: *const u8, b: usize) -> __m256i {
        _mm256_loadu_si256(row.add(b * Self::BYTES + 2).cast())
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn unsigned(row: *const u8, b: usize) -> __m256i {
        _mm256_xor_si256(Self::signed(row, b), _mm256_set1_epi8(i8::MIN))
    }

    #[inline(always)]
    unsafe fn unsigned_pair(row: *const u8, b: usize) -> __m512i {
        let first = _mm512_castsi256_si512(Self::signed(row, b));
        let both = _mm512_inserti64x4::<1>(first, Self::signed(row, b + 1));
        _mm512_xor_si512(both, _mm512_set1_epi8(i8::MIN))
    }
}

impl Format for Q4_0 {
    const OFFSET: i32 = 8;
    const UNSIGNED_MAX: i32 = 15;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn signed(row: *const u8, b: usize) -> __m256i {
        _mm256_sub_epi8(Self::unsigned(row, b), _mm256_set1_epi8(8))
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn unsigned(row: *const u8, b: usize) -> __m256i {
        let bytes = _mm_loadu_si128(row.add(b * Self::BYTES + 2).cast());
        let nibble = _mm_set1_epi8(0x0F);
        let low = _mm_and_si128(bytes, nibble);
        let high = _mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble);
        _mm256_set_m128i(high, low)
    }

    #[inline(always)]
    unsafe fn unsigned_pair(row: *const u8, b: usize) -> __m512i {
        let quants = |b: usize| _mm_loadu_si128(row.add(b * Self::BYTES + 2).cast());
        let both = _mm256_set_m128i(quants(b + 1), quants(b));
        // Each block's 16 bytes twice, [b, b, b + 1, b + 1]: low nibbles, then high.
        let twice = _mm512_shuffle_i64x2::<0b01_01_00_00>(
            _mm512_castsi256_si512(both),
            _mm512_castsi256_si512(both),
        );
        let shifted = _mm512_mask_srli_epi16::<4>(twice, 0xFF00_FF00, twice);
        _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
    }
}

impl Format for Q4K {
    const OFFSET: i32 = 0;
    const UNSIGNED_MAX: i32 = 15;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn signed(row: *const u8, b: usize) -> __m256i {
        Self::unsigned(row, b)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn unsigned(row: *const u8, b: usize) -> __m256i {
        let bytes = _mm256_loadu_si256(row.add(b / 8 * Self::BYTES + 16 + b % 8 / 2 * 32).cast());
        let shift = _mm_cvtsi32_si128((b % 2 * 4) as i32);
        _mm256_and_si256(_mm256_srl_epi16(bytes, shift), _mm256_set1_epi8(0x0F))
    }

    #[inline(always)]
    unsafe fn unsigned_pair(row: *const u8, b: usize) -> __m512i {
        // The pair's 32 bytes: the first block's low nibbles, the second's high.
        let at = row.add(b / 8 * Self::BYTES + 16 + b % 8 / 2 * 32);
        let bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256(at.cast()));
        let shifted = _mm512_mask_srli_epi16::<4>(bytes, SECOND_OF_PAIR, bytes);
        _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
    }

    #[inline(always)]
    unsafe fn eight_scales(row: *const u8, b: usize) -> (__m256, __m256) {
        let ([d, dmin], [s0, s1, m0, m1]) = Self::stored(row, b);
        let bytes = _mm_setr_epi32(s0 as i32, s1 as i32, m0 as i32, m1 as i32);
        let scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
        let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes)));
        (
            _mm256_mul_ps(scales, f16_everywhere(d)),
            _mm256_mul_ps(mins, f16_everywhere(dmin)),
        )
    }
}

impl Format for Q6K {
    const OFFSET: i32 = 32;
    const UNSIGNED_MAX: i32 = 63;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn signed(row: *const u8, b: usize) -> __m256i {
        _mm256_sub_epi8(Self::unsigned(row, b), _mm256_set1_epi8(32))
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn unsigned(row: *const u8, b: usize) -> __m256i {
        let block = Self::super_block(row, b);
        let (half, j) = (b % 8 / 4, b % 4);
        let low = _mm256_loadu_si256(block.add(64 * half + 32 * (j % 2)).cast());
        let high = _mm256_loadu_si256(block.add(128 + 32 * half).cast());
        let shift = |bits: usize| _mm_cvtsi32_si128(bits as i32);
        let low = _mm256_and_si256(
            _mm256_srl_epi16(low, shift(4 * (j / 2))),
            _mm256_set1_epi8(0x0F),
        );
        let high = _mm256_and_si256(_mm256_srl_epi16(high, shift(2 * j)), _mm256_set1_epi8(0x03));
        _mm256_or_si256(low, _mm256_slli_epi16::<4>(high))
    }

    #[inline(always)]
    unsafe fn eight_scales(row: *const u8, b: usize) -> (__m256, __m256) {
        (f16_everywhere(Self::d_bits(row, b)), _mm256_setzero_ps())
    }

    #[inline(always)]
    unsafe fn unsigned_pair(row: *const u8, b: usize) -> __m512i {
        let block = Self::super_block(row, b);
        // Blocks 0 and 1 of a half super-block are the low nibbles of its 64 low-bit bytes,
        // 2 and 3 the high; all four take their high bits from the same 32 bytes, two each.
        let (half, first) = (b % 8 / 4, b % 4);
        let low = _mm512_loadu_si512(block.add(64 * half).cast());
        let high = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(128 + 32 * half).cast()));
        // Each weight's high bits (2·j and 2·j + 1 of its byte, block j) to bits 4 and 5.
        let (low, high) = if first == 0 {
            let second =
                _mm512_mask_slli_epi16::<2>(_mm512_slli_epi16::<4>(high), SECOND_OF_PAIR, high);
            (low, second)
        } else {
            (
                _mm512_srli_epi16::<4>(low),
                _mm512_mask_srli_epi16::<2>(high, SECOND_OF_PAIR, high),
            )
        };
        let high = _mm512_and_si512(high, _mm512_set1_epi8(0x30));
        // low & 0x0F | high, as one ternary-logic table (a: low, b: high, c: the mask).
        _mm512_ternarylogic_epi32::<0xEC>(low, high, _mm512_set1_epi8(0x0F))
    }

    #[inline(always)]
    unsafe fn sixteen_scales(row: *const u8, b: usize) -> __m512 {
        let scales = _mm_loadu_si128(Self::super_block(row, b).add(192).cast());
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(scales))
    }
}

/// An f16 in every lane, by F16C: `half`'s conversion checks for F16C at run time, a load
/// and a branch per super-block in the row kernels.
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[inline(always)]
unsafe fn f16_everywhere(bits: u16) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
}

/// `x` quantized into `rows` (sized for it by `Q8Rows::new`), with its lane offsets where
/// the weights' `offset` is given.
pub(super) fn quantize(rows: &mut Q8Rows, x: &[f32], offset: Option<i32>) {
    assert!(rows.scales.len() * BLOCK == x.len() && rows.quants.len() == x.len());
    assert!(offset.is_none() || rows.lane_offsets.len() * 4 == x.len());
    // SAFETY: a Matrix exists only where one of our kernels runs, and both need AVX2; the
    // lengths checked above are the ones quantize_avx2 reads and writes.
    unsafe { quantize_avx2(rows, x, offset) }
}

/// `quantize_block` a block per step in four registers; libm's `roundf`, one call per
/// value, was most of a decode step's quantization. Halves round to even, as in
/// llama.cpp's vector quantization (the plain form rounds them away from zero, as its
/// reference does): the two differ only where `x / d` is exactly half an integer.
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(rows: &mut Q8Rows, x: &[f32], offset: Option<i32>) {
    let sign = _mm256_set1_ps(-0.0);
    // packs interleaves the 128-bit halves; this puts the 8 groups of 4 back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(block.as_ptr().add(i * 8)));
        let magnitude = |i: usize| _mm256_andnot_ps(sign, v[i]);
        let max = _mm256_max_ps(
            _mm256_max_ps(magnitude(0), magnitude(1)),
            _mm256_max_ps(magnitude(2), magnitude(3)),
        );
        let d = horizontal_max(max) / 127.0;
        let inverse = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inverse)));
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        _mm256_storeu_si256(rows.quants.as_mut_ptr().add(b * BLOCK).cast(), bytes);
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        rows.sums[b] = horizontal_sum_i32(sum);
        if let Some(offset) = offset {
            let ones = _mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes);
            let fours = _mm256_madd_epi16(ones, _mm256_set1_epi16(1));
            let shares = _mm256_mullo_epi32(fours, _mm256_set1_epi32(-offset));
            _mm256_storeu_si256(rows.lane_offsets.as_mut_ptr().add(b * 8).cast(), shares);
        }
        rows.scales[b] = f16::from_f32(d).to_f32();
    }
}

#[target_feature(enable = "avx")]
#[inline]
unsafe fn horizontal_max(v: __m256) -> f32 {
    let half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let quarter = _mm_max_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_max_ss(quarter, _mm_movehdup_ps(quarter)))
}

/// The sum of a register's eight lanes.
#[target_feature(enable = "avx")]
#[inline]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn horizontal_sum_i32(v: __m256i) -> i32 {
    let half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let quarter = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
    _mm_cvtsi128_si32(_mm_add_epi32(quarter, _mm_shuffle_epi32::<1>(quarter)))
}

/// The scales and mins of a tile's rows (`stored`: `lanes` whole rows of `per_row`
/// blocks), block by block, `lanes` to a block, as the tile kernels read them (each row's
/// eight blocks at a time, written out across the lanes).
///
/// # Safety
/// The CPU has AVX2 and F16C, and `scales` and `mins` hold `per_row · lanes` values.
#[target_feature(enable = "avx2,f16c")]
unsafe fn tile_scales<F: Format>(
    stored: &[u8],
    per_row: usize,
    lanes: usize,
    scales: &mut [f32],
    mins: &mut [f32],
) {
    let row_bytes = row_bytes::<F>(per_row);
    assert!(
        stored.len() == lanes * row_bytes
            && scales.len() == per_row * lanes
            && mins.len() == per_row * lanes
    );
    let whole = per_row / 8 * 8;
    for lane in 0..lanes {
        let row = stored.as_ptr().add(lane * row_bytes);
        for b in (0..whole).step_by(8) {
            let (mut eight, mut eight_mins) = ([0f32; 8], [0f32; 8]);
            let (s, m) = F::eight_scales(row, b);
            _mm256_storeu_ps(eight.as_mut_ptr(), s);
            _mm256_storeu_ps(eight_mins.as_mut_ptr(), m);
            for i in 0..8 {
                scales[(b + i) * lanes + lane] = eight[i];
                // The kernels read no mins of formats without them.
                if F::MINS {
                    mins[(b + i) * lanes + lane] = eight_mins[i];
                }
            }
        }
        for b in whole..per_row {
            (scales[b * lanes + lane], mins[b * lanes + lane]) = F::scale(row, b);
        }
    }
}

/// Asks for the cache lines of the four blocks `PREFETCH` bytes past block `b` of the row at
/// `base` (where four blocks straddle one line more, the next call's first line is it). A
/// prefetch past the matrix's end is harmless (it never faults), hence the wrapping address.
#[inline(always)]
fn prefetch_four_blocks<F: Format>(base: *const u8, b: usize) {
    // Bytes per block, on average over a super-block.
    let at = |blocks: usize| blocks * F::BYTES / F::BLOCKS;
    let ahead = base.wrapping_add(at(b) + PREFETCH);
    for line in 0..at(4).div_ceil(64) {
        // SAFETY: a prefetch reads nothing and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64).cast()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector quantization gives `quantize_block`'s scales and quants, except a quant
    /// one apart where the value falls exactly halfway (halves to even there, away from zero    /// in the plain form), the sums its quants give, and their lane offsets.
    #[test]
    fn vector_quantization_is_the_plain_one() {
        if Kernel::best_here().is_none() {
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
        let got = Q8Rows::new(&x, BLOCK, Some(32));
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
            assert_eq!(got.sums[b], sum);
            for (lane, four) in got.quants[b * BLOCK..][..BLOCK].chunks_exact(4).enumerate() {
                let four: i32 = four.iter().map(|&q| q as i32).sum();
                assert_eq!(got.lane_offsets[b * 8 + lane], -32 * four);
            }
        }
        assert_eq!(&got.quants[3 * BLOCK..3 * BLOCK + 3], &[127, 64, -2]);
    }
}
