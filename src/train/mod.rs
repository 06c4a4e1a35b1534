//! Training on candle: continued pretraining (next-token loss on packed sequences) and SFT
//! (loss on response tokens only), with AdamW, warmup + cosine schedule, gradient clipping
//! and accumulation, evaluation loss on held-out examples, checkpoints and exact resume.
//!
//! The model is the inference `Phi` built with `fused = false` over `Var`s, so what trains
//! is what runs. An output directory is always a loadable model folder (`config.json`,
//! `tokenizer.json`, `model.safetensors` with Hugging Face names) plus the optimizer state,
//! `trainer_state.json` and `metrics.jsonl`.

mod batches;
mod optim;
mod params;

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use web_time::Instant;

pub use batches::{Batch, Examples, Order};
pub use optim::{learning_rate, AdamW};
pub use params::Params;

use crate::error::{Error, Result};
use crate::model::{Logits, Phi, PhiConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Pretrain,
    Sft,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    config: TrainConfig,
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
}

pub struct Trainer {
    model_cfg: PhiConfig,
    tokenizer_json: String,
    params: Params,
    model: Phi,
    opt: AdamW,
    data: Examples,
    order: Order,
    pub config: TrainConfig,
    pub step: u64,
}

/// Mean cross-entropy of the masked next-token targets.
fn masked_loss(model: &Phi, batch: &Batch) -> Result<Tensor> {
    let logits = model.forward(&batch.input, None, Logits::All)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp.gather(&batch.target.unsqueeze(2)?, 2)?.squeeze(2)?;
    let total = (picked * &batch.mask)?.sum_all()?;
    Ok((total.neg()? / (batch.tokens.max(1) as f64))?)
}

impl Trainer {
    pub fn new(
        model_cfg: PhiConfig,
        tokenizer_json: String,
        params: Params,
        data: Examples,
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
        let model = Phi::load(&model_cfg, &params, false)?;
        let (train, _) = data.split();
        if train.is_empty() {
            return Err(Error::input("no training examples"));
        }
        Ok(Self {
            order: Order::new(config.seed, train),
            opt: AdamW::new(config.weight_decay),
            model_cfg,
            tokenizer_json,
            params,
            model,
            data,
            config,
            step: 0,
        })
    }

    /// Continues the run saved in `dir` on `data` (built as for the original run).
    pub fn resume(dir: &Path, data: Examples) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| Error::file(p.display(), e))
        };
        let state: TrainState = serde_json::from_str(&read("trainer_state.json")?)
            .map_err(|e| Error::file(dir.join("trainer_state.json").display(), e))?;
        let ckpt = crate::checkpoint::Checkpoint::open(dir, None, DType::F32)?;
        let params = Params::from_source(&ckpt.config, ckpt.weights.as_ref())?;
        let mut trainer = Self::new(
            ckpt.config,
            read("tokenizer.json")?,
            params,
            data,
            state.config,
        )?;
        trainer
            .opt
            .load(&dir.join("optimizer.safetensors"), state.step)?;
        trainer.step = state.step;
        Ok(trainer)
    }

    /// Trains until step `stop_after` (default: the planned total), writing to `out`.
    pub fn run(
        &mut self,
        out: &Path,
        stop_after: Option<u64>,
        on_step: &mut dyn FnMut(&StepMetrics),
    ) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::file(out.display(), e))?;
        let last = stop_after
            .unwrap_or(self.config.steps)
            .min(self.config.steps);
        let metrics_path = out.join("metrics.jsonl");
        while self.step < last {
            let mut m = self.train_step()?;
            let c = &self.config;
            if (c.eval_every > 0 && m.step % c.eval_every == 0) || m.step == last {
                m.eval_loss = Some(self.eval_loss()?);
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| Error::file(metrics_path.display(), e))?;
            let line = serde_json::to_string(&m).map_err(Error::input)?;
            writeln!(f, "{line}").map_err(|e| Error::file(metrics_path.display(), e))?;
            on_step(&m);
            if (c.save_every > 0 && m.step % c.save_every == 0) || m.step == last {
                self.save(out)?;
            }
        }
        Ok(())
    }

    fn train_step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        self.step += 1;
        let c = self.config.clone();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.params.vars.len()];
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for micro in 0..c.grad_accum {
            let first =
                ((self.step - 1) * c.grad_accum as u64 + micro as u64) * c.batch_size as u64;
            let idx: Vec<usize> = (0..c.batch_size as u64)
                .map(|j| self.order.get(first + j))
                .collect();
            let batch = self.data.batch(&idx)?;
            tokens += batch.input.elem_count();
            let loss = (masked_loss(&self.model, &batch)? / c.grad_accum as f64)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
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
        let grads: Vec<Tensor> = grads.into_iter().flatten().collect();
        let mut norm_sq = 0.0;
        for g in &grads {
            norm_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = norm_sq.sqrt();
        let scale = if c.clip > 0.0 && norm > c.clip {
            c.clip / norm
        } else {
            1.0
        };
        let lr = learning_rate(self.step, c.lr, c.warmup, c.steps);
        for ((name, var), g) in self.params.vars.iter().zip(&grads) {
            let g = (g * scale)?;
            let next = self.opt.update(name, var.as_tensor(), &g, lr)?;
            var.set(&next)?;
        }
        self.opt.t += 1;
        Ok(StepMetrics {
            step: self.step,
            loss: loss_sum,
            lr,
            tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            grad_norm: norm,
            eval_loss: None,
        })
    }

    /// Mean loss over up to `eval_batches` batches of the held-out examples.
    pub fn eval_loss(&self) -> Result<f64> {
        let (_, eval) = self.data.split();
        let idx: Vec<usize> = eval.collect();
        let mut losses = Vec::new();
        for chunk in idx
            .chunks(self.config.batch_size)
            .take(self.config.eval_batches.max(1))
        {
            let batch = self.data.batch(chunk)?;
            losses.push(masked_loss(&self.model, &batch)?.to_scalar::<f32>()? as f64);
        }
        Ok(losses.iter().sum::<f64>() / losses.len().max(1) as f64)
    }

    /// Writes the model folder and the state a resume needs.
    pub fn save(&self, out: &Path) -> Result<()> {
        let write = |name: &str, text: &str| {
            let p = out.join(name);
            std::fs::write(&p, text).map_err(|e| Error::file(p.display(), e))
        };
        let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
        write("config.json", &json(&self.model_cfg.to_hf_json()))?;
        write("tokenizer.json", &self.tokenizer_json)?;
        self.params.save(&out.join("model.safetensors"))?;
        self.opt.save(&out.join("optimizer.safetensors"))?;
        let state = TrainState {
            step: self.step,
            config: self.config.clone(),
        };
        write(
            "trainer_state.json",
            &serde_json::to_string_pretty(&state).map_err(Error::input)?,
        )
    }

    pub fn parameter_count(&self) -> usize {
        self.params.count()
    }
}
