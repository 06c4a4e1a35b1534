//! Speed as `medphi bench` and the page's Benchmark button measure it: a prompt prefilled,
//! then greedy decoding, through the `Backend` interface, with what a decode token moves in
//! device memory and the bandwidth that makes.

use web_time::Instant;

use crate::backend::{Backend, Next, Want};
use crate::candidates::argmax;
use crate::error::{Error, Result};
use crate::tokenizer::PhiTokenizer;

/// A prompt of exactly `len` tokens: clinical text, repeated as needed.
pub fn prompt_ids(tokenizer: &PhiTokenizer, len: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "A 45-year-old man presents with crushing substernal chest pain radiating to the left arm, \
        diaphoresis and nausea for two hours. ECG shows ST elevation in leads II, III and aVF. ";
    let base = tokenizer.encode(TEXT)?;
    Ok(base.iter().copied().cycle().take(len).collect())
}

/// One measurement.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Speed {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// What the last decode token read from device memory (main memory on the CPU).
    pub bytes_per_token: Option<usize>,
    /// `bytes_per_token` × decode tok/s, in GB/s.
    pub effective_gb_s: Option<f64>,
}

/// Decoding on `backend` from an empty cache, each step asking for `want` as generation's
/// decoding loop does (`Want::Greedy`: on a GPU the argmax stays on the device) and feeding
/// back the most likely token.
pub async fn decode_speed(
    backend: &mut dyn Backend,
    ids: &[u32],
    gen: usize,
    want: Want,
) -> Result<Speed> {
    if ids.is_empty() || gen == 0 {
        return Err(Error::input(
            "a speed measurement needs a prompt and at least one generated token",
        ));
    }
    if ids.len() + gen > backend.capacity() {
        return Err(Error::input(format!(
            "a prompt of {} tokens and {gen} more do not fit the context of {}",
            ids.len(),
            backend.capacity()
        )));
    }
    // One untimed prefill and decode step first: the first dispatches of a freshly loaded
    // GPU backend include shader compilation, which is not the model's speed.
    backend.truncate(0);
    let first = token(backend.forward(ids, want).await?)?;
    backend.forward(&[first], want).await?;
    backend.truncate(0);
    let t = Instant::now();
    let mut next = token(backend.forward(ids, want).await?)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..gen {
        next = token(backend.forward(&[next], want).await?)?;
    }
    let decode_tok_s = gen as f64 / t.elapsed().as_secs_f64();
    let bytes_per_token = backend.device_stats().map(|d| d.bytes_moved);
    Ok(Speed {
        prefill_tok_s: ids.len() as f64 / prefill,
        decode_tok_s,
        bytes_per_token,
        effective_gb_s: bytes_per_token.map(|b| b as f64 * decode_tok_s / 1e9),
    })
}

/// The most likely next token in what a forward returned.
fn token(next: Next) -> Result<u32> {
    match next {
        Next::Token(id) => Ok(id),
        Next::Candidates(top) if !top.ids.is_empty() => Ok(top.ids[0]),
        Next::Rows(row) if !row.is_empty() => Ok(argmax(&row)),
        other => Err(Error::input(format!(
            "the forward returned no token: {other:?}"
        ))),
    }
}
