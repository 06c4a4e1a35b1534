//! `GpuTensor`: a GPU buffer with the shape and storage format of what it holds, so kernels
//! take their sizes from their operands (and check that they fit) instead of trusting loose
//! integers beside bare buffers.

use std::borrow::Cow;

/// How a tensor's values sit in GPU memory. Each format has its own shader snippet
/// (`weights_*.wgsl`) defining `w_at(i)`, compiled into its own matmul, GEMV and embedding
/// pipelines, so the kernels read every format in place: GGUF blocks are uploaded as-is.
/// Activations are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    /// f16 pairs packed in u32 (no `shader-f16` needed).
    F16,
    /// GGML q8_0 blocks (34 bytes per 32 values).
    Q8_0,
    /// GGML q4_0 blocks (18 bytes per 32 values).
    Q4_0,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 4] = [Self::F32, Self::F16, Self::Q8_0, Self::Q4_0];

    /// Bytes of one row of `cols` values as a checkpoint stores it (`cols` a multiple of 32
    /// for the block formats: GGML's 34- and 18-byte blocks).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::F32 => cols * 4,
            Self::F16 => cols * 2,
            Self::Q8_0 => cols / 32 * 34,
            Self::Q4_0 => cols / 32 * 18,
        }
    }

    /// The bytes the GPU holds for `rows` rows of `cols` values given as a checkpoint stores
    /// them. The block formats are repacked (weights_ggml.wgsl): each row's quants, then its
    /// scales, padded to 16 bytes, so kernels read whole aligned words; the others are as given.
    pub fn device_bytes(self, stored: &[u8], rows: usize, cols: usize) -> Cow<'_, [u8]> {
        let (block, quants) = match self {
            Self::F32 | Self::F16 => return Cow::Borrowed(stored),
            Self::Q8_0 => (34, 32),
            Self::Q4_0 => (18, 16),
        };
        let blocks = cols / 32;
        let quant_bytes = blocks * quants;
        let row_bytes = (quant_bytes + blocks.div_ceil(2) * 4).next_multiple_of(16);
        let mut out = vec![0u8; rows * row_bytes];
        for (src, dst) in stored
            .chunks_exact(blocks * block)
            .zip(out.chunks_exact_mut(row_bytes))
        {
            for (b, blk) in src.chunks_exact(block).enumerate() {
                dst[b * quants..(b + 1) * quants].copy_from_slice(&blk[2..]);
                let at = quant_bytes + 2 * b;
                dst[at..at + 2].copy_from_slice(&blk[..2]);
            }
        }
        Cow::Owned(out)
    }

    /// The gpu kernel family's view of this format (gpu/chunks_*.wgsl).
    pub(super) fn gpu_chunks(self) -> String {
        let ggml = include_str!("shaders/gpu/chunks_ggml.wgsl");
        match self {
            Self::F32 => include_str!("shaders/gpu/chunks_f32.wgsl").to_string(),
            Self::F16 => include_str!("shaders/gpu/chunks_f16.wgsl").to_string(),
            Self::Q8_0 => format!("{ggml}{}", include_str!("shaders/gpu/chunks_q8_0.wgsl")),
            Self::Q4_0 => format!("{ggml}{}", include_str!("shaders/gpu/chunks_q4_0.wgsl")),
        }
    }

    pub(super) fn shader(self) -> String {
        let ggml = include_str!("shaders/weights_ggml.wgsl");
        match self {
            Self::F32 => include_str!("shaders/weights_f32.wgsl").to_string(),
            Self::F16 => include_str!("shaders/weights_f16.wgsl").to_string(),
            Self::Q8_0 => format!("{ggml}{}", include_str!("shaders/weights_q8_0.wgsl")),
            Self::Q4_0 => format!("{ggml}{}", include_str!("shaders/weights_q4_0.wgsl")),
        }
    }
}

/// A buffer and what it holds: `shape` outermost first (a matrix is `[rows, cols]`), in
/// `format`. Activation buffers are sized for the most rows a pass can hold; kernels are
/// told how many rows are in use.
#[derive(Clone, Debug)]
pub struct GpuTensor {
    pub buffer: wgpu::Buffer,
    pub shape: Vec<usize>,
    pub format: WeightFormat,
}

impl GpuTensor {
    /// Values held: the product of the shape.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last dimension (a row's length).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Rows of `cols()` values.
    pub fn rows(&self) -> usize {
        self.len() / self.cols().max(1)
    }

    /// Bytes of device memory the values take (`format`'s layout, padding included).
    pub fn bytes(&self) -> usize {
        self.buffer.size() as usize
    }
}

impl GpuLinear {
    /// Bytes a pass over the layer reads: the matrix and the bias.
    pub fn bytes(&self) -> usize {
        self.w.bytes() + self.b.as_ref().map_or(0, GpuTensor::bytes)
    }
}

impl GpuNorm {
    pub fn bytes(&self) -> usize {
        self.w.bytes() + self.b.bytes()
    }
}

/// A linear layer on the GPU: `y = x · wᵀ + b`, `w` of shape `[out, in]` in any format.
pub struct GpuLinear {
    pub w: GpuTensor,
    pub b: Option<GpuTensor>,
}

/// LayerNorm's weight and bias (f32) and epsilon.
pub struct GpuNorm {
    pub w: GpuTensor,
    pub b: GpuTensor,
    pub eps: f32,
}

#[cfg(test)]
mod tests {
    use super::WeightFormat;

    /// Two rows of two q8_0 blocks: quants first, then the scales, each row 16-byte padded.
    #[test]
    fn block_formats_are_repacked_quants_then_scales() {
        let block = |scale: u8, q: u8| {
            let mut b = vec![scale, 0x3c];
            b.extend(std::iter::repeat_n(q, 32));
            b
        };
        let stored: Vec<u8> = [block(1, 10), block(2, 20), block(3, 30), block(4, 40)].concat();
        let dev = WeightFormat::Q8_0.device_bytes(&stored, 2, 64);
        // 64 quants + 2 scales (4 bytes) = 68, padded to 80.
        assert_eq!(dev.len(), 2 * 80);
        assert_eq!(&dev[0..32], &[10; 32]);
        assert_eq!(&dev[32..64], &[20; 32]);
        assert_eq!(&dev[64..68], &[1, 0x3c, 2, 0x3c]);
        assert_eq!(&dev[80..112], &[30; 32]);
        assert_eq!(&dev[144..148], &[3, 0x3c, 4, 0x3c]);
    }
}
