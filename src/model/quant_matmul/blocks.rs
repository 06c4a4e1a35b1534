//! The GGML block formats our native kernels read, as stored: where each keeps a block's
//! weights, scale and min. Each instruction set's kernels (`x86`, `neon`) add how the weights
//! come into their registers (their `Format`); what lies where is said once, here.

use candle_core::quantized::GgmlDType;

use super::BLOCK;

/// A GGML block format: blocks of 32 weights, each with a scale (and in k-quants a min),
/// stored one by one (q8_0, q4_0) or eight to a super-block (q4_K, q6_K).
///
/// # Safety (every method)
/// `row` points at a stored row holding block `b` (and for `scales_of_eight`, blocks `b` to
/// `b + 7`).
pub trait Layout {
    const DTYPE: GgmlDType;
    /// Blocks of 32 weights stored together.
    const BLOCKS: usize;
    /// Bytes stored per `BLOCKS` blocks.
    const BYTES: usize;
    /// Whether blocks carry a min besides their scale.
    const MINS: bool;
    /// Whether blocks carry a second, integer scale per 16 weights (`pair_scales`).
    const PAIR_SCALES: bool = false;

    /// Block `b`'s scale and min; by default, of a block stored alone as an f16 scale and
    /// then its quants.
    #[inline]
    unsafe fn scale(row: *const u8, b: usize) -> (f32, f32) {
        (read_f16(row.add(b * Self::BYTES)), 0.0)
    }
    /// The scales and mins of blocks `b..b + 8` (`b` a multiple of 8); by default, block by
    /// block.
    #[inline(always)]
    unsafe fn scales_of_eight(row: *const u8, b: usize) -> ([f32; 8], [f32; 8]) {
        let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
        for i in 0..8 {
            (scales[i], mins[i]) = Self::scale(row, b + i);
        }
        (scales, mins)
    }
    /// Block `b`'s integer scales of weights 0–15 and 16–31, where `PAIR_SCALES`.
    #[inline(always)]
    unsafe fn pair_scales(_row: *const u8, _b: usize) -> [i16; 2] {
        [1, 1]
    }
}

/// Bytes of a stored row of `blocks` blocks of `F`.
#[cfg(any(native_kernels, test))]
pub(super) const fn row_bytes<F: Layout>(blocks: usize) -> usize {
    blocks / F::BLOCKS * F::BYTES
}

/// q8_0: a block is its f16 scale and 32 signed bytes.
pub struct Q8_0;

impl Layout for Q8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BLOCKS: usize = 1;
    const BYTES: usize = 2 + BLOCK;
    const MINS: bool = false;
}

/// q4_0: a block is its f16 scale and 16 bytes, weight `j` in the low nibble of byte `j`
/// and weight `j + 16` in its high nibble, both stored plus 8.
pub struct Q4_0;

impl Layout for Q4_0 {
    const DTYPE: GgmlDType = GgmlDType::Q4_0;
    const BLOCKS: usize = 1;
    const BYTES: usize = 2 + BLOCK / 2;
    const MINS: bool = false;
}

/// q4_K: super-blocks of eight blocks, each an f16 `d` and `dmin`, 12 bytes packing every
/// block's 6-bit scale and min (`q4_k_scales`), then 128 bytes of nibbles: blocks `2k` and
/// `2k + 1` in the low and high nibbles of bytes `16 + 32k` to `+ 32`. Weight `q` of a block
/// with scale `s` and min `m` is `d·s·q − dmin·m`.
pub struct Q4K;

impl Q4K {
    /// Super-block `b / 8`'s `d` and `dmin`, and its eight blocks' scales and mins.
    ///
    /// # Safety
    /// As `Layout::scale`.
    #[inline(always)]
    pub(super) unsafe fn super_block(row: *const u8, b: usize) -> (f32, f32, [u32; 4]) {
        let ([d, dmin], scales) = Self::stored(row, b);
        (f16_bits_to_f32(d), f16_bits_to_f32(dmin), scales)
    }

    /// The same with `d` and `dmin` as their f16 bits.
    ///
    /// # Safety
    /// As `Layout::scale`.
    #[inline(always)]
    pub(super) unsafe fn stored(row: *const u8, b: usize) -> ([u16; 2], [u32; 4]) {
        let block = row.add(b / 8 * Self::BYTES);
        let [d, dmin] = block.cast::<[u16; 2]>().read_unaligned().map(u16::from_le);
        let packed = block.add(4).cast::<[u32; 3]>().read_unaligned();
        ([d, dmin], q4_k_scales(packed.map(u32::from_le)))
    }
}

impl Layout for Q4K {
    const DTYPE: GgmlDType = GgmlDType::Q4K;
    const BLOCKS: usize = 8;
    const BYTES: usize = 4 + 12 + 8 * BLOCK / 2;
    const MINS: bool = true;

    #[inline]
    unsafe fn scale(row: *const u8, b: usize) -> (f32, f32) {
        let (d, dmin, words) = Self::super_block(row, b);
        let byte = |i: usize| (words[i / 4] >> (i % 4 * 8)) as u8 as f32;
        (d * byte(b % 8), dmin * byte(8 + b % 8))
    }

    #[inline(always)]
    unsafe fn scales_of_eight(row: *const u8, b: usize) -> ([f32; 8], [f32; 8]) {
        let (d, dmin, words) = Self::super_block(row, b);
        let bytes: [u8; 16] = bytemuck::cast(words.map(u32::to_le));
        (
            std::array::from_fn(|i| d * bytes[i] as f32),
            std::array::from_fn(|i| dmin * bytes[8 + i] as f32),
        )
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
    pub(super) unsafe fn super_block(row: *const u8, b: usize) -> *const u8 {
        row.add(b / 8 * Self::BYTES)
    }

    /// Super-block `b / 8`'s `d`.
    #[inline(always)]
    pub(super) unsafe fn d(row: *const u8, b: usize) -> f32 {
        f16_bits_to_f32(Self::d_bits(row, b))
    }

    /// The same as its f16 bits.
    #[inline(always)]
    pub(super) unsafe fn d_bits(row: *const u8, b: usize) -> u16 {
        u16::from_le(
            Self::super_block(row, b)
                .add(208)
                .cast::<u16>()
                .read_unaligned(),
        )
    }
}

impl Layout for Q6K {
    const DTYPE: GgmlDType = GgmlDType::Q6K;
    const BLOCKS: usize = 8;
    const BYTES: usize = 128 + 64 + 16 + 2;
    const MINS: bool = false;
    const PAIR_SCALES: bool = true;

    #[inline]
    unsafe fn scale(row: *const u8, b: usize) -> (f32, f32) {
        (Self::d(row, b), 0.0)
    }

    #[inline(always)]
    unsafe fn scales_of_eight(row: *const u8, b: usize) -> ([f32; 8], [f32; 8]) {
        ([Self::d(row, b); 8], [0.0; 8])
    }

    #[inline(always)]
    unsafe fn pair_scales(row: *const u8, b: usize) -> [i16; 2] {
        let scales = Self::super_block(row, b)
            .add(192 + 2 * (b % 8))
            .cast::<[i8; 2]>();
        scales.read().map(i16::from)
    }
}

/// The f16 stored at `at`, as f32.
///
/// # Safety
/// `at` points at two readable bytes.
#[inline(always)]
unsafe fn read_f16(at: *const u8) -> f32 {
    f16_bits_to_f32(u16::from_le(at.cast::<u16>().read_unaligned()))
}

/// An f16, given by its bits, as f32.
#[inline(always)]
fn f16_bits_to_f32(bits: u16) -> f32 {
    // One `fcvt`, which every ARMv8 CPU has: `half` converts out of line after checking at
    // run time for a later extension, a call per block in the kernels' loops.
    #[cfg(target_arch = "aarch64")]
    {
        let value: f32;
        // SAFETY: a conversion between registers.
        unsafe {
            std::arch::asm!(
                "fcvt {value:s}, {bits:h}",
                value = lateout(vreg) value,
                bits = in(vreg) bits,
                options(pure, nomem, nostack),
            )
        };
        value
    }
    #[cfg(not(target_arch = "aarch64"))]
    half::f16::from_bits(bits).to_f32()
}

/// A q4_K super-block's eight 6-bit scales and mins (bytes 0–7 and 8–15 of the result, in
/// little-endian words), as ggml packs them in 12 bytes (`get_scale_min_k4`): blocks 0–3 in
/// the low 6 bits of bytes 0–3 (scales) and 4–7 (mins); blocks 4–7 in the low (scales) and
/// high (mins) nibbles of bytes 8–11, their top two bits in the top two bits of bytes 0–3
/// (scales) and 4–7 (mins). Four bytes at a time, as llama.cpp unpacks them: byte by byte,
/// this was a third of a decode's time.
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

    /// Every block's scale and min read alone are those read eight at a time.
    #[test]
    fn eight_scales_are_the_blocks_scales() {
        fn same<F: Layout>() {
            let stored: Vec<u8> = (0..row_bytes::<F>(16))
                .map(|i| (i * 131 % 251) as u8)
                .collect();
            for b in [0, 8] {
                // SAFETY: `stored` holds 16 blocks.
                let (scales, mins) = unsafe { F::scales_of_eight(stored.as_ptr(), b) };
                for i in 0..8 {
                    let (scale, min) = unsafe { F::scale(stored.as_ptr(), b + i) };
                    // Bits, as some of these bytes read as f16 NaNs.
                    assert_eq!(
                        [scales[i].to_bits(), mins[i].to_bits()],
                        [scale.to_bits(), min.to_bits()],
                        "{:?} block {}",
                        F::DTYPE,
                        b + i
                    );
                }
            }
        }
        same::<Q8_0>();
        same::<Q4_0>();
        same::<Q4K>();
        same::<Q6K>();
    }
}
