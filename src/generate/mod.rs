//! Text generation: prefill the prompt in one forward, then sample token by token,
//! streaming whole characters and stopping at EOS, a stop string or the token budget.

mod prompt;
mod sampling;

use serde::{Deserialize, Serialize};
use web_time::Instant;

pub use prompt::{PromptFormat, Turn};
pub use sampling::{Sampler, SamplingParams, SAMPLING_CANDIDATES};

use crate::backend::{Backend, Next, Want};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::tokenizer::{PhiTokenizer, TokenStream};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    StopString,
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Generation {
    pub input_ids: Vec<u32>,
    /// Generated ids, EOS excluded.
    pub output_ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Prompt tokens served from the KV cache of an earlier call (chat history).
    pub reused_tokens: usize,
}

/// Prompt tokens run per forward during prefill: Stop is heard between pieces, and a long
/// prompt never needs its whole attention matrix at once.
const PREFILL_CHUNK: usize = 256;

/// A backend plus the ids its KV cache holds, so a new prompt that extends the previous
/// conversation only computes the new part.
pub struct Session<B: Backend> {
    backend: B,
    cached_ids: Vec<u32>,
    cancel: Cancel,
}

impl<B: Backend> Session<B> {
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            cached_ids: Vec::new(),
            cancel: Cancel::new(),
        }
    }

    /// Stops generation when `cancel` is raised (instead of the session's own flag).
    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    /// The flag that stops the running generation at its next token; the caller lowers it
    /// again ([`Cancel::reset`]) before the next one.
    pub fn cancel_handle(&self) -> Cancel {
        self.cancel.clone()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend for direct use (scoring). Its cache is emptied first, since whatever the
    /// caller runs makes `cached_ids` stale.
    pub fn backend_mut(&mut self) -> &mut B {
        self.cached_ids.clear();
        self.backend.truncate(0);
        &mut self.backend
    }

    pub fn reset(&mut self) {
        self.cached_ids.clear();
        self.backend.truncate(0);
    }

    /// Runs `ids` after the cache and returns what `want` asks for.
    async fn run(&mut self, ids: &[u32], want: Want) -> Result<Next> {
        let next = self.backend.forward(ids, want).await?;
        self.cached_ids.extend_from_slice(ids);
        Ok(next)
    }

    /// Makes the cache hold exactly `ids` and returns what follows the last one, and how
    /// many ids were reused from the cache; `None` for the first when cancelled meanwhile.
    async fn prefill(&mut self, ids: &[u32], want: Want) -> Result<(Option<Next>, usize)> {
        let mut common = self
            .cached_ids
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last prompt token must run to produce logits.
        common = common.min(ids.len() - 1);
        self.backend.truncate(common);
        self.cached_ids.truncate(common);
        let mut rest = &ids[common..];
        while rest.len() > PREFILL_CHUNK {
            if self.cancel.is_cancelled() {
                return Ok((None, common));
            }
            self.run(&rest[..PREFILL_CHUNK], Want::LastRow).await?;
            rest = &rest[PREFILL_CHUNK..];
        }
        if self.cancel.is_cancelled() {
            return Ok((None, common));
        }
        Ok((Some(self.run(rest, want).await?), common))
    }

    /// Generates a continuation of `input_ids`. `on_text` receives each new piece of
    /// text as it is completed and returns `false` to cancel; the session's [`Cancel`] flag
    /// is checked before every token and between prefill chunks.
    pub async fn generate(
        &mut self,
        tokenizer: &PhiTokenizer,
        input_ids: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let capacity = self.backend.capacity();
        if input_ids.is_empty() {
            return Err(Error::input("the prompt is empty"));
        }
        if input_ids.len() >= capacity {
            return Err(Error::input(format!(
                "the prompt is {} tokens, longer than the context of {capacity} tokens",
                input_ids.len()
            )));
        }
        let vocab_limit = tokenizer
            .vocab_limit()
            .min(self.backend.config().vocab_size);
        let mut decoding = Decoding {
            sampler: Sampler::new(opts.sampling.clone())?,
            vocab_limit,
            eos: tokenizer
                .eos_token_id()
                .or(self.backend.config().eos_token_id),
            history: input_ids.to_vec(),
            output_ids: Vec::new(),
            stream: TokenStream::new(tokenizer),
            stops: StopMatcher::new(&opts.stop),
            stop_reason: StopReason::Cancelled,
            decoded: 0,
        };
        // Plain greedy decoding needs no logits on the host, and sampling only a few.
        let want = match decoding.sampler.candidates(vocab_limit) {
            Some(k) => Want::Candidates {
                k,
                vocab_limit,
                temperature: opts.sampling.temperature as f32,
            },
            None if opts.sampling.temperature == 0.0 && opts.sampling.repetition_penalty == 1.0 => {
                Want::Greedy { vocab_limit }
            }
            None => Want::LastRow,
        };
        let t0 = Instant::now();
        let (next, reused) = self.prefill(input_ids, want).await?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if let Some(next) = next {
            self.decode(next, want, opts.max_new_tokens, &mut decoding, on_text)
                .await?;
        }
        let Decoding {
            output_ids,
            stops,
            stop_reason,
            decoded,
            ..
        } = decoding;
        Ok(Generation {
            input_ids: input_ids.to_vec(),
            output_ids,
            text: stops.text,
            stop_reason,
            prefill_tok_s: rate(input_ids.len() - reused, prefill_secs),
            decode_tok_s: rate(decoded, t1.elapsed().as_secs_f64()),
            reused_tokens: reused,
        })
    }

    /// The token loop: picks a token from `next`, streams its text, and runs it for the next.
    async fn decode(
        &mut self,
        mut next: Next,
        want: Want,
        max_new_tokens: usize,
        d: &mut Decoding<'_>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<()> {
        d.stop_reason = StopReason::MaxTokens;
        while d.output_ids.len() < max_new_tokens {
            if self.cancel.is_cancelled() {
                d.stop_reason = StopReason::Cancelled;
                break;
            }
            let limit = d.vocab_limit;
            let id = match &mut next {
                Next::Token(id) => *id,
                Next::Rows(logits) => d.sampler.sample(&mut logits[..limit], &d.history)?,
                Next::Candidates(top) => match d.sampler.sample_top(top)? {
                    Some(id) => id,
                    None => {
                        let mut row = self.backend.last_row().await?;
                        d.sampler.sample(&mut row[..limit], &d.history)?
                    }
                },
            };
            if Some(id) == d.eos {
                d.stop_reason = StopReason::Eos;
                break;
            }
            d.output_ids.push(id);
            d.history.push(id);
            if let Some(piece) = d.stream.push(id)? {
                let (emit, hit) = d.stops.push(&piece);
                if !emit.is_empty() && !on_text(&emit) {
                    d.stop_reason = StopReason::Cancelled;
                    break;
                }
                if hit {
                    d.stop_reason = StopReason::StopString;
                    break;
                }
            }
            if d.output_ids.len() == max_new_tokens {
                break;
            }
            if self.backend.cached() + 1 > self.backend.capacity() {
                d.stop_reason = StopReason::ContextFull;
                break;
            }
            next = self.run(&[id], want).await?;
            d.decoded += 1;
        }
        if !matches!(
            d.stop_reason,
            StopReason::StopString | StopReason::Cancelled
        ) {
            if let Some(rest) = d.stream.finish()? {
                d.stops.push(&rest);
            }
            let tail = d.stops.flush();
            if !tail.is_empty() {
                on_text(&tail);
            }
        }
        Ok(())
    }
}

/// The state of one generation's token loop.
struct Decoding<'a> {
    sampler: Sampler,
    vocab_limit: usize,
    eos: Option<u32>,
    /// Prompt and generated ids, for the repetition penalty.
    history: Vec<u32>,
    /// Generated ids, EOS excluded.
    output_ids: Vec<u32>,
    stream: TokenStream<'a>,
    stops: StopMatcher<'a>,
    stop_reason: StopReason,
    /// Forwards run after the prefill.
    decoded: usize,
}

fn rate(tokens: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

/// Holds back text that might be the start of a stop string, and cuts the output at the
/// first complete one.
struct StopMatcher<'a> {
    stops: &'a [String],
    /// All text accepted so far (what the caller sees in the end).
    text: String,
    /// Bytes of `text` already handed to the caller.
    emitted: usize,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds `piece`; returns the text now safe to show, and whether a stop string was hit.
    fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self.emitted;
        self.text.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            return (self.take(at), true);
        }
        let held = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.text[self.emitted..], s))
            .max()
            .unwrap_or(0);
        let safe = self.text.len() - held;
        (self.take(safe), false)
    }

    fn take(&mut self, upto: usize) -> String {
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        out
    }

    fn flush(&mut self) -> String {
        self.take(self.text.len())
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            stop.is_char_boundary(n)
                && text.is_char_boundary(text.len() - n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_output_across_pieces() {
        let stops = vec!["\nUser:".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("Hello"), ("Hello".to_string(), false));
        assert_eq!(m.push(" there\nUs"), (" there".to_string(), false));
        assert_eq!(m.push("er: more"), (String::new(), true));
        assert_eq!(m.text, "Hello there");
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop() {
        let stops = vec!["\nUser:".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("a\nU"), ("a".to_string(), false));
        assert_eq!(m.push("nder"), ("\nUnder".to_string(), false));
        assert_eq!(m.flush(), "");
        assert_eq!(m.text, "a\nUnder");
    }
}
