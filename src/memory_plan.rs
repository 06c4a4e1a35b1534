//! What a load will hold, worked out from headers alone (each tensor's stored form after the
//! conversions asked for, and the config) so that a load that cannot fit is refused before
//! any weight byte is read: the weights as the backend keeps them, the KV cache for the
//! context, and the largest tensor, which a streamed load holds raw while converting it.

use crate::model::{PhiConfig, StoredTensor};

/// Where the weights will live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Gpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryPlan {
    /// Bytes of weights as the backend holds them.
    pub weights: u64,
    /// Bytes of the KV cache at the full context.
    pub kv_cache: u64,
    /// The largest tensor as stored.
    pub largest_stored: u64,
    /// The largest matrix the GPU binds whole (the embedding and output layers, with a row
    /// per token, are split by rows to fit a binding).
    pub largest_binding: u64,
}

fn dense(dtype: &str) -> bool {
    matches!(dtype, "F32" | "F16" | "BF16")
}

impl MemoryPlan {
    pub fn new(stored: &[StoredTensor], cfg: &PhiConfig, context: usize, target: Target) -> Self {
        let held = |t: &StoredTensor| {
            let values = t.shape.iter().product::<usize>() as u64;
            match (target, t.dtype.as_str()) {
                // The CPU model computes in f32 and keeps GGML blocks as they are.
                (Target::Cpu, d) if dense(d) => 4 * values,
                (Target::Cpu, _) => t.bytes,
                // The GPU keeps f16 matrices, q8_0 and q4_0 blocks; the rest becomes f32.
                (Target::Gpu, "F16") if t.shape.len() == 2 => 2 * values,
                (Target::Gpu, "Q8_0" | "Q4_0") => t.bytes,
                (Target::Gpu, _) => 4 * values,
            }
        };
        let context = context.min(cfg.max_position_embeddings) as u64;
        let kv_width = (cfg.num_key_value_heads * cfg.head_dim()) as u64;
        Self {
            weights: stored.iter().map(held).sum(),
            kv_cache: cfg.num_hidden_layers as u64 * 2 * context * kv_width * 4,
            largest_stored: stored.iter().map(|t| t.bytes).max().unwrap_or(0),
            largest_binding: stored
                .iter()
                .filter(|t| t.shape.len() == 2 && t.shape[0] != cfg.vocab_size)
                .map(held)
                .max()
                .unwrap_or(0),
        }
    }

    /// Weights and KV cache together.
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache
    }
}

/// Bytes as people read them ("1.6 GB", "134 MB").
pub fn readable(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.1} GB", bytes as f64 / 1e9)
    } else {
        format!("{} MB", bytes.div_ceil(1_000_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dtype: &str, shape: &[usize], bytes: u64) -> StoredTensor {
        StoredTensor {
            name: String::new(),
            shape: shape.to_vec(),
            dtype: dtype.into(),
            bytes,
        }
    }

    #[test]
    fn counts_each_form_as_its_backend_holds_it() {
        let cfg = PhiConfig::from_json(
            r#"{"vocab_size": 100, "hidden_size": 64, "intermediate_size": 256,
                "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512}"#,
            "test",
        )
        .unwrap();
        let stored = [
            tensor("F16", &[100, 64], 12_800),
            tensor("Q4_0", &[256, 64], 256 * 2 * 18),
            tensor("F16", &[64], 128),
        ];
        let cpu = MemoryPlan::new(&stored, &cfg, 128, Target::Cpu);
        assert_eq!(cpu.weights, 25_600 + 9_216 + 256);
        assert_eq!(cpu.kv_cache, 2 * 2 * 128 * 64 * 4);
        assert_eq!(cpu.largest_stored, 12_800);
        let gpu = MemoryPlan::new(&stored, &cfg, 4096, Target::Gpu);
        assert_eq!(gpu.weights, 12_800 + 9_216 + 256);
        // The context is capped at the model's.
        assert_eq!(gpu.kv_cache, 2 * 2 * 512 * 64 * 4);
        // The 100-row token table is split by rows; the MLP matrix is bound whole.
        assert_eq!(gpu.largest_binding, 9_216);
    }
}
