//! medphi: Phi-2-family language models, in the browser (WebGPU or wasm CPU) and natively.
//!
//! Layers, from the inside out (see ARCHITECTURE.md):
//! - [`model`]: the Phi-2 configuration and forward pass on candle tensors;
//! - [`weights`]: safetensors and GGUF readers that hand tensors to the model by name;
//! - [`tokenizer`]: byte-level BPE and a UTF-8-safe streaming detokenizer;
//! - [`gpu`]: the wgpu/WebGPU compute kernels (WGSL);
//! - [`backend`]: the small interface generation and evaluation use to run a model;
//! - [`cancel`]: the flag that stops generation, evaluation and training at a safe point;
//! - [`generate`]: sampling, stop strings, prompt formats, streaming generation;
//! - `train` (native): pretraining and SFT on the differentiable model;
//! - [`checkpoint`]: finding and opening a model folder or GGUF file;
//! - [`data`]: training data built from medical ontologies (HPO, ICD-10-CM);
//! - `web` (wasm32 only): the JavaScript API the browser page's worker calls.

pub mod backend;
pub mod cancel;
pub mod candidates;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gpu;
pub mod model;
pub mod tokenizer;
#[cfg(not(target_arch = "wasm32"))]
pub mod train;
#[cfg(target_arch = "wasm32")]
pub mod web;
pub mod weights;

pub use error::{Error, Result};
