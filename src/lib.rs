//! medphi: Phi-2-family language models, in the browser (WebGPU or wasm CPU) and natively.
//!
//! A reading order, from the inside out (ARCHITECTURE.md has the why):
//! 1. [`model`]: the architecture. `PhiConfig` (config.json, validated), `names` (every
//!    tensor and its name in each file layout), `TensorSource` (what the model asks of a
//!    checkpoint), and `Phi`, the whole forward pass in one file on candle tensors.
//! 2. [`weights`]: safetensors and GGUF files as `TensorSource`s, read as untrusted input;
//!    [`tokenizer`]: byte-level BPE and a UTF-8-safe streaming detokenizer;
//!    [`checkpoint`]: a model folder or GGUF file opened and checked as a whole.
//! 3. [`backend`]: the one interface generation and evaluation use to run a model,
//!    `forward(tokens, Want) -> Next`, with the CPU implementation; [`gpu`]: the same on
//!    wgpu/WebGPU, from WGSL kernels; [`candidates`]: top-k and argmax of a logits row.
//! 4. [`generate`]: a `Session` over a backend, sampling, stop strings, prompt formats;
//!    [`cancel`]: the flag that stops long work at a safe point.
//! 5. [`eval`]: benchmark files, lm-eval's scoring, resumable runs and its output records.
//! 6. [`train`]: pretraining, SFT, DPO and LoRA on the differentiable model (the same trainer
//!    in the browser), with checkpoints that survive a kill natively; [`data`]: training data from medical ontologies.
//! 7. The shells: `web` (wasm32 only) is the JavaScript API the page's worker calls; the CLI
//!    lives in the binary (`src/main.rs`, `src/cli/`). [`fuzzing`] holds the parsers' fuzz
//!    entry points.

pub mod backend;
pub mod bench;
pub mod cancel;
pub mod candidates;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
/// Entry points for the fuzz targets (`fuzz/`) and their replay test: one per parser of
/// untrusted input (GGUF, safetensors, config.json, tokenizer.json, benchmarks, chat requests).
pub mod fuzzing;
pub mod generate;
pub mod gpu;
pub mod memory_plan;
pub mod model;
pub mod tokenizer;
pub mod train;
#[cfg(target_arch = "wasm32")]
pub mod web;
pub mod weights;

pub use error::{Error, Result};
