//! `medphi info`: what a checkpoint holds, read from headers only.

use std::collections::BTreeMap;
use std::fmt::Write;

use anyhow::Result;
use candle_core::DType;
use clap::Args;
use medphi::checkpoint::Checkpoint;
use medphi::model::expected_tensors;

#[derive(Args)]
pub struct InfoArgs {
    /// A model folder or a .gguf file.
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long)]
    tokenizer: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn info(args: InfoArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.model, args.tokenizer.as_deref(), DType::F32)?;
    let cfg = &ckpt.config;
    let expected = expected_tensors(cfg);
    ckpt.weights.check(&expected)?;
    let params = cfg.parameter_count();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for t in ckpt.weights.stored_tensors() {
        *dtypes.entry(t.dtype).or_default() += t.shape.iter().product::<usize>();
    }
    let out = serde_json::json!({
        "model": args.model.display().to_string(),
        "architecture": "PhiForCausalLM",
        "format": ckpt.format,
        "parameters": params,
        "size_on_disk_bytes": ckpt.weight_bytes,
        "dtypes": dtypes,
        "vocab_size": cfg.vocab_size,
        "tokenizer_vocab": ckpt.tokenizer.vocab_limit(),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "layers": cfg.num_hidden_layers,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim(),
        "rotary_dim": cfg.rotary_dim(),
        "rope_theta": cfg.rope_theta,
        "context_length": cfg.max_position_embeddings,
        "activation": cfg.hidden_act.hf_name(),
    });
    if args.json {
        return super::print_line(out);
    }
    let mut text = String::new();
    writeln!(text, "model          {}", args.model.display())?;
    writeln!(text, "architecture   PhiForCausalLM ({})", ckpt.format)?;
    writeln!(
        text,
        "parameters     {} ({:.2} B)",
        params,
        params as f64 / 1e9
    )?;
    writeln!(
        text,
        "size on disk   {:.1} MiB",
        ckpt.weight_bytes as f64 / (1 << 20) as f64
    )?;
    let mix: Vec<String> = dtypes
        .iter()
        .map(|(d, n)| format!("{d} {:.1}%", 100.0 * *n as f64 / params.max(1) as f64))
        .collect();
    writeln!(text, "dtypes         {}", mix.join(", "))?;
    writeln!(
        text,
        "layers         {} × (hidden {}, mlp {}, {} heads of {} [rotary {}], kv heads {})",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.head_dim(),
        cfg.rotary_dim(),
        cfg.num_key_value_heads
    )?;
    writeln!(
        text,
        "vocabulary     {} rows ({} used by the tokenizer)",
        cfg.vocab_size,
        ckpt.tokenizer.vocab_limit()
    )?;
    write!(
        text,
        "context        {} tokens, rope theta {}",
        cfg.max_position_embeddings, cfg.rope_theta
    )?;
    super::print_line(text)
}
