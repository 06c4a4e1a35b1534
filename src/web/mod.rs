//! The browser API (wasm-bindgen): a thin shell that hands files to [`Checkpoint`],
//! builds the WebGPU or CPU backend, and exposes generation, multiple-choice scoring and
//! LoRA fine-tuning to JavaScript. The page's Web Worker (`www/worker.js`) is its only caller.
//!
//! Every failure reaches JavaScript as an `Error` whose `name` says which kind it was
//! (`FileError`, `ConfigError`, `InputError`, `GpuError`, `TensorError`); the page falls
//! back to the CPU on `GpuError`. Nothing here panics on bad input: a panic would abort
//! the whole wasm module.

mod api;
mod files;
mod finetune;
mod pacing;

pub use api::{eval_report, parse_benchmark, Model};
pub use finetune::{parse_training_rows, FineTune};
/// `initThreadPool(n)` for JavaScript: starts rayon's pool on `n` Web Workers (threaded build).
#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

use wasm_bindgen::prelude::*;

use crate::error::Error;

#[wasm_bindgen(start)]
fn start() {
    // A panic is a bug; at least let it say where it happened in the console.
    console_error_panic_hook::set_once();
}

fn js_error(e: Error) -> JsValue {
    let name = match &e {
        Error::File { .. } => "FileError",
        Error::Config(_) => "ConfigError",
        Error::Input(_) => "InputError",
        Error::Gpu(_) => "GpuError",
        Error::Tensor(_) => "TensorError",
    };
    let err = js_sys::Error::new(&e.to_string());
    err.set_name(name);
    err.into()
}

fn to_js<T: serde::Serialize>(value: &T) -> Result<JsValue, JsValue> {
    value
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| js_error(Error::input(e)))
}

fn from_js<T: serde::de::DeserializeOwned>(value: JsValue, what: &str) -> Result<T, JsValue> {
    serde_wasm_bindgen::from_value(value)
        .map_err(|e| js_error(Error::input(format!("invalid {what}: {e}"))))
}
