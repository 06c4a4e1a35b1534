//! Log-likelihood scoring of multiple-choice items exactly as lm-evaluation-harness's
//! `multiple_choice` output type does it, with the question evaluated once per item.
//!
//! For a context `c` and choice `x`, lm-eval scores the continuation `" " + x`:
//! trailing whitespace of `c` moves to the front of the continuation; `c` and `c + cont`
//! are tokenized separately and the continuation tokens are `enc(c + cont)[len(enc(c)):]`;
//! the model sees `(enc(c) + cont_tokens)[-(L+1):][:-1]` (left-truncated to its context L),
//! and the log-likelihood is the sum of log-softmax (over every logit row, padding
//! included) at the continuation tokens. `is_greedy` says whether each was the argmax.
//! An empty context (lm-eval's unconditional request `("", x)` for `acc_mutual_info`) is
//! the end-of-text token, and the continuation is `x` itself, encoded alone.

use crate::backend::{Backend, Want};
use crate::error::{Error, Result};

use crate::tokenizer::PhiTokenizer;

use super::tasks::Item;

/// One choice's score, as lm-eval's `filtered_resps` entry `[loglikelihood, is_greedy]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChoiceScore {
    pub loglikelihood: f64,
    pub is_greedy: bool,
}

/// The token ids lm-eval feeds for one (context, choice) pair.
struct Pair {
    context: Vec<u32>,
    continuation: Vec<u32>,
}

fn encode_pair(
    tokenizer: &PhiTokenizer,
    context: &str,
    continuation: &str,
    eos: u32,
) -> Result<Pair> {
    let trimmed = context.trim_end();
    let continuation = format!("{}{continuation}", &context[trimmed.len()..]);
    let (context_ids, continuation_ids) = if trimmed.is_empty() {
        (vec![eos], tokenizer.encode(&continuation)?)
    } else {
        let context_ids = tokenizer.encode(trimmed)?;
        let whole = tokenizer.encode(&format!("{trimmed}{continuation}"))?;
        let rest = whole.get(context_ids.len()..).unwrap_or(&[]).to_vec();
        (context_ids, rest)
    };
    if continuation_ids.is_empty() {
        return Err(Error::input(format!(
            "choice {continuation:?} tokenizes to nothing after its context"
        )));
    }
    Ok(Pair {
        context: context_ids,
        continuation: continuation_ids,
    })
}

/// `log_softmax(row)[token]` in f64, and whether `token` is the row's argmax.
fn token_logprob(row: &[f32], token: u32) -> (f64, bool) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
    let value = row[token as usize];
    let lp = f64::from(value - max) - sum.ln();
    let greedy = crate::candidates::argmax(row) == token;
    (lp, greedy)
}

fn score_rows(rows: &[f32], vocab: usize, tokens: &[u32]) -> ChoiceScore {
    let mut ll = 0.0;
    let mut greedy = true;
    for (row, &t) in rows.chunks(vocab).zip(tokens) {
        let (lp, g) = token_logprob(row, t);
        ll += lp;
        greedy &= g;
    }
    ChoiceScore {
        loglikelihood: ll,
        is_greedy: greedy,
    }
}

/// Scores every choice of `item`. With `share_prefix`, the context runs once and each
/// choice continues from its KV cache; without, each choice runs from scratch, as lm-eval
/// does (kept as the reference path and for measuring the gain).
pub async fn score_item(
    backend: &mut dyn Backend,
    tokenizer: &PhiTokenizer,
    item: &Item,
    share_prefix: bool,
) -> Result<Vec<ChoiceScore>> {
    let eos = eos(backend, tokenizer);
    let pairs = item
        .choices
        .iter()
        .map(|c| encode_pair(tokenizer, &item.context, &format!(" {c}"), eos))
        .collect::<Result<Vec<_>>>()?;
    score_pairs(backend, &pairs, share_prefix).await
}

/// Scores every choice of `item` without its context (lm-eval's unconditional requests).
pub async fn score_unconditional(
    backend: &mut dyn Backend,
    tokenizer: &PhiTokenizer,
    item: &Item,
) -> Result<Vec<ChoiceScore>> {
    let eos = eos(backend, tokenizer);
    let pairs = item
        .choices
        .iter()
        .map(|c| encode_pair(tokenizer, "", c, eos))
        .collect::<Result<Vec<_>>>()?;
    score_pairs(backend, &pairs, true).await
}

fn eos(backend: &dyn Backend, tokenizer: &PhiTokenizer) -> u32 {
    tokenizer
        .eos_token_id()
        .or(backend.config().eos_token_id)
        .unwrap_or(0)
}

async fn score_pairs(
    backend: &mut dyn Backend,
    pairs: &[Pair],
    share_prefix: bool,
) -> Result<Vec<ChoiceScore>> {
    let vocab = backend.config().vocab_size;
    let max_len = backend.capacity();
    let mut prefix: Option<(Vec<u32>, Vec<f32>)> = None;
    let mut scores = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let (ctx, cont) = (&pair.context, &pair.continuation);
        let fits = ctx.len() + cont.len() <= max_len + 1;
        if share_prefix && fits {
            let reuse = matches!(&prefix, Some((ids, _)) if ids == ctx);
            if !reuse {
                backend.truncate(0);
                let last = backend.forward(ctx, Want::LastRow).await?.rows()?;
                prefix = Some((ctx.clone(), last));
            }
            let (_, last) = prefix.as_ref().expect("set above");
            let mut rows = last.clone();
            if cont.len() > 1 {
                backend.truncate(ctx.len());
                rows.extend(
                    backend
                        .forward(&cont[..cont.len() - 1], Want::AllRows)
                        .await?
                        .rows()?,
                );
            }
            scores.push(score_rows(&rows, vocab, cont));
        } else {
            let mut all: Vec<u32> = ctx.iter().chain(cont).copied().collect();
            let keep = all.len().min(max_len + 1);
            all.drain(..all.len() - keep);
            all.pop();
            if cont.len() > all.len() {
                return Err(Error::input(format!(
                    "a choice of {} tokens does not fit the context of {max_len}",
                    cont.len()
                )));
            }
            backend.truncate(0);
            let rows = backend.forward(&all, Want::AllRows).await?.rows()?;
            let skip = (all.len() - cont.len()) * vocab;
            scores.push(score_rows(&rows[skip..], vocab, cont));
        }
    }
    backend.truncate(0);
    Ok(scores)
}
