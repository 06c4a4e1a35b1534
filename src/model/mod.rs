//! The Phi-2 architecture: its configuration, its tensors' names in every layout, and its
//! forward pass on candle tensors.

mod config;
mod decode_attention;
mod disjoint;
#[cfg(target_arch = "x86_64")]
pub mod f16_matmul;
pub mod grad_kernels;
mod kv_cache;
pub mod names;
mod phi;
#[cfg(quant_kernels)]
pub mod quant_matmul;
mod source;
#[cfg(target_arch = "wasm32")]
pub mod spin_pool;
pub mod stored;

pub use config::{Activation, PhiConfig};
pub use kv_cache::KvCache;
pub use names::expected_tensors;
pub use phi::{Logits, Phi};
pub use source::{BoxFuture, StoredTensor, TensorSource, Weight};
