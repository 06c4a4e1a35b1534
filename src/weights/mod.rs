//! Reading checkpoint tensors: safetensors (f32/f16/bf16, single or sharded, in transformers'
//! or the older phi-msft layout) and GGUF; PEFT LoRA adapters merged on load; quantization
//! on load.
//!
//! Each file format is a `model::TensorSource`: it answers "give me tensor NAME of shape
//! SHAPE", by Hugging Face tensor name, so the model code never knows which file format it
//! came from.
//! Files are untrusted: headers are bounds-checked by the parsers, and each tensor's
//! shape and dtype are compared with what the config implies before its bytes are used.

mod adapter;
mod bytes;
mod gguf;
mod gguf_file;
mod gguf_write;
mod msft;
mod quantize;
mod random;
mod range_read;
mod read_ahead;
mod safetensors;

pub use self::adapter::{merge_lora, Adapter, WithAdapter};
pub use self::bytes::Bytes;
pub use self::gguf::Gguf;
#[cfg(not(target_arch = "wasm32"))] // for `fuzzing`
pub(crate) use self::gguf_file::{GgufFile, Parsed};
pub use self::gguf_write::write_gguf;
pub use self::msft::{is_msft, MsftLayout};
pub use self::quantize::{Quantization, QuantizeOnLoad};
pub use self::random::RandomWeights;
pub use self::range_read::RangeRead;
pub use self::read_ahead::ReadAhead;
pub use self::safetensors::Safetensors;
pub use crate::model::{StoredTensor, TensorSource, Weight};
