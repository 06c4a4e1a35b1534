//! Benchmark evaluation with lm-evaluation-harness's items, prompts, scoring and output
//! files: `tasks` reads the original files and builds prompts, `scoring` computes
//! log-likelihoods (sharing each question across its choices), this module decides `acc` /
//! `acc_norm` per item and writes its `samples_<task>.jsonl` line, `run` scores a task's
//! items into that file as it goes (resumable) and aggregates them with lm-eval's standard
//! errors, and `generative` reads the option out of free-text answers.

mod generative;
pub mod report;
mod run;
mod scoring;
mod tasks;

use serde_json::{json, Value};

pub use generative::extract_choice;
pub use run::{resume_samples, score_items, task_results, Mode};
pub use scoring::{score_item, score_unconditional, ChoiceScore};
pub use tasks::{Item, Task, MMLU_MEDICAL};

use crate::backend::Backend;
use crate::error::Result;
use crate::tokenizer::PhiTokenizer;

/// One scored item, ready to be written as a line of `samples_<task>.jsonl`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub doc_id: usize,
    pub scores: Vec<ChoiceScore>,
    /// The choice with the highest log-likelihood, and with the highest per character.
    pub pred: usize,
    pub pred_norm: usize,
    pub acc: bool,
    pub acc_norm: bool,
    /// Each choice without the context, and whether the choice the context raised most is
    /// the gold one; only for items that ask for `acc_mutual_info`.
    pub unconditional: Vec<ChoiceScore>,
    pub pred_mutual_info: Option<usize>,
    pub acc_mutual_info: Option<bool>,
}

/// First index of the maximum, as `numpy.argmax`.
fn first_argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Scores one item and decides `acc` (argmax of log-likelihood), `acc_norm` (argmax of
/// log-likelihood per character of the choice) and, where the item asks for it,
/// `acc_mutual_info` (argmax of log-likelihood minus the choice's own).
pub async fn evaluate_item(
    backend: &mut dyn Backend,
    tokenizer: &PhiTokenizer,
    doc_id: usize,
    item: &Item,
    share_prefix: bool,
) -> Result<Sample> {
    let scores = score_item(backend, tokenizer, item, share_prefix).await?;
    let pred = first_argmax(scores.iter().map(|s| s.loglikelihood));
    let pred_norm = first_argmax(
        scores
            .iter()
            .zip(&item.choices)
            .map(|(s, c)| s.loglikelihood / c.chars().count() as f64),
    );
    let (unconditional, pred_mutual_info) = if item.mutual_info {
        let alone = score_unconditional(backend, tokenizer, item).await?;
        let pred = first_argmax(
            scores
                .iter()
                .zip(&alone)
                .map(|(s, u)| s.loglikelihood - u.loglikelihood),
        );
        (alone, Some(pred))
    } else {
        (Vec::new(), None)
    };
    Ok(Sample {
        doc_id,
        scores,
        pred,
        pred_norm,
        acc: pred == item.gold,
        acc_norm: pred_norm == item.gold,
        unconditional,
        pred_mutual_info,
        acc_mutual_info: pred_mutual_info.map(|p| p == item.gold),
    })
}

/// Mean and lm-eval's `mean_stderr` (sample standard deviation / √n); no stderr for n < 2.
pub fn mean_stderr(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, None);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}

/// One line of lm-eval's `samples_<task>.jsonl`; the unconditional requests follow the
/// conditional ones, in the order lm-eval makes them.
pub fn sample_json(item: &Item, sample: &Sample) -> Value {
    let resps: Vec<Value> = sample
        .scores
        .iter()
        .chain(&sample.unconditional)
        .map(|s| json!([s.loglikelihood, s.is_greedy]))
        .collect();
    let mut arguments: Vec<Value> = item
        .choices
        .iter()
        .map(|c| json!([item.context, format!(" {c}")]))
        .collect();
    if !sample.unconditional.is_empty() {
        arguments.extend(item.choices.iter().map(|c| json!(["", c])));
    }
    let mut line = json!({
        "doc_id": sample.doc_id,
        "doc": item.doc,
        "target": item.gold,
        "arguments": arguments,
        "resps": resps.iter().map(|r| json!([r])).collect::<Vec<_>>(),
        "filtered_resps": resps,
        "acc": f64::from(u8::from(sample.acc)),
        "acc_norm": f64::from(u8::from(sample.acc_norm)),
    });
    if let Some(ok) = sample.acc_mutual_info {
        line["acc_mutual_info"] = json!(f64::from(u8::from(ok)));
    }
    line
}
