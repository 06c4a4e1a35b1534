//! The WebGPU compute backend (wgpu): the same code natively (Vulkan, Metal, DX12; Mesa's
//! lavapipe in CI) and in the browser (WebGPU).
//!
//! - `context`: adapter and device with the adapter's own limits, uploads, async readback;
//! - `tensor`: `GpuTensor`, a buffer with its shape and storage format;
//! - `params`: each kernel's parameter block, defined once for Rust and WGSL;
//! - `kernels`: compute pipelines built once from the `.wgsl` files in `shaders/`, bound by
//!   name;
//! - `weights`: a checkpoint's weights uploaded in their stored formats;
//! - `backend`: the Phi-2 forward pass from those kernels, behind the `Backend` trait.

mod backend;
mod context;
mod kernels;
mod params;
mod tensor;
mod weights;

pub use backend::GpuBackend;
pub use context::{GpuContext, GpuInfo};
pub use kernels::{
    attention_partials_len, AttentionBuffers, AttentionShape, KernelChoice, KernelFamily, Kernels,
    RopeKvBuffers, SPLIT_KEYS,
};
pub use tensor::{GpuLinear, GpuNorm, GpuTensor, WeightFormat};
