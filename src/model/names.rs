//! Every tensor of the Phi-2 architecture, and its name in each layout that stores one:
//! transformers' `PhiForCausalLM` (what safetensors checkpoints and our own outputs use),
//! the `phi-msft` (MixFormer) layout microsoft/phi-2 first shipped in and early fine-tunes
//! keep, llama.cpp's `phi2` GGUF (split or fused q/k/v), and PEFT's LoRA adapters. This is the
//! one place those names are spelled: the CPU model, the GPU backend, the trainer, the
//! exporter and adapter merging all ask it.

use super::PhiConfig;

/// Which half of a layer's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Weight,
    Bias,
}

/// Where in the network a tensor sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    Embedding,
    /// Decoder block `n`'s input LayerNorm and linear layers.
    Norm(usize),
    Q(usize),
    K(usize),
    V(usize),
    Dense(usize),
    Fc1(usize),
    Fc2(usize),
    FinalNorm,
    Head,
}

/// One tensor: a site and a part (the embedding has only a weight).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId {
    pub site: Site,
    pub part: Part,
}

/// The linear layers of each block, in the order a block applies them.
pub const LINEARS: [fn(usize) -> Site; 6] =
    [Site::Q, Site::K, Site::V, Site::Dense, Site::Fc1, Site::Fc2];

/// transformers' name of each site within a block, and llama.cpp's.
fn block_names(site: Site) -> Option<(usize, &'static str, &'static str)> {
    Some(match site {
        Site::Norm(n) => (n, "input_layernorm", "attn_norm"),
        Site::Q(n) => (n, "self_attn.q_proj", "attn_q"),
        Site::K(n) => (n, "self_attn.k_proj", "attn_k"),
        Site::V(n) => (n, "self_attn.v_proj", "attn_v"),
        Site::Dense(n) => (n, "self_attn.dense", "attn_output"),
        Site::Fc1(n) => (n, "mlp.fc1", "ffn_up"),
        Site::Fc2(n) => (n, "mlp.fc2", "ffn_down"),
        _ => return None,
    })
}

impl Site {
    pub fn weight(self) -> TensorId {
        TensorId {
            site: self,
            part: Part::Weight,
        }
    }

    pub fn bias(self) -> TensorId {
        TensorId {
            site: self,
            part: Part::Bias,
        }
    }

    /// Whether this is one of a block's linear layers (what LoRA adapts).
    pub fn is_linear(self) -> bool {
        matches!(
            self,
            Site::Q(_) | Site::K(_) | Site::V(_) | Site::Dense(_) | Site::Fc1(_) | Site::Fc2(_)
        )
    }

    /// transformers' module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn hf(self) -> String {
        match self {
            Site::Embedding => "model.embed_tokens".into(),
            Site::FinalNorm => "model.final_layernorm".into(),
            Site::Head => "lm_head".into(),
            block => {
                let (n, hf, _) = block_names(block).expect("a block site");
                format!("model.layers.{n}.{hf}")
            }
        }
    }

    /// PEFT's `target_modules` name (the last part of the module path).
    pub fn peft_target(self) -> String {
        let hf = self.hf();
        hf.rsplit('.').next().unwrap_or(&hf).to_string()
    }

    /// The names of this layer's LoRA matrices in a PEFT adapter: `A` (rank × in) and
    /// `B` (out × rank).
    pub fn lora_names(self) -> [String; 2] {
        ["A", "B"].map(|m| format!("base_model.model.{}.lora_{m}.weight", self.hf()))
    }
}

impl TensorId {
    /// The name in a transformers checkpoint, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn hf(self) -> String {
        let part = match self.part {
            Part::Weight => "weight",
            Part::Bias => "bias",
        };
        format!("{}.{part}", self.site.hf())
    }

    /// The name in a llama.cpp `phi2` GGUF, e.g. `blk.3.attn_q.weight`.
    pub fn gguf(self) -> String {
        let part = match self.part {
            Part::Weight => "weight",
            Part::Bias => "bias",
        };
        let stem = match self.site {
            Site::Embedding => "token_embd".to_string(),
            Site::FinalNorm => "output_norm".to_string(),
            Site::Head => "output".to_string(),
            block => {
                let (n, _, gguf) = block_names(block).expect("a block site");
                format!("blk.{n}.{gguf}")
            }
        };
        format!("{stem}.{part}")
    }

    /// For q, k and v: the fused `attn_qkv` tensor older phi2 GGUFs store them in, and this
    /// one's place in it (0, 1, 2: its rows are the q rows, then k, then v).
    pub fn gguf_fused(self) -> Option<(String, usize)> {
        let (n, index) = match self.site {
            Site::Q(n) => (n, 0),
            Site::K(n) => (n, 1),
            Site::V(n) => (n, 2),
            _ => return None,
        };
        let part = match self.part {
            Part::Weight => "weight",
            Part::Bias => "bias",
        };
        Some((format!("blk.{n}.attn_qkv.{part}"), index))
    }

    /// The name in the `phi-msft` layout, e.g. `transformer.h.3.mixer.out_proj.weight`. q, k
    /// and v live in one fused `mixer.Wqkv` tensor; [`TensorId::fused_rows`] says where.
    pub fn msft(self) -> String {
        let part = match self.part {
            Part::Weight => "weight",
            Part::Bias => "bias",
        };
        let stem = match self.site {
            Site::Embedding => "transformer.embd.wte".to_string(),
            Site::FinalNorm => "lm_head.ln".to_string(),
            Site::Head => "lm_head.linear".to_string(),
            Site::Norm(n) => format!("transformer.h.{n}.ln"),
            Site::Q(n) | Site::K(n) | Site::V(n) => format!("transformer.h.{n}.mixer.Wqkv"),
            Site::Dense(n) => format!("transformer.h.{n}.mixer.out_proj"),
            Site::Fc1(n) => format!("transformer.h.{n}.mlp.fc1"),
            Site::Fc2(n) => format!("transformer.h.{n}.mlp.fc2"),
        };
        format!("{stem}.{part}")
    }

    /// For q, k and v: their rows in a fused q|k|v tensor (q's `hidden_size` rows, then k's
    /// and v's `num_key_value_heads × head_dim` each), and that tensor's shape.
    pub fn fused_rows(self, cfg: &PhiConfig) -> Option<(std::ops::Range<usize>, Vec<usize>)> {
        let (h, kv) = (cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim());
        let rows = match self.site {
            Site::Q(_) => 0..h,
            Site::K(_) => h..h + kv,
            Site::V(_) => h + kv..h + 2 * kv,
            _ => return None,
        };
        let mut shape = self.shape(cfg);
        shape[0] = h + 2 * kv;
        Some((rows, shape))
    }

    /// The id of a transformers name; `None` for a name no Phi-2 tensor has.
    pub fn from_hf(name: &str) -> Option<TensorId> {
        let (stem, part) = name.rsplit_once('.')?;
        let part = match part {
            "weight" => Part::Weight,
            "bias" => Part::Bias,
            _ => return None,
        };
        let site = match stem {
            "model.embed_tokens" if part == Part::Weight => Site::Embedding,
            "model.final_layernorm" => Site::FinalNorm,
            "lm_head" => Site::Head,
            _ => {
                let (n, module) = stem.strip_prefix("model.layers.")?.split_once('.')?;
                let n: usize = n.parse().ok()?;
                block_sites(n).find(|s| block_names(*s).is_some_and(|(_, hf, _)| hf == module))?
            }
        };
        Some(TensorId { site, part })
    }

    /// The shape `cfg` gives this tensor: `[out, in]` for matrices, `[len]` for vectors.
    pub fn shape(self, cfg: &PhiConfig) -> Vec<usize> {
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let kv = cfg.num_key_value_heads * cfg.head_dim();
        let (out, inp) = match self.site {
            Site::Embedding | Site::Head => (v, h),
            Site::Norm(_) | Site::FinalNorm => (h, h),
            Site::Q(_) | Site::Dense(_) => (h, h),
            Site::K(_) | Site::V(_) => (kv, h),
            Site::Fc1(_) => (i, h),
            Site::Fc2(_) => (h, i),
        };
        match (self.site, self.part) {
            (Site::Norm(_) | Site::FinalNorm, _) | (_, Part::Bias) => vec![out],
            (_, Part::Weight) => vec![out, inp],
        }
    }
}

/// Block `n`'s sites: its LayerNorm, then its linear layers.
fn block_sites(n: usize) -> impl Iterator<Item = Site> {
    std::iter::once(Site::Norm(n)).chain(LINEARS.iter().map(move |s| s(n)))
}

/// Every tensor a checkpoint of `cfg` holds with its shape, by transformers name (what
/// `TensorSource::check` compares a checkpoint with).
pub fn expected_tensors(cfg: &PhiConfig) -> Vec<(String, Vec<usize>)> {
    all_tensors(cfg)
        .into_iter()
        .map(|id| (id.hf(), id.shape(cfg)))
        .collect()
}

/// Every tensor a checkpoint of `cfg` holds, in the order transformers lists them (a tied
/// output layer keeps only its bias).
pub fn all_tensors(cfg: &PhiConfig) -> Vec<TensorId> {
    let mut out = vec![Site::Embedding.weight()];
    for n in 0..cfg.num_hidden_layers {
        for site in block_sites(n) {
            out.extend([site.weight(), site.bias()]);
        }
    }
    out.extend([Site::FinalNorm.weight(), Site::FinalNorm.bias()]);
    if !cfg.tie_word_embeddings {
        out.push(Site::Head.weight());
    }
    out.push(Site::Head.bias());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_each_layout_round_trip() {
        let q = Site::Q(12).weight();
        assert_eq!(q.hf(), "model.layers.12.self_attn.q_proj.weight");
        assert_eq!(q.gguf(), "blk.12.attn_q.weight");
        assert_eq!(q.gguf_fused(), Some(("blk.12.attn_qkv.weight".into(), 0)));
        assert_eq!(Site::Fc2(0).bias().gguf(), "blk.0.ffn_down.bias");
        assert_eq!(Site::Head.bias().gguf(), "output.bias");
        assert_eq!(Site::Embedding.weight().gguf(), "token_embd.weight");
        assert_eq!(Site::Dense(1).peft_target(), "dense");
        assert_eq!(Site::V(3).bias().msft(), "transformer.h.3.mixer.Wqkv.bias");
        assert_eq!(Site::Head.weight().msft(), "lm_head.linear.weight");
        assert_eq!(
            Site::Fc1(2).lora_names()[1],
            "base_model.model.model.layers.2.mlp.fc1.lora_B.weight"
        );
        let cfg = crate::model::PhiConfig::from_json(
            r#"{"vocab_size": 100, "hidden_size": 16, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2}"#,
            "test",
        )
        .unwrap();
        for id in all_tensors(&cfg) {
            assert_eq!(TensorId::from_hf(&id.hf()), Some(id), "{}", id.hf());
        }
        assert_eq!(all_tensors(&cfg).len(), 1 + 2 * 14 + 2 + 2);
        let gqa = PhiConfig {
            num_key_value_heads: 1,
            ..cfg.clone()
        };
        assert_eq!(
            Site::V(0).weight().fused_rows(&gqa),
            Some((24..32, vec![32, 16]))
        );
        assert_eq!(Site::K(0).bias().fused_rows(&cfg), Some((16..32, vec![48])));
        assert_eq!(TensorId::from_hf("model.layers.0.unknown.weight"), None);
        assert_eq!(TensorId::from_hf("model.embed_tokens.bias"), None);
    }
}
