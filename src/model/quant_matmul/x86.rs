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
use std::marker::PhantomData;
use std::ops::Range;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{check_blocks, BLOCK};
use crate::error::{Error, Result};
use crate::model::disjoint::{for_each_unit, rows_of, Disjoint};
use crate::model::stored::StoredBytes;

/// Weight rows per unit of work (and per VNNI tile: one 512-bit register of i32 lanes).
const TILE: usize = 16;

/// How far ahead of the row kernels' reads (bytes) the next cache lines are asked for: rows
/// are read in memory order, one stream, and this keeps a few hundred nanoseconds of it in
/// flight beyond what the hardware prefetcher does alone.
const PREFETCH: usize = 2048;

/// Which instructions multiply a matrix, chosen once by what the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 F, VL and VNNI (Intel's servers since Ice Lake, AMD since Zen 4).
    Vnni,
    /// AVX2, FMA and F16C (x86-64 CPUs since 2013–2015).
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs; `None` where it runs neither (candle's serve).
    pub fn best_here() -> Option<Self> {
        Self::all_here().first().copied()
    }

    /// Every kernel this CPU runs, fastest first (what tests and benchmarks compare).
    pub fn all_here() -> Vec<Self> {
        [Self::Vnni, Self::Avx2]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    fn runs_here(self) -> bool {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match self {
            Self::Vnni => {
                avx2 && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            Self::Avx2 => avx2,
        }
    }
}

/// A GGML block format the kernels read: blocks of 32 weights, each with a scale (and in
/// k-quants a min), stored one by one (q8_0, q4_0) or eight to a super-block (q4_K). A
/// block's weights come out in two forms: signed, for AVX2's `vpmaddubsw`, and offset to
/// unsigned, for VNNI's `vpdpbusd`, which multiplies unsigned bytes by signed ones; the
/// offset comes back out as one integer per activation block, `OFFSET·Σx`, so the block's
/// sum stays exact. A min (`w = scale·q − min`) is not an integer multiple of the scale, so
/// its share, `min·Σx`, comes off in f32, eight blocks at a time.
///
/// # Safety (every method)
/// `row` points at a stored row holding block `b` (and for `eight_scales`, blocks `b` to
/// `b + 7`, `b` a multiple of 8), and the CPU has AVX2 and F16C.
pub trait Format {
    const DTYPE: GgmlDType;
    /// Blocks of 32 weights stored together.
    const BLOCKS: usize;
    /// Bytes stored per `BLOCKS` blocks.
    const BYTES: usize;
    /// What `unsigned` adds to each weight.
    const OFFSET: i32;
    /// The largest byte `unsigned` gives.
    const UNSIGNED_MAX: i32;
    /// Whether blocks carry a min besides their scale.
    const MINS: bool;
    /// Whether blocks carry a second scale per 16 weights (`pair_scales`): the AVX2 kernels
    /// multiply it in as an integer by `vpmaddwd` on signed weights; the VNNI kernels scale
    /// each half's i32 sums by it in f32, the offset's share taken off per four activations
    /// (`Q8Rows::lane_offsets`).
    const PAIR_SCALES: bool = false;

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
    /// Block `b`'s scale and min, one block alone; by default as `eight_scales`'.
    #[inline]
    unsafe fn scale(row: *const u8, b: usize) -> (f32, f32) {
        let scale = row.add(b * Self::BYTES).cast::<f16>().read_unaligned();
        (scale.to_f32(), 0.0)
    }
    /// Block `b`'s integer scales of weights 0–15 and 16–31, where `PAIR_SCALES`.
    unsafe fn pair_scales(_row: *const u8, _b: usize) -> [i16; 2] {
        [1, 1]
    }
    /// The same of blocks `b..b + 8` (`b` a multiple of 8) as f32: blocks `b..b + 4` in
    /// the first register, two lanes each, the rest in the second.
    unsafe fn sixteen_scales(_row: *const u8, _b: usize) -> [__m256; 2] {
        [_mm256_set1_ps(1.0); 2]
    }
}

/// Bytes of a stored row of `blocks` blocks of `F`.
const fn row_bytes<F: Format>(blocks: usize) -> usize {
    blocks / F::BLOCKS * F::BYTES
}

/// q8_0: a block is its f16 scale and 32 signed bytes.
pub struct Q8_0;

impl Format for Q8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BLOCKS: usize = 1;
    const BYTES: usize = 2 + BLOCK;
    const OFFSET: i32 = 128;
    const UNSIGNED_MAX: i32 = 255;
    const MINS: bool = false;

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
}

/// q4_0: a block is its f16 scale and 16 bytes, weight `j` in the low nibble of byte `j`
/// and weight `j + 16` in its high nibble, both stored plus 8.
pub struct Q4_0;

impl Format for Q4_0 {
    const DTYPE: GgmlDType = GgmlDType::Q4_0;
    const BLOCKS: usize = 1;
    const BYTES: usize = 2 + BLOCK / 2;
    const OFFSET: i32 = 8;
    const UNSIGNED_MAX: i32 = 15;
    const MINS: bool = false;

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
}

/// q4_K: super-blocks of eight blocks, each an f16 `d` and `dmin`, 12 bytes packing every
/// block's 6-bit scale and min (`q4_k_scales`), then 128 bytes of nibbles: blocks `2k` and
/// `2k + 1` in the low and high nibbles of bytes `32k..32k + 32`. Weight `q` of a block
/// with scale `s` and min `m` is `d·s·q − dmin·m`.
pub struct Q4K;

impl Q4K {
    /// Super-block `b / 8`'s `d` and `dmin`, and its eight blocks' scales and mins.
    ///
    /// # Safety
    /// As `Format::scale`.
    #[inline(always)]
    unsafe fn super_block(row: *const u8, b: usize) -> (f32, f32, [u32; 4]) {
        let block = row.add(b / 8 * Self::BYTES);
        let d = block.cast::<f16>().read_unaligned();
        let dmin = block.add(2).cast::<f16>().read_unaligned();
        let packed = block.add(4).cast::<[u32; 3]>().read_unaligned();
        (
            d.to_f32(),
            dmin.to_f32(),
            q4_k_scales(packed.map(u32::from_le)),
        )
    }
}

impl Format for Q4K {
    const DTYPE: GgmlDType = GgmlDType::Q4K;
    const BLOCKS: usize = 8;
    const BYTES: usize = 4 + 12 + 8 * BLOCK / 2;
    const OFFSET: i32 = 0;
    const UNSIGNED_MAX: i32 = 15;
    const MINS: bool = true;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn signed(row: *const u8, b: usize) -> __m256i {
        Self::unsigned(row, b)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn unsigned(row: *const u8, b: usize) -> __m256i {
        let bytes = _mm256_loadu_si256(row.add(b / 8 * Self::BYTES + 16 + b % 8 / 2 * 32).cast());
        let shift = _mm_cvtsi32_si128(b as i32 % 2 * 4);
        _mm256_and_si256(_mm256_srl_epi16(bytes, shift), _mm256_set1_epi8(0x0F))
    }

    #[inline(always)]
    unsafe fn eight_scales(row: *const u8, b: usize) -> (__m256, __m256) {
        let (d, dmin, [s0, s1, m0, m1]) = Self::super_block(row, b);
        let bytes = _mm_setr_epi32(s0 as i32, s1 as i32, m0 as i32, m1 as i32);
        let scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
        let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes)));
        (
            _mm256_mul_ps(scales, _mm256_set1_ps(d)),
            _mm256_mul_ps(mins, _mm256_set1_ps(dmin)),
        )
    }

    #[inline]
    unsafe fn scale(row: *const u8, b: usize) -> (f32, f32) {
        let (d, dmin, words) = Self::super_block(row, b);
        let byte = |i: usize| (words[i / 4] >> (i % 4 * 8)) as u8 as f32;
        (d * byte(b % 8), dmin * byte(8 + b % 8))
    }
}

/// q6_K: super-blocks of eight blocks: 128 bytes of low nibbles, 64 of high bit pairs, 16
/// signed 8-bit scales (one per 16 weights), then an f16 `d`. The blocks come in two halves
/// of four: block `4h + j` holds the low (`j` < 2) or high nibbles of bytes `64h + 32(j % 2)`
/// to `+ 32`, under bits `2j` and `2j + 1` of bytes `128 + 32h` to `+ 32`, stored plus 32;
/// its weights `16i` to `16i + 15` are scaled by `d · scales[2(4h + j) + i]`.
pub struct Q6K;

impl Q6K {
    /// Super-block `b / 8`, where block `b` lies.
    #[inline(always)]
    unsafe fn super_block(row: *const u8, b: usize) -> *const u8 {
        row.add(b / 8 * Self::BYTES)
    }

    /// Super-block `b / 8`'s `d`.
    #[inline(always)]
    unsafe fn d(row: *const u8, b: usize) -> f32 {
        let d = Self::super_block(row, b)
            .add(208)
            .cast::<f16>()
            .read_unaligned();
        d.to_f32()
    }
}

impl Format for Q6K {
    const DTYPE: GgmlDType = GgmlDType::Q6K;
    const BLOCKS: usize = 8;
    const BYTES: usize = 128 + 64 + 16 + 2;
    const OFFSET: i32 = 32;
    const UNSIGNED_MAX: i32 = 63;
    const MINS: bool = false;
    const PAIR_SCALES: bool = true;

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
        (_mm256_set1_ps(Self::d(row, b)), _mm256_setzero_ps())
    }

    #[inline]
    unsafe fn scale(row: *const u8, b: usize) -> (f32, f32) {
        (Self::d(row, b), 0.0)
    }

    #[inline(always)]
    unsafe fn pair_scales(row: *const u8, b: usize) -> [i16; 2] {
        let scales = Self::super_block(row, b)
            .add(192 + 2 * (b % 8))
            .cast::<[i8; 2]>();
        scales.read().map(i16::from)
    }

    #[inline(always)]
    unsafe fn sixteen_scales(row: *const u8, b: usize) -> [__m256; 2] {
        let scales = Self::super_block(row, b).add(192);
        [0, 8].map(|half| {
            let bytes = _mm_loadl_epi64(scales.add(half).cast());
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))
        })
    }
}

/// A q4_K super-block's eight 6-bit scales and mins (bytes 0–7 and 8–15 of the result, in
/// little-endian words), as ggml packs them in 12 bytes (`get_scale_min_k4`): blocks 0–3 in the low 6 bits of bytes
/// 0–3 (scales) and 4–7 (mins); blocks 4–7 in the low (scales) and high (mins) nibbles of
/// bytes 8–11, their top two bits in the top two bits of bytes 0–3 (scales) and 4–7 (mins).
/// Four bytes at a time, as llama.cpp unpacks them: byte by byte, this was a third of a
/// decode's time.
#[inline(always)]
fn q4_k_scales([scales, mins, high]: [u32; 3]) -> [u32; 4] {
    const LOW_6: u32 = 0x3F3F_3F3F;
    const LOW_4: u32 = 0x0F0F_0F0F;
    const LOW_2: u32 = 0x0303_0303;
    [
        scales & LOW_6,
        (high & LOW_4) | ((scales >> 6) & LOW_2) << 4,
        mins & LOW_6,
        ((high >> 4) & LOW_4) | ((mins >> 6) & LOW_2) << 4,
    ]
}

/// A `rows × cols` matrix of `F` blocks as GGUF stores them: row after row.
pub struct Matrix<F> {
    rows: usize,
    cols: usize,
    blocks: StoredBytes,
    kernel: Kernel,
    format: PhantomData<fn() -> F>,
}

pub type Q8Matrix = Matrix<Q8_0>;
pub type Q4Matrix = Matrix<Q4_0>;
pub type Q4KMatrix = Matrix<Q4K>;
pub type Q6KMatrix = Matrix<Q6K>;

impl<F: Format> Matrix<F> {
    pub(super) fn new(
        blocks: StoredBytes,
        rows: usize,
        cols: usize,
        kernel: Kernel,
    ) -> Result<Self> {
        if !kernel.runs_here() {
            return Err(Error::input(format!(
                "this CPU lacks the instructions of the {kernel:?} {:?} kernel",
                F::DTYPE
            )));
        }
        check_blocks(blocks.as_slice(), rows, cols, F::BLOCKS * BLOCK, F::BYTES)?;
        Ok(Self {
            rows,
            cols,
            blocks,
            kernel,
            format: PhantomData,
        })
    }

    /// Whether this CPU runs any of our kernels.
    pub fn runs_here() -> bool {
        Kernel::best_here().is_some()
    }

    /// Bytes held (and read by each product).
    pub fn bytes(&self) -> usize {
        self.blocks.len()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · Wᵀ` for `x` holding whole rows of `cols` values: one row of `rows` values out
    /// per row in.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        let m = rows_of(x, self.cols, "a quantized matrix")?;
        if m == 0 {
            return Ok(Vec::new());
        }
        let lane_offsets = (self.kernel == Kernel::Vnni && F::PAIR_SCALES).then_some(F::OFFSET);
        let activations = Q8Rows::new(x, self.cols, lane_offsets);
        let mut out = vec![0f32; m * self.rows];
        let product = Product {
            stored: self.blocks.as_slice(),
            rows: self.rows,
            blocks_per_row: self.cols / BLOCK,
            row_bytes: row_bytes::<F>(self.cols / BLOCK),
            activation_rows: m,
            activations: &activations,
            out: Disjoint::new(&mut out),
        };
        let units = self.rows.div_ceil(TILE);
        // On the threads the kernels share (`for_each_unit` says why); each unit writes only
        // its own rows' outputs, and `out` outlives the pool's call.
        match self.kernel {
            Kernel::Vnni if m >= 4 => {
                for_each_unit(units, |t| vnni::prefill_unit::<F>(&product, t))
            }
            Kernel::Vnni => for_each_unit(units, |t| vnni::decode_unit::<F>(&product, t)),
            Kernel::Avx2 => for_each_unit(units, |t| avx2::unit::<F>(&product, t)),
        }
        Ok(out)
    }
}

/// One product as each of its units sees it; its sizes known once, by `matmul`.
struct Product<'a> {
    stored: &'a [u8],
    rows: usize,
    blocks_per_row: usize,
    /// Bytes per stored weight row.
    row_bytes: usize,
    activation_rows: usize,
    activations: &'a Q8Rows,
    out: Disjoint,
}

impl Product<'_> {
    /// Unit `t`'s weight rows.
    fn unit_rows(&self, t: usize) -> Range<usize> {
        t * TILE..(t * TILE + TILE).min(self.rows)
    }

    /// Weight rows `rows`, as stored.
    fn weights(&self, rows: Range<usize>) -> &[u8] {
        &self.stored[rows.start * self.row_bytes..rows.end * self.row_bytes]
    }

    /// Activation row `j`.
    fn x_row(&self, j: usize) -> XRow<'_> {
        let (per_row, x) = (self.blocks_per_row, self.activations);
        XRow {
            scales: &x.scales[j * per_row..(j + 1) * per_row],
            sums: &x.sums[j * per_row..(j + 1) * per_row],
            lane_offsets: x
                .lane_offsets
                .get(j * per_row * 8..(j + 1) * per_row * 8)
                .unwrap_or_default(),
            quants: &x.quants[j * per_row * BLOCK..(j + 1) * per_row * BLOCK],
        }
    }

    /// Weight rows `rows` against every activation row, four activation rows at a time while
    /// four are left (`four`: they share each weight load), then one at a time (`one`); each
    /// gives `W` outputs per activation row, of which the first `rows.len()` are written.
    ///
    /// # Safety
    /// As `write`'s, for `rows`.
    #[inline(always)]
    unsafe fn in_fours<const W: usize>(
        &self,
        rows: Range<usize>,
        four: impl Fn(&[XRow; 4]) -> [[f32; W]; 4],
        one: impl Fn(&[XRow; 1]) -> [[f32; W]; 1],
    ) {
        let (m, lanes) = (self.activation_rows, rows.len());
        let mut j = 0;
        while m - j >= 4 {
            let xs = [0, 1, 2, 3].map(|n| self.x_row(j + n));
            for (n, values) in four(&xs).iter().enumerate() {
                self.write(j + n, rows.start, &values[..lanes]);
            }
            j += 4;
        }
        for j in j..m {
            self.write(j, rows.start, &one(&[self.x_row(j)])[0][..lanes]);
        }
    }

    /// Writes `values` as outputs `r..` of activation row `j`.
    ///
    /// # Safety
    /// Weight rows `r..r + values.len()` must belong to the calling unit (no other thread
    /// writes those outputs), and lie inside the matrix.
    unsafe fn write(&self, j: usize, r: usize, values: &[f32]) {
        debug_assert!(r + values.len() <= self.rows && j < self.activation_rows);
        let at = self.out.at(j * self.rows + r);
        std::ptr::copy_nonoverlapping(values.as_ptr(), at, values.len());
    }
}

/// Activation rows quantized to q8_0 blocks, with each block's `Σq`: the weights' offsets
/// and mins add it (times themselves) to the block's products.
struct Q8Rows {
    scales: Vec<f32>,
    sums: Vec<i32>,
    quants: Vec<i8>,
    /// Where asked for, per block, minus the weights' offset times each four activations'
    /// sum: what a format with a scale per 16 weights takes off each of `vpdpbusd`'s lanes.
    lane_offsets: Vec<i32>,
}

/// One quantized activation row.
struct XRow<'a> {
    scales: &'a [f32],
    sums: &'a [i32],
    quants: &'a [i8],
    lane_offsets: &'a [i32],
}

impl XRow<'_> {
    /// Whether the row holds `blocks` blocks.
    fn has(&self, blocks: usize) -> bool {
        self.scales.len() == blocks
            && self.sums.len() == blocks
            && self.quants.len() == blocks * BLOCK
    }

    /// Block `b`'s value sum, `scale·Σq`, which a weight block's min multiplies.
    ///
    /// # Safety
    /// `b` is one of the row's blocks.
    #[inline(always)]
    unsafe fn block_sum(&self, b: usize) -> f32 {
        *self.scales.get_unchecked(b) * *self.sums.get_unchecked(b) as f32
    }
}

impl Q8Rows {
    /// `x`, whole rows of `cols` values (a multiple of 32), quantized; with each block's
    /// lane offsets where the weights' `offset` is given.
    fn new(x: &[f32], cols: usize, offset: Option<i32>) -> Self {
        let blocks = x.len() / BLOCK;
        assert!(x.len() == blocks * BLOCK && cols.is_multiple_of(BLOCK));
        let mut rows = Self {
            scales: vec![0.0; blocks],
            sums: vec![0; blocks],
            quants: vec![0; blocks * BLOCK],
            lane_offsets: vec![0; if offset.is_some() { blocks * 8 } else { 0 }],
        };
        // SAFETY: a Matrix exists only where one of our kernels runs, and both need AVX2;
        // the lengths above are the ones quantize_avx2 reads and writes.
        unsafe { rows.quantize_avx2(x, offset) };
        rows
    }

    /// `quantize_block` a block per step in four registers; libm's `roundf`, one call per
    /// value, was most of a decode step's quantization. Halves round to even, as in
    /// llama.cpp's vector quantization (the plain form rounds them away from zero, as its
    /// reference does): the two differ only where `x / d` is exactly half an integer.
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(&mut self, x: &[f32], offset: Option<i32>) {
        let sign = _mm256_set1_ps(-0.0);
        // packs interleaves the 128-bit halves; this puts the 8 groups of 4 back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let v: [__m256; 4] =
                std::array::from_fn(|i| _mm256_loadu_ps(block.as_ptr().add(i * 8)));
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
            _mm256_storeu_si256(self.quants.as_mut_ptr().add(b * BLOCK).cast(), bytes);
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            self.sums[b] = horizontal_sum_i32(sum);
            if let Some(offset) = offset {
                let ones = _mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes);
                let fours = _mm256_madd_epi16(ones, _mm256_set1_epi16(1));
                let shares = _mm256_mullo_epi32(fours, _mm256_set1_epi32(-offset));
                _mm256_storeu_si256(self.lane_offsets.as_mut_ptr().add(b * 8).cast(), shares);
            }
            self.scales[b] = f16::from_f32(d).to_f32();
        }
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

    /// The word-wise unpacking of q4_K's scales and mins gives ggml's `get_scale_min_k4`,
    /// byte by byte, for packings where every bit differs.
    #[test]
    fn q4_k_scales_unpack_as_ggml_does() {
        let get_scale_min_k4 = |j: usize, q: &[u8; 12]| {
            if j < 4 {
                (q[j] & 63, q[j + 4] & 63)
            } else {
                (
                    (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                    (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                )
            }
        };
        for seed in 0..64u32 {
            let packed: [u8; 12] = std::array::from_fn(|i| {
                ((seed * 12 + i as u32).wrapping_mul(2_654_435_761) >> 24) as u8
            });
            let words = std::array::from_fn(|i| {
                u32::from_le_bytes(std::array::from_fn(|k| packed[4 * i + k]))
            });
            let got: Vec<u8> = q4_k_scales(words)
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            for j in 0..8 {
                assert_eq!(
                    (got[j], got[8 + j]),
                    get_scale_min_k4(j, &packed),
                    "{packed:?}, {j}"
                );
            }
        }
    }

    /// The vector quantization gives `quantize_block`'s scales and quants, except a quant
    /// one apart where the value falls exactly halfway (halves to even there, away from zero    /// in the plain form), the sums its quants give, and their lane offsets.
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
