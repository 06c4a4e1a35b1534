//! `medphi gpu-info`: the adapter wgpu picks, its limits and optional features.

use anyhow::Result;
use medphi::gpu::GpuContext;

pub fn gpu_info() -> Result<()> {
    let ctx = pollster::block_on(GpuContext::new())?;
    super::print_line(serde_json::to_string_pretty(&ctx.info)?)
}
