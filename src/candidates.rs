//! The candidates for the next token in a row of logits: the `k` most likely with the row's
//! softmax normaliser (`TopK`, what sampling needs; the GPU's `top_k.wgsl` computes the same on
//! the device) and the argmax (greedy). A leaf: backends produce these, sampling consumes
//! them, and neither depends on the other.

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
