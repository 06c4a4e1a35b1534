//! Picking the next token from logits: greedy, or temperature / top-k / top-p sampling,
//! with the repetition penalty of transformers (CTRL paper), in that order.
//!
//! A GPU backend keeps the logits on the device and hands back only the most likely
//! candidates and the softmax normaliser (`TopK`). `Sampler::sample_top` decides from those
//! whenever they determine the result exactly (a top-k within them, a nucleus inside them, or
//! a draw that lands on them); otherwise the row is read and `sample` finishes with the same
//! draw, so both routes give the same tokens for a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 disables it; > 1 discourages tokens already present in the sequence.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 299_792_458,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::input(format!(
                "temperature {} must be ≥ 0",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::input(format!("top_p {p} must be in (0, 1]")));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::input("top_k must be ≥ 1"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::input(format!(
                "repetition_penalty {} must be > 0",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// How many candidates sampling asks a backend for.
pub const SAMPLING_CANDIDATES: usize = 64;

/// The `k` most likely next tokens and the log-normaliser of the whole row.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// Most likely first; the lower id first on ties.
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
    /// log Σ exp(logit / temperature) over every (non-NaN) logit of the row.
    pub log_norm: f32,
}

/// `TopK` of a row of logits on the host (what the GPU's top_k.wgsl computes on the device).
pub fn top_k(logits: &[f32], k: usize, temperature: f32) -> TopK {
    let mut cands: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let max = cands
        .iter()
        .map(|c| c.1 / temperature)
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = cands.iter().map(|c| (c.1 / temperature - max).exp()).sum();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < cands.len() {
        if k > 0 {
            cands.select_nth_unstable_by(k - 1, order);
        }
        cands.truncate(k);
    }
    cands.sort_unstable_by(order);
    TopK {
        ids: cands.iter().map(|c| c.0).collect(),
        logits: cands.iter().map(|c| c.1).collect(),
        log_norm: max + sum.ln(),
    }
}

/// `exp(logit / temp)` of `logits` (largest first) normalised to sum to 1.
fn softmax(logits: &[f32], temp: f32) -> Vec<f32> {
    let max = logits[0] / temp;
    let e: Vec<f32> = logits.iter().map(|l| (l / temp - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|p| p / sum).collect()
}

/// The last index of the nucleus: the smallest prefix of `probs` (largest first) whose mass
/// reaches `top_p`; `None` when rounding leaves the whole of `probs` short of it.
fn nucleus(probs: &[f32], top_p: f64) -> Option<usize> {
    let mut mass = 0.0;
    probs.iter().position(|p| {
        mass += p;
        f64::from(mass) >= top_p
    })
}

/// Index of the entry of `probs` where the running draw `r` runs out, if it does.
fn walk(probs: &[f32], mut r: f32) -> Option<usize> {
    for (i, p) in probs.iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return Some(i);
        }
    }
    None
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// A draw `sample_top` made but could not use; `sample` takes it instead of a new one.
    pending: Option<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            pending: None,
        })
    }

    /// How many candidates `sample_top` needs; `None` when only a whole row will do (greedy
    /// has its own path, and the repetition penalty changes logits the backend never sees).
    pub fn candidates(&self) -> Option<usize> {
        if self.params.temperature == 0.0 || self.params.repetition_penalty != 1.0 {
            return None;
        }
        Some(
            self.params
                .top_k
                .unwrap_or(SAMPLING_CANDIDATES)
                .min(SAMPLING_CANDIDATES),
        )
    }

    /// Samples from a backend's candidates (`TopK` at this sampler's temperature) when they
    /// decide the token; `None` when the draw needs the whole row: `sample` then finishes.
    pub fn sample_top(&mut self, top: &TopK) -> Result<Option<u32>> {
        if top.ids.is_empty() {
            return Err(Error::input("all logits are NaN"));
        }
        let temp = self.params.temperature as f32;
        let u = self.rng.random::<f32>();
        let (probs, whole) = match self.params.top_k {
            // Every token `sample` would keep is here: renormalise over them as it does.
            Some(k) if k <= top.ids.len() => (softmax(&top.logits[..k], temp), true),
            // Each candidate's share of the whole row.
            _ => (
                top.logits
                    .iter()
                    .map(|l| (l / temp - top.log_norm).exp())
                    .collect(),
                false,
            ),
        };
        let decided = match (self.params.top_p, whole) {
            (Some(top_p), _) => match nucleus(&probs, top_p) {
                Some(last) => {
                    let kept = &probs[..=last];
                    walk(kept, u * kept.iter().sum::<f32>()).or(Some(last))
                }
                // Rounding kept the whole top-k set short of top_p: `sample` keeps it all.
                None if whole => {
                    walk(&probs, u * probs.iter().sum::<f32>()).or(Some(probs.len() - 1))
                }
                None => None,
            },
            (None, true) => walk(&probs, u).or(Some(probs.len() - 1)),
            // The row's total mass is 1: the draw lands on a candidate or beyond them.
            (None, false) => walk(&probs, u),
        };
        Ok(match decided {
            Some(i) => Some(top.ids[i]),
            None => {
                self.pending = Some(u);
                None
            }
        })
    }

    /// Chooses a token from `logits` (already cut to the tokenizer's vocabulary);
    /// `history` is every token so far (prompt and generated), for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::input("no logits to sample from"));
        }
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            for &t in history {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
                }
            }
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let temp = self.params.temperature as f32;
        let top = top_k(logits, self.params.top_k.unwrap_or(logits.len()), temp);
        if top.ids.is_empty() {
            return Err(Error::input("all logits are NaN"));
        }
        let mut probs = softmax(&top.logits, temp);
        if let Some(last) = self.params.top_p.and_then(|p| nucleus(&probs, p)) {
            probs.truncate(last + 1);
        }
        let total: f32 = probs.iter().sum();
        let u = self
            .pending
            .take()
            .unwrap_or_else(|| self.rng.random::<f32>());
        let i = walk(&probs, u * total).unwrap_or(probs.len() - 1);
        Ok(top.ids[i])
    }
}

/// Index of the largest logit; the first one on ties, as torch.argmax.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax_and_first_of_ties() {
        let mut s = Sampler::new(params(0.0)).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_pick() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        })
        .unwrap();
        assert_eq!(s.sample(&mut [2.0, 1.5], &[0]).unwrap(), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_restricts_support() {
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..params(1.0)
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5], &[]).unwrap(), 1);
        }
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.5),
            ..params(1.0)
        })
        .unwrap();
        // softmax([5, 0, 0]) puts 0.987 on token 0: top-p 0.5 keeps only it.
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [5.0, 0.0, 0.0], &[]).unwrap(), 0);
        }
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            })
            .unwrap();
            (0..2000)
                .map(|_| s.sample(&mut [0.0, (3.0f32).ln()], &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let ones = draw(7).iter().filter(|&&t| t == 1).count() as f64 / 2000.0;
        assert!((ones - 0.75).abs() < 0.04, "p(1) = {ones}, expected 0.75");
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Sampler::new(params(-1.0)).is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: Some(1.5),
            ..params(1.0)
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_k: Some(0),
            ..params(1.0)
        })
        .is_err());
    }

    /// The device route (candidates, and the row only when a draw lands outside them) picks
    /// what the whole row does, on peaked rows (decided by the candidates) and flat ones
    /// (mostly decided by the row).
    #[test]
    fn candidates_and_the_whole_row_sample_the_same_tokens() {
        let mut rng = StdRng::seed_from_u64(5);
        let (mut decided, mut tails) = (0, 0);
        for spread in [0.5f32, 6.0] {
            let logits: Vec<f32> = (0..1000)
                .map(|_| (rng.random::<f32>() - 0.5) * spread * 4.0)
                .collect();
            for (temperature, top_k, top_p) in [
                (1.0, None, None),
                (0.7, Some(10), None),
                (0.8, None, Some(0.9)),
                (1.2, Some(200), Some(0.5)),
            ] {
                let p = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    seed: 9,
                    ..Default::default()
                };
                let (mut row, mut device) =
                    (Sampler::new(p.clone()).unwrap(), Sampler::new(p).unwrap());
                for _ in 0..300 {
                    let want = row.sample(&mut logits.clone(), &[]).unwrap();
                    let k = device.candidates().unwrap();
                    let top = super::top_k(&logits, k, temperature as f32);
                    let got = match device.sample_top(&top).unwrap() {
                        Some(id) => {
                            decided += 1;
                            id
                        }
                        None => {
                            tails += 1;
                            device.sample(&mut logits.clone(), &[]).unwrap()
                        }
                    };
                    assert_eq!(got, want, "T {temperature} top_k {top_k:?} top_p {top_p:?}");
                }
            }
        }
        assert!(
            decided > 500 && tails > 100,
            "{decided} decided, {tails} tails"
        );
    }

    #[test]
    fn host_top_k_orders_by_value_then_id_and_skips_nan() {
        let top = top_k(&[1.0, f32::NAN, 3.0, 1.0, 2.0], 3, 1.0);
        assert_eq!(top.ids, [2, 4, 0]);
        assert_eq!(top.logits, [3.0, 2.0, 1.0]);
        let norm = (1f32.exp() * 2.0 + 3f32.exp() + 2f32.exp()).ln();
        assert!((top.log_norm - norm).abs() < 1e-6);
        assert_eq!(top_k(&[f32::NAN], 2, 1.0).ids, Vec::<u32>::new());
    }
}
