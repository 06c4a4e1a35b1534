//! q8_0, q4_0, q4_K and q6_K on aarch64 CPUs with the dot product instructions (ARMv8.2's
//! `sdot`: Apple's M-series, AWS Graviton 2 and later, Snapdragon X, the Raspberry Pi 5's
//! Cortex-A76): the file's blocks multiplied where they lie. ARM CPUs without them (the
//! Raspberry Pi 4's Cortex-A72) keep candle's kernels.
//!
//! Why: candle 0.11 holds a repacked copy of every quantized matrix on ARM, as on x86
//! (`x86.rs` says what that costs): a q8_0 Phi-2 needed twice its file in memory, and
//! loading it wrote gigabytes of fresh pages.
//!
//! How: `sdot` multiplies signed bytes by signed bytes, four pairs into each of four i32
//! lanes, so the weights need neither an offset to unsigned (VNNI's) nor a sign trick
//! (AVX2's): a block's 32 weights come out signed in two registers (q4_0's nibbles less 8,
//! q6_K's six bits less 32, q4_K's nibbles as they are), two `sdot`s against the q8_0
//! activations give the block's sums, and one FMA scales them in f32 (q6_K's halves each by
//! its integer scale first; a q4_K block's min comes off as `min·Σx`), as llama.cpp's ARM
//! kernels do block by block. Each weight row is read once per four activation rows, in
//! memory order: decode reads each once, and prefill's activation rows share each weight
//! load four at a time.

use std::arch::aarch64::*;
use std::arch::asm;

use super::blocks::{Layout, Q4K, Q4_0, Q6K, Q8_0};
use super::matrix::{row_fits, Product, Q8Rows, XRow, TILE};
use super::{quantize_block, BLOCK};
use crate::model::disjoint::for_each_unit;

/// Which instructions multiply a matrix, chosen once by what the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// NEON with the dot product instructions (ARMv8.2's `sdot`).
    Dotprod,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const EVERY: [Self; 1] = [Self::Dotprod];

    pub(super) fn runs_here(self) -> bool {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }

    /// What the activations' quantization adds for `F`'s products: nothing (the weights
    /// are signed).
    pub(super) fn lane_offsets<F: Format>(self) -> Option<i32> {
        None
    }

    /// Every unit of `p`, `units` of them, on the threads the kernels share
    /// (`for_each_unit` says why).
    pub(super) fn multiply<F: Format>(self, p: &Product, units: usize) {
        for_each_unit(units, |t| unit::<F>(p, t))
    }
}

/// How the kernel reads a block format's weights (`Layout`: what lies where).
///
/// # Safety
/// As `Layout`'s, and the CPU has NEON.
pub trait Format: Layout {
    /// Block `b`'s 32 weights, signed, in order: weights 0–15 in the first register.
    unsafe fn weights(row: *const u8, b: usize) -> [int8x16_t; 2];
}

impl Format for Q8_0 {
    #[inline(always)]
    unsafe fn weights(row: *const u8, b: usize) -> [int8x16_t; 2] {
        let quants = row.add(b * Self::BYTES + 2).cast::<i8>();
        [vld1q_s8(quants), vld1q_s8(quants.add(16))]
    }
}

impl Format for Q4_0 {
    #[inline(always)]
    unsafe fn weights(row: *const u8, b: usize) -> [int8x16_t; 2] {
        let bytes = vld1q_u8(row.add(b * Self::BYTES + 2));
        let low = vandq_u8(bytes, vdupq_n_u8(0x0F));
        let high = vshrq_n_u8::<4>(bytes);
        [low, high].map(|w| vsubq_s8(vreinterpretq_s8_u8(w), vdupq_n_s8(8)))
    }
}

impl Format for Q4K {
    #[inline(always)]
    unsafe fn weights(row: *const u8, b: usize) -> [int8x16_t; 2] {
        let bytes = row.add(b / 8 * Self::BYTES + 16 + b % 8 / 2 * 32);
        let halves = [vld1q_u8(bytes), vld1q_u8(bytes.add(16))];
        halves.map(|w| {
            let nibbles = if b.is_multiple_of(2) {
                vandq_u8(w, vdupq_n_u8(0x0F))
            } else {
                vshrq_n_u8::<4>(w)
            };
            vreinterpretq_s8_u8(nibbles)
        })
    }
}

impl Format for Q6K {
    #[inline(always)]
    unsafe fn weights(row: *const u8, b: usize) -> [int8x16_t; 2] {
        let block = Self::super_block(row, b);
        let (half, j) = (b % 8 / 4, b % 4);
        let low = block.add(64 * half + 32 * (j % 2));
        let high = block.add(128 + 32 * half);
        // Shifts by a register: a negative count shifts right.
        let right = |bits: usize| vdupq_n_s8(-(bits as i8));
        [0, 16].map(|k| {
            let low = vandq_u8(
                vshlq_u8(vld1q_u8(low.add(k)), right(4 * (j / 2))),
                vdupq_n_u8(0x0F),
            );
            let high = vandq_u8(vshlq_u8(vld1q_u8(high.add(k)), right(2 * j)), vdupq_n_u8(3));
            let w = vorrq_u8(low, vshlq_n_u8::<4>(high));
            vsubq_s8(vreinterpretq_s8_u8(w), vdupq_n_s8(32))
        })
    }
}

/// `x` quantized into `rows` (sized for it by `Q8Rows::new`), by the plain form: on ARM its
/// rounding is one instruction, and a decode step quantizes a row per matrix against the
/// thousands of weight rows it reads.
pub(super) fn quantize(rows: &mut Q8Rows, x: &[f32], _offset: Option<i32>) {
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let (scale, quants) = quantize_block(block);
        rows.scales[b] = scale;
        rows.sums[b] = quants.iter().map(|&q| i32::from(q)).sum();
        rows.quants[b * BLOCK..][..BLOCK].copy_from_slice(&quants);
    }
}

/// Unit `t`: its weight rows against every activation row, four at a time while four are
/// left.
fn unit<F: Format>(p: &Product, t: usize) {
    let rows = p.unit_rows(t);
    let weights = p.weights(rows.clone());
    let (four, one) = (
        |xs: &[XRow; 4]| rows_dots::<F, 4>(weights, p.row_bytes, xs),
        |x: &[XRow; 1]| rows_dots::<F, 1>(weights, p.row_bytes, x),
    );
    // SAFETY: the rows are this unit's.
    unsafe { p.in_fours(rows, four, one) };
}

/// Each of `weights`' rows (at most `TILE`, `row_bytes` each) dotted with each of `N`
/// activation rows.
fn rows_dots<F: Format, const N: usize>(
    weights: &[u8],
    row_bytes: usize,
    xs: &[XRow; N],
) -> [[f32; TILE]; N] {
    let mut out = [[0f32; TILE]; N];
    for (r, row) in weights.chunks_exact(row_bytes).enumerate() {
        for (n, dot) in dots::<F, N>(row, xs).into_iter().enumerate() {
            out[n][r] = dot;
        }
    }
    out
}

/// One stored weight row dotted with each of `N` quantized activation rows.
fn dots<F: Format, const N: usize>(row: &[u8], xs: &[XRow; N]) -> [f32; N] {
    assert!(row_fits::<F>(row, xs));
    // SAFETY: a Matrix with this kernel exists only where the CPU has NEON and the dot
    // product instructions, and the assertion above keeps every read inside the slices.
    unsafe { dots_neon::<F, N>(row, xs) }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dots_neon<F: Format, const N: usize>(row: &[u8], xs: &[XRow; N]) -> [f32; N] {
    let blocks = xs[0].scales.len();
    let base = row.as_ptr();
    let mut sums = Sums::<N>::new();
    let whole = blocks / 8 * 8;
    for first in (0..whole).step_by(8) {
        let (scales, mins) = F::scales_of_eight(base, first);
        for i in (0..8).step_by(2) {
            sums.add::<F>(base, xs, (first + i, 0), (scales[i], mins[i]));
            sums.add::<F>(base, xs, (first + i + 1, 1), (scales[i + 1], mins[i + 1]));
        }
    }
    for b in whole..blocks {
        sums.add::<F>(base, xs, (b, 0), F::scale(base, b));
    }
    sums.total()
}

/// A weight row's dot products with `N` activation rows so far: per activation row, two
/// chains of f32 sums (one activation row alone takes them block by block in turn, to hide
/// the FMA's latency; several rows' chains interleave by themselves), and the weights' mins'
/// share.
struct Sums<const N: usize> {
    chains: [[float32x4_t; 2]; N],
    mins: [f32; N],
}

impl<const N: usize> Sums<N> {
    #[inline(always)]
    unsafe fn new() -> Self {
        Self {
            chains: [[vdupq_n_f32(0.0); 2]; N],
            mins: [0.0; N],
        }
    }

    /// Block `b` of the row at `base`, of weight scale `scale` and min `min`, against each
    /// activation row: its sums into chain `chain`. (Always inlined: as a closure, LLVM
    /// called it per block for four activation rows of the k-quants.)
    #[inline(always)]
    unsafe fn add<F: Format>(
        &mut self,
        base: *const u8,
        xs: &[XRow; N],
        (b, chain): (usize, usize),
        (scale, min): (f32, f32),
    ) {
        let w = F::weights(base, b);
        let [low_scale, high_scale] = F::pair_scales(base, b).map(i32::from);
        let zero = vdupq_n_s32(0);
        for (n, x) in xs.iter().enumerate() {
            let q = x.quants.as_ptr().add(b * BLOCK);
            let (low, high) = (vld1q_s8(q), vld1q_s8(q.add(16)));
            let sums = if F::PAIR_SCALES {
                let low = vmulq_n_s32(sdot(zero, w[0], low), low_scale);
                vmlaq_n_s32(low, sdot(zero, w[1], high), high_scale)
            } else {
                sdot(sdot(zero, w[0], low), w[1], high)
            };
            let scale = scale * *x.scales.get_unchecked(b);
            let acc = &mut self.chains[n][chain];
            *acc = vfmaq_n_f32(*acc, vcvtq_f32_s32(sums), scale);
            if F::MINS {
                self.mins[n] += min * x.block_sum(b);
            }
        }
    }

    #[inline(always)]
    unsafe fn total(&self) -> [f32; N] {
        std::array::from_fn(|n| {
            let [a, b] = self.chains[n];
            vaddvq_f32(vaddq_f32(a, b)) - self.mins[n]
        })
    }
}

/// `acc` plus, in each i32 lane, the four products of that lane's bytes of `a` and `b`
/// (`sdot`; Rust's intrinsic for it is not stable yet).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack),
    );
    acc
}
