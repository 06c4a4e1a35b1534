//! Training examples and the order they are seen in. The order is a pure function of the
//! seed and the global example index, so a resumed run sees exactly what an uninterrupted
//! one would.

use std::ops::Range;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::Row;
use crate::error::{Error, Result};
use crate::tokenizer::PhiTokenizer;

/// Token ids and a loss mask, `batch × length` (targets are the ids shifted by one).
pub struct Batch {
    pub input: Tensor,
    pub target: Tensor,
    pub mask: Tensor,
    /// Positions that carry loss.
    pub tokens: usize,
}

/// An example's ids and how many of them are prompt (carrying no loss).
pub type Tokenized = (Vec<u32>, usize);

pub enum Examples {
    /// Windows of `seq_len + 1` ids over one stream of documents joined by EOS (pretraining:
    /// every position carries loss).
    Packed { ids: Vec<u32>, seq_len: usize },
    /// Prompt + response + EOS per example (at most `seq_len + 1` ids), loss on the response
    /// and EOS only (SFT). A batch is padded to its longest example, not to `seq_len`: most
    /// pairs are far shorter than the window, and padding would be most of the compute.
    Masked { examples: Vec<Tokenized>, pad: u32 },
}

impl Examples {
    /// Documents separated by blank lines.
    pub fn pretrain(tok: &PhiTokenizer, text: &str, seq_len: usize, eos: u32) -> Result<Self> {
        let mut ids = Vec::new();
        for doc in text.split("\n\n").map(str::trim).filter(|d| !d.is_empty()) {
            ids.extend(tok.encode(doc)?);
            ids.push(eos);
        }
        if ids.len() < 2 * (seq_len + 1) {
            return Err(Error::input(format!(
                "the corpus has {} tokens, too few for two windows of {}",
                ids.len(),
                seq_len + 1
            )));
        }
        Ok(Examples::Packed { ids, seq_len })
    }

    /// Rows with `prompt` and `response`; `what` names them in errors.
    pub fn sft(
        tok: &PhiTokenizer,
        rows: &[Row],
        what: &str,
        seq_len: usize,
        eos: u32,
    ) -> Result<Self> {
        let lists = masked_lists(tok, rows, what, seq_len, eos, &["response"])?;
        Ok(Self::masked(
            lists.into_iter().next().unwrap_or_default(),
            eos,
        ))
    }

    /// Rows with `prompt`, `chosen` and `rejected`: the chosen and the rejected examples,
    /// aligned by index.
    pub fn preferences(
        tok: &PhiTokenizer,
        rows: &[Row],
        what: &str,
        seq_len: usize,
        eos: u32,
    ) -> Result<(Self, Self)> {
        let mut lists = masked_lists(tok, rows, what, seq_len, eos, &["chosen", "rejected"])?;
        let rejected = lists.pop().unwrap_or_default();
        let chosen = lists.pop().unwrap_or_default();
        Ok((Self::masked(chosen, eos), Self::masked(rejected, eos)))
    }

    fn masked(examples: Vec<Tokenized>, pad: u32) -> Self {
        Examples::Masked { examples, pad }
    }

    pub fn len(&self) -> usize {
        match self {
            Examples::Packed { ids, seq_len } => (ids.len() - 1) / seq_len,
            Examples::Masked { examples, .. } => examples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Example `i`'s length in ids.
    pub fn length(&self, i: usize) -> usize {
        match self {
            Examples::Packed { seq_len, .. } => seq_len + 1,
            Examples::Masked { examples, .. } => examples[i].0.len(),
        }
    }

    /// The last `held_out(len)` examples are held out for the evaluation loss.
    pub fn split(&self) -> (Range<usize>, Range<usize>) {
        let n = self.len();
        let eval = Self::held_out(n);
        (0..n - eval, n - eval..n)
    }

    /// How many of `n` examples are held out: 1/50, at least one.
    pub fn held_out(n: usize) -> usize {
        (n / 50).max(1)
    }

    /// The ids of example `i` and one target weight per id but the last.
    fn example(&self, i: usize) -> (Vec<u32>, Vec<f32>) {
        match self {
            Examples::Packed { ids, seq_len } => {
                let w = ids[i * seq_len..i * seq_len + seq_len + 1].to_vec();
                (w, vec![1.0; *seq_len])
            }
            Examples::Masked { examples, .. } => {
                let (ids, prompt_len) = &examples[i];
                // Target t is id t + 1: it carries loss when it belongs to the response.
                let mask = (1..ids.len())
                    .map(|t| f32::from(u8::from(t >= *prompt_len)))
                    .collect();
                (ids.clone(), mask)
            }
        }
    }

    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch> {
        let pad = match self {
            Examples::Masked { pad, .. } => *pad,
            Examples::Packed { .. } => 0,
        };
        let rows: Vec<_> = indices.iter().map(|&i| self.example(i)).collect();
        let l = rows.iter().map(|(_, m)| m.len()).max().unwrap_or(0).max(1);
        let (mut input, mut target, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (mut w, mut m) in rows {
            w.resize(l + 1, pad);
            m.resize(l, 0.0);
            input.extend_from_slice(&w[..l]);
            target.extend_from_slice(&w[1..]);
            mask.extend(m);
        }
        let b = indices.len();
        let tokens = mask.iter().filter(|&&m| m > 0.0).count();
        Ok(Batch {
            input: Tensor::from_vec(input, (b, l), device)?,
            target: Tensor::from_vec(target, (b, l), device)?,
            mask: Tensor::from_vec(mask, (b, l), device)?,
            tokens,
        })
    }
}

/// For each of `responses`, the examples `prompt + response + EOS` (with the prompt length)
/// of every row, truncated to `seq_len + 1`; a row is dropped from all lists when its
/// prompt leaves no room for any of its responses.
fn masked_lists(
    tok: &PhiTokenizer,
    rows: &[Row],
    what: &str,
    seq_len: usize,
    eos: u32,
    responses: &[&str],
) -> Result<Vec<Vec<Tokenized>>> {
    let mut lists = vec![Vec::new(); responses.len()];
    for r in rows {
        let prompt = tok.encode(r.text("prompt")?)?;
        let mut row = Vec::with_capacity(responses.len());
        for response in responses {
            let mut ids = prompt.clone();
            ids.extend(tok.encode(r.text(response)?)?);
            ids.push(eos);
            ids.truncate(seq_len + 1);
            row.push(ids);
        }
        // The prompt alone fills the window: nothing to learn from.
        if row.iter().any(|ids| prompt.len() >= ids.len()) {
            continue;
        }
        for (list, ids) in lists.iter_mut().zip(row) {
            list.push((ids, prompt.len()));
        }
    }
    if lists[0].len() < 2 {
        return Err(Error::file(
            what,
            "needs at least two usable examples (rows whose prompt leaves room for a response)",
        ));
    }
    Ok(lists)
}

/// Which training example comes `g`-th: a fresh seeded shuffle of `range` every epoch.
pub struct Order {
    seed: u64,
    range: Range<usize>,
    /// With lengths, each epoch's shuffle is cut into groups of `group` examples, each sorted
    /// longest first (Hugging Face's `group_by_length`).
    lengths: Vec<usize>,
    group: usize,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Order {
    pub fn new(seed: u64, range: Range<usize>) -> Self {
        Self {
            seed,
            range,
            lengths: Vec::new(),
            group: 0,
            epoch: None,
        }
    }

    /// Batches of examples of similar length, so that padding them to their longest costs
    /// little; the order stays a seeded shuffle at the scale of `group` examples.
    /// `lengths[i]` is the length of example `range.start + i`.
    pub fn grouped_by_length(mut self, lengths: Vec<usize>, group: usize) -> Self {
        self.lengths = lengths;
        self.group = group.max(1);
        self.epoch = None;
        self
    }

    pub fn get(&mut self, g: u64) -> usize {
        let n = self.range.len() as u64;
        let epoch = g / n;
        if self.epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut perm: Vec<usize> = self.range.clone().collect();
            perm.shuffle(&mut StdRng::seed_from_u64(
                self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            if !self.lengths.is_empty() {
                let start = self.range.start;
                for group in perm.chunks_mut(self.group) {
                    group.sort_by_key(|&i| std::cmp::Reverse(self.lengths[i - start]));
                }
            }
            self.epoch = Some((epoch, perm));
        }
        let (_, perm) = self.epoch.as_ref().expect("set above");
        perm[(g % n) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sft_loss_covers_the_response_and_eos_only() {
        // Prompt [1, 2, 3], response [4, 5], EOS 0; the shorter example is padded with 9 to
        // the batch's longest.
        let ex = Examples::Masked {
            examples: vec![(vec![1, 2, 3, 4, 5, 0], 3), (vec![7, 8, 0], 2)],
            pad: 9,
        };
        let b = ex.batch(&[1, 0], &Device::Cpu).unwrap();
        let input: Vec<u32> = b.input.flatten_all().unwrap().to_vec1().unwrap();
        let target: Vec<u32> = b.target.flatten_all().unwrap().to_vec1().unwrap();
        let mask: Vec<f32> = b.mask.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(input, [7, 8, 0, 9, 9, 1, 2, 3, 4, 5]);
        assert_eq!(target, [8, 0, 9, 9, 9, 2, 3, 4, 5, 0]);
        assert_eq!(mask, [0., 1., 0., 0., 0., 0., 0., 1., 1., 1.]);
        assert_eq!(b.tokens, 4);
    }

    #[test]
    fn grouping_by_length_keeps_a_permutation_and_cuts_padding() {
        let range = 10..410;
        let lengths: Vec<usize> = range.clone().map(|i| (i * 7919) % 97 + 3).collect();
        let padded = |order: &mut Order| -> usize {
            (0..400u64)
                .collect::<Vec<_>>()
                .chunks(8)
                .map(|b| {
                    let l: Vec<usize> = b.iter().map(|&g| lengths[order.get(g) - 10]).collect();
                    l.iter().max().unwrap() * l.len()
                })
                .sum()
        };
        let mut plain = Order::new(3, range.clone());
        let mut grouped = Order::new(3, range.clone()).grouped_by_length(lengths.clone(), 400);
        let mut seen: Vec<usize> = (0..400).map(|g| grouped.get(g)).collect();
        seen.sort_unstable();
        assert_eq!(seen, range.clone().collect::<Vec<_>>());
        let real: usize = lengths.iter().sum();
        assert!(padded(&mut grouped) < real + real / 10);
        assert!(padded(&mut plain) > real + real / 2);
        // Deterministic, and a new epoch is a new order.
        let mut again = Order::new(3, range.clone()).grouped_by_length(lengths.clone(), 400);
        assert!((0..800).all(|g| again.get(g) == grouped.get(g)));
        let mut small = Order::new(3, range).grouped_by_length(lengths, 40);
        assert_ne!(
            (0..400).map(|g| small.get(g)).collect::<Vec<_>>(),
            (400..800).map(|g| small.get(g)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn order_is_a_seeded_shuffle_per_epoch() {
        let mut a = Order::new(5, 0..10);
        let first: Vec<usize> = (0..10).map(|g| a.get(g)).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let second: Vec<usize> = (10..20).map(|g| a.get(g)).collect();
        assert_ne!(first, second);
        // Asking out of order (a resumed run) gives the same examples.
        let mut b = Order::new(5, 0..10);
        assert_eq!(b.get(13), second[3]);
        assert_eq!(b.get(2), first[2]);
    }
}
