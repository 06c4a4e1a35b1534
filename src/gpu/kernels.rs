//! Compute pipelines, compiled once per device, and the recording of their dispatches into
//! a caller's command encoder (one encoder per forward step).
//!
//! Each kernel's source is its parameter block (generated from `params.rs`), then, for the
//! kernels that read weights, one `weights_*.wgsl`, then its own `.wgsl`. Its bindings are
//! read from that source by name, and a dispatch binds buffers by those names, so a buffer
//! can never land in another's slot; operands are [`GpuTensor`]s whose shapes each kernel
//! checks before recording.

use std::cell::{Cell, RefCell};

use wgpu::util::DeviceExt;

use super::context::GpuContext;
use super::params::{
    AttentionParams, EmbeddingParams, GpuParams, LayerNormParams, LenParams, MatmulParams,
    MergeParams, RopeParams, TopKParams,
};
use super::tensor::{GpuLinear, GpuNorm, GpuTensor, WeightFormat};
use crate::error::{Error, Result};

/// Largest workgroup count per dispatch dimension that WebGPU guarantees.
const MAX_GROUPS: u32 = 65_535;

/// Which kernels record the matrix products and attention: the `gpu` family is built for
/// hardware GPUs (coalesced 16-byte loads, many workgroups, subgroup reductions), the
/// `emulator` family for CPU-emulated adapters (lavapipe, SwiftShader), whose costs are the
/// reverse of a GPU's. Both give the same results; the other kernels are shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFamily {
    Gpu,
    Emulator,
}

/// What a caller asks for: a family, or `Auto`, which takes `gpu` on hardware adapters and
/// `emulator` on CPU-type ones. (`MEDPHI_GPU_KERNELS` natively, `gpuKernels` in the page.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelChoice {
    #[default]
    Auto,
    Gpu,
    Emulator,
}

impl std::str::FromStr for KernelChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "emulator" => Ok(Self::Emulator),
            other => Err(Error::input(format!(
                "unknown GPU kernel family {other:?} (expected auto, gpu or emulator)"
            ))),
        }
    }
}

impl KernelChoice {
    /// The family for an adapter: `Auto` by its device type.
    pub fn resolve(self, info: &super::GpuInfo) -> KernelFamily {
        match self {
            Self::Gpu => KernelFamily::Gpu,
            Self::Emulator => KernelFamily::Emulator,
            Self::Auto if info.device_type == "Cpu" => KernelFamily::Emulator,
            Self::Auto => KernelFamily::Gpu,
        }
    }
}

/// Shapes for `rope_kv` and `attention`: `seq` new tokens at positions `start..`, in a cache
/// with room for `capacity` positions per head.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub seq: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub rotary_dim: u32,
    pub start: u32,
    pub capacity: u32,
}

/// Keys per workgroup when a single query's attention is split over the sequence.
pub const SPLIT_KEYS: u32 = 256;

/// The most candidates `top_k` returns (top_k.wgsl keeps them in private arrays this long).
pub const MAX_TOP_K: u32 = 64;

/// Floats of the attention scratch buffer for a cache of `capacity` positions.
pub fn attention_partials_len(heads: usize, head_dim: usize, capacity: usize) -> usize {
    heads * capacity.div_ceil(SPLIT_KEYS as usize) * (head_dim + 2)
}

/// Operands of `rope_kv`: projections in, rotated queries and the KV cache out.
pub struct RopeKvBuffers<'a> {
    pub q: &'a GpuTensor,
    pub k: &'a GpuTensor,
    pub v: &'a GpuTensor,
    pub cos: &'a GpuTensor,
    pub sin: &'a GpuTensor,
    pub q_out: &'a GpuTensor,
    pub k_cache: &'a GpuTensor,
    pub v_cache: &'a GpuTensor,
}

/// Operands of `attention`: rotated queries, the layer's K and V caches, the split-mode
/// scratch (`attention_partials_len` floats), and the output.
pub struct AttentionBuffers<'a> {
    pub q: &'a GpuTensor,
    pub k_cache: &'a GpuTensor,
    pub v_cache: &'a GpuTensor,
    pub partials: &'a GpuTensor,
    pub out: &'a GpuTensor,
}

/// A pipeline and its bindings after the parameter block (number and name), as its WGSL
/// declares them.
struct Kernel {
    pipeline: wgpu::ComputePipeline,
    bindings: Vec<(u32, String)>,
}

/// One pipeline per weight format, indexed by `WeightFormat as usize`.
type PerFormat = [Kernel; 4];

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
    family: KernelFamily,
    slots: RefCell<Vec<Slot>>,
    next_slot: Cell<usize>,
    matmul: PerFormat,
    gemv: PerFormat,
    layer_norm: Kernel,
    gelu_new: Kernel,
    embedding: PerFormat,
    residual: Kernel,
    top_k: Kernel,
    rope_kv: Kernel,
    attention: Kernel,
    attention_merge: Kernel,
}

/// Workgroups for `len` threads of 256, spread over two dimensions past the per-dimension cap.
fn elementwise_groups(len: u32) -> (u32, u32, u32) {
    let groups = len.div_ceil(256).max(1);
    if groups > MAX_GROUPS {
        (MAX_GROUPS, groups.div_ceil(MAX_GROUPS), 1)
    } else {
        (groups, 1, 1)
    }
}

/// The `@binding(n)` variables of group 0 in `source` after the parameters (n ≥ 1), by number.
fn binding_names(source: &str) -> Vec<(u32, String)> {
    let mut found: Vec<(u32, String)> = source
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("@group(0) @binding(")?;
            let (n, decl) = rest.split_once(')')?;
            let name = decl.split_once('>')?.1.split_once(':')?.0.trim();
            Some((n.parse().ok()?, name.to_string()))
        })
        .filter(|(n, _)| *n > 0)
        .collect();
    found.sort();
    found
}

fn kernel<P: GpuParams>(device: &wgpu::Device, label: &str, body: &str) -> Kernel {
    // WGSL's `enable` directives must come before every declaration.
    let (enables, rest): (Vec<&str>, Vec<&str>) =
        body.lines().partition(|l| l.starts_with("enable "));
    let source = format!("{}\n{}{}", enables.join("\n"), P::wgsl(), rest.join("\n"));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    Kernel {
        pipeline,
        bindings: binding_names(&source),
    }
}

/// `body` compiled once per weight format, after `head` and the format's weights snippet
/// (`weights_*.wgsl` for the emulator family, `gpu/chunks_*.wgsl` for the gpu family).
fn per_format<P: GpuParams>(
    device: &wgpu::Device,
    label: &str,
    (family, head): (KernelFamily, &str),
    body: &str,
) -> PerFormat {
    WeightFormat::ALL.map(|f| {
        let weights = match family {
            KernelFamily::Emulator => f.shader(),
            KernelFamily::Gpu => f.gpu_chunks(),
        };
        kernel::<P>(
            device,
            &format!("{label} {f:?}"),
            &format!("{weights}{head}{body}"),
        )
    })
}

/// gpu/gemv.wgsl with its row reduction: subgroup operations where the adapter has them and
/// no subgroup is wider than a row's invocations, workgroup memory otherwise.
fn gpu_gemv(subgroups: bool) -> String {
    let body = include_str!("shaders/gpu/gemv.wgsl");
    if subgroups {
        let builtins = "@builtin(subgroup_size) subgroup_size: u32,";
        let enable = if cfg!(target_arch = "wasm32") {
            "enable subgroups;\n"
        } else {
            ""
        };
        format!(
            "{enable}{}{}",
            include_str!("shaders/gpu/reduce_subgroups.wgsl"),
            body.replace("SUBGROUP_BUILTINS", builtins)
                .replace("SUBGROUP_INIT", "subgroup_width = subgroup_size;")
        )
    } else {
        format!(
            "{}{}",
            include_str!("shaders/gpu/reduce_workgroup.wgsl"),
            body.replace("SUBGROUP_BUILTINS", "")
                .replace("SUBGROUP_INIT", "")
        )
    }
}

/// gpu/gemv.wgsl's invocations per output row: subgroups up to this wide fit in one row.
const GEMV_LANES: u32 = 64;

/// Errors naming `kernel` unless `ok`.
fn check(ok: bool, kernel: &str, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::gpu(format!("{kernel}: {}", what())))
    }
}

impl Kernels {
    /// The pipelines of `family` for this device. `subgroups`: may the gpu family use
    /// subgroup operations (the adapter has them, at most `GEMV_LANES` wide)?
    pub fn new(ctx: &GpuContext, family: KernelFamily) -> Self {
        let d = &ctx.device;
        let info = &ctx.info;
        let subgroups = info.subgroups && info.subgroup_max_size <= GEMV_LANES;
        let matmul_bindings = (family, include_str!("shaders/matmul_bindings.wgsl"));
        let (matmul, gemv, attention) = match family {
            KernelFamily::Emulator => (
                include_str!("shaders/matmul.wgsl").to_string(),
                include_str!("shaders/gemv.wgsl").to_string(),
                include_str!("shaders/attention.wgsl"),
            ),
            KernelFamily::Gpu => (
                include_str!("shaders/gpu/matmul.wgsl").to_string(),
                gpu_gemv(subgroups),
                include_str!("shaders/gpu/attention.wgsl"),
            ),
        };
        Self {
            family,
            slots: RefCell::new(Vec::new()),
            next_slot: Cell::new(0),
            matmul: per_format::<MatmulParams>(d, "matmul", matmul_bindings, &matmul),
            gemv: per_format::<MatmulParams>(d, "gemv", matmul_bindings, &gemv),
            layer_norm: kernel::<LayerNormParams>(
                d,
                "layer_norm",
                include_str!("shaders/layer_norm.wgsl"),
            ),
            gelu_new: kernel::<LenParams>(d, "gelu_new", include_str!("shaders/gelu_new.wgsl")),
            embedding: per_format::<EmbeddingParams>(
                d,
                "embedding",
                (KernelFamily::Emulator, ""),
                include_str!("shaders/embedding.wgsl"),
            ),
            residual: kernel::<LenParams>(d, "residual", include_str!("shaders/residual.wgsl")),
            top_k: kernel::<TopKParams>(d, "top_k", include_str!("shaders/top_k.wgsl")),
            rope_kv: kernel::<RopeParams>(d, "rope_kv", include_str!("shaders/rope_kv.wgsl")),
            attention: kernel::<AttentionParams>(d, "attention", attention),
            attention_merge: kernel::<MergeParams>(
                d,
                "attention_merge",
                include_str!("shaders/attention_merge.wgsl"),
            ),
        }
    }

    pub fn family(&self) -> KernelFamily {
        self.family
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

    fn slot(ctx: &GpuContext, kernel: &Kernel, params: &[u8], buffers: &[&wgpu::Buffer]) -> Slot {
        let pipeline = &kernel.pipeline;
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
        for ((binding, _), b) in kernel.bindings.iter().zip(buffers) {
            entries.push(wgpu::BindGroupEntry {
                binding: *binding,
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

    /// Records `kernel` with `params` and the tensors `bound` by binding name.
    fn dispatch(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        params: &impl GpuParams,
        bound: &[(&str, &GpuTensor)],
        groups: (u32, u32, u32),
    ) -> Result<()> {
        if groups.0 > MAX_GROUPS || groups.1 > MAX_GROUPS || groups.2 > MAX_GROUPS {
            return Err(Error::gpu(format!(
                "dispatch of {groups:?} workgroups exceeds {MAX_GROUPS} per dimension"
            )));
        }
        if let Some((name, _)) = bound
            .iter()
            .find(|(name, _)| !kernel.bindings.iter().any(|(_, b)| b == name))
        {
            return Err(Error::gpu(format!(
                "the kernel has no binding {name} (it has {:?})",
                kernel.bindings
            )));
        }
        let buffers = kernel
            .bindings
            .iter()
            .map(|(_, name)| {
                bound
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| &t.buffer)
                    .ok_or_else(|| Error::gpu(format!("binding {name} was not given")))
            })
            .collect::<Result<Vec<_>>>()?;
        let params = params.uniform_bytes();
        let index = self.next_slot.get();
        self.next_slot.set(index + 1);
        let mut slots = self.slots.borrow_mut();
        let pipeline = &kernel.pipeline;
        let reusable = slots.get(index).is_some_and(|slot| {
            slot.pipeline == *pipeline
                && slot.params.size() == params.len() as u64
                && slot.buffers.iter().eq(buffers.iter().copied())
        });
        if reusable {
            ctx.queue.write_buffer(&slots[index].params, 0, &params);
        } else {
            let slot = Self::slot(ctx, kernel, &params, &buffers);
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

    /// `y[.., col_offset..] = x · wᵀ + b` over the first `rows` rows of `x` (`[_, in]`), into
    /// columns `col_offset..col_offset + out` of `y`'s rows. A single row (decode) takes the
    /// GEMV kernel, more rows (prefill) the tiled GEMM.
    pub fn matmul(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        rows: usize,
        x: &GpuTensor,
        linear: &GpuLinear,
        (y, col_offset): (&GpuTensor, usize),
    ) -> Result<()> {
        let w = &linear.w;
        let (n, k) = (w.rows(), w.cols());
        check(x.cols() == k, "matmul", || {
            format!("x has rows of {}, w of {k}", x.cols())
        })?;
        check(
            rows <= x.rows() && rows <= y.rows() && col_offset + n <= y.cols(),
            "matmul",
            || {
                format!(
                    "{rows} rows of {n} at column {col_offset} do not fit y {:?}",
                    y.shape
                )
            },
        )?;
        let p = MatmulParams {
            m: rows as u32,
            n: n as u32,
            k: k as u32,
            has_bias: u32::from(linear.b.is_some()),
            ldy: y.cols() as u32,
            col_offset: col_offset as u32,
        };
        // Without a bias, any buffer fills its binding: has_bias = 0 keeps it unread.
        let b = linear.b.as_ref().unwrap_or(x);
        let bound = [("x", x), ("w", w), ("b", b), ("y", y)];
        let (kernel, groups) = match (self.family, rows) {
            (KernelFamily::Gpu, _) if !k.is_multiple_of(32) => {
                return Err(Error::gpu(format!(
                    "matmul: the gpu kernels need rows of a multiple of 32 values, w has {k}"
                )))
            }
            // gpu/gemv.wgsl: 4 rows per workgroup.
            (KernelFamily::Gpu, 1) => (
                &self.gemv[w.format as usize],
                elementwise_groups(p.n.div_ceil(4) * 256),
            ),
            // gpu/matmul.wgsl's 32-row × 64-column tiles.
            (KernelFamily::Gpu, _) => (
                &self.matmul[w.format as usize],
                (p.n.div_ceil(64), p.m.div_ceil(32), 1),
            ),
            (KernelFamily::Emulator, 1) => (&self.gemv[w.format as usize], elementwise_groups(p.n)),
            // matmul.wgsl's 16-row × 64-column tiles.
            (KernelFamily::Emulator, _) => (
                &self.matmul[w.format as usize],
                (p.n.div_ceil(64), p.m.div_ceil(16), 1),
            ),
        };
        self.dispatch(ctx, encoder, kernel, &p, &bound, groups)
    }

    /// LayerNorm of the first `rows` rows of `x` into `y`.
    pub fn layer_norm(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        rows: usize,
        x: &GpuTensor,
        norm: &GpuNorm,
        y: &GpuTensor,
    ) -> Result<()> {
        let dim = norm.w.len();
        check(
            x.cols() == dim && y.cols() == dim && rows <= x.rows() && rows <= y.rows(),
            "layer_norm",
            || format!("{rows} rows of {dim} from {:?} into {:?}", x.shape, y.shape),
        )?;
        let p = LayerNormParams {
            rows: rows as u32,
            dim: dim as u32,
            eps: norm.eps,
        };
        let bound = [("x", x), ("gamma", &norm.w), ("beta", &norm.b), ("y", y)];
        self.dispatch(ctx, encoder, &self.layer_norm, &p, &bound, (p.rows, 1, 1))
    }

    /// gelu_new in place over the first `rows` rows of `x`.
    pub fn gelu_new(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        rows: usize,
        x: &GpuTensor,
    ) -> Result<()> {
        check(rows <= x.rows(), "gelu_new", || {
            format!("{rows} rows of {:?}", x.shape)
        })?;
        let p = LenParams {
            len: (rows * x.cols()) as u32,
        };
        let groups = elementwise_groups(p.len);
        self.dispatch(ctx, encoder, &self.gelu_new, &p, &[("x", x)], groups)
    }

    /// `out[t] = table[ids[t]]` for the first `tokens` ids, where `table` holds rows
    /// `row_start..` of the whole table (one chunk of a table split by rows); ids outside it
    /// are left to the other chunks' dispatches.
    pub fn embedding(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        tokens: usize,
        ids: &GpuTensor,
        (table, row_start): (&GpuTensor, usize),
        out: &GpuTensor,
    ) -> Result<()> {
        let dim = table.cols();
        check(
            tokens <= ids.len() && out.cols() == dim && tokens <= out.rows(),
            "embedding",
            || format!("{tokens} ids of {dim} into {:?}", out.shape),
        )?;
        let p = EmbeddingParams {
            tokens: tokens as u32,
            dim: dim as u32,
            row_start: row_start as u32,
            row_count: table.rows() as u32,
        };
        let kernel = &self.embedding[table.format as usize];
        let bound = [("ids", ids), ("w", table), ("out", out)];
        let groups = elementwise_groups(p.tokens * p.dim);
        self.dispatch(ctx, encoder, kernel, &p, &bound, groups)
    }

    /// `x += attn + mlp` over the first `rows` rows.
    pub fn residual(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        rows: usize,
        (x, attn, mlp): (&GpuTensor, &GpuTensor, &GpuTensor),
    ) -> Result<()> {
        check(
            x.cols() == attn.cols()
                && x.cols() == mlp.cols()
                && rows <= x.rows().min(attn.rows()).min(mlp.rows()),
            "residual",
            || {
                format!(
                    "{rows} rows of {:?}, {:?}, {:?}",
                    x.shape, attn.shape, mlp.shape
                )
            },
        )?;
        let p = LenParams {
            len: (rows * x.cols()) as u32,
        };
        let bound = [("x", x), ("attn", attn), ("mlp", mlp)];
        let groups = elementwise_groups(p.len);
        self.dispatch(ctx, encoder, &self.residual, &p, &bound, groups)
    }

    /// The `k` (at most `MAX_TOP_K`) largest of the first `len` values of `x` and their
    /// log-normaliser at `1 / inv_temp`, laid out in `out` as top_k.wgsl describes.
    pub fn top_k(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        (len, k, inv_temp): (u32, u32, f32),
        (x, out): (&GpuTensor, &GpuTensor),
    ) -> Result<()> {
        if k == 0 || k > MAX_TOP_K {
            return Err(Error::input(format!(
                "top-k of {k} on the GPU (1 to {MAX_TOP_K})"
            )));
        }
        check(
            len as usize <= x.len() && out.len() > 2 * k as usize,
            "top_k",
            || format!("top {k} of {len} from {:?} into {:?}", x.shape, out.shape),
        )?;
        let p = TopKParams { len, k, inv_temp };
        let bound = [("x", x), ("out", out)];
        self.dispatch(ctx, encoder, &self.top_k, &p, &bound, (1, 1, 1))
    }

    /// Rotary embedding of queries into `q_out`; rotated keys and values into the cache.
    pub fn rope_kv(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        shape: AttentionShape,
        b: RopeKvBuffers<'_>,
    ) -> Result<()> {
        let s = shape;
        let cache = (s.kv_heads * s.capacity * s.head_dim) as usize;
        let table = (s.capacity * s.rotary_dim / 2) as usize;
        check(
            s.start + s.seq <= s.capacity
                && b.k_cache.len() >= cache
                && b.v_cache.len() >= cache
                && b.cos.len() >= table
                && b.sin.len() >= table,
            "rope_kv",
            || format!("{shape:?} against a cache of {:?}", b.k_cache.shape),
        )?;
        let p = RopeParams {
            seq: s.seq,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            rotary_dim: s.rotary_dim,
            start: s.start,
            capacity: s.capacity,
        };
        let groups = (s.head_dim.div_ceil(64), s.heads + s.kv_heads, s.seq);
        let bound = [
            ("q", b.q),
            ("k", b.k),
            ("v", b.v),
            ("cos_t", b.cos),
            ("sin_t", b.sin),
            ("q_out", b.q_out),
            ("k_cache", b.k_cache),
            ("v_cache", b.v_cache),
        ];
        self.dispatch(ctx, encoder, &self.rope_kv, &p, &bound, groups)
    }

    /// Causal attention of the `seq` new (rotated) queries over the cache. A single query
    /// over more than `SPLIT_KEYS` keys is split over the sequence into `partials` and
    /// merged, so long contexts keep the GPU busy.
    pub fn attention(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        shape: AttentionShape,
        b: AttentionBuffers<'_>,
    ) -> Result<()> {
        if shape.head_dim > 128 || !shape.head_dim.is_multiple_of(4) {
            return Err(Error::gpu(format!(
                "head_dim {} is not what the attention kernels take (a multiple of 4, at most 128)",
                shape.head_dim
            )));
        }
        let p = AttentionParams {
            seq: shape.seq,
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            start: shape.start,
            capacity: shape.capacity,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
            split_keys: 0,
        };
        let caches = [("q", b.q), ("k_cache", b.k_cache), ("v_cache", b.v_cache)];
        let keys = shape.start + shape.seq;
        if shape.seq > 1 || keys <= SPLIT_KEYS {
            let bound = [caches[0], caches[1], caches[2], ("out", b.out)];
            let groups = (shape.heads, shape.seq, 1);
            return self.dispatch(ctx, encoder, &self.attention, &p, &bound, groups);
        }
        let splits = keys.div_ceil(SPLIT_KEYS);
        let needed =
            attention_partials_len(shape.heads as usize, shape.head_dim as usize, keys as usize);
        check(b.partials.len() >= needed, "attention", || {
            format!(
                "{needed} partials for {keys} keys, {:?} given",
                b.partials.shape
            )
        })?;
        let split = AttentionParams {
            split_keys: SPLIT_KEYS,
            ..p
        };
        let bound = [caches[0], caches[1], caches[2], ("out", b.partials)];
        let groups = (shape.heads, splits, 1);
        self.dispatch(ctx, encoder, &self.attention, &split, &bound, groups)?;
        let merge = MergeParams {
            heads: shape.heads,
            head_dim: shape.head_dim,
            splits,
        };
        let bound = [("partials", b.partials), ("out", b.out)];
        let groups = (shape.heads, 1, 1);
        self.dispatch(ctx, encoder, &self.attention_merge, &merge, &bound, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::binding_names;

    #[test]
    fn binding_names_are_read_from_the_kernel_source_in_binding_order() {
        let source = "@group(0) @binding(0) var<uniform> p: Params;\n\
                      @group(0) @binding(3) var<storage, read_write> y: array<f32>;\n\
                      @group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;\n";
        assert_eq!(
            binding_names(source),
            [(1, "x".to_string()), (3, "y".to_string())]
        );
    }
}
