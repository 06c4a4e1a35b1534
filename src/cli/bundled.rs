//! The model this project trained (models/tiny-medphi/README.md), built into the binary:
//! an installed `medphi` runs it wherever it is, with no files beside it.

use candle_core::DType;
use medphi::checkpoint::{Checkpoint, NamedBytes};

const CONFIG: &[u8] = include_bytes!("../../models/tiny-medphi/config.json");
const TOKENIZER: &[u8] = include_bytes!("../../models/tiny-medphi/tokenizer.json");
pub const WEIGHTS: &[u8] = include_bytes!("../../models/tiny-medphi/model.safetensors");

/// How reports name it.
pub const NAME: &str = "tiny-medphi (built in)";

pub fn checkpoint() -> medphi::Result<Checkpoint> {
    let file = |name: &str, bytes: &[u8]| NamedBytes {
        name: format!("tiny-medphi/{name}"),
        bytes: bytes.to_vec(),
    };
    Checkpoint::from_bytes(
        Some(file("config.json", CONFIG)),
        Some(file("tokenizer.json", TOKENIZER)),
        vec![file("model.safetensors", WEIGHTS)],
        DType::F32,
    )
}
