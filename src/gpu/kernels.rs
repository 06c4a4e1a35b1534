//! Compute pipelines, compiled once per device, and the recording of their dispatches
//! into a caller's command encoder (one encoder per forward step).

use std::cell::{Cell, RefCell};

use wgpu::util::DeviceExt;

use super::context::GpuContext;
use crate::error::{Error, Result};

/// Largest workgroup count per dispatch dimension that WebGPU guarantees.
const MAX_GROUPS: u32 = 65_535;

/// How a weight matrix sits in GPU memory. Each format has its own shader snippet
/// (`weights_*.wgsl`) defining `w_at(i)`, compiled into its own matmul, GEMV and embedding
/// pipelines, so the kernels read every format in place: GGUF blocks are uploaded as-is.
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

    fn shader(self) -> String {
        let ggml = include_str!("shaders/weights_ggml.wgsl");
        match self {
            Self::F32 => include_str!("shaders/weights_f32.wgsl").to_string(),
            Self::F16 => include_str!("shaders/weights_f16.wgsl").to_string(),
            Self::Q8_0 => format!("{ggml}{}", include_str!("shaders/weights_q8_0.wgsl")),
            Self::Q4_0 => format!("{ggml}{}", include_str!("shaders/weights_q4_0.wgsl")),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub has_bias: u32,
    /// Row stride of the output (≥ n).
    pub ldy: u32,
    /// First output column written.
    pub col_offset: u32,
    _pad: [u32; 2],
}

impl MatmulParams {
    /// A plain `(m × k) · (n × k)ᵀ` into a dense `(m × n)` output.
    pub fn new(m: u32, n: u32, k: u32, bias: bool) -> Self {
        Self::into_columns(m, n, k, bias, n, 0)
    }

    /// The same, writing columns `col_offset..col_offset+n` of an output with rows of `ldy`.
    pub fn into_columns(m: u32, n: u32, k: u32, bias: bool, ldy: u32, col_offset: u32) -> Self {
        Self {
            m,
            n,
            k,
            has_bias: u32::from(bias),
            ldy,
            col_offset,
            _pad: [0; 2],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LayerNormParams {
    rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

/// Shapes for `rope_kv` and `attention`: `seq` new tokens at positions `start..`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionShape {
    pub seq: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub rotary_dim: u32,
    pub start: u32,
    pub capacity: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttentionParams {
    seq: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    start: u32,
    capacity: u32,
    scale: f32,
    split_keys: u32,
}

/// Keys per workgroup when a single query's attention is split over the sequence.
pub const SPLIT_KEYS: u32 = 256;

/// The most candidates `top_k` returns (top_k.wgsl keeps them in private arrays this long).
pub const MAX_TOP_K: u32 = 64;

/// Floats of the attention scratch buffer for a cache of `capacity` positions.
pub fn attention_partials_len(heads: usize, head_dim: usize, capacity: usize) -> usize {
    heads * capacity.div_ceil(SPLIT_KEYS as usize) * (head_dim + 2)
}

/// Buffers of `rope_kv`: projections in, rotated queries and the KV cache out.
pub struct RopeKvBuffers<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub cos: &'a wgpu::Buffer,
    pub sin: &'a wgpu::Buffer,
    pub q_out: &'a wgpu::Buffer,
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
}

/// One pipeline per weight format, indexed by `WeightFormat as usize`.
type PerFormat = [wgpu::ComputePipeline; 4];

/// One dispatch's parameter buffer and bind group, kept from one step to the next: the n-th
/// dispatch of a forward binds the same buffers as the n-th of the previous one, so only its
/// parameters are rewritten and nothing is created per token.
struct Slot {
    pipeline: wgpu::ComputePipeline,
    buffers: Vec<wgpu::Buffer>,
    params: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
}

pub struct Kernels {
    slots: RefCell<Vec<Slot>>,
    next_slot: Cell<usize>,
    matmul: PerFormat,
    gemv: PerFormat,
    layer_norm: wgpu::ComputePipeline,
    gelu_new: wgpu::ComputePipeline,
    embedding: PerFormat,
    residual: wgpu::ComputePipeline,
    top_k: wgpu::ComputePipeline,
    rope_kv: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
    attention_merge: wgpu::ComputePipeline,
}

/// `attention`'s buffers: rotated queries, the layer's K and V caches, the split-mode
/// scratch, and the output.
pub type AttentionBuffers<'a> = (
    &'a wgpu::Buffer,
    &'a wgpu::Buffer,
    &'a wgpu::Buffer,
    &'a wgpu::Buffer,
    &'a wgpu::Buffer,
);

/// Workgroups for `len` threads of 256, spread over two dimensions past the per-dimension cap.
fn elementwise_groups(len: u32) -> (u32, u32) {
    let groups = len.div_ceil(256).max(1);
    if groups > MAX_GROUPS {
        (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
    } else {
        (groups, 1)
    }
}

fn pipeline(device: &wgpu::Device, label: &str, source: &str) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    })
}

const MATMUL_PARAMS: &str = include_str!("shaders/matmul_params.wgsl");

/// `kernel` compiled once per weight format: `head`, then the format's `w_at`, then `kernel`.
fn per_format(device: &wgpu::Device, label: &str, head: &str, kernel: &str) -> PerFormat {
    WeightFormat::ALL.map(|f| {
        pipeline(
            device,
            &format!("{label} {f:?}"),
            &format!("{head}{}{kernel}", f.shader()),
        )
    })
}

impl Kernels {
    pub fn new(ctx: &GpuContext) -> Self {
        let d = &ctx.device;
        Self {
            slots: RefCell::new(Vec::new()),
            next_slot: Cell::new(0),
            matmul: per_format(
                d,
                "matmul",
                MATMUL_PARAMS,
                include_str!("shaders/matmul.wgsl"),
            ),
            gemv: per_format(d, "gemv", MATMUL_PARAMS, include_str!("shaders/gemv.wgsl")),
            layer_norm: pipeline(d, "layer_norm", include_str!("shaders/layer_norm.wgsl")),
            gelu_new: pipeline(
                d,
                "gelu_new",
                concat!(
                    include_str!("shaders/len_params.wgsl"),
                    include_str!("shaders/gelu_new.wgsl")
                ),
            ),
            embedding: per_format(d, "embedding", "", include_str!("shaders/embedding.wgsl")),
            residual: pipeline(
                d,
                "residual",
                concat!(
                    include_str!("shaders/len_params.wgsl"),
                    include_str!("shaders/residual.wgsl")
                ),
            ),
            top_k: pipeline(d, "top_k", include_str!("shaders/top_k.wgsl")),
            rope_kv: pipeline(d, "rope_kv", include_str!("shaders/rope_kv.wgsl")),
            attention: pipeline(d, "attention", include_str!("shaders/attention.wgsl")),
            attention_merge: pipeline(
                d,
                "attention_merge",
                include_str!("shaders/attention_merge.wgsl"),
            ),
        }
    }

    /// Starts recording a forward step: its dispatches reuse the previous step's bind groups
    /// in order.
    pub fn begin_step(&self) {
        self.next_slot.set(0);
    }

    /// Dispatches recorded since `begin_step`.
    pub fn dispatches_in_step(&self) -> usize {
        self.next_slot.get()
    }

    fn slot(
        ctx: &GpuContext,
        pipeline: &wgpu::ComputePipeline,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
    ) -> Slot {
        let uniform = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: params,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Slot {
            pipeline: pipeline.clone(),
            buffers: buffers.iter().map(|&b| b.clone()).collect(),
            params: uniform,
            bind_group,
        }
    }

    fn dispatch(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        pipeline: &wgpu::ComputePipeline,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32, u32),
    ) -> Result<()> {
        if groups.0 > MAX_GROUPS || groups.1 > MAX_GROUPS || groups.2 > MAX_GROUPS {
            return Err(Error::gpu(format!(
                "dispatch of {groups:?} workgroups exceeds {MAX_GROUPS} per dimension"
            )));
        }
        let index = self.next_slot.get();
        self.next_slot.set(index + 1);
        let mut slots = self.slots.borrow_mut();
        let reusable = slots.get(index).is_some_and(|slot| {
            slot.pipeline == *pipeline
                && slot.params.size() == params.len() as u64
                && slot.buffers.iter().eq(buffers.iter().copied())
        });
        if reusable {
            ctx.queue.write_buffer(&slots[index].params, 0, params);
        } else {
            let slot = Self::slot(ctx, pipeline, params, buffers);
            match slots.get_mut(index) {
                Some(old) => *old = slot,
                None => slots.push(slot),
            }
        }
        let bind_group = &slots[index].bind_group;
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        Ok(())
    }

    /// One invocation per element over `threads` elements, with four u32 parameters
    /// (uniform blocks are padded to 16 bytes).
    fn elementwise(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        pipeline: &wgpu::ComputePipeline,
        threads: u32,
        params: [u32; 4],
        buffers: &[&wgpu::Buffer],
    ) -> Result<()> {
        let (gx, gy) = elementwise_groups(threads);
        self.dispatch(
            ctx,
            encoder,
            pipeline,
            bytemuck::cast_slice(&params),
            buffers,
            (gx, gy, 1),
        )
    }

    /// `y = x · wᵀ + b` for `x` (m × k), `w` (n × k) stored in `format`; `bias` may be any
    /// buffer when absent. A single row (decode) takes the GEMV kernel, more rows (prefill)
    /// the tiled GEMM.
    pub fn matmul(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        p: MatmulParams,
        format: WeightFormat,
        (x, w, bias, y): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    ) -> Result<()> {
        if p.m == 1 {
            let (gx, gy) = elementwise_groups(p.n);
            return self.dispatch(
                ctx,
                encoder,
                &self.gemv[format as usize],
                bytemuck::bytes_of(&p),
                &[x, w, bias, y],
                (gx, gy, 1),
            );
        }
        // matmul.wgsl's 16-row × 64-column tiles.
        let groups = (p.n.div_ceil(64), p.m.div_ceil(16), 1);
        self.dispatch(
            ctx,
            encoder,
            &self.matmul[format as usize],
            bytemuck::bytes_of(&p),
            &[x, w, bias, y],
            groups,
        )
    }

    /// LayerNorm of `rows` rows of `dim` values.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        rows: u32,
        dim: u32,
        eps: f32,
        (x, gamma, beta, y): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    ) -> Result<()> {
        let p = LayerNormParams {
            rows,
            dim,
            eps,
            _pad: 0,
        };
        self.dispatch(
            ctx,
            encoder,
            &self.layer_norm,
            bytemuck::bytes_of(&p),
            &[x, gamma, beta, y],
            (rows, 1, 1),
        )
    }

    /// gelu_new in place over `len` values.
    pub fn gelu_new(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        len: u32,
        x: &wgpu::Buffer,
    ) -> Result<()> {
        self.elementwise(ctx, encoder, &self.gelu_new, len, [len, 0, 0, 0], &[x])
    }

    /// `out[t] = table[ids[t]]` for the ids within rows `row_start..row_start+row_count`
    /// of the table, which `table` holds (one chunk of a table split by rows).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        tokens: u32,
        dim: u32,
        (row_start, row_count, format): (u32, u32, WeightFormat),
        (ids, table, out): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    ) -> Result<()> {
        let params = [tokens, dim, row_start, row_count];
        self.elementwise(
            ctx,
            encoder,
            &self.embedding[format as usize],
            tokens * dim,
            params,
            &[ids, table, out],
        )
    }

    /// `x += attn + mlp` over `len` values.
    pub fn residual(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        len: u32,
        (x, attn, mlp): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    ) -> Result<()> {
        self.elementwise(
            ctx,
            encoder,
            &self.residual,
            len,
            [len, 0, 0, 0],
            &[x, attn, mlp],
        )
    }

    /// The `k` (at most `MAX_TOP_K`) largest of the first `len` values of `x` and their
    /// log-normaliser at `1 / inv_temp`, laid out in `out` as top_k.wgsl describes.
    pub fn top_k(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        (len, k, inv_temp): (u32, u32, f32),
        (x, out): (&wgpu::Buffer, &wgpu::Buffer),
    ) -> Result<()> {
        if k == 0 || k > MAX_TOP_K {
            return Err(Error::input(format!(
                "top-k of {k} on the GPU (1 to {MAX_TOP_K})"
            )));
        }
        let params = [len, k, inv_temp.to_bits(), 0];
        self.dispatch(
            ctx,
            encoder,
            &self.top_k,
            bytemuck::cast_slice(&params),
            &[x, out],
            (1, 1, 1),
        )
    }

    /// Rotary embedding of queries into `q_out`; rotated keys and values into the cache.
    pub fn rope_kv(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        shape: AttentionShape,
        b: RopeKvBuffers<'_>,
    ) -> Result<()> {
        let mut params = [0u32; 8];
        params[..7].copy_from_slice(bytemuck::cast_slice(&[shape]));
        let groups = (
            shape.head_dim.div_ceil(64),
            shape.heads + shape.kv_heads,
            shape.seq,
        );
        let buffers = [b.q, b.k, b.v, b.cos, b.sin, b.q_out, b.k_cache, b.v_cache];
        self.dispatch(
            ctx,
            encoder,
            &self.rope_kv,
            bytemuck::cast_slice(&params),
            &buffers,
            groups,
        )
    }

    /// Causal attention of the `seq` new (rotated) queries over the cache. A single query
    /// over more than `SPLIT_KEYS` keys is split over the sequence into `partials` (of
    /// `attention_partials_len` floats) and merged, so long contexts keep the GPU busy.
    pub fn attention(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        shape: AttentionShape,
        (q, k_cache, v_cache, partials, out): AttentionBuffers,
    ) -> Result<()> {
        if shape.head_dim > 128 {
            return Err(Error::gpu(format!(
                "head_dim {} exceeds the attention kernel's 128",
                shape.head_dim
            )));
        }
        let params = AttentionParams {
            seq: shape.seq,
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            start: shape.start,
            capacity: shape.capacity,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
            split_keys: 0,
        };
        let keys = shape.start + shape.seq;
        if shape.seq > 1 || keys <= SPLIT_KEYS {
            return self.dispatch(
                ctx,
                encoder,
                &self.attention,
                bytemuck::bytes_of(&params),
                &[q, k_cache, v_cache, out],
                (shape.heads, shape.seq, 1),
            );
        }
        let splits = keys.div_ceil(SPLIT_KEYS);
        let split = AttentionParams {
            split_keys: SPLIT_KEYS,
            ..params
        };
        self.dispatch(
            ctx,
            encoder,
            &self.attention,
            bytemuck::bytes_of(&split),
            &[q, k_cache, v_cache, partials],
            (shape.heads, splits, 1),
        )?;
        let merge = [shape.heads, shape.head_dim, splits, 0];
        self.dispatch(
            ctx,
            encoder,
            &self.attention_merge,
            bytemuck::cast_slice(&merge),
            &[partials, out],
            (shape.heads, 1, 1),
        )
    }
}
