//! A run written to a folder (native): the trainer's steps with `metrics.jsonl` appended line
//! by line and checkpoints (see `checkpoint.rs`) that a killed run resumes from exactly.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::checkpoint::{self, CheckpointWriter, TrainState};
use super::{save_tensors, Objective, Params, StepMetrics, TrainConfig, Trainer};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::model::PhiConfig;

pub struct FolderRun {
    pub trainer: Trainer,
    out: PathBuf,
    /// Written into every checkpoint, so each is a loadable model folder.
    tokenizer_json: String,
    /// The step of the last checkpoint written (0: none yet).
    saved: u64,
}

impl FolderRun {
    /// A new run of `trainer` into `out`.
    pub fn new(trainer: Trainer, tokenizer_json: String, out: &Path) -> Self {
        Self {
            trainer,
            out: out.to_path_buf(),
            tokenizer_json,
            saved: 0,
        }
    }

    /// Continues the run saved in checkpoint folder `dir` (see [`super::latest_checkpoint`],
    /// which also verifies it) into `out`; `objective` rebuilds its data (and reference)
    /// from the run's saved configuration, as for the original run.
    pub fn resume(
        dir: &Path,
        state: TrainState,
        device: &Device,
        objective: impl FnOnce(
            &TrainConfig,
            &crate::tokenizer::PhiTokenizer,
            &PhiConfig,
        ) -> Result<Objective>,
        out: &Path,
    ) -> Result<Self> {
        let (ckpt, params) = match (state.config.lora, &state.config.init_from) {
            (Some(lora), Some(base)) => {
                let ckpt = crate::checkpoint::Checkpoint::open(base, None, DType::F32)?;
                let adapters = dir.join("adapter_model.safetensors");
                let params = Params::lora(
                    &ckpt.config,
                    ckpt.weights.as_ref(),
                    lora,
                    state.config.seed,
                    Some(&adapters),
                    device,
                )?;
                (ckpt, params)
            }
            (Some(_), None) => return Err(Error::input("a LoRA run needs its base (init_from)")),
            (None, _) => {
                let ckpt = crate::checkpoint::Checkpoint::open(dir, None, DType::F32)?;
                let params = Params::from_source(&ckpt.config, ckpt.weights.as_ref(), device)?;
                (ckpt, params)
            }
        };
        let objective = objective(&state.config, &ckpt.tokenizer, &ckpt.config)?;
        let tokenizer = dir.join("tokenizer.json");
        let tokenizer_json =
            std::fs::read_to_string(&tokenizer).map_err(|e| Error::file(tokenizer.display(), e))?;
        let mut trainer = Trainer::new(ckpt.config, params, objective, state.config)?;
        trainer
            .opt
            .load(&dir.join("optimizer.safetensors"), state.step, device)?;
        trainer.step = state.step;
        Ok(Self {
            trainer,
            out: out.to_path_buf(),
            tokenizer_json,
            saved: state.step,
        })
    }

    /// Trains until step `stop_after` (default: the planned total) or until `cancel` is
    /// raised; the state at the end is always saved as a checkpoint. A step whose loss or
    /// gradient is not finite stops the run with an error, after the last good state is saved.
    pub fn run(
        &mut self,
        stop_after: Option<u64>,
        cancel: &Cancel,
        on_step: &mut dyn FnMut(&StepMetrics),
    ) -> Result<()> {
        let out = self.out.clone();
        std::fs::create_dir_all(&out).map_err(|e| Error::file(out.display(), e))?;
        let last = stop_after
            .unwrap_or(self.trainer.config.steps)
            .min(self.trainer.config.steps);
        let metrics_path = out.join("metrics.jsonl");
        while self.trainer.step < last && !cancel.is_cancelled() {
            let mut m = match self.trainer.step() {
                Ok(m) => m,
                Err(e) => {
                    if self.saved < self.trainer.step {
                        self.save()?;
                    }
                    return Err(e);
                }
            };
            let c = &self.trainer.config;
            if (c.eval_every > 0 && m.step % c.eval_every == 0) || m.step == last {
                m.eval_loss = Some(self.trainer.eval_loss()?);
            }
            let save_every = self.trainer.config.save_every;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| Error::file(metrics_path.display(), e))?;
            // One write per line: a kill leaves whole lines and at most one partial.
            let line = serde_json::to_string(&m).map_err(Error::input)? + "\n";
            f.write_all(line.as_bytes())
                .map_err(|e| Error::file(metrics_path.display(), e))?;
            on_step(&m);
            if save_every > 0 && m.step % save_every == 0 {
                self.save()?;
            }
        }
        if self.saved < self.trainer.step || !checkpoint::exists(&out)? {
            self.save()
        } else {
            // Saving prunes; a resumed run with nothing left to save may still hold what a
            // kill between a commit and its pruning left behind.
            checkpoint::prune(&out)
        }
    }

    /// Writes a checkpoint of the current step (see [`checkpoint`]): the model folder and
    /// the state a resume needs. Weights that are not all finite are refused.
    pub fn save(&mut self) -> Result<()> {
        let t = &self.trainer;
        let mut ckpt = CheckpointWriter::new(&self.out, t.step)?;
        let config = serde_json::to_string_pretty(&t.model_cfg.to_hf_json()).unwrap_or_default();
        ckpt.write("config.json", config.as_bytes())?;
        ckpt.write("tokenizer.json", self.tokenizer_json.as_bytes())?;
        match t.params.lora_config() {
            // Streamed to the file: a full model's weights are not held twice.
            None => {
                save_tensors(&t.finite_trainable()?, &ckpt.path("model.safetensors"))?;
                ckpt.added("model.safetensors")?;
            }
            Some(_) => {
                for (name, bytes) in t.adapter_files()? {
                    ckpt.write(&name, &bytes)?;
                }
                if t.config.merge {
                    let merged = t.params.merged(&t.model_cfg)?;
                    save_tensors(&merged, &ckpt.path("model.safetensors"))?;
                    ckpt.added("model.safetensors")?;
                }
            }
        }
        t.opt.save(&ckpt.path("optimizer.safetensors"))?;
        ckpt.added("optimizer.safetensors")?;
        ckpt.commit(&t.config)?;
        self.saved = t.step;
        Ok(())
    }
}
