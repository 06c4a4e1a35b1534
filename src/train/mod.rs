//! Training on candle: continued pretraining (next-token loss on packed sequences), SFT
//! (loss on response tokens only) and DPO (against a frozen reference model), with AdamW,
//! warmup + cosine schedule, gradient clipping and accumulation, evaluation loss on held-out
//! examples, checkpoints and exact resume.
//!
//! The model is the inference `Phi` built with `fused = false` over `Var`s, so what trains
//! is what runs.
//!
//! The trainer itself takes its data, weights and settings as values and hands back step
//! metrics and the adapter's files as bytes, so the browser runs the same code as the CLI.
//! `folder.rs` (native) adds the file system: an output directory that is always a loadable
//! model folder (`config.json`, `tokenizer.json`, `model.safetensors` with Hugging Face
//! names) plus the optimizer state, `trainer_state.json` and `metrics.jsonl`.

mod batches;
#[cfg(not(target_arch = "wasm32"))]
mod checkpoint;
#[cfg(not(target_arch = "wasm32"))]
mod folder;
mod optim;
mod params;
mod rows;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use web_time::Instant;

pub use batches::{Batch, Examples, Order};
#[cfg(not(target_arch = "wasm32"))]
pub use checkpoint::{
    exists as checkpoint_exists, latest as latest_checkpoint, restore_metrics, TrainState,
};
#[cfg(not(target_arch = "wasm32"))]
pub use folder::FolderRun;
pub use optim::{learning_rate, AdamW};
pub use params::{save_tensors, tensor_bytes, LoraConfig, Params, Precision};
pub use rows::{rows_from_text, rows_from_values, Row};

use crate::error::{Error, Result};
use crate::model::{Logits, Phi, PhiConfig};

/// The settings a run takes when it is not told otherwise, the CLI's and the page's alike,
/// so the same data and seed give the same weights from either.
pub mod defaults {
    pub const LR: f64 = 1e-3;
    pub const WEIGHT_DECAY: f64 = 0.1;
    pub const CLIP: f64 = 1.0;
    /// Tokens per example (the longest SFT example kept).
    pub const SEQ_LEN: usize = 128;
    pub const LORA_ALPHA: f64 = 16.0;

    /// Warmup steps: 5% of the run.
    pub fn warmup(steps: u64) -> u64 {
        steps / 20
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Pretrain,
    Sft,
    Dpo,
}

/// What a step minimises.
pub enum Objective {
    /// Next-token cross-entropy on the masked targets (pretraining, SFT).
    Lm(Examples),
    /// DPO: chosen and rejected responses aligned by index, scored against `reference`.
    Dpo {
        chosen: Examples,
        rejected: Examples,
        reference: Box<Phi>,
    },
}

impl Objective {
    fn examples(&self) -> &Examples {
        match self {
            Objective::Lm(e) => e,
            Objective::Dpo { chosen, .. } => chosen,
        }
    }
}

/// Everything that decides a run; saved with each checkpoint and reused on resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub stage: Stage,
    /// The step count the schedule is planned for.
    pub steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: u64,
    pub weight_decay: f64,
    /// Global gradient-norm limit (0 = off).
    pub clip: f64,
    pub seed: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0 = only at the end).
    pub save_every: u64,
    /// DPO's β (how far the policy may move from the reference).
    #[serde(default)]
    pub beta: f64,
    /// The model this run started from (DPO's reference, LoRA's base).
    #[serde(default)]
    pub init_from: Option<std::path::PathBuf>,
    /// Train LoRA adapters on a frozen base instead of every weight.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// LoRA: also write the merged full model (`model.safetensors`).
    #[serde(default)]
    pub merge: bool,
    #[serde(default)]
    pub precision: Precision,
    /// Batch examples of similar length together (SFT, DPO): less padding, same epochs.
    #[serde(default)]
    pub group_by_length: bool,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub grad_norm: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// DPO: how often the chosen response out-scores the rejected one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_accuracy: Option<f64>,
    /// DPO: mean of β·(chosen − rejected) log-ratio differences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_margin: Option<f64>,
}

pub struct Trainer {
    model_cfg: PhiConfig,
    params: Params,
    /// Built once when the model's weights are the `Var`s (see `Params::model_tracks_vars`);
    /// otherwise `None` and rebuilt from them at every step.
    model: Option<Phi>,
    opt: AdamW,
    objective: Objective,
    order: Order,
    pub config: TrainConfig,
    pub step: u64,
}

/// Whether every value of `t` is finite (0·x is 0 for those, NaN for NaN and ±∞).
fn all_finite(t: &Tensor) -> Result<bool> {
    let s = (t * 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(s == 0.0)
}

/// Sum of the masked target log-probabilities of each sequence: `(batch,)`.
fn sequence_logp(model: &Phi, batch: &Batch) -> Result<Tensor> {
    let logits = model.forward(&batch.input, None, Logits::All)?;
    let picked =
        crate::model::grad_kernels::target_logp(&logits.to_dtype(DType::F32)?, &batch.target)?;
    Ok((picked * &batch.mask)?.sum(1)?)
}

/// Mean cross-entropy of the masked next-token targets.
fn masked_loss(model: &Phi, batch: &Batch) -> Result<Tensor> {
    let total = sequence_logp(model, batch)?.sum_all()?;
    Ok((total.neg()? / (batch.tokens.max(1) as f64))?)
}

/// DPO's loss `−log σ(β·[(π_c − ref_c) − (π_r − ref_r)])` averaged over the batch, with the
/// fraction of pairs whose chosen reward is higher and the mean reward margin.
fn dpo_loss(
    model: &Phi,
    reference: &Phi,
    (chosen, rejected): (&Batch, &Batch),
    beta: f64,
) -> Result<(Tensor, f64, f64)> {
    let ref_c = sequence_logp(reference, chosen)?.detach();
    let ref_r = sequence_logp(reference, rejected)?.detach();
    let reward_c = ((sequence_logp(model, chosen)? - ref_c)? * beta)?;
    let reward_r = ((sequence_logp(model, rejected)? - ref_r)? * beta)?;
    let z = (reward_c - reward_r)?;
    // −log σ(z) = softplus(−z) = relu(−z) + log(1 + e^−|z|), stable for any z.
    let loss = (z.neg()?.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?;
    let zs: Vec<f32> = z.to_vec1()?;
    let n = zs.len().max(1) as f64;
    let accuracy = zs.iter().filter(|&&v| v > 0.0).count() as f64 / n;
    let margin = zs.iter().map(|&v| v as f64).sum::<f64>() / n;
    Ok((loss, accuracy, margin))
}

/// One step's summed gradient (in `params.vars` order), loss and what it saw.
#[derive(Default)]
struct StepGradients {
    grads: Vec<Tensor>,
    loss: f64,
    tokens: usize,
    /// DPO only.
    reward_accuracy: f64,
    reward_margin: f64,
}

enum CurrentModel<'a> {
    Built(&'a Phi),
    Rebuilt(Box<Phi>),
}

impl CurrentModel<'_> {
    fn get(&self) -> &Phi {
        match self {
            CurrentModel::Built(m) => m,
            CurrentModel::Rebuilt(m) => m,
        }
    }
}

impl Trainer {
    pub fn new(
        model_cfg: PhiConfig,
        params: Params,
        objective: Objective,
        config: TrainConfig,
    ) -> Result<Self> {
        if config.batch_size == 0 || config.grad_accum == 0 || config.steps == 0 {
            return Err(Error::input(
                "steps, batch size and gradient accumulation must be at least 1",
            ));
        }
        if config.seq_len > model_cfg.max_position_embeddings {
            return Err(Error::input(format!(
                "--seq-len {} exceeds the model's context of {}",
                config.seq_len, model_cfg.max_position_embeddings
            )));
        }
        if config.precision == Precision::Bf16 && params.device().is_cpu() {
            return Err(Error::input(
                "candle has no bf16 matrix multiply on the CPU: train in bf16 with --device cuda, \
                 or use --precision f16 or f32",
            ));
        }
        let params = params.with_precision(config.precision);
        let model = if params.model_tracks_vars() {
            Some(Phi::load(&model_cfg, &params, false)?)
        } else {
            None
        };
        let (train, _) = objective.examples().split();
        if train.is_empty() {
            return Err(Error::input("no training examples"));
        }
        let mut order = Order::new(config.seed, train.clone());
        if config.group_by_length {
            let examples = objective.examples();
            // 50 batches a group, as Hugging Face's LengthGroupedSampler.
            order = order.grouped_by_length(
                train.map(|i| examples.length(i)).collect(),
                50 * config.batch_size * config.grad_accum,
            );
        }
        Ok(Self {
            order,
            opt: AdamW::new(config.weight_decay),
            model_cfg,
            params,
            model,
            objective,
            config,
            step: 0,
        })
    }

    /// Runs the next step: its micro-batches' gradients, clipping, one AdamW update. A step
    /// whose loss or gradient is not finite is refused before any weight changes.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let step = self.step + 1;
        let c = self.config.clone();
        let g = self.gradients()?;
        let mut norm_sq = 0.0;
        for g in &g.grads {
            norm_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = norm_sq.sqrt();
        if !(g.loss.is_finite() && norm.is_finite()) {
            return Err(Error::input(format!(
                "step {step}: the loss is {} and the gradient norm {norm}; the update was not \
                 applied and training stopped with the weights of step {} (lower --lr or set --clip)",
                g.loss, self.step
            )));
        }
        let scale = if c.clip > 0.0 && norm > c.clip {
            c.clip / norm
        } else {
            1.0
        };
        let lr = learning_rate(step, c.lr, c.warmup, c.steps);
        for ((name, var), grad) in self.params.vars.iter().zip(&g.grads) {
            let next = self.opt.update(name, var.as_tensor(), grad, scale, lr)?;
            var.set(&next)?;
        }
        self.opt.t += 1;
        self.step = step;
        let dpo = matches!(self.objective, Objective::Dpo { .. });
        Ok(StepMetrics {
            step,
            loss: g.loss,
            lr,
            tokens_per_s: g.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            grad_norm: norm,
            eval_loss: None,
            reward_accuracy: dpo.then_some(g.reward_accuracy),
            reward_margin: dpo.then_some(g.reward_margin),
        })
    }

    /// The next step's gradient, summed over its `grad_accum` micro-batches, with its loss.
    fn gradients(&mut self) -> Result<StepGradients> {
        let per_step = (self.config.grad_accum * self.config.batch_size) as u64;
        let first = self.step * per_step;
        let step_examples: Vec<usize> = (0..per_step).map(|j| self.order.get(first + j)).collect();
        let c = &self.config;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.params.vars.len()];
        let mut out = StepGradients::default();
        // The weights only change after the last micro-batch: one model serves them all.
        let model = self.current_model()?;
        let model = model.get();
        let device = self.params.device();
        for idx in step_examples.chunks(c.batch_size) {
            let loss = match &self.objective {
                Objective::Lm(examples) => {
                    let batch = examples.batch(idx, &device)?;
                    out.tokens += batch.input.elem_count();
                    masked_loss(model, &batch)?
                }
                Objective::Dpo {
                    chosen,
                    rejected,
                    reference,
                } => {
                    let (bc, br) = (chosen.batch(idx, &device)?, rejected.batch(idx, &device)?);
                    out.tokens += bc.input.elem_count() + br.input.elem_count();
                    let (loss, acc, m) = dpo_loss(model, reference, (&bc, &br), c.beta)?;
                    out.reward_accuracy += acc / c.grad_accum as f64;
                    out.reward_margin += m / c.grad_accum as f64;
                    loss
                }
            };
            let loss = (loss / c.grad_accum as f64)?;
            out.loss += loss.to_scalar::<f32>()? as f64;
            let g = loss.backward()?;
            for ((name, var), acc) in self.params.vars.iter().zip(grads.iter_mut()) {
                let gi = g
                    .get(var)
                    .ok_or_else(|| Error::input(format!("{name} received no gradient")))?;
                *acc = Some(match acc.take() {
                    Some(a) => (a + gi)?,
                    None => gi.clone(),
                });
            }
        }
        out.grads = grads.into_iter().flatten().collect();
        Ok(out)
    }

    /// The model over the current weights: the one built at the start, or one rebuilt from
    /// the `Var`s' current values (LoRA's base plus adapters, or a lower-precision cast).
    fn current_model(&self) -> Result<CurrentModel<'_>> {
        Ok(match &self.model {
            Some(m) => CurrentModel::Built(m),
            None => {
                CurrentModel::Rebuilt(Box::new(Phi::load(&self.model_cfg, &self.params, false)?))
            }
        })
    }

    /// Mean loss over up to `eval_batches` batches of the held-out examples.
    pub fn eval_loss(&self) -> Result<f64> {
        let (_, eval) = self.objective.examples().split();
        let idx: Vec<usize> = eval.collect();
        let model = self.current_model()?;
        let model = model.get();
        let device = self.params.device();
        let mut losses = Vec::new();
        for chunk in idx
            .chunks(self.config.batch_size)
            .take(self.config.eval_batches.max(1))
        {
            let loss = match &self.objective {
                Objective::Lm(examples) => masked_loss(model, &examples.batch(chunk, &device)?)?,
                Objective::Dpo {
                    chosen,
                    rejected,
                    reference,
                } => {
                    let pair = (
                        &chosen.batch(chunk, &device)?,
                        &rejected.batch(chunk, &device)?,
                    );
                    dpo_loss(model, reference, pair, self.config.beta)?.0
                }
            };
            losses.push(loss.to_scalar::<f32>()? as f64);
        }
        Ok(losses.iter().sum::<f64>() / losses.len().max(1) as f64)
    }

    /// The trainable tensors, refused if any holds NaN or infinite values.
    fn finite_trainable(&self) -> Result<HashMap<String, Tensor>> {
        let trainable = self.params.trainable();
        for (name, t) in &trainable {
            if !all_finite(t)? {
                return Err(Error::input(format!(
                    "step {}: parameter {name} holds NaN or infinite values; not saved",
                    self.step
                )));
            }
        }
        Ok(trainable)
    }

    /// A LoRA run's adapter as PEFT writes it: `adapter_config.json` and
    /// `adapter_model.safetensors`, which `peft`, `medphi --adapter` and the page load.
    pub fn adapter_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let lora = self
            .params
            .lora_config()
            .ok_or_else(|| Error::input("this run trains every weight, not a LoRA adapter"))?;
        let peft = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": crate::model::names::LINEARS.map(|s| s(0).peft_target()),
            "base_model_name_or_path": self.config.init_from,
        });
        let config = serde_json::to_string_pretty(&peft).map_err(Error::input)?;
        Ok(vec![
            ("adapter_config.json".into(), config.into_bytes()),
            (
                "adapter_model.safetensors".into(),
                tensor_bytes(&self.finite_trainable()?)?,
            ),
        ])
    }

    pub fn parameter_count(&self) -> usize {
        self.params.count()
    }
}
