//! `medphi chat`: a REPL that keeps the conversation and reuses its KV cache between turns.

use std::io::{BufRead, Write};

use anyhow::Result;
use clap::Args;
use medphi::backend::Backend;
use medphi::generate::{GenerateOptions, PromptFormat, Session, StopReason, Turn};

use super::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "chat")]
    prompt_format: PromptFormat,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn chat(args: ChatArgs) -> Result<()> {
    let super::Loaded {
        backend, tokenizer, ..
    } = args.model.load()?;
    eprintln!(
        "medphi chat on {} ({} layers, context {}). /reset clears the conversation, /exit or Ctrl-D quits.",
        backend.name(),
        backend.config().num_hidden_layers,
        backend.capacity()
    );
    // Ctrl-C stops the reply being written; the conversation goes on.
    let interrupt = super::interrupt();
    let mut session = Session::new(backend).with_cancel(interrupt.clone());
    let mut history: Vec<Turn> = Vec::new();
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.params(),
        stop: args.prompt_format.stop_strings(),
    };
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        write!(stdout, "\n> ")?;
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let message = line.trim();
        match message {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let prompt = args.prompt_format.render(&history, message);
        interrupt.reset();
        let result = tokenizer.encode(&prompt).and_then(|ids| {
            pollster::block_on(session.generate(&tokenizer, &ids, &opts, &mut |piece| {
                write!(stdout, "{piece}")
                    .and_then(|_| stdout.flush())
                    .is_ok()
            }))
        });
        match result {
            Ok(g) => {
                writeln!(stdout)?;
                eprintln!(
                    "[{} tokens at {:.1} tok/s; {} prompt tokens reused from cache]",
                    g.output_ids.len(),
                    g.decode_tok_s,
                    g.reused_tokens
                );
                if g.stop_reason == StopReason::ContextFull {
                    eprintln!("(context full: /reset to start over)");
                }
                history.push(Turn {
                    user: message.to_string(),
                    assistant: g.text,
                });
            }
            // A turn that cannot run (say, the conversation outgrew the context, or the
            // tokenizer refuses the text) is reported and the REPL carries on.
            Err(e) => eprintln!("error: {e}"),
        }
    }
    Ok(())
}
