//! `GpuTensor`: a GPU buffer with the shape and storage format of what it holds, so kernels
//! take their sizes from their operands (and check that they fit) instead of trusting loose
//! integers beside bare buffers.

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

    /// Bytes of one row of `cols` values (`cols` a multiple of 32 for the block formats).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::F32 => cols * 4,
            Self::F16 => cols * 2,
            Self::Q8_0 => cols / 32 * 34,
            Self::Q4_0 => cols / 32 * 18,
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
