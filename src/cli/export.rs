//! `medphi export-gguf`: a model folder as a phi2 GGUF (f32, q8_0 or q4_0 matrices) with
//! its tokenizer embedded, for llama.cpp and the page, written tensor by tensor.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::DType;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use medphi::checkpoint::Checkpoint;
use medphi::weights::write_gguf;

#[derive(Clone, Copy, ValueEnum)]
enum Quant {
    F32,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A model folder (config.json, tokenizer.json, safetensors).
    model: PathBuf,
    /// The GGUF file to write.
    out: PathBuf,
    #[arg(long, value_enum, default_value = "q8_0")]
    quant: Quant,
}

pub fn export_gguf(args: ExportArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.model, None, DType::F32)?;
    let tokenizer_path = args.model.join("tokenizer.json");
    let tokenizer = std::fs::read_to_string(&tokenizer_path)
        .with_context(|| format!("{}", tokenizer_path.display()))?;
    let quant = match args.quant {
        Quant::F32 => None,
        Quant::Q8_0 => Some(GgmlDType::Q8_0),
        Quant::Q4_0 => Some(GgmlDType::Q4_0),
    };
    let tmp = args.out.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    let tensors = medphi::model::names::all_tensors(&ckpt.config).len();
    let pb = ProgressBar::new(tensors as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tensors {msg}")
            .expect("static template"),
    );
    write_gguf(
        &mut writer,
        &ckpt.config,
        ckpt.weights.as_ref(),
        &tokenizer,
        quant,
        &mut |name| {
            pb.set_message(name.to_string());
            pb.inc(1);
        },
    )?;
    pb.finish_and_clear();
    writer
        .into_inner()
        .map_err(|e| anyhow::anyhow!("{}: {}", tmp.display(), e.error()))?
        .sync_all()
        .with_context(|| format!("{}", tmp.display()))?;
    // Never leave a half-written file under the final name.
    std::fs::rename(&tmp, &args.out).with_context(|| format!("{}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
