//! `medphi generate` and `medphi logits`.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use medphi::backend::Backend;
use medphi::backend::Want;
use medphi::generate::{GenerateOptions, PromptFormat, Session};

use super::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// instruct (`Instruct: …\nOutput:`), chat (`User: …\nAssistant:`) or raw.
    #[arg(long, default_value = "raw")]
    prompt_format: PromptFormat,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop before this string (repeatable); the format's own stop strings always apply.
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object with ids, text and speeds instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let super::Loaded {
        backend, tokenizer, ..
    } = args.model.load()?;
    let prompt = args.prompt_format.render(&[], &args.prompt);
    let input_ids = tokenizer.encode(&prompt)?;
    let mut stop = args.prompt_format.stop_strings();
    stop.extend(args.stop);
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.params(),
        stop,
    };
    let interrupt = super::interrupt();
    let mut session = Session::new(backend).with_cancel(interrupt.clone());
    let mut stdout = std::io::stdout();
    let json = args.json;
    let g = pollster::block_on(
        session.generate(&tokenizer, &input_ids, &opts, &mut |piece| {
            if !json {
                // A closed pipe (`| head`) ends generation rather than the process.
                return write!(stdout, "{piece}")
                    .and_then(|_| stdout.flush())
                    .is_ok();
            }
            true
        }),
    )?;
    if json {
        let out = serde_json::json!({
            "input_ids": g.input_ids,
            "output_ids": g.output_ids,
            "text": g.text,
            "stop_reason": g.stop_reason,
            "prefill_tok_s": g.prefill_tok_s,
            "decode_tok_s": g.decode_tok_s,
        });
        super::print_line(out)?;
    } else {
        super::print_line("")?;
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, stop: {:?}]",
            g.input_ids.len(),
            g.prefill_tok_s,
            g.output_ids.len(),
            g.decode_tok_s,
            g.stop_reason
        );
    }
    if interrupt.is_cancelled() {
        bail!(super::Interrupted(format!(
            "stopped after {} tokens",
            g.output_ids.len()
        )));
    }
    Ok(())
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    tokens: String,
}

pub fn logits(args: LogitsArgs) -> Result<()> {
    let ids: Vec<u32> = args
        .tokens
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .with_context(|| format!("--tokens: {t:?} is not a token id"))
        })
        .collect::<Result<_>>()?;
    let mut backend = args.model.load()?.backend;
    let vocab = backend.config().vocab_size;
    let flat = pollster::block_on(backend.forward(&ids, Want::AllRows))?.rows()?;
    let rows: Vec<&[f32]> = flat.chunks(vocab).collect();
    super::print_line(serde_json::json!({ "input_ids": ids, "logits": rows }))?;
    Ok(())
}
