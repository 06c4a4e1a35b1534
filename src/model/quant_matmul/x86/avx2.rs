//! The AVX2 kernel, for x86-64 CPUs without AVX-512 VNNI.
//!
//! As llama.cpp's AVX2 q8_0 dot product (and its q4_0 one, whose nibbles are widened to
//! signed bytes first): per block, `|w|` times `x` with `w`'s signs by
//! `vpmaddubsw` (pairs of products into i16: at most 2·128·127, which never saturates) and
//! `vpmaddwd` (into i32), scaled in f32. One kernel serves decode and prefill: a unit's
//! weight rows are read once each, in memory order, and each is dotted with four activation
//! rows at a time while its blocks are in registers, so `|w|` is taken once per four. (Four
//! weight rows against two activation rows, to read the activations from L2 less often, was
//! no faster: the two multiplies per block and pair bound it, not the loads.)

use std::arch::x86_64::*;

use half::f16;

use super::{horizontal_sum, prefetch_four_blocks, scale_words, Format, Product, XRow};
use crate::model::quant_matmul::BLOCK;

/// Unit `t`: its weight rows against every activation row.
pub(super) fn unit<F: Format>(p: &Product, t: usize) {
    let rows = p.unit_rows(t);
    let weights = p.weights(rows.clone());
    let m = p.activation_rows;
    for (r, row) in rows.zip(weights.chunks_exact(p.row_bytes)) {
        // SAFETY (each write): row `r` is this unit's.
        for j in (0..m).step_by(4) {
            if m - j >= 4 {
                let xs = [p.x_row(j), p.x_row(j + 1), p.x_row(j + 2), p.x_row(j + 3)];
                for (n, value) in dots::<F, 4>(row, &xs).into_iter().enumerate() {
                    unsafe { p.write(j + n, r, &[value]) };
                }
            } else {
                for j in j..m {
                    unsafe { p.write(j, r, &dots::<F, 1>(row, &[p.x_row(j)])) };
                }
            }
        }
    }
}

/// One stored weight row dotted with each of `N` quantized activation rows.
fn dots<F: Format, const N: usize>(row: &[u8], xs: &[XRow; N]) -> [f32; N] {
    let blocks = row.len() / F::BYTES;
    let fits = |x: &XRow| x.scales.len() == blocks && x.quants.len() == blocks * BLOCK;
    assert!(row.len() == blocks * F::BYTES && xs.iter().all(fits));
    // SAFETY: a Matrix with this kernel exists only where the CPU has AVX2, FMA and F16C,
    // and the assertion above keeps every read inside the slices.
    unsafe { dots_avx2::<F, N>(row, xs) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2<F: Format, const N: usize>(row: &[u8], xs: &[XRow; N]) -> [f32; N] {
    let blocks = row.len() / F::BYTES;
    let base = row.as_ptr();
    let ones = _mm256_set1_epi16(1);
    // One activation row alone takes four accumulators, a block each in turn, to hide the
    // FMA's latency; four rows' chains interleave by themselves.
    let chains = if N == 1 { 4 } else { 1 };
    let mut acc = [[_mm256_setzero_ps(); 4]; N];
    // Block `b` into chain `chain`, its weight scale times each activation row's in `scales`.
    let mut block = |b: usize, chain: usize, scales: [f32; N]| {
        let w = F::signed(base.add(b * F::BYTES + 2));
        let magnitude = _mm256_sign_epi8(w, w);
        for n in 0..N {
            let quants = _mm256_loadu_si256(xs[n].quants.as_ptr().add(b * BLOCK).cast());
            let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(quants, w));
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc[n][chain] = _mm256_fmadd_ps(sums, _mm256_set1_ps(scales[n]), acc[n][chain]);
        }
    };
    let whole = blocks / 8 * 8;
    for b in (0..whole).step_by(8) {
        // Eight blocks' scales, weights' times activations', in one multiply per row.
        let words: [u16; 8] = scale_words::<F, 8>(base, b);
        let weight_scales = _mm256_cvtph_ps(_mm_loadu_si128(words.as_ptr().cast()));
        let mut scales = [[0f32; 8]; N];
        for (scales, x) in scales.iter_mut().zip(xs) {
            let activation_scales = _mm256_loadu_ps(x.scales.as_ptr().add(b));
            _mm256_storeu_ps(
                scales.as_mut_ptr(),
                _mm256_mul_ps(weight_scales, activation_scales),
            );
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
        let at = b * F::BYTES;
        let weight_scale = f16::from_le_bytes([row[at], row[at + 1]]).to_f32();
        block(
            b,
            0,
            std::array::from_fn(|n| weight_scale * xs[n].scales[b]),
        );
    }
    acc.map(|[a, b, c, d]| horizontal_sum(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d))))
}
