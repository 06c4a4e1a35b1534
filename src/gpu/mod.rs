//! The WebGPU compute backend (wgpu): the same code natively (Vulkan, Metal, DX12; Mesa's
//! lavapipe in CI) and in the browser (WebGPU).
//!
//! - `context`: adapter and device with the adapter's own limits, async readback;
//! - `kernels`: compute pipelines built once from the `.wgsl` files in `shaders/`;
//! - `backend`: the Phi-2 forward pass from those kernels, behind the `Backend` trait.

mod backend;
mod context;
mod kernels;

pub use backend::GpuBackend;
pub use context::{GpuContext, GpuInfo};
pub use kernels::{
    attention_partials_len, AttentionShape, Kernels, MatmulParams, RopeKvBuffers, WeightFormat,
    SPLIT_KEYS,
};
