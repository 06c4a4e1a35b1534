//! The Phi-2 architecture: its configuration and its forward pass on candle tensors.

mod config;
pub mod grad_kernels;
mod kv_cache;
mod phi;

pub use config::{Activation, PhiConfig};
pub use kv_cache::KvCache;
pub use phi::{expected_tensors, Logits, Phi};
