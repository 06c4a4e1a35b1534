//! Compute pipelines, compiled once per device, and the recording of their dispatches
//! into a caller's command encoder (one encoder per forward step).

use wgpu::util::DeviceExt;

use super::context::GpuContext;
use crate::error::{Error, Result};

/// Largest workgroup count per dispatch dimension that WebGPU guarantees.
const MAX_GROUPS: u32 = 65_535;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub has_bias: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LayerNormParams {
    rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

pub struct Kernels {
    matmul: wgpu::ComputePipeline,
    layer_norm: wgpu::ComputePipeline,
    gelu_new: wgpu::ComputePipeline,
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

impl Kernels {
    pub fn new(ctx: &GpuContext) -> Self {
        let d = &ctx.device;
        Self {
            matmul: pipeline(d, "matmul", include_str!("shaders/matmul.wgsl")),
            layer_norm: pipeline(d, "layer_norm", include_str!("shaders/layer_norm.wgsl")),
            gelu_new: pipeline(d, "gelu_new", include_str!("shaders/gelu_new.wgsl")),
        }
    }

    fn dispatch(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        pipeline: &wgpu::ComputePipeline,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32),
    ) -> Result<()> {
        if groups.0 > MAX_GROUPS || groups.1 > MAX_GROUPS {
            return Err(Error::gpu(format!(
                "dispatch of {groups:?} workgroups exceeds {MAX_GROUPS} per dimension"
            )));
        }
        let uniform = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: params,
                usage: wgpu::BufferUsages::UNIFORM,
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
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
        Ok(())
    }

    /// `y = x · wᵀ + b` for `x` (m × k), `w` (n × k); `bias` may be any buffer when absent.
    pub fn matmul(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        p: MatmulParams,
        (x, w, bias, y): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    ) -> Result<()> {
        let groups = (p.n.div_ceil(16), p.m.div_ceil(16));
        self.dispatch(
            ctx,
            encoder,
            &self.matmul,
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
            (rows, 1),
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
        let groups = len.div_ceil(256);
        // Spread over two dimensions when one would exceed the per-dimension cap.
        let (gx, gy) = if groups > MAX_GROUPS {
            (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
        } else {
            (groups.max(1), 1)
        };
        // Uniform blocks are padded to 16 bytes.
        let params = [len, 0, 0, 0];
        self.dispatch(
            ctx,
            encoder,
            &self.gelu_new,
            bytemuck::cast_slice(&params),
            &[x],
            (gx, gy),
        )
    }
}
